"""The run queue: template runs wait in the store and start when a slot (and a GPU) is free.

``medzone run`` and the portal *enqueue* a run (:func:`enqueue`: the runner's checks and
run folder, then a ``queued`` row with what the run needs and which executor runs it).
What starts it is a **worker** (:class:`Worker`: ``medzone worker``, or the one the hub
starts as a managed service), which every ``RunQueue.poll_interval`` seconds, and at once
when a run is enqueued on this machine or a run it started ends (:meth:`Worker.wait`),

1. looks after what is under way (:func:`recover`): a ``running`` run whose process is gone
   is marked failed with the reason; a queued run claimed by a process that died before
   starting it goes back to the queue; a run past its time limit is stopped;
2. picks what starts now (:func:`schedule`, a pure function of the store's rows): at most
   ``RunQueue.slots`` runs at once, at most ``RunQueue.per_user_limit`` of one user's,
   users served **round-robin** (the user served least recently goes first, so one user's
   50 runs do not starve another's one), and a run whose template *requires* a GPU waits
   until the executor has one free (other runs go ahead of it meanwhile);
3. claims each pick in the store (one atomic update: no two processes start the same run)
   and submits it to the executor (:mod:`medzone_hub.executors`; ``local`` by default).

Everything lives in the store, so a worker killed at any step loses nothing: queued runs
stay queued; a run the local executor started keeps running in its own process (and its
sandbox) and is counted again by the next worker (re-attached); a run whose process died
is marked failed with the reason.

Without a worker, ``medzone run`` (and the portal) still work: they wait until the same
:func:`schedule` gives their run a slot, then claim and execute it themselves
(:func:`run_here`), so a zone with nothing else started runs templates as before. (They do
not wait behind other queued runs then: nobody would start those; detached runs wait for
a worker.)

What a run needs comes from its template's notebook metadata,
``metadata["medzone"]["needs"]`` = ``{"gpu": "none"|"optional"|"required", "cpus": N,
"memory_bytes": N, "time_limit_s": N}`` (:func:`template_needs`), capped by the zone's
``RunQueue.max_*`` settings; ``-p`` parameters cannot change it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from select import POLLIN, poll as fd_poll  # sqlalchemy's select is the query
from typing import Any

from sqlalchemy import func, select, update
from traitlets import Bool, Float, Integer, Unicode
from traitlets.config import Configurable

from . import audit, runner
from .config import MedZoneHome
from .errors import Conflict, InvalidInput, MedZoneError, NotFound, RuleViolation
from .executors import DEFAULT_EXECUTOR, Executor, get_executor
from .executors.local import run_config
from .models import Run, User, as_utc, utcnow
from .sandbox import SandboxConfig, proc_start_time
from .sessions import policy_for

log = logging.getLogger(__name__)

#: What a run may say it needs of its GPU.
GPU_NEEDS = ("none", "optional", "required")

#: The queue's own files under ``MEDZONE_HOME`` (the worker's lock).
QUEUE_DIR = "run-queue"
WORKER_LOCK = "worker.lock"
#: The worker's wake-up FIFO: a byte written to it makes the worker look at the queue now.
WAKE_FIFO = "wake"

#: Why a run stopped at its time limit (``{seconds}`` filled in).
TIME_LIMIT_REACHED = "stopped: its time limit of {seconds} s was reached"
#: Why a run the worker was executing stopped when the worker was stopped in order.
WORKER_STOPPED = "stopped: the worker running it was stopped before it finished; run it again"


class RunQueue(Configurable):
    """How the zone queues template runs (``c.RunQueue.…`` in the hub's config file)."""

    executor = Unicode(DEFAULT_EXECUTOR, help=(
        "The executor that runs queued template runs: 'local' (on this machine, in the "
        "users' bubblewrap sandboxes) or 'slurm' (each run an sbatch job)."),
    ).tag(config=True)
    slots = Integer(2, min=1, help=(
        "How many template runs execute at once, all users together.")).tag(config=True)
    per_user_limit = Integer(0, min=0, help=(
        "How many of one user's template runs may execute at once; 0 (the default): no cap "
        "beyond the slots. Users take turns either way: a freed slot goes to the waiting "
        "user served least recently, so one user's 50 runs delay another's one by at most "
        "one run; a cap leaves slots idle while only one user has runs waiting."
        )).tag(config=True)
    max_cpus = Integer(4, min=1, help=(
        "The most CPUs a template may declare it needs (metadata medzone.needs.cpus); "
        "more is capped to this.")).tag(config=True)
    max_memory_bytes = Integer(8 << 30, min=1 << 20, help=(
        "The most memory a template may declare it needs (medzone.needs.memory_bytes); "
        "more is capped to this.")).tag(config=True)
    max_time_limit_s = Integer(24 * 3600, min=1, help=(
        "The longest time limit a template may declare (medzone.needs.time_limit_s); "
        "more is capped to this. A run past its limit is stopped.")).tag(config=True)
    default_cpus = Integer(1, min=1, help="CPUs a run needs when its template does not say."
                           ).tag(config=True)
    default_memory_bytes = Integer(2 << 30, min=1 << 20, help=(
        "Memory a run needs when its template does not say.")).tag(config=True)
    default_time_limit_s = Integer(4 * 3600, min=1, help=(
        "A run's time limit when its template does not say.")).tag(config=True)
    poll_interval = Float(0.2, min=0.01, help=(
        "Seconds between the worker's (and a waiting `medzone run`'s) looks at the queue. "
        "The worker also looks at once when a run is enqueued on this machine or a run it "
        "started ends; the poll finds what those miss (runs enqueued elsewhere, re-attached "
        "runs ending, time limits, other executors' jobs)."),
    ).tag(config=True)
    start_worker = Bool(True, help=(
        "Start the queue's worker (`medzone worker`) as a hub-managed service. Without a "
        "worker, `medzone run` and the portal execute their own runs in turn.")
    ).tag(config=True)


def queue_settings(config=None) -> RunQueue:
    """The ``RunQueue`` section of the hub's config (a traitlets ``Config``); defaults else."""
    return RunQueue(config=config) if config is not None else RunQueue()


# --- what a run needs -----------------------------------------------------------------

def template_needs(path: str | os.PathLike) -> dict[str, Any]:
    """What the template at *path* declares it needs (``metadata.medzone.needs``), checked;
    ``{}`` when it declares nothing. :class:`InvalidInput` for a malformed declaration."""
    try:
        nb = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise InvalidInput(f"cannot read template {path}: {err}") from None
    meta = nb.get("metadata", {}) if isinstance(nb, dict) else {}
    declared = (meta.get("medzone") or {}).get("needs") if isinstance(meta, dict) else None
    if declared is None:
        return {}
    if not isinstance(declared, dict):
        raise InvalidInput(f"template {Path(path).stem}: metadata medzone.needs is not an object")
    needs: dict[str, Any] = {}
    for key, value in declared.items():
        if key == "gpu":
            if value not in GPU_NEEDS:
                raise InvalidInput(f"template {Path(path).stem}: needs.gpu is {value!r}, not "
                                   f"one of {', '.join(GPU_NEEDS)}")
            needs[key] = value
        elif key in ("cpus", "memory_bytes", "time_limit_s"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"template {Path(path).stem}: needs.{key} must be a "
                                   f"positive whole number, not {value!r}")
            needs[key] = value
        else:
            raise InvalidInput(f"template {Path(path).stem}: unknown need {key!r} (needs: "
                               "gpu, cpus, memory_bytes, time_limit_s)")
    return needs


def run_needs(declared: dict[str, Any], settings: RunQueue) -> dict[str, Any]:
    """*declared* needs with the zone's defaults filled in and its maximums applied."""
    return {
        "gpu": declared.get("gpu", "none"),
        "cpus": min(declared.get("cpus", settings.default_cpus), settings.max_cpus),
        "memory_bytes": min(declared.get("memory_bytes", settings.default_memory_bytes),
                            settings.max_memory_bytes),
        "time_limit_s": min(declared.get("time_limit_s", settings.default_time_limit_s),
                            settings.max_time_limit_s),
    }


# --- enqueue -----------------------------------------------------------------------------

def enqueue(home: MedZoneHome, store, user: str, template: str,
            parameters: Sequence[tuple[str, str]] = (), *, settings: RunQueue | None = None,
            config: SandboxConfig | None = None, templates_dir=None,
            now: datetime | None = None) -> Run:
    """Check and queue a run of *template* as *user* (:func:`medzone_hub.runner.prepare_run`)
    with the template's needs, capped by *settings*. A template that requires a GPU is
    refused for a user who may not have one. Returns the ``queued`` row."""
    settings = settings or queue_settings()
    path = runner.find_template(template, templates_dir)
    needs = run_needs(template_needs(path), settings)
    if needs["gpu"] == "required":
        with store.session() as session:
            policy = policy_for(home, session, user, config=config, now=now)
        if not policy.gpu_allowed:
            raise RuleViolation(f"template {path.stem} requires a GPU and user {user!r} may "
                                "not use one (ask for the GPU role)")
    run = runner.prepare_run(home, store, user, str(path), parameters,
                             templates_dir=templates_dir, config=config, now=now,
                             needs=needs, executor=settings.executor)
    notify_worker(home)
    return run


# --- scheduling (pure) -------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """A run as the scheduler sees it."""

    id: int
    user: str
    gpu: str = "none"
    queued_at: float = 0.0


def schedule(queued: Sequence[Entry], active: Sequence[Entry], *, slots: int,
             per_user: int, free_gpus: int | None,
             last_served: dict[str, float] | None = None) -> list[int]:
    """Which *queued* runs start now, in order, given the *active* ones (claimed or running).

    At most *slots* runs are active and at most *per_user* of one user's (0: no cap).
    Users take turns: the user served least recently (*last_served*: when each user's last
    run was claimed; never comes first) starts their oldest run, then goes to the back of the line. A run
    that requires a GPU is passed over while *free_gpus* is 0 (``None``: the executor
    waits for GPUs itself); the user's next run may go instead."""
    last_served = last_served or {}
    free = slots - len(active)
    per: dict[str, int] = {}
    for entry in active:
        per[entry.user] = per.get(entry.user, 0) + 1
    lines: dict[str, list[Entry]] = {}
    for entry in sorted(queued, key=lambda e: (e.queued_at, e.id)):
        lines.setdefault(entry.user, []).append(entry)
    order = sorted(lines, key=lambda u: (u in last_served, last_served.get(u, 0.0),
                                         lines[u][0].queued_at, lines[u][0].id))
    picks: list[int] = []
    while free > 0:
        for user in order:
            if per_user and per.get(user, 0) >= per_user:
                continue
            entry = next((e for e in lines[user] if not (
                e.gpu == "required" and free_gpus is not None and free_gpus <= 0)), None)
            if entry is None:
                continue
            lines[user].remove(entry)
            picks.append(entry.id)
            per[user] = per.get(user, 0) + 1
            free -= 1
            if entry.gpu == "required" and free_gpus is not None:
                free_gpus -= 1
            order.remove(user)
            if lines[user]:
                order.append(user)
            break
        else:
            break
    return picks


def positions(queued: Sequence[Entry], last_served: dict[str, float] | None = None
              ) -> dict[int, int]:
    """Each queued run's place in line (1 = next), were every slot free in turn."""
    order = schedule(queued, [], slots=len(queued), per_user=len(queued) or 1,
                     free_gpus=None, last_served=last_served)
    return {run_id: i + 1 for i, run_id in enumerate(order)}


def _stamp(value: datetime | None) -> float:
    if value is None:
        return 0.0
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def _entry(run: Run) -> Entry:
    needs = run.needs if isinstance(run.needs, dict) else {}
    return Entry(run.id, run.user.name, needs.get("gpu", "none"),
                 _stamp(run.queued_at or run.created_at))


@dataclass
class QueueView:
    """The store's queue at one moment."""

    waiting: list[Entry]  # queued, not claimed
    active: list[Entry]  # claimed or running
    last_served: dict[str, float]
    gpu_pending: int  # active GPU runs whose sandbox has not started yet


def queue_view(session) -> QueueView:
    """The queue as :func:`schedule` needs it."""
    rows = list(session.scalars(select(Run).where(Run.state.in_(("queued", "running")))))
    waiting = [_entry(r) for r in rows if r.state == "queued" and r.executor_job is None]
    active_rows = [r for r in rows if not (r.state == "queued" and r.executor_job is None)]
    served = session.execute(select(User.name, func.max(Run.claimed_at)).join(Run.user)
                             .where(Run.claimed_at.is_not(None)).group_by(User.name))
    pending = sum(1 for r in active_rows if r.sandbox_pid is None and isinstance(r.needs, dict)
                  and r.needs.get("gpu_given"))
    return QueueView(waiting, [_entry(r) for r in active_rows],
                     {name: _stamp(at) for name, at in served}, pending)


def queue_positions(session) -> dict[int, int]:
    """Queued, unclaimed runs' places in line (1 = next)."""
    view = queue_view(session)
    return positions(view.waiting, view.last_served)


# --- claiming, and looking after what is under way ------------------------------------------

def process_marker(pid: int | None = None) -> str:
    """``local:<pid>:<start time>``: a job id naming a live process on this machine."""
    pid = pid or os.getpid()
    return f"local:{pid}:{proc_start_time(pid)}"


def marker_alive(marker: str | None) -> bool | None:
    """Whether the process a ``local:`` marker names still runs; ``None`` for other jobs."""
    if not marker or not marker.startswith("local:"):
        return None
    try:
        _, pid, start = marker.split(":")
        return proc_start_time(int(pid)) == int(start)
    except ValueError:
        return False


def claim(store, run_id: int, job: str, *, gpu_given: bool | None = None) -> bool:
    """Take queued run *run_id* for *job* (one atomic update); ``False`` if it was not
    queued and unclaimed any more."""
    with store.session() as session:
        done = session.execute(
            update(Run).where(Run.id == run_id, Run.state == "queued",
                              Run.executor_job.is_(None))
            .values(executor_job=job, claimed_at=utcnow()))
        if done.rowcount != 1:
            return False
        if gpu_given is not None:
            run = session.get(Run, run_id)
            run.needs = {**(run.needs or {}), "gpu_given": bool(gpu_given)}
    return True


def set_job(store, run_id: int, job: str) -> None:
    with store.session() as session:
        session.execute(update(Run).where(Run.id == run_id).values(executor_job=job))


def recover(store, executors: dict[str, Executor] | None = None) -> dict[str, list[int]]:
    """Look after runs under way (see the module docstring): returns the ids of runs
    ``requeued`` (claimed by a process that died before starting them), ``failed`` (their
    process or job is gone) and ``timed_out`` (stopped at their time limit)."""
    found: dict[str, list[int]] = {"requeued": [], "failed": [], "timed_out": []}
    # Other executors are asked about their jobs first, outside the transaction below (a
    # Slurm query takes a while; a SQLite store is locked while a session writes).
    polled: dict[int, tuple[str, str | None]] = {}
    if executors:
        with store.session() as session:
            jobs = list(session.scalars(select(Run).where(
                Run.state.in_(("queued", "running")), Run.executor_job.is_not(None))))
        for run in jobs:
            if run.executor in executors and marker_alive(run.executor_job) is None:
                polled[run.id] = (run.executor_job, executors[run.executor].poll(run))

    def poll(run) -> str | None:
        job, seen = polled.get(run.id, (None, "running"))
        return seen if job == run.executor_job else "running"  # changed since: next time

    now = utcnow()
    with store.session() as session:
        rows = list(session.scalars(select(Run).where(Run.state.in_(("queued", "running")))
                                    .with_for_update()))
        for run in rows:
            if run.state == "queued" and run.executor_job:
                alive = marker_alive(run.executor_job)
                if alive is False:
                    run.executor_job, run.claimed_at = None, None
                    found["requeued"].append(run.id)
                elif alive is None and executors and run.executor in executors:
                    seen = poll(run)
                    if seen in (None, "done", "failed"):
                        run.state, run.finished_at = "failed", now
                        run.error = (f"the {run.executor} job {run.executor_job} ended before "
                                     "the run started" if seen else
                                     f"the {run.executor} job {run.executor_job} is gone")
                        found["failed"].append(run.id)
            elif run.state == "running":
                before = run.state
                runner.check_alive(session, run)
                if run.state != before:
                    found["failed"].append(run.id)
                    continue
                job = run.executor_job
                if executors and run.executor in executors and job and marker_alive(job) is None:
                    seen = poll(run)
                    if seen in (None, "done", "failed"):
                        # Its job ended without the run recording an outcome (killed, its
                        # node lost): the executor's word on the job is the reason.
                        why = getattr(executors[run.executor], "reason", lambda _run: None)(run)
                        run.state, run.finished_at = "failed", now
                        run.error = (f"{why or f'the {run.executor} job {job} is gone'}: the "
                                     "run stopped before it finished")
                        run.runner_pid = run.runner_start = None
                        run.sandbox_pid = run.sandbox_start = None
                        found["failed"].append(run.id)
                        continue
                limit = (run.needs or {}).get("time_limit_s") if isinstance(run.needs, dict) \
                    else None
                if limit and run.started_at and now - as_utc(run.started_at) > \
                        timedelta(seconds=limit):
                    stop_run(session, run, TIME_LIMIT_REACHED.format(seconds=limit),
                             actor="medzone:queue", executors=executors)
                    found["timed_out"].append(run.id)
    return found


def stop_run(session, run: Run, reason: str, *, actor: str,
             executors: dict[str, Executor] | None = None) -> None:
    """Stop *run* (queued or running) for *reason*: recorded ``cancelled`` with the reason
    (the runner's record of the run says so too) and audited ``run.cancel``."""
    killed = False
    if runner.process_alive(run.sandbox_pid, run.sandbox_start):
        runner.kill_process(run.sandbox_pid)
        killed = True
    elif executors and run.executor in executors and run.executor_job and \
            marker_alive(run.executor_job) is None:
        executors[run.executor].cancel(run)
    run.state, run.error, run.finished_at = "cancelled", reason, utcnow()
    audit.append(session, actor=actor, action="run.cancel", subject=f"template:{run.template}",
                 detail={"run": run.id, "user": run.user.name, "output": run.output,
                         "sandbox_killed": killed, "reason": reason})


def cancel(home: MedZoneHome, store, run_id: int, by: str, *,
           executors: dict[str, Executor] | None = None, hub_config=None) -> Run:
    """Cancel run *run_id* for *by* (:func:`medzone_hub.runner.cancel_run`: its owner, an
    admin or the operator); a run submitted to another executor (a Slurm job) is
    cancelled there too."""
    with store.session() as session:
        run = runner.cancel_run(session, run_id, by)
        job, executor = run.executor_job, run.executor
    if job and marker_alive(job) is None and executor != "local":
        chosen = (executors or {}).get(executor)
        if chosen is None:
            with contextlib.suppress(MedZoneError):
                chosen = get_executor(executor, config=hub_config)
        if chosen is not None:
            chosen.cancel(run)
    return run


# --- the worker --------------------------------------------------------------------------

def worker_lock_path(home: MedZoneHome) -> Path:
    return home.root / QUEUE_DIR / WORKER_LOCK


def worker_pid(home: MedZoneHome) -> int | None:
    """The pid of the zone's running worker, or ``None`` when none runs."""
    path = worker_lock_path(home)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def wake_path(home: MedZoneHome) -> Path:
    return home.root / QUEUE_DIR / WAKE_FIFO


def notify_worker(home: MedZoneHome) -> bool:
    """Wake the zone's worker, if one runs on this machine, so it looks at the queue now
    rather than at its next poll. Never blocks; ``False`` when no worker was woken (none
    runs, or this process may not write its FIFO): its poll finds the run then."""
    try:
        fd = os.open(wake_path(home),
                     os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:  # ENXIO: no worker reads it; ENOENT: none ever ran; EACCES: not ours
        return False
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        with contextlib.suppress(BlockingIOError):  # full: the worker has a wake-up waiting
            os.write(fd, b"\0")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _open_wake_fifo(home: MedZoneHome) -> int:
    """The worker's end of its wake-up FIFO (made if missing), open for reading without
    blocking (and for writing, so it never reads end-of-file when no one else has it)."""
    path = wake_path(home)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISFIFO(os.lstat(path).st_mode):
            path.unlink()
    with contextlib.suppress(FileExistsError):
        os.mkfifo(path, 0o600)
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)


def _tell_home(executor: Executor, home: MedZoneHome) -> None:
    if getattr(executor, "home", False) is None:
        executor.home = home  # the local executor finds the zone's GPU registry there


def free_gpu_count(view: QueueView, executor: Executor) -> int | None:
    free = executor.free_gpus()
    return None if free is None else max(0, free - view.gpu_pending)


class Worker:
    """Starts queued runs as slots allow (module docstring). One per zone: it holds
    :func:`worker_lock_path` while it runs."""

    def __init__(self, home: MedZoneHome, store, *, settings: RunQueue | None = None,
                 config: SandboxConfig | None = None, executor: Executor | None = None,
                 hub_config=None):
        self.home, self.store = home, store
        self.settings = settings or queue_settings(hub_config)
        self.config = config
        self.executor = executor or get_executor(self.settings.executor, config=hub_config,
                                                 sandbox_config=config)
        _tell_home(self.executor, home)
        self.lock_fd: int | None = None
        self.wake_fd: int | None = None
        self.stopping = False

    def lock(self) -> None:
        path = worker_lock_path(self.home)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise Conflict(f"a worker already runs for this zone (pid {text or '?'})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.lock_fd = fd
        if hasattr(self.executor, "lock_fd"):
            self.executor.lock_fd = fd
        try:
            self.wake_fd = _open_wake_fifo(self.home)
        except OSError as err:  # it polls only
            log.warning("queue: no wake-up FIFO at %s (%s): polling only", wake_path(self.home),
                        err.strerror)
        if hasattr(self.executor, "wake_fd"):
            self.executor.wake_fd = self.wake_fd

    def unlock(self) -> None:
        if self.wake_fd is not None:
            os.close(self.wake_fd)
            self.wake_fd = None
            if hasattr(self.executor, "wake_fd"):
                self.executor.wake_fd = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def wait(self, timeout: float, *, wake: bool = True) -> bool:
        """Wait up to *timeout* seconds for a reason to look at the queue again: a run
        enqueued on this machine (:func:`notify_worker`) or a run the executor started
        ended (:meth:`Executor.wake_fds`). Whether one came before the timeout."""
        fds = [self.wake_fd] if wake and self.wake_fd is not None else []
        if wake:
            fds += getattr(self.executor, "wake_fds", list)()
        if not fds:
            time.sleep(timeout)
            return False
        poller = fd_poll()
        for fd in fds:
            poller.register(fd, POLLIN)
        ready = poller.poll(max(0, int(timeout * 1000)))
        if self.wake_fd is not None and any(fd == self.wake_fd for fd, _ in ready):
            with contextlib.suppress(BlockingIOError):
                while os.read(self.wake_fd, 4096):
                    pass
        return bool(ready)

    def step(self) -> list[int]:
        """One look at the queue: recover, schedule, claim and submit. The runs submitted."""
        executors = {self.executor.name: self.executor}
        recover(self.store, executors)
        reap = getattr(self.executor, "reap", None)
        if reap:
            reap()
        with self.store.session() as session:
            view = queue_view(session)
        slots = self.settings.slots
        if self.executor.slots() is not None:
            slots = min(slots, self.executor.slots())
        free_gpus = free_gpu_count(view, self.executor)
        picks = schedule(view.waiting, view.active, slots=slots,
                         per_user=self.settings.per_user_limit, free_gpus=free_gpus,
                         last_served=view.last_served)
        needs = {e.id: e.gpu for e in view.waiting}
        submitted = []
        for run_id in picks:
            gpu = needs[run_id]
            given = gpu == "required" or (gpu == "optional" and (free_gpus is None
                                                                 or free_gpus > 0))
            if gpu == "optional" and given and free_gpus is not None:
                free_gpus -= 1
            if not claim(self.store, run_id, process_marker(), gpu_given=given):
                continue
            try:
                job = self.executor.submit(self.home, self.store, run_id)
            except MedZoneError as err:
                with self.store.session() as session:
                    run = session.get(Run, run_id)
                    if run.state == "queued":
                        run.state, run.error, run.finished_at = "failed", str(err), utcnow()
                log.warning("run %s: %s", run_id, err)
                continue
            set_job(self.store, run_id, job)
            submitted.append(run_id)
            log.info("run %s started (%s job %s)", run_id, self.executor.name, job)
        return submitted

    def run(self, *, until: Callable[[], bool] | None = None) -> None:
        """Work until stopped (SIGTERM/SIGINT) or *until* says so."""
        self.lock()
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self.stopping and not (until and until()):
                failed = False
                try:
                    self.step()
                except MedZoneError as err:
                    log.warning("queue: %s", err)
                    failed = True  # no wake-ups until the next poll: no busy loop
                self.wait(self.settings.poll_interval, wake=not failed)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            stop = getattr(self.executor, "stop_all", None)
            if stop and self.stopping:
                stop(self.store, WORKER_STOPPED)
            self.executor.close()
            self.unlock()

    def _stop(self, signum, frame) -> None:
        self.stopping = True


# --- running one's own run: `medzone run` and the portal without a worker ----------------

def run_here(home: MedZoneHome, store, run_id: int, *, settings: RunQueue | None = None,
             config: SandboxConfig | None = None, executor: Executor | None = None,
             hub_config=None, on_wait: Callable[[dict[str, Any]], None] | None = None):
    """Wait for queued run *run_id*'s turn (the same :func:`schedule` as the worker's) and
    execute it in this process (:func:`medzone_hub.runner.execute_run`: the sandbox is
    attached to this process's stdout and stderr). Returns its
    :class:`~medzone_hub.runner.RunResult`, or ``None`` when a worker took the run (wait
    for it with :func:`wait`). *on_wait* gets ``{"state": "queued", "position": N}`` while
    the run waits."""
    settings = settings or queue_settings(hub_config)
    # This process executes the run itself, on this machine: the local executor's view.
    executor = executor or get_executor(settings.executor, config=hub_config,
                                        sandbox_config=config)
    _tell_home(executor, home)
    last = None
    while True:
        recover(store, {executor.name: executor})
        with store.session() as session:
            run = session.get(Run, run_id)
            if run is None:
                raise NotFound(f"no run {run_id}")
            if run.state != "queued" or run.executor_job is not None:
                return None
            needs = dict(run.needs or {})
            view = queue_view(session)
        if worker_pid(home) is not None:
            return None  # the worker starts it in turn
        free_gpus = free_gpu_count(view, executor)
        slots = settings.slots if executor.slots() is None else min(settings.slots,
                                                                   executor.slots())
        # No worker: nobody starts the other queued runs (detached ones wait for a worker),
        # so this run waits for a free slot (and GPU), not behind them.
        own = [e for e in view.waiting if e.id == run_id]
        picks = schedule(own, view.active, slots=slots, per_user=settings.per_user_limit,
                         free_gpus=free_gpus, last_served=view.last_served)
        if run_id in picks:
            gpu = needs.get("gpu", "none")
            given = gpu == "required" or (gpu == "optional" and (free_gpus is None
                                                                 or free_gpus > 0))
            if not claim(store, run_id, process_marker(), gpu_given=given):
                continue
            if executor.name != "local":  # e.g. Slurm: submit it, then wait like for a worker
                set_job(store, run_id, executor.submit(home, store, run_id))
                return None
            return runner.execute_run(home, store, run_id,
                                      config=run_config(config, {**needs, "gpu_given": given}))
        place = positions(view.waiting, view.last_served).get(run_id)
        if on_wait and place != last:
            on_wait({"state": "queued", "position": place})
            last = place
        time.sleep(settings.poll_interval)


def wait_started(store, run_id: int, *, settings: RunQueue | None = None,
                 timeout: float = 10.0, home: MedZoneHome | None = None) -> str:
    """Wait, at most *timeout* seconds, while queued run *run_id* is about to start (claimed,
    or due a slot now); return at once when it waits its turn behind others, or when no
    worker runs for zone *home* (given). Its state then (what a page shows right after a
    run was asked for)."""
    settings = settings or queue_settings()
    deadline = time.monotonic() + timeout
    while True:
        with store.session() as session:
            run = session.get(Run, run_id)
            if run is None:
                raise NotFound(f"no run {run_id}")
            state, claimed = run.state, run.executor_job is not None
            view = queue_view(session) if not claimed else None
        if state != "queued" or time.monotonic() > deadline:
            return state
        if not claimed and home is not None and worker_pid(home) is None:
            return state
        if view is not None and run_id not in schedule(
                view.waiting, view.active, slots=settings.slots,
                per_user=settings.per_user_limit, free_gpus=None,
                last_served=view.last_served):
            return state
        time.sleep(0.05)


def wait(home: MedZoneHome, store, run_id: int, *, poll_interval: float = 0.2,
         on_progress: Callable[[dict[str, Any]], None] | None = None) -> Run:
    """Wait until run *run_id* ends; its final row. *on_progress* gets the run's state,
    place in line (queued) and cells (running) whenever they change."""
    last = None
    while True:
        with store.session() as session:
            run = runner.get_run(session, run_id)
            state = run.state
            place = queue_positions(session).get(run_id) if state == "queued" else None
        if state in runner.ENDED:
            return run
        info: dict[str, Any] = {"state": state, "position": place}
        if state == "running":
            progress = runner.run_progress(home, run)
            info.update(cells_done=progress["cells_done"], cells_total=progress["cells_total"],
                        current_cell=progress["current_cell"])
        if on_progress and info != last:
            on_progress(info)
            last = info
        time.sleep(poll_interval)


def describe(home: MedZoneHome, session, runs: Iterable[Run]) -> list[dict[str, Any]]:
    """Runs as the faces show them: :func:`medzone_hub.runner.run_summary` plus the place
    in line of a queued run (``position``) and the cells of a running one (``cells``:
    ``"i/n"``, the cell executing of the code cells)."""
    places = queue_positions(session)
    shown = []
    for run in runs:
        info = runner.run_summary(run)
        info.update(executor=run.executor, executor_job=run.executor_job, needs=run.needs,
                    queued=_iso(run.queued_at), position=places.get(run.id), cells=None)
        if run.state == "running":
            progress = runner.run_progress(home, run)
            if progress["cells_total"]:
                at = progress["current_cell"] or progress["cells_done"]
                info["cells"] = f"{at}/{progress['cells_total']}"
        shown.append(info)
    return shown


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def outcome(home: MedZoneHome, run: Run):
    """What ``medzone run`` reports of an ended run, as when it executed it itself: the
    :class:`~medzone_hub.runner.RunResult` of a done run; :class:`RunFailed` otherwise."""
    notebook = runner.home_path(home, run)
    if run.state == "done":
        return notebook
    written = notebook.is_file()
    kept = f"; partial notebook kept at {notebook}" if written else ""
    what = run.error if run.state == "cancelled" else f"failed: {run.error}"
    raise runner.RunFailed(f"run of {run.template} {what}{kept}", notebook if written else None)


__all__ = ["Entry", "GPU_NEEDS", "QueueView", "RunQueue", "Worker", "cancel", "claim",
           "describe", "enqueue", "notify_worker", "outcome", "positions", "queue_positions", "queue_settings",
           "queue_view", "recover", "run_here", "run_needs", "schedule",
           "stop_run", "template_needs", "wait", "wait_started", "worker_pid"]
