"""The ``slurm`` executor against a real one-node Slurm cluster (slurmctld, slurmd, munge).

The cluster is the one ``.ci/slurm`` starts (``make test`` exports its ``SLURM_CONF``).
Without ``SLURM_CONF`` this module starts it itself with ``.ci/slurm`` (as root) and stops
it afterwards if it started it (unless test workers share it); if that fails, every test
here fails with the reason, so a green run always means Slurm was tested.

Every run is real: ``sbatch`` submits a job whose command is the zone's ``medzone runs
execute ID``, which runs papermill in the user's bubblewrap sandbox on the (only) node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from traitlets.config import Config

from medzone_hub import runner
from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome
from medzone_hub.errors import Conflict, InvalidInput
from medzone_hub.db import connect
from medzone_hub.executors import get_executor
from medzone_hub.executors.slurm import (ENV_SANDBOX_CONFIG, SlurmExecutor, execute_job,
                                         job_sandbox_config, slurm_time)
from medzone_hub.hubapp import DEFAULT_CONFIG
from medzone_hub.models import Run
from medzone_hub.runqueue import RunQueue, Worker, cancel, enqueue
from medzone_hub.sandbox import SandboxConfig, detect_gpus, proc_start_time, reserve_gpu
from medzone_hub.sandbox.resources import GPU_REGISTRY_NAME
from medzone_hub.sessions import policy_for
from medzone_hub.slurm import (SlurmClient, SlurmError, SlurmMissing, SlurmUnreachable,
                               parse_job)

from .test_runner import PROBE, _sha
from .test_runner import zone  # noqa: F401 - the module's zone: alice (granted ds-a), bob

ROOT = Path(__file__).resolve().parent.parent
CI_SLURM = ROOT / ".ci" / "slurm"
HOWTO = ('Start the test cluster and export its configuration with:  export "$(sudo .ci/slurm)"'
         '  (as root: export "$(.ci/slurm)"); Debian 12 packages: slurmctld slurmd '
         'slurm-client munge.')
#: How long a test waits for a run at most (a hung job fails the test, not the session).
RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def slurm_conf() -> str:
    """The test cluster's slurm.conf: ``$SLURM_CONF``, or the cluster ``.ci/slurm`` starts."""
    conf = os.environ.get("SLURM_CONF")
    started = False
    if not conf:
        done = subprocess.run(["bash", str(CI_SLURM)], capture_output=True, text=True,
                              timeout=180, check=False)
        if done.returncode != 0 or not done.stdout.startswith("SLURM_CONF="):
            pytest.fail(f"no Slurm cluster: .ci/slurm failed ({done.stderr.strip()}). {HOWTO}")
        conf = done.stdout.strip().partition("=")[2]
        started = "starting slurmctld" in done.stderr
    if not Path(conf).is_file():
        pytest.fail(f"SLURM_CONF={conf} names no file. {HOWTO}")
    try:
        SlurmClient(conf).ping()
    except SlurmError as err:
        pytest.fail(f"{err}. {HOWTO}")
    yield conf
    # Stopped by whoever started it; not from one of several test workers sharing it.
    if started and not os.environ.get("PYTEST_XDIST_WORKER"):
        subprocess.run(["bash", str(CI_SLURM), "stop"], capture_output=True, check=False)


@pytest.fixture(scope="module")
def hub_config(zone, slurm_conf):  # noqa: F811
    """A hub config file: the default one, with runs queued to the test cluster."""
    path = zone.base / "hub_slurm.py"
    path.write_text(f"load_subconfig({str(DEFAULT_CONFIG)!r})\n"
                    "c.RunQueue.executor = 'slurm'\n"
                    f"c.SlurmExecutor.slurm_conf = {slurm_conf!r}\n"
                    "c.SlurmExecutor.hub_config_file = __file__\n")
    return path


def _config(slurm_conf: str, **settings) -> Config:
    config = Config()
    config.SlurmExecutor.slurm_conf = slurm_conf
    for name, value in settings.items():
        setattr(config.SlurmExecutor, name, value)
    return config


@pytest.fixture(scope="module")
def executor(slurm_conf, hub_config) -> SlurmExecutor:
    return get_executor("slurm", config=_config(slurm_conf, hub_config_file=str(hub_config)))


@pytest.fixture(scope="module")
def wait_template(zone):  # noqa: F811
    """A template whose second code cell runs until its sandbox is stopped."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell('note = ""', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import time\nwhile True:\n    time.sleep(0.2)")]
    path = zone.base / "slurm_wait.ipynb"
    nbformat.write(nb, str(path))
    return path


def _cli(zone, *args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k not in (ENV_DB_URL, "MEDZONE_ACTOR")}
    env[ENV_HOME] = str(zone.home.root)
    return subprocess.run([sys.executable, "-m", "medzone_hub.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd="/")


def _worker(zone, executor) -> Worker:  # noqa: F811
    return Worker(zone.home, zone.store, settings=RunQueue(executor="slurm", slots=4,
                                                           per_user_limit=4),
                  executor=executor)


def _enqueue(zone, user: str, template, *params) -> int:  # noqa: F811
    run = enqueue(zone.home, zone.store, user, str(template), list(params),
                  settings=RunQueue(executor="slurm"))
    return run.id


def _row(zone, run_id: int) -> Run:  # noqa: F811
    with zone.store.session() as session:
        return runner.get_run(session, run_id)


def _until(zone, worker, run_id: int, states, what: str = ""):  # noqa: F811
    """Step the worker (as `medzone worker` does) until run *run_id* is in one of *states*."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        worker.step()
        row = _row(zone, run_id)
        if row.state in states and (not what or what == "cell2" and row.sandbox_pid and
                                     runner.run_progress(zone.home, row)["current_cell"] == 2):
            return row
        assert time.monotonic() < deadline, f"run {run_id} stayed {row.state}"
        time.sleep(0.1)


def _slurm_state(executor, run, ended: bool = True):
    """The job's Slurm record, once it has ended (when *ended*)."""
    deadline = time.monotonic() + 60
    while True:
        job = executor.job(run)
        if job is not None and (job.ended or not ended):
            return job
        assert time.monotonic() < deadline, f"Slurm job {run.executor_job}: {job}"
        time.sleep(0.1)


# --- runs to the end -----------------------------------------------------------------------

def test_medzone_run_executes_a_template_as_a_slurm_job_in_the_sandbox(zone, hub_config,  # noqa: F811
                                                                       executor):
    done = _cli(zone, "run", str(PROBE), "--user", "alice", "-p", "message", "on the node",
                "-p", "dataset", "ds-a", "--hub-config", str(hub_config))
    assert done.returncode == 0, done.stderr
    notebook = Path(done.stdout.strip())
    assert notebook.is_file() and notebook.parent.parent == zone.home.root / "homes" / "alice" / "runs"
    assert (notebook.parent / "after.txt").read_text() == "reached the end"
    # It ran in alice's sandbox: her uid, no network, only her live grant under /data.
    probe = json.loads((notebook.parent / "probe.json").read_text())
    assert probe["uid"] == zone.uids["alice"]
    assert probe["interfaces"] == ["lo"]
    assert probe["data"] == ["ds-a"]
    assert probe["params"]["message"] == "on the node"

    row = next(r for r in json.loads(_cli(zone, "runs", "list", "--user", "alice",
                                          "--json").stdout)
               if r["output"] == f"runs/{notebook.parent.name}/runner_probe.ipynb")
    assert row["state"] == "done" and row["executor"] == "slurm"
    run = _row(zone, row["id"])
    assert run.output_sha256 == _sha(notebook)
    # Slurm ran it: the run's job is a Slurm job that completed, and the executor's view
    # of the run is Slurm's.
    job = _slurm_state(executor, run)
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0")
    assert job.fields["JobName"] == f"medzone-run-{run.id}"
    assert executor.poll(run) == "done"
    statuses = [d["status"] for _a, _s, d in zone.audit("run.execute") if d["run"] == run.id]
    assert statuses == ["ok"]


def test_a_failing_run_ends_failed_with_its_reason_in_the_store_and_in_slurm(zone, executor):  # noqa: F811
    run_id = _enqueue(zone, "bob", PROBE, ("fail", "yes"))
    row = _until(zone, _worker(zone, executor), run_id, runner.ENDED)
    assert row.state == "failed"
    assert row.error.startswith("cell 3 `if fail:` failed: RuntimeError: probe failure requested")
    job = _slurm_state(executor, row)
    assert job.state == "FAILED" and job.exit_code == "1:0"
    assert executor.poll(row) == "failed"
    assert executor.reason(row) == f"Slurm job {row.executor_job} FAILED (NonZeroExitCode, exit 1:0)"
    # The job's output is the command's one line, no traceback.
    log = (zone.home.root / "run-queue" / "slurm" / f"run-{run_id}-{row.executor_job}.log")
    lines = [line for line in log.read_text().splitlines() if line.startswith("medzone: error")]
    assert lines == [f"medzone: error: run of runner_probe failed: {row.error}; partial "
                     f"notebook kept at {runner.home_path(zone.home, row)}"]
    assert "Traceback" not in log.read_text()


# --- state from Slurm, cancel -----------------------------------------------------------------

def test_state_comes_from_slurm_while_the_job_is_held_and_after_release(zone, slurm_conf,  # noqa: F811
                                                                       hub_config):
    held = get_executor("slurm", config=_config(slurm_conf, extra_args=["--hold"],
                                                hub_config_file=str(hub_config)))
    run_id = _enqueue(zone, "bob", PROBE)
    worker = _worker(zone, held)
    assert worker.step() == [run_id]
    row = _row(zone, run_id)
    assert row.state == "queued" and row.executor_job.isdigit()
    job = _slurm_state(held, row, ended=False)
    assert (job.state, job.reason) == ("PENDING", "JobHeldUser")
    assert held.poll(row) == "queued"
    worker.step()
    assert _row(zone, run_id).state == "queued"  # waiting in Slurm is not lost
    subprocess.run(["scontrol", "release", row.executor_job], check=True,
                   env={**os.environ, "SLURM_CONF": slurm_conf})
    row = _until(zone, worker, run_id, runner.ENDED)
    assert row.state == "done"
    # The run's row is written before its job's process exits: Slurm then says so too.
    assert _slurm_state(held, row).state == "COMPLETED" and held.poll(row) == "done"


def test_cancel_scancels_the_job_and_its_sandbox(zone, executor, wait_template):  # noqa: F811
    run_id = _enqueue(zone, "alice", wait_template)
    worker = _worker(zone, executor)
    row = _until(zone, worker, run_id, ("running",), what="cell2")
    assert executor.poll(row) == "running"
    assert _slurm_state(executor, row, ended=False).state == "RUNNING"
    sandbox, start = row.sandbox_pid, row.sandbox_start
    assert proc_start_time(sandbox) == start

    cancelled = cancel(zone.home, zone.store, run_id, "alice", executors={"slurm": executor})
    assert cancelled.state == "cancelled"
    job = _slurm_state(executor, row)
    assert job.state == "CANCELLED"
    assert executor.poll(row) == "failed"
    deadline = time.monotonic() + 60
    while proc_start_time(sandbox) == start:
        assert time.monotonic() < deadline, "the sandbox outlived its cancelled job"
        time.sleep(0.1)
    row = _until(zone, worker, run_id, runner.ENDED)
    assert (row.state, row.error) == ("cancelled", "cancelled by alice")
    assert _cli(zone, "audit", "verify").returncode == 0


def test_a_job_killed_outside_medzone_leaves_its_run_failed_with_slurms_reason(  # noqa: F811
        zone, executor, wait_template):  # noqa: F811
    run_id = _enqueue(zone, "bob", wait_template)
    worker = _worker(zone, executor)
    row = _until(zone, worker, run_id, ("running",), what="cell2")
    executor.client.cancel(row.executor_job)  # e.g. an operator's scancel, or a lost node
    row = _until(zone, worker, run_id, runner.ENDED)
    assert row.state == "failed"
    assert row.error == (f"Slurm job {row.executor_job} CANCELLED (exit 0:15): the run "
                         "stopped before it finished")
    assert row.runner_pid is None and row.sandbox_pid is None


def test_a_pending_job_is_cancelled_in_slurm_before_it_runs(zone, slurm_conf, hub_config):  # noqa: F811
    held = get_executor("slurm", config=_config(slurm_conf, extra_args=["--hold"],
                                                hub_config_file=str(hub_config)))
    run_id = _enqueue(zone, "bob", PROBE)
    _worker(zone, held).step()
    row = _row(zone, run_id)
    cancel(zone.home, zone.store, run_id, "bob", executors={"slurm": held})
    job = _slurm_state(held, row)
    assert job.state == "CANCELLED"
    row = _row(zone, run_id)
    assert (row.state, row.started_at) == ("cancelled", None)
    assert not (runner.home_path(zone.home, row)).exists()  # it never ran


def test_a_job_runs_only_its_own_run(zone):  # noqa: F811
    run_id = _enqueue(zone, "bob", PROBE)
    with zone.store.session() as session:
        session.get(Run, run_id).executor_job = "4242"
    with pytest.raises(Conflict, match=f"run {run_id} is not Slurm job 17's "
                                        r"\(its job: 4242\)"):
        execute_job(zone.home, zone.store, run_id, job_id="17", environ={})
    assert _row(zone, run_id).state == "queued"
    with zone.store.session() as session:
        runner.cancel_run(session, run_id, "bob")  # job 4242 is no one's: out of the queue


# --- what sbatch is asked ------------------------------------------------------------------

def test_sbatch_options_carry_the_runs_needs_and_the_sites_settings(slurm_conf):
    ex = SlurmExecutor(config=_config(slurm_conf, partition="gpu", account="lab1", qos="high",
                                      extra_args=["--constraint=a100"], gres_gpu="gpu:a100"))
    run = Run(id=7, needs={"gpu": "required", "cpus": 4, "memory_bytes": 3 << 30,
                           "time_limit_s": 90061})
    options = ex.sbatch_options(run, Path("/z/logs"))
    assert options[-5:] == ["--gres=gpu:a100:1", "--partition=gpu", "--account=lab1",
                            "--qos=high", "--constraint=a100"]
    assert {"--cpus-per-task=4", "--mem=3072M", "--time=1-01:01:01",
            "--job-name=medzone-run-7", "--no-requeue"} <= set(options)
    cpu = Run(id=8, needs={"gpu": "optional", "cpus": 1})
    assert not [o for o in ex.sbatch_options(cpu, Path("/z")) if o.startswith("--gres")]
    assert slurm_time(5) == "0-00:01:00"
    # The zone's sandbox settings travel with the job (no hub config to load on the node).
    zone_config = SandboxConfig(pids_limit=77, extra_ro_binds=[("/opt/a", "/opt/a")])
    given = SlurmExecutor(config=_config(slurm_conf), sandbox_config=zone_config)
    env = given.job_env(MedZoneHome(Path("/z")), connect("sqlite:///:memory:"))
    assert env[ENV_HOME] == "/z" and env["SLURM_CONF"] == slurm_conf
    assert job_sandbox_config(env) == zone_config
    assert set(env) <= {"PATH", "LANG", ENV_HOME, ENV_DB_URL, "MEDZONE_HUB_CONFIG",
                        "SLURM_CONF", ENV_SANDBOX_CONFIG}
    with pytest.raises(InvalidInput, match="does not fit this MedZone"):
        job_sandbox_config({ENV_SANDBOX_CONFIG: '{"no_such_setting": 1}'})
    job = parse_job("JobId=12 JobName=x JobState=TIMEOUT Reason=TimeLimit Dependency=(null) "
                    "ExitCode=0:15 Command=/a b/c")
    assert job.describe() == "Slurm job 12 TIMEOUT (TimeLimit, exit 0:15)" and job.ended


def test_a_slurm_jobs_sandbox_takes_a_gpu_slurm_gave_it_and_no_registry_entry(  # noqa: F811
        zone, tmp_path, monkeypatch):  # noqa: F811
    dev = tmp_path / "dev"
    dev.mkdir()
    for i in range(4):
        (dev / f"nvidia{i}").touch()
    monkeypatch.setenv("SLURM_JOB_GPUS", "1,3")  # what slurmd sets for --gres=gpu:2
    gpus = detect_gpus(dev=str(dev), driver_proc=str(tmp_path / "no-driver"))
    assert [g.index for g in gpus] == [1, 3]
    registry = zone.home.sandbox_state_dir / GPU_REGISTRY_NAME
    before = registry.read_bytes() if registry.exists() else None
    with zone.store.session() as session:
        policy = policy_for(zone.home, session, "alice",
                            SandboxConfig(allow_gpu_role=None))
    reserve_gpu(policy, gpus=gpus, support_nodes=[])
    assert policy.gpu.index == 1 and policy.env["CUDA_VISIBLE_DEVICES"] == "1"
    assert (policy.gpu_registry, policy.gpu_key) == (None, None)
    assert (registry.read_bytes() if registry.exists() else None) == before


# --- Slurm missing or down: one line ----------------------------------------------------------

def test_slurm_missing_is_one_clear_line(zone, slurm_conf, tmp_path):  # noqa: F811
    empty = tmp_path / "bin"
    empty.mkdir()
    missing = get_executor("slurm", config=_config(slurm_conf, bin_dir=str(empty)))
    with pytest.raises(SlurmMissing) as err:
        missing.client.ping()
    assert str(err.value) == (f"Slurm's scontrol is not installed (not in {empty}): install "
                              "the Slurm client (Debian: apt-get install slurm-client) or set "
                              "SlurmExecutor.bin_dir")
    # The queue records why the run could not be submitted.
    run_id = _enqueue(zone, "bob", PROBE)
    _worker(zone, missing).step()
    row = _row(zone, run_id)
    assert row.state == "failed" and row.error.startswith("Slurm's sbatch is not installed")

    # And at the command line: one line, no traceback.
    config = zone.base / "hub_no_slurm.py"
    config.write_text(f"load_subconfig({str(DEFAULT_CONFIG)!r})\n"
                      "c.RunQueue.executor = 'slurm'\n"
                      f"c.SlurmExecutor.bin_dir = {str(empty)!r}\n")
    done = _cli(zone, "run", str(PROBE), "--user", "bob", "--hub-config", str(config))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"medzone: error: Slurm's sbatch is not installed (not in {empty}): install the "
        "Slurm client (Debian: apt-get install slurm-client) or set SlurmExecutor.bin_dir"]

    absent = SlurmClient(tmp_path / "nowhere.conf")
    with pytest.raises(SlurmMissing, match="no Slurm configuration at .*nowhere.conf"):
        absent.job("1")


def test_an_unreachable_controller_is_one_clear_line(slurm_conf, tmp_path):
    # The same cluster's configuration with the controller on a port nobody listens on.
    text = Path(slurm_conf).read_text().replace("SlurmctldPort=", "SlurmctldPort=1", 1)
    conf = tmp_path / "slurm.conf"
    conf.write_text(text + "MessageTimeout=1\n")
    with pytest.raises(SlurmUnreachable) as err:
        SlurmClient(conf).submit("#!/bin/sh\ntrue\n")
    message = str(err.value)
    assert message.startswith("the Slurm controller does not answer (sbatch: ")
    assert "\n" not in message and message.endswith(f"configuration: {conf})")


def test_the_clusters_daemons_do_not_hold_the_start_scripts_lock(slurm_conf):
    """``.ci/slurm`` serialises its callers with a flock on ``<dir>.lock``. A daemon it starts
    must not inherit that descriptor: munged once did, held the lock for its whole life, and
    the ``.ci/slurm stop`` in make's EXIT trap then waited for it until CI's time ran out."""
    lock = (Path(slurm_conf).parent.parent / f"{Path(slurm_conf).parent.name}.lock").resolve()
    holders = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            if comm not in ("munged", "slurmctld", "slurmd", "slurmstepd"):
                continue
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:  # the process ended while we looked
            continue
        if str(lock) in fds:
            holders.append(f"{comm} ({proc.name})")
    assert lock.exists(), f"{lock}: .ci/slurm did not take its lock here"
    assert not holders, f"{', '.join(holders)} hold {lock}"
    done = subprocess.run(["flock", "-w", "60", str(lock), "true"], check=False)
    assert done.returncode == 0
