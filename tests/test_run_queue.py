"""The run queue: runs wait in the store, a worker starts them (fair across users, within
the slots, GPU-aware), and nothing is lost when the worker is killed.

The scheduling decision is a pure function, tested on its own; everything else runs for
real: ``medzone run`` / ``medzone worker`` processes, papermill in the users' bubblewrap
sandboxes, SIGKILL of the worker and of a run's process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from medzone_hub import accounts, runner, runqueue
from medzone_hub.config import ENV_DB_URL, ENV_HOME
from medzone_hub.errors import Conflict, InvalidInput, RuleViolation
from medzone_hub.executors import Executor, executor_class, get_executor
from medzone_hub.executors.local import LocalExecutor
from medzone_hub.hubapp import DEFAULT_CONFIG
from medzone_hub.models import Run
from medzone_hub.runqueue import Entry, RunQueue, positions, schedule
from medzone_hub.sandbox import GpuDevice, GpuRegistry, SandboxConfig, proc_start_time

from .test_runner import PROBE
from .test_runner import zone  # noqa: F401 - alice (granted ds-a), bob


# --- the scheduling decision (pure) ----------------------------------------------------------

def _queue(spec: str) -> list[Entry]:
    """``"a1 a2 b1"``: entries in queue order, user = the letter."""
    return [Entry(i, name[0], "none", float(i)) for i, name in enumerate(spec.split(), 1)]


def test_round_robin_serves_every_user_in_turn():
    # alice queued five runs before bob's two and carol's one: they still take turns.
    queued = _queue("a1 a2 a3 a4 a5 b1 b2 c1")
    names = {e.id: e.user + str(e.id) for e in queued}
    first = schedule(queued, [], slots=2, per_user=1, free_gpus=None)
    assert [names[i] for i in first] == ["a1", "b6"]
    # Both slots busy: nothing starts.
    active = [e for e in queued if e.id in first]
    rest = [e for e in queued if e.id not in first]
    assert schedule(rest, active, slots=2, per_user=1, free_gpus=None) == []
    # One ends: carol, never served, goes before alice's second run.
    served = {"a": 1.0, "b": 2.0}
    nxt = schedule(rest, active[1:], slots=2, per_user=1, free_gpus=None, last_served=served)
    assert [names[i] for i in nxt] == ["c8"]
    # The whole line, were every slot free in turn: a, b, c, a, b, a, a, a.
    order = positions(queued)
    assert [names[i] for i in sorted(order, key=order.get)] == \
        ["a1", "b6", "c8", "a2", "b7", "a3", "a4", "a5"]


def test_the_per_user_limit_and_the_slots_hold():
    queued = _queue("a1 a2 a3 b1")
    assert schedule(queued, [], slots=4, per_user=2, free_gpus=None) == [1, 4, 2]
    assert schedule(queued, [], slots=1, per_user=2, free_gpus=None) == [1]


def test_a_run_that_needs_a_gpu_waits_for_one_and_others_go_ahead():
    queued = [Entry(1, "a", "required", 1.0), Entry(2, "a", "none", 2.0),
              Entry(3, "b", "required", 3.0), Entry(4, "c", "optional", 4.0)]
    # No GPU free: the GPU runs wait (not refused), the rest start.
    assert schedule(queued, [], slots=4, per_user=1, free_gpus=0) == [2, 4]
    # One GPU free: the first GPU run in turn takes it; the next one waits.
    assert schedule(queued, [], slots=4, per_user=1, free_gpus=1) == [1, 4]
    # An executor that queues GPU runs itself (Slurm): no waiting here.
    assert schedule(queued, [], slots=4, per_user=1, free_gpus=None) == [1, 3, 4]


# --- what a run needs ---------------------------------------------------------------------

def _template(folder: Path, name: str, source: str, needs: dict | None = None,
              params: str = 'note = ""') -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    if needs is not None:
        nb.metadata["medzone"] = {"needs": needs}
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(source)]
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, str(path))
    os.chmod(path, 0o644)
    return path


@pytest.fixture(scope="module")
def templates(zone):  # noqa: F811
    folder = zone.base / "queue-templates"
    folder.mkdir(exist_ok=True)
    os.chmod(folder, 0o755)
    return {
        "tiny": _template(folder, "tiny", "x = 1"),
        "wait": _template(folder, "wait", "import time\nwhile True:\n    time.sleep(0.2)"),
        "big": _template(folder, "big", "x = 1", {"gpu": "optional", "cpus": 64,
                                                  "memory_bytes": 1 << 40,
                                                  "time_limit_s": 10 ** 9},
                         params="cpus = 1\ngpu = 'none'"),
        "gpu": _template(folder, "gpu", "x = 1", {"gpu": "required"}),
        "bad": _template(folder, "bad", "x = 1", {"gpu": "lots"}),
        "short": _template(folder, "short", "import time\nwhile True:\n    time.sleep(0.2)",
                           {"time_limit_s": 1}),
    }


def test_needs_come_from_the_template_capped_by_the_zone(zone, templates):  # noqa: F811
    settings = RunQueue(max_cpus=2, max_memory_bytes=1 << 30, max_time_limit_s=600)
    run = runqueue.enqueue(zone.home, zone.store, "bob", str(templates["big"]),
                           [("cpus", "99"), ("gpu", "required")], settings=settings)
    # -p sets the notebook's parameters, never what the run may take.
    assert run.needs == {"gpu": "optional", "cpus": 2, "memory_bytes": 1 << 30,
                         "time_limit_s": 600}
    assert run.parameters == {"cpus": 99, "gpu": "required"}
    assert run.executor == "local" and run.executor_job is None and run.queued_at is not None
    with zone.store.session() as session:
        runner.cancel_run(session, run.id, "bob")
    with pytest.raises(InvalidInput, match="needs.gpu is 'lots'"):
        runqueue.enqueue(zone.home, zone.store, "bob", str(templates["bad"]))
    # A GPU run for someone without the GPU role is refused, not queued for ever.
    with pytest.raises(RuleViolation, match="requires a GPU"):
        runqueue.enqueue(zone.home, zone.store, "bob", str(templates["gpu"]))


def test_executors_by_name():
    assert executor_class("local") is LocalExecutor
    assert isinstance(get_executor("local"), Executor)
    with pytest.raises(InvalidInput, match="no executor 'nope'"):
        get_executor("nope")


# --- real runs: medzone run, medzone worker -----------------------------------------------------

def _env(zone) -> dict:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k not in (ENV_DB_URL, "MEDZONE_ACTOR")}
    env[ENV_HOME] = str(zone.home.root)
    return env


def _hub_config(zone, slots: int = 2, per_user: int = 1) -> Path:  # noqa: F811
    path = zone.base / f"queue_config_{slots}_{per_user}.py"
    path.write_text(f"c = get_config()  # noqa\nload_subconfig({str(DEFAULT_CONFIG)!r})\n"
                    f"c.RunQueue.slots = {slots}\nc.RunQueue.per_user_limit = {per_user}\n"
                    "c.RunQueue.poll_interval = 0.1\n")
    return path


def _cli(zone, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:  # noqa: F811
    return subprocess.run([sys.executable, "-m", "medzone_hub.cli", *args], env=_env(zone),
                          capture_output=True, text=True, timeout=timeout, cwd="/")


def _start(zone, *args: str) -> subprocess.Popen:  # noqa: F811
    return subprocess.Popen([sys.executable, "-m", "medzone_hub.cli", *args], env=_env(zone),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _row(zone, run_id: int) -> Run:  # noqa: F811
    with zone.store.session() as session:
        return runner.get_run(session, run_id)


def _until(what, timeout: float = 180, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(step)


def _detach(zone, user: str, template: Path, config: Path) -> int:  # noqa: F811
    done = _cli(zone, "run", str(template), "--user", user, "--detach", "--hub-config",
                str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().isdigit(), done.stdout
    return int(done.stdout)


def _clear_queue(zone):  # noqa: F811
    with zone.store.session() as session:
        for run in runner.list_runs(session):
            if run.state in ("queued", "running"):
                runner.cancel_run(session, run.id, "cli:test")


def test_detach_queues_and_a_worker_runs_it_while_run_waits(zone, templates):  # noqa: F811
    _clear_queue(zone)
    config = _hub_config(zone)
    run_id = _detach(zone, "bob", templates["tiny"], config)
    row = _row(zone, run_id)
    assert row.state == "queued" and row.executor_job is None
    listed = json.loads(_cli(zone, "runs", "list", "--state", "queued", "--json").stdout)
    assert [(r["id"], r["state"], r["position"]) for r in listed] == [(run_id, "queued", 1)]
    shown = _cli(zone, "runs", "show", str(run_id))
    assert "position in the queue: 1" in shown.stdout, shown.stdout

    worker = _start(zone, "worker", "--hub-config", str(config))
    try:
        _until(lambda: _row(zone, run_id).state == "done")
        # `medzone run` with a worker running: the worker executes it, the command waits,
        # prints progress on stderr and the notebook's path on stdout, as without one.
        waited = _cli(zone, "run", str(PROBE), "--user", "alice", "-p", "message", "queued",
                      "--hub-config", str(config))
    finally:
        _stop(worker)
    assert waited.returncode == 0, waited.stderr
    notebook = Path(waited.stdout.strip())
    assert notebook.is_file() and notebook.name == "runner_probe.ipynb"
    assert "cell " in waited.stderr and "Traceback" not in waited.stderr
    assert json.loads((notebook.parent / "probe.json").read_text())["params"]["message"] == \
        "queued"
    newest = json.loads(_cli(zone, "runs", "list", "--user", "alice", "--json").stdout)[0]
    assert newest["state"] == "done" and newest["executor_job"].startswith("local:")
    # A failing run through the worker exits 1 with the same one line.
    worker = _start(zone, "worker", "--hub-config", str(config))
    try:
        failed = _cli(zone, "run", str(PROBE), "--user", "alice", "-p", "fail", "true",
                      "--hub-config", str(config))
    finally:
        _stop(worker)
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("medzone: error: run of runner_probe failed: cell ") and \
        "probe failure requested" in last, failed.stderr
    assert _cli(zone, "audit", "verify").returncode == 0


def test_three_users_share_two_slots_round_robin(zone, templates):  # noqa: F811
    _clear_queue(zone)
    with zone.store.session() as session:
        if "carol" not in {u.name for u in accounts.list_users(session)}:
            accounts.add_user(session, "carol", actor="test")
    config = _hub_config(zone, slots=2)
    order = [("alice", 4), ("bob", 2), ("carol", 1)]
    ids = {user: [_detach(zone, user, templates["tiny"], config) for _ in range(n)]
           for user, n in order}
    everything = [i for runs in ids.values() for i in runs]
    worker = _start(zone, "worker", "--hub-config", str(config))
    try:
        _until(lambda: all(_row(zone, i).state == "done" for i in everything), timeout=600)
    finally:
        _stop(worker)
    rows = sorted((_row(zone, i) for i in everything), key=lambda r: (r.claimed_at, r.id))
    users = [r.user.name for r in rows]
    # Everyone's first run starts before anyone's second; carol's one is not stuck behind
    # alice's four.
    assert set(users[:3]) == {"alice", "bob", "carol"}, users
    # Then the users with runs left, in the same turn order (who goes first depends on
    # who was served least recently before), then alice's last ones.
    assert users[3:5] == [u for u in users[:3] if u != "carol"], users
    assert users[5:] == ["alice", "alice"], users
    # Never more than two at once.
    spans = [(r.started_at, r.finished_at) for r in rows]
    for start, _ in spans:
        assert sum(1 for s, f in spans if s <= start < f) <= 2


def test_a_gpu_run_waits_for_a_free_gpu(zone, templates):  # noqa: F811
    _clear_queue(zone)
    with zone.store.session() as session:
        if "gina" not in {u.name for u in accounts.list_users(session)}:
            accounts.add_user(session, "gina", roles=["gpu"], actor="test")
    registry = GpuRegistry(zone.base / "gpus-test.json")
    fake = [GpuDevice(0, "/dev/null")]
    holder = subprocess.Popen(["sleep", "600"])  # an interactive server holding the GPU
    registry.acquire("server:alice", user="alice", gpus=fake, per_gpu=1, pid=holder.pid)
    executor = LocalExecutor(sandbox_config=SandboxConfig(), gpus=fake, registry=registry)
    worker = runqueue.Worker(zone.home, zone.store, settings=RunQueue(slots=2),
                             executor=executor)
    try:
        gpu_run = runqueue.enqueue(zone.home, zone.store, "gina", str(templates["gpu"]))
        other = runqueue.enqueue(zone.home, zone.store, "alice", str(templates["tiny"]))
        assert executor.free_gpus() == 0
        # The GPU is taken: the GPU run waits (queued, not refused); alice's goes ahead.
        assert worker.step() == [other.id]
        assert worker.step() == []
        row = _row(zone, gpu_run.id)
        assert row.state == "queued" and row.executor_job is None
        holder.kill()
        holder.wait()  # the server stopped: its GPU is free
        assert executor.free_gpus() == 1
        assert worker.step() == [gpu_run.id]
        _until(lambda: _row(zone, gpu_run.id).state in runner.ENDED
               and _row(zone, other.id).state in runner.ENDED)
        executor.reap()
    finally:
        if holder.poll() is None:
            holder.kill()
        executor.close()
    assert _row(zone, other.id).state == "done"
    assert _row(zone, gpu_run.id).needs["gpu_given"] is True



def test_the_worker_wakes_when_a_run_is_enqueued_and_when_its_process_exits(zone, templates):  # noqa: F811
    _clear_queue(zone)
    assert not runqueue.notify_worker(zone.home)  # no worker: nobody to wake
    executor = LocalExecutor(sandbox_config=SandboxConfig())
    worker = runqueue.Worker(zone.home, zone.store, settings=RunQueue(slots=2),
                             executor=executor)
    worker.lock()
    try:
        assert not worker.wait(0.01)  # nothing happened: the timeout
        # Enqueued (here, as `medzone run` and the portal do): the worker wakes, once.
        run = runqueue.enqueue(zone.home, zone.store, "bob", str(templates["tiny"]))
        assert worker.wait(600)
        assert not worker.wait(0.01)
        assert worker.step() == [run.id]
        assert len(executor.wake_fds()) == 1
        # The run's process exits: the worker wakes (long before its 600 s poll), and
        # the run has recorded its outcome by then.
        assert worker.wait(600)
        assert _row(zone, run.id).state == "done"
        assert worker.step() == [] and executor.wake_fds() == []
        # A run's process keeps neither the worker's lock nor its wake-up FIFO: with the
        # worker gone and a run still executing, nobody reads the FIFO.
        long = runqueue.enqueue(zone.home, zone.store, "bob", str(templates["wait"]))
        assert worker.step() == [long.id]
        worker.unlock()
        assert not runqueue.notify_worker(zone.home)
        assert runqueue.worker_pid(zone.home) is None
        _until(lambda: _row(zone, long.id).sandbox_pid)
        with zone.store.session() as session:
            runner.cancel_run(session, long.id, "bob")
        assert worker.wait(600)  # its process exits once its sandbox is killed
        executor.reap()
    finally:
        worker.unlock()
        executor.close()
    assert _row(zone, long.id).state == "cancelled"


def test_sigkill_of_the_worker_loses_nothing(zone, templates):  # noqa: F811
    _clear_queue(zone)
    config = _hub_config(zone, slots=1)
    first = _detach(zone, "alice", templates["wait"], config)

    # Killed while a run executes: the run's own process and sandbox carry on.
    worker = _start(zone, "worker", "--hub-config", str(config))
    try:
        running = _until(lambda: (r := _row(zone, first)).sandbox_pid and r)
        _stop(worker, signal.SIGKILL)
        assert proc_start_time(running.runner_pid) == running.runner_start
        assert _row(zone, first).state == "running"

        # Killed while a run is only queued: it stays queued.
        second = _detach(zone, "bob", templates["tiny"], config)
        worker = _start(zone, "worker", "--hub-config", str(config))
        _stop(worker, signal.SIGKILL)
        row = _row(zone, second)
        assert row.state == "queued" and row.executor_job is None  # the one slot is taken

        # Killed between claiming a run and starting it: the claim dies with it.
        ghost = subprocess.Popen(["true"])
        ghost.wait()
        with zone.store.session() as session:
            session.get(Run, second).executor_job = f"local:{ghost.pid}:1"
        assert runqueue.recover(zone.store)["requeued"] == [second]
        assert _row(zone, second).executor_job is None

        # A new worker re-attaches the running run: the one slot stays taken.
        worker = _start(zone, "worker", "--hub-config", str(config))
        time.sleep(1.0)  # several looks at the queue (0.1 s apart)
        assert _row(zone, first).state == "running" and _row(zone, second).state == "queued"
        # The run's process is killed: its run is marked failed with the reason, and the
        # next run in line starts.
        os.kill(running.runner_pid, signal.SIGKILL)
        _until(lambda: _row(zone, second).state == "done")
    finally:
        _stop(worker)
    row = _row(zone, first)
    assert (row.state, row.error) == ("failed", runner.PROCESS_GONE)
    assert _cli(zone, "audit", "verify").returncode == 0


def test_cancel_a_queued_and_a_running_run(zone, templates):  # noqa: F811
    _clear_queue(zone)
    config = _hub_config(zone, slots=1)
    worker = _start(zone, "worker", "--hub-config", str(config))
    try:
        running = _detach(zone, "alice", templates["wait"], config)
        _until(lambda: _row(zone, running).sandbox_pid)
        sandbox = _row(zone, running).sandbox_pid
        queued = _detach(zone, "bob", templates["tiny"], config)  # waits: one slot
        cancelled = _cli(zone, "runs", "cancel", str(queued))  # the operator may
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.strip() == f"run {queued} of tiny by bob: cancelled"
        with zone.store.session() as session, pytest.raises(RuleViolation):
            runner.cancel_run(session, running, "bob")
        with zone.store.session() as session:
            runner.cancel_run(session, running, "alice")
        _until(lambda: proc_start_time(sandbox) is None)
        _until(lambda: _row(zone, running).finished_at and _row(zone, running).runner_pid
               is None)
    finally:
        _stop(worker)
    assert _row(zone, queued).state == "cancelled" and _row(zone, queued).started_at is None
    row = _row(zone, running)
    assert (row.state, row.error) == ("cancelled", "cancelled by alice")
    with zone.store.session() as session, pytest.raises(Conflict):
        runner.cancel_run(session, queued, "bob")
    assert _cli(zone, "audit", "verify").returncode == 0


def test_a_run_past_its_time_limit_is_stopped(zone, templates):  # noqa: F811
    _clear_queue(zone)
    config = _hub_config(zone)
    run_id = _detach(zone, "bob", templates["short"], config)
    worker = _start(zone, "worker", "--hub-config", str(config))
    try:
        _until(lambda: _row(zone, run_id).state in runner.ENDED)
    finally:
        _stop(worker)
    row = _row(zone, run_id)
    assert (row.state, row.error) == ("cancelled", runqueue.TIME_LIMIT_REACHED.format(seconds=1))


def test_without_a_worker_run_waits_its_turn_then_executes_itself(zone, templates):  # noqa: F811
    _clear_queue(zone)
    config = _hub_config(zone, slots=1)
    blocker = _start(zone, "run", str(templates["wait"]), "--user", "alice",
                     "--hub-config", str(config))
    try:
        run = _until(lambda: next((r for r in _runs(zone, "running") if r.template == "wait"),
                                  None))
        waiting = _start(zone, "run", str(templates["tiny"]), "--user", "bob",
                         "--hub-config", str(config))
        tiny = _until(lambda: next((r for r in _runs(zone, "queued") if r.template == "tiny"),
                                   None))
        time.sleep(1.0)
        assert _row(zone, tiny.id).state == "queued"  # the one slot is taken
        assert _cli(zone, "runs", "cancel", str(run.id)).returncode == 0
        out, err = waiting.communicate(timeout=180)
    finally:
        _stop(blocker)
    assert waiting.returncode == 0, err
    assert f"run {tiny.id}: queued (position 1)" in err
    assert Path(out.strip()).is_file()


def _runs(zone, state: str) -> list:  # noqa: F811
    with zone.store.session() as session:
        return runner.list_runs(session, state=state)


def test_the_portal_shows_a_queued_runs_place_and_lets_its_owner_cancel_it(zone, templates):  # noqa: F811
    from pathlib import PurePosixPath

    from medzone_hub.portal.runs import RunTracker

    _clear_queue(zone)

    class PortalState:  # a portal whose hub runs the worker (none runs here: it stays queued)
        home = zone.home
        store = zone.store
        templates_dir = None
        sandbox_config = None
        queue_settings = RunQueue(start_worker=True)

    tracker = RunTracker(PortalState())
    first = tracker.start("bob", str(templates["tiny"]), [])
    second = tracker.start("alice", str(templates["tiny"]), [])
    shown = [tracker.progress("bob", first), tracker.progress("alice", second)]
    assert [(p["state"], p["position"], p["cancellable"]) for p in shown] == [
        ("queued", 1, True), ("queued", 2, True)] or [p["position"] for p in shown] == [2, 1]
    tracker.cancel("bob", first)
    assert tracker.progress("bob", first)["state"] == "cancelled"
    assert tracker.progress("alice", second)["position"] == 1
    tracker.cancel("alice", second)
    assert PurePosixPath(first).name.endswith("-tiny")
