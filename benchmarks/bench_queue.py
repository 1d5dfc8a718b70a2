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
  them (round-robin) and the total time against ``20 × one run ÷ 2``, where one run is the
  median wall time of the queued runs of the overhead part (each alone). Goal: ≤ 1.2×.
  Reported beside it: the runs' median while two share the machine, and the share of the
  total the slots stood idle between runs (what the queue itself costs).

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
from datetime import datetime
from pathlib import Path

import nbformat

from medzone_hub import accounts, runner, runqueue
from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome
from medzone_hub.db import connect
from medzone_hub.hubapp import DEFAULT_CONFIG
from medzone_hub.models import Run

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
    deadline = time.monotonic() + timeout
    while not all(_row(store, i).state in runner.ENDED for i in ids):
        if time.monotonic() > deadline:
            raise RuntimeError("runs did not finish")
        time.sleep(0.05)


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

        t0 = time.monotonic()
        ids = []
        for user, n in THROUGHPUT:
            ids += [runqueue.enqueue(home, store, user, str(template), settings=settings).id
                    for _ in range(n)]
        _wait(store, ids)
        total = time.monotonic() - t0
        rows = sorted((_row(store, i) for i in ids), key=lambda r: (r.claimed_at, r.id))
        order = [r.user.name for r in rows]
        ideal = len(ids) * statistics.median(one_run) / SLOTS
        # How long each run took while another ran beside it (two kernels on a machine of
        # two shared CPUs), and how much of the total the slots stood idle between runs.
        busy = [(r.finished_at - r.started_at).total_seconds() for r in rows]
        packed = sum(busy) / SLOTS
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
                "one_run_median_s": round(statistics.median(one_run), 2),
                "total_s": round(total, 2),
                "ideal_s": round(ideal, 2),
                "ratio": round(total / ideal, 3),
                "run_median_while_sharing_s": round(statistics.median(busy), 2),
                "slots_busy_s": round(packed, 2),
                "queue_idle_share": round(1 - packed / total, 3),
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
