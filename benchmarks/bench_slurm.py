"""The Slurm executor's cost: submission → the template's first cell, against the local one.

Two temporary zones (SQLite stores, one approved user, a one-cell template), each with its
own ``medzone worker`` already running: one with the local executor, one with the slurm
executor on the idle one-node cluster ``.ci/slurm`` starts (``$SLURM_CONF``, or started
here as root). Each sample is the time from ``enqueue`` to the moment the template's first
cell starts (papermill's ``start_time`` in the executed notebook); the two executors
alternate, so drift on the machine hits both alike; the first of each is a warm-up.
What Slurm adds: ``sbatch``, the controller's scheduling, slurmd starting the job, and the
job's ``medzone runs execute`` starting Python (the local executor forks the worker
instead). Goal: ≤ 2 s added at the median.

``MEDZONE_BENCH_SLURM_RUNS`` (default 6) sets the runs per executor, warm-up included.
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
from pathlib import Path

from medzone_hub import accounts, runner, runqueue
from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome
from medzone_hub.db import connect
from medzone_hub.hubapp import DEFAULT_CONFIG
from medzone_hub.models import Run
from medzone_hub.slurm import SlurmClient

# The same tiny template and the same reading of the executed notebook as the queue's bench.
from .bench_queue import _first_cell, _row, _template

RUNS = int(os.environ.get("MEDZONE_BENCH_SLURM_RUNS", "6"))
GOAL_ADDED_S = 2.0
CI_SLURM = Path(__file__).resolve().parent.parent / ".ci" / "slurm"


def _wait(store, run_id: int, timeout: float = 600) -> Run:
    deadline = time.monotonic() + timeout
    while (row := _row(store, run_id)).state not in runner.ENDED:
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run_id} did not finish")
        time.sleep(0.05)
    if row.state != "done":
        raise RuntimeError(f"run {run_id} {row.state}: {row.error}")
    return row


def _slurm_conf() -> str:
    conf = os.environ.get("SLURM_CONF")
    if not conf:
        done = subprocess.run(["bash", str(CI_SLURM)], capture_output=True, text=True,
                              check=True)
        conf = done.stdout.strip().partition("=")[2]
    SlurmClient(conf).ping()
    return conf


class Zone:
    """A zone with one user and a running ``medzone worker`` using *executor*."""

    def __init__(self, base: Path, executor: str, slurm_conf: str):
        self.home = MedZoneHome(base / executor / "home").ensure()
        self.store = connect(self.home.db_url)
        with self.store.session() as session:
            accounts.add_user(session, "ann", actor="bench")
        config = base / executor / "hub_config.py"
        config.write_text(f"load_subconfig({str(DEFAULT_CONFIG)!r})\n"
                          f"c.RunQueue.executor = {executor!r}\n"
                          f"c.SlurmExecutor.slurm_conf = {slurm_conf!r}\n"
                          "c.SlurmExecutor.hub_config_file = __file__\n")
        self.settings = runqueue.RunQueue(executor=executor)
        env = {**os.environ, ENV_HOME: str(self.home.root)}
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "medzone_hub.cli", "worker", "--hub-config", str(config)],
            env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def first_cell(self, template: Path) -> float:
        t0 = time.time()
        run = runqueue.enqueue(self.home, self.store, "ann", str(template),
                               settings=self.settings)
        return _first_cell(self.home, _wait(self.store, run.id)) - t0

    def close(self) -> None:
        if self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.worker.kill()
        self.store.close()


def run() -> dict:
    conf = _slurm_conf()
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="medzone-bench-slurm-"))
    os.chmod(base, 0o755)
    saved_db = os.environ.pop(ENV_DB_URL, None)
    zones: list[Zone] = []
    try:
        for name in ("local", "slurm"):
            (base / name).mkdir(mode=0o755)
            zones.append(Zone(base, name, conf))
        local, slurm = zones
        template = _template(base)
        times: dict[str, list[float]] = {"local": [], "slurm": []}
        for i in range(RUNS):
            pair = (("local", local), ("slurm", slurm)) if i % 2 else \
                (("slurm", slurm), ("local", local))
            for name, zone in pair:
                seconds = zone.first_cell(template)
                if i:  # the first of each is a warm-up
                    times[name].append(seconds)
        added = statistics.median(times["slurm"]) - statistics.median(times["local"])
        return {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other work "
                       "while measured)",
            "slurm": SlurmClient(conf).run("sinfo", ["-V"]).stdout.strip(),
            "runs_per_executor": len(times["local"]),
            "local_first_cell_s": [round(t, 3) for t in times["local"]],
            "slurm_first_cell_s": [round(t, 3) for t in times["slurm"]],
            "local_first_cell_median_s": round(statistics.median(times["local"]), 3),
            "slurm_first_cell_median_s": round(statistics.median(times["slurm"]), 3),
            "added_median_s": round(added, 3),
            "ratio_median": round(statistics.median(times["slurm"])
                                  / statistics.median(times["local"]), 2),
            "goal_added_s": GOAL_ADDED_S,
            "meets_goal": added <= GOAL_ADDED_S,
        }
    finally:
        for zone in zones:
            zone.close()
        if saved_db is not None:
            os.environ[ENV_DB_URL] = saved_db
        subprocess.run(["chmod", "-R", "u+rwX", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
