"""The local executor: each run in its own process on this machine, in the user's sandbox.

:meth:`LocalExecutor.submit` forks the worker: the child leaves the worker's session and
runs :func:`medzone_hub.runner.execute_run` (bubblewrap, the user's policy, its GPU if it
was given one), records the outcome in the store and exits. The job id is
``local:<pid>:<start time>`` (the start time tells a reused pid from the run's process).

The child outlives its worker: a worker killed with SIGKILL leaves its runs executing, and
the next worker counts them against the slots again (re-attached) while the store says
``running`` and their process lives. Stopped in order (SIGTERM), the worker stops its runs
(:meth:`LocalExecutor.stop_all`), so nothing outlives the hub that started it.

The worker waits on :meth:`wake_fds` (a pidfd per run's process, readable when it exits),
so a slot a run frees is given to the next run at once, not at the worker's next poll.

GPUs: :meth:`free_gpus` is what the zone's GPU registry has room for on the GPUs this
machine has (interactive servers hold theirs there too); ``None`` when GPUs are switched
off for sandboxes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal

from .. import runner
from ..models import Run, utcnow
from ..sandbox import GpuRegistry, SandboxConfig, detect_gpus, proc_start_time
from ..sandbox.resources import GPU_REGISTRY_NAME
from . import Executor

log = logging.getLogger(__name__)


def run_config(config: SandboxConfig | None, needs: dict | None) -> SandboxConfig:
    """The sandbox settings of a run with *needs* (a GPU only if it was given one)."""
    # Kept here rather than imported from the run queue: the queue imports executors.
    config = config or SandboxConfig()
    needs = needs or {}
    changes = {}
    if not needs.get("gpu_given", needs.get("gpu", "none") != "none"):
        changes["gpu_enabled"] = False
    memory = needs.get("memory_bytes")
    if memory and (config.memory_limit_bytes is None or memory < config.memory_limit_bytes):
        changes["memory_limit_bytes"] = int(memory)
    cpus = needs.get("cpus")
    if cpus and (config.cpu_limit is None or cpus < config.cpu_limit):
        changes["cpu_limit"] = float(cpus)
    return dataclasses.replace(config, **changes) if changes else config


class LocalExecutor(Executor):
    """Runs on this machine, one forked process per run."""

    name = "local"

    def __init__(self, *, config=None, sandbox_config: SandboxConfig | None = None,
                 gpus=None, registry: GpuRegistry | None = None, home=None):
        self.hub_config = config
        self.home = home  # the zone (its GPU registry); set by the first submit otherwise
        self.sandbox_config = sandbox_config or SandboxConfig()
        self.gpus = gpus  # None: detect them when asked
        self.registry = registry
        self.children: dict[int, int] = {}  # pid -> run id
        self.pidfds: dict[int, int] = {}  # pid -> pidfd (readable once the process exited)
        #: Descriptors the children must not keep (the worker's lock, its wake-up FIFO).
        self.lock_fd: int | None = None
        self.wake_fd: int | None = None

    # --- the interface -----------------------------------------------------------------

    def submit(self, home, store, run_id: int) -> str:
        self.home = self.home or home
        with store.session() as session:
            run = session.get(Run, run_id)
            needs = dict(run.needs or {}) if run is not None else {}
        config = run_config(self.sandbox_config, needs)
        pid = os.fork()
        if pid == 0:  # the run's process
            code = 1
            try:
                os.setsid()
                for fd in (self.lock_fd, self.wake_fd, *self.pidfds.values()):
                    if fd is not None:
                        os.close(fd)
                store.engine.dispose(close=False)  # the parent's connections stay its own
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                runner.execute_run(home, store, run_id, config=config)
                code = 0
            except BaseException:  # noqa: BLE001 - recorded in the run's row
                code = 1
            finally:
                os._exit(code)
        self.children[pid] = run_id
        pidfd = _pidfd(pid)
        if pidfd is not None:
            self.pidfds[pid] = pidfd
        return f"local:{pid}:{proc_start_time(pid)}"

    def poll(self, run) -> str | None:
        job = run.executor_job or ""
        if not job.startswith("local:"):
            return None
        try:
            _, pid, start = job.split(":")
            alive = proc_start_time(int(pid)) == int(start)
        except ValueError:
            return None
        if alive:
            return "running" if run.state == "running" else "queued"
        if run.state in ("done", "failed"):
            return run.state
        return None

    def cancel(self, run) -> None:
        if runner.process_alive(run.sandbox_pid, run.sandbox_start):
            runner.kill_process(run.sandbox_pid)

    def free_gpus(self) -> int | None:
        config = self.sandbox_config
        if not config.gpu_enabled:
            return None
        gpus = detect_gpus() if self.gpus is None else list(self.gpus)
        if not gpus:
            return 0
        registry = self.registry
        if registry is None and self.home is not None:
            registry = GpuRegistry(self.home.sandbox_state_dir / GPU_REGISTRY_NAME)
        used = sum(registry.usage().values()) if registry is not None else 0
        return max(0, len(gpus) * config.gpu_sessions_per_gpu - used)

    def close(self) -> None:
        self.reap()
        for pid in list(self.pidfds):
            self._forget_fd(pid)

    def wake_fds(self) -> list[int]:
        return list(self.pidfds.values())

    # --- the worker's housekeeping -------------------------------------------------------

    def reap(self) -> None:
        """Collect the exit status of runs that ended (no zombies)."""
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                done, _status = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
            self.children.pop(pid, None)
            self._forget_fd(pid)

    def _forget_fd(self, pid: int) -> None:
        fd = self.pidfds.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def stop_all(self, store, reason: str) -> None:
        """Stop the runs this executor started that still execute, recording *reason*."""
        for pid, run_id in list(self.children.items()):
            with store.session() as session:
                run = session.get(Run, run_id, with_for_update=True)
                if run is not None and run.state in ("queued", "running"):
                    run.state, run.error, run.finished_at = "failed", reason, utcnow()
                    run.runner_pid = run.runner_start = None
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.children.pop(pid, None)
            self._forget_fd(pid)


def _pidfd(pid: int) -> int | None:
    """A descriptor readable once process *pid* exited (Linux 5.3+); ``None`` where the
    kernel has none (the worker's poll notices the run's end then)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
