"""The run queue's cost: enqueue → first cell, and 20 tiny runs from 3 users on 2 slots.

One temporary zone (SQLite store, three approved users, a one-cell template), real
papermill runs in the users' bubblewrap sandboxes.

* **Overhead**: the time from the call to the moment the template's first cell starts
  (papermill's ``start_time`` in the executed notebook), ``direct`` (``prepare_run`` then
  ``execute_run`` in this process, as ``medzone run`` did before the queue) against
  ``queued`` (``enqueue`` in this process; a ``medzone worker`` process, already running,
  claims the run and its local executor executes it). The two alternate, so drift on the
  machine hits both alike; the first of each is a warm-up. Goal: ≤ 0.3 s added at the
  median.
* **Throughput**: 20 tiny runs queued at once by three users (10, 6, 4) with
  ``RunQueue.slots = 2`` and the default ``per_user_limit`` (no cap: users take turns); the order the worker started
  them (round-robin: ``started_out_of_turn`` counts the runs that started while a user
  served longer ago had one queued; the runs are enqueued one by one while the worker
  starts them, so the first ones start as they come) and the total time against
  ``20 × one run ÷ 2``, where one run is the
  median wall time of the queued runs of the overhead part (each alone). Goal: ≤ 1.2×.
  Reported beside it: the runs' median while two share the machine, the share of the
  total the slots stood idle between runs (what the queue itself costs), and where that
  idle time goes: from a run's end (``finished_at``) to the claim of the run that takes its
  slot, and from a claim to the run's start (``started_at``: the fork and the run
  process's first look at the store).

``MEDZONE_BENCH_QUEUE_RUNS`` (default 6) sets the overhead runs per variant, warm-up
included.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import nbformat
from sqlalchemy import func, select

from medzone_hub import accounts, runner, runqueue
from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome
from medzone_hub.db import connect
from medzone_hub.hubapp import DEFAULT_CONFIG
from medzone_hub.models import Run, User

RUNS = int(os.environ.get("MEDZONE_BENCH_QUEUE_RUNS", "6"))
THROUGHPUT = (("ann", 10), ("ben", 6), ("cat", 4))
SLOTS = 2
GOAL_ADDED_S = 0.3
GOAL_THROUGHPUT = 1.2


def _template(folder: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("n = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("x = n + 1")]
    path = folder / "tiny.ipynb"
    nbformat.write(nb, str(path))
    os.chmod(path, 0o644)
    return path


def _first_cell(home: MedZoneHome, run: Run) -> float:
    """When the template's first cell started (papermill's record), as a Unix time."""
    nb = nbformat.read(str(runner.home_path(home, run)), as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code"
                and "injected-parameters" not in c.metadata.get("tags", []))
    return datetime.fromisoformat(cell.metadata["papermill"]["start_time"]).timestamp()


def _row(store, run_id: int) -> Run:
    with store.session() as session:
        return runner.get_run(session, run_id)


def _wait(store, ids, timeout: float = 900) -> None:
    # One query a look, so that watching the runs costs the two shared CPUs next to nothing.
    deadline = time.monotonic() + timeout
    query = select(func.count()).select_from(Run).where(Run.id.in_(list(ids)),
                                                        Run.state.in_(runner.ENDED))
    while True:
        with store.session() as session:
            if session.scalar(query) == len(ids):
                return
        if time.monotonic() > deadline:
            raise RuntimeError("runs did not finish")
        time.sleep(0.05)


def _seconds(a, b) -> float:
    return (b - a).total_seconds()


def _out_of_turn(rows, served: dict, settle: float = 1.0) -> list[int]:
    """The runs (of *rows*, with *served*: when each user was last served before them)
    that started out of turn: when each was claimed, a user with a run already queued
    was served longer ago (or never, queued earlier). The runs are enqueued one by one
    while the worker starts them, so who was waiting is read from the runs' own times: a
    run queued at least *settle* seconds before (``queued_at`` is stamped before its
    enqueue commits, so a run stamped just before a claim may not have been seen yet)."""
    served = dict(served)
    wrong = []
    for run in sorted(rows, key=lambda r: (r.claimed_at, r.id)):
        waiting = {run.user.name: run.queued_at}
        for other in rows:
            if (other.claimed_at, other.id) > (run.claimed_at, run.id) and \
                    other.queued_at + timedelta(seconds=settle) <= run.claimed_at:
                first = waiting.get(other.user.name)
                waiting[other.user.name] = min(first or other.queued_at, other.queued_at)
        turn = min(waiting, key=lambda u: (u in served, served.get(u), waiting[u]))
        if run.user.name != turn:
            wrong.append(run.id)
        served[run.user.name] = run.claimed_at
    return wrong


def run() -> dict:
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="medzone-bench-queue-"))
    os.chmod(base, 0o755)
    saved_db = os.environ.pop(ENV_DB_URL, None)
    worker = None
    try:
        home = MedZoneHome(base / "home").ensure()
        store = connect(home.db_url)
        with store.session() as session:
            for name, _n in THROUGHPUT:
                accounts.add_user(session, name, actor="bench")
        template = _template(base)
        config = base / "bench_config.py"
        config.write_text(f"c = get_config()  # noqa\nload_subconfig({str(DEFAULT_CONFIG)!r})\n"
                          f"c.RunQueue.slots = {SLOTS}\n")
        env = {**os.environ, ENV_HOME: str(home.root)}
        worker = subprocess.Popen([sys.executable, "-m", "medzone_hub.cli", "worker",
                                   "--hub-config", str(config)], env=env, cwd="/",
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        settings = runqueue.RunQueue(slots=SLOTS)
        direct, queued, one_run = [], [], []
        for i in range(RUNS):
            t0 = time.time()
            prepared = runner.prepare_run(home, store, "ann", str(template))
            # Taken before the worker sees it (one update, as `medzone run` does alone).
            runqueue.claim(store, prepared.id, runqueue.process_marker())
            runner.execute_run(home, store, prepared.id)
            d = _first_cell(home, _row(store, prepared.id)) - t0
            t0 = time.time()
            run = runqueue.enqueue(home, store, "ann", str(template), settings=settings)
            _wait(store, [run.id])
            row = _row(store, run.id)
            q = _first_cell(home, row) - t0
            if i:  # the first of each is a warm-up
                direct.append(d)
                queued.append(q)
                one_run.append((row.finished_at - row.started_at).total_seconds())
        added = statistics.median(queued) - statistics.median(direct)

        with store.session() as session:
            served = dict(session.execute(
                select(User.name, func.max(Run.claimed_at)).join(Run.user)
                .where(Run.claimed_at.is_not(None)).group_by(User.name)).all())
        t0 = time.monotonic()
        ids = []
        for user, n in THROUGHPUT:
            ids += [runqueue.enqueue(home, store, user, str(template), settings=settings).id
                    for _ in range(n)]
        _wait(store, ids)
        total = time.monotonic() - t0
        rows = sorted((_row(store, i) for i in ids), key=lambda r: (r.claimed_at, r.id))
        order = [r.user.name for r in rows]
        out_of_turn = _out_of_turn(rows, served)
        ideal = len(ids) * statistics.median(one_run) / SLOTS
        # How long each run took while another ran beside it (two kernels on a machine of
        # two shared CPUs), and how much of the total the slots stood idle between runs.
        busy = [(r.finished_at - r.started_at).total_seconds() for r in rows]
        packed = sum(busy) / SLOTS
        at_once = max(sum(1 for o in rows if o.started_at <= r.started_at < o.finished_at)
                      for r in rows)
        # The k-th run to end frees the slot the (k + SLOTS)-th claim takes.
        claims = sorted(r.claimed_at for r in rows)
        ends = sorted(r.finished_at for r in rows)
        handover = [_seconds(end, claim) for end, claim in zip(ends, claims[SLOTS:])]
        claim_to_start = [_seconds(r.claimed_at, r.started_at) for r in rows]
        return {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other work "
                       "while measured)",
            "overhead": {
                "runs_per_variant": len(direct),
                "direct_first_cell_median_s": round(statistics.median(direct), 3),
                "queued_first_cell_median_s": round(statistics.median(queued), 3),
                "added_median_s": round(added, 3),
                "goal_added_s": GOAL_ADDED_S,
                "meets_goal": added <= GOAL_ADDED_S,
            },
            "throughput": {
                "runs": len(ids), "slots": SLOTS,
                "users": {u: n for u, n in THROUGHPUT},
                "start_order": order,
                "started_out_of_turn": len(out_of_turn),
                "one_run_median_s": round(statistics.median(one_run), 2),
                "total_s": round(total, 2),
                "ideal_s": round(ideal, 2),
                "ratio": round(total / ideal, 3),
                "run_median_while_sharing_s": round(statistics.median(busy), 2),
                "slots_busy_s": round(packed, 2),
                "most_running_at_once": at_once,
                "queue_idle_share": round(1 - packed / total, 3),
                "end_to_next_claim_median_s": round(statistics.median(handover), 3),
                "claim_to_start_median_s": round(statistics.median(claim_to_start), 3),
                "goal_ratio": GOAL_THROUGHPUT,
                "meets_goal": total / ideal <= GOAL_THROUGHPUT,
                "all_done": all(r.state == "done" for r in rows),
            },
        }
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
        if saved_db is not None:
            os.environ[ENV_DB_URL] = saved_db
        subprocess.run(["chmod", "-R", "u+rwX", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
