"""The ``slurm`` executor: each queued template run is one Slurm batch job.

The job's command is the zone's own ``medzone`` (the venv's console script, which every
compute node reaches at the same path) executing that one prepared run
(:data:`EXECUTE_COMMAND`): :func:`medzone_hub.runner.execute_run` on the compute node,
in the user's bubblewrap sandbox with the same policy as on the hub's machine (uid, binds,
no network, only live grants under ``/data``), recording the run's state, outcome and
audit row in the zone's store as a local run does. So the nodes share the venv, the
zone's ``MEDZONE_HOME`` (the parts runs need: ``homes/``, ``datasets/``, ``run-templates/``,
``run-queue/slurm/`` for the jobs' output) and reach its store (``MEDZONE_DB_URL``); see
docs/runs.md, "Slurm".

What this executor adds is Slurm's own view: :meth:`SlurmExecutor.submit` is ``sbatch``
(what the run needs as ``--cpus-per-task``, ``--mem``, ``--time``, ``--gres=gpu:N``; the
site's partition, account, QoS and extra arguments), :meth:`~SlurmExecutor.poll` is the
job's state as ``scontrol show job`` tells it, :meth:`~SlurmExecutor.cancel` is ``scancel``.
Slurm queues jobs itself, so the executor sets no slot or GPU limit of its own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

from traitlets import Dict, Float, Integer, List, Unicode
from traitlets.config import Configurable

from .. import runner
from ..config import ENV_DB_URL, ENV_HOME
from ..errors import Conflict, InvalidInput, NotFound
from ..models import Run
from ..sandbox import SandboxConfig, proc_start_time
from ..slurm import SlurmClient, SlurmJob
from . import Executor
from .local import run_config

#: The hub config file every face reads (:mod:`medzone_hub.hubconfig`), passed on to jobs.
ENV_HUB_CONFIG = "MEDZONE_HUB_CONFIG"

#: The zone's sandbox settings (:class:`~medzone_hub.sandbox.SandboxConfig` as JSON), given
#: to each job so that it need not load the hub config file (and JupyterHub) to know them.
ENV_SANDBOX_CONFIG = "MEDZONE_RUN_SANDBOX_CONFIG"

#: The ``medzone`` subcommand a job runs, followed by the run's id.
EXECUTE_COMMAND = ("runs", "execute")

#: Where the jobs' output files go, under ``MEDZONE_HOME`` (root-only).
LOG_DIR = "run-queue/slurm"

#: What a job's environment holds besides what the executor sets (``--export=ALL`` of an
#: environment the executor builds: nothing else of the hub's process leaks into it).
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8"}


def slurm_time(seconds: int) -> str:
    """*seconds* as sbatch's ``--time`` (``days-hours:minutes:seconds``), at least 1 min."""
    seconds = max(60, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


class _ConfigurableExecutorType(type(Configurable), type(Executor)):
    """Both metaclasses: traitlets' (the settings) and the interface's (abstract methods)."""


class SlurmExecutor(Configurable, Executor, metaclass=_ConfigurableExecutorType):
    """Runs each queued template run as a Slurm batch job (``c.SlurmExecutor.…`` in the
    hub's config file; used when ``c.RunQueue.executor = "slurm"``)."""

    name = "slurm"

    partition = Unicode("", help=(
        "The Slurm partition runs are submitted to (sbatch --partition); empty: the "
        "cluster's default partition.")).tag(config=True)
    account = Unicode("", help=(
        "The Slurm account runs are charged to (sbatch --account); empty: the submitting "
        "user's default account.")).tag(config=True)
    qos = Unicode("", help=(
        "The Slurm quality of service of runs (sbatch --qos); empty: the default.")
    ).tag(config=True)
    extra_args = List(Unicode(), help=(
        "More sbatch options for every run, e.g. ['--constraint=a100', '--exclusive']. "
        "They come after the executor's own, so they win where both set one.")
    ).tag(config=True)
    gres_gpu = Unicode("gpu", help=(
        "The generic resource a run that requires a GPU asks for: sbatch "
        "--gres=<this>:<count>, e.g. 'gpu:a100' for a typed GPU in the site's gres.conf.")
    ).tag(config=True)
    gpus_per_run = Integer(1, min=1, help=(
        "How many GPUs a run that requires a GPU asks Slurm for (sbatch --gres=gpu:N); "
        "its sandbox is given one of them.")).tag(config=True)
    medzone_command = Unicode("", help=(
        "The `medzone` console script a job runs on the compute node (the venv every "
        "node shares, at the same path); empty: this process's venv's bin/medzone.")
    ).tag(config=True)
    slurm_conf = Unicode("", help=(
        "The cluster's slurm.conf for sbatch, scontrol and scancel; empty: $SLURM_CONF, "
        "else Slurm's default (/etc/slurm/slurm.conf).")).tag(config=True)
    bin_dir = Unicode("", help=(
        "The folder holding sbatch, scontrol and scancel; empty: found on $PATH.")
    ).tag(config=True)
    command_timeout = Float(60.0, min=1.0, help=(
        "Seconds one Slurm command may take before the controller counts as unreachable.")
    ).tag(config=True)
    job_environment = Dict(value_trait=Unicode(), help=(
        "Environment variables every job gets besides PATH, LANG, MEDZONE_HOME, "
        "MEDZONE_DB_URL, MEDZONE_HUB_CONFIG and the sandbox settings (e.g. a site's "
        "TMPDIR). "
        "Nothing else of the hub's environment reaches the job.")).tag(config=True)
    hub_config_file = Unicode("", help=(
        "The hub config file a job's `medzone runs execute` reads on the compute node for "
        "the sandbox settings when the executor was not given them (the worker and "
        "`medzone run` give them); put `c.SlurmExecutor.hub_config_file = __file__` in the "
        "file itself. Empty: $MEDZONE_HUB_CONFIG of the submitting process, else the "
        "package's default config.")).tag(config=True)
    log_dir = Unicode("", help=(
        "Where the jobs' output files (sbatch --output) go, on a folder every node shares; "
        f"empty: MEDZONE_HOME/{LOG_DIR} (root-only).")).tag(config=True)

    def __init__(self, config=None, sandbox_config=None, **kwargs):
        # The sandbox settings are the job's to read on the compute node (from the same
        # hub config file); the executor itself needs only its own section.
        if config is not None:
            kwargs["config"] = config
        super().__init__(**kwargs)
        #: The zone's sandbox settings, handed to each job (``None``: the job reads them
        #: from the hub config file).
        self.sandbox_config = sandbox_config
        self.client = SlurmClient(self.slurm_conf or None, self.bin_dir or None,
                                  timeout=self.command_timeout)
        #: The last Slurm view of each job polled (for :meth:`reason`).
        self._seen: dict[str, SlurmJob] = {}

    # --- the job -------------------------------------------------------------------------

    def medzone(self) -> str:
        return self.medzone_command or os.path.join(sys.prefix, "bin", "medzone")

    def job_script(self, run_id: int) -> str:
        """The batch script of run *run_id*: the zone's ``medzone`` executing it."""
        argv = [self.medzone(), *EXECUTE_COMMAND, str(int(run_id))]
        return ("#!/bin/sh\n"
                f"# MedZone template run {int(run_id)}: executed in its user's sandbox.\n"
                f"exec {shlex.join(argv)}\n")

    def sbatch_options(self, run, log_dir: Path) -> list[str]:
        """sbatch's options for *run* (a :class:`~medzone_hub.models.Run` row)."""
        needs = run.needs if isinstance(run.needs, dict) else {}
        options = [f"--job-name=medzone-run-{run.id}",
                   f"--output={log_dir}/run-{run.id}-%j.log", "--open-mode=append",
                   f"--chdir={log_dir}", "--export=ALL", "--no-requeue", "--nodes=1",
                   "--ntasks=1", f"--cpus-per-task={int(needs.get('cpus') or 1)}"]
        if needs.get("memory_bytes"):
            options.append(f"--mem={math.ceil(int(needs['memory_bytes']) / (1 << 20))}M")
        if needs.get("time_limit_s"):
            options.append(f"--time={slurm_time(needs['time_limit_s'])}")
        if needs.get("gpu") == "required":
            options.append(f"--gres={self.gres_gpu}:{self.gpus_per_run}")
        for flag, value in (("--partition", self.partition), ("--account", self.account),
                            ("--qos", self.qos)):
            if value:
                options.append(f"{flag}={value}")
        return [*options, *self.extra_args]

    def job_env(self, home, store) -> dict[str, str]:
        """The job's whole environment: where the zone and its store are, and the config."""
        env = dict(BASE_ENV)
        env.update(self.job_environment)
        env[ENV_HOME] = str(home.root)
        env[ENV_DB_URL] = store.url.render_as_string(hide_password=False)
        hub_config = self.hub_config_file or os.environ.get(ENV_HUB_CONFIG)
        if hub_config:
            env[ENV_HUB_CONFIG] = str(Path(hub_config).resolve())
        if self.client.conf:
            env["SLURM_CONF"] = self.client.conf
        if self.sandbox_config is not None:
            env[ENV_SANDBOX_CONFIG] = json.dumps(dataclasses.asdict(self.sandbox_config))
        return env

    # --- the executor interface ----------------------------------------------------------

    def submit(self, home, store, run_id: int) -> str:
        """``sbatch`` run *run_id*'s job; its Slurm job id."""
        medzone = self.medzone()
        if not os.access(medzone, os.X_OK):
            raise InvalidInput(f"no medzone command at {medzone} to run on the compute "
                               "nodes (set SlurmExecutor.medzone_command)")
        with store.session() as session:
            run = session.get(Run, run_id)
            if run is None:
                raise NotFound(f"no run {run_id}")
            log_dir = Path(self.log_dir) if self.log_dir else home.root / LOG_DIR
            log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            options = self.sbatch_options(run, log_dir)
        return self.client.submit(self.job_script(run_id), options,
                                  env=self.job_env(home, store))

    def job(self, run) -> SlurmJob | None:
        """*run*'s job as Slurm knows it now (``None``: no job, or Slurm forgot it)."""
        if not run.executor_job:
            return None
        job = self.client.job(run.executor_job)
        if job is not None:
            self._seen[run.executor_job] = job
        return job

    def poll(self, run) -> str | None:
        """*run*'s state as Slurm tells it: ``queued`` (pending), ``running``, ``done``
        (COMPLETED), ``failed`` (any other end: FAILED, CANCELLED, TIMEOUT, NODE_FAIL,
        OUT_OF_MEMORY…), or ``None`` when Slurm knows no such job. Raises
        :class:`~medzone_hub.slurm.SlurmUnreachable` when the controller does not answer
        (the run is then neither lost nor ended: ask again later)."""
        job = self.job(run)
        if job is None:
            return None
        if job.pending:
            return "queued"
        if job.running:
            return "running"
        return "done" if job.succeeded else "failed"

    def reason(self, run) -> str | None:
        """One line on how *run*'s job ended, from its last :meth:`poll`
        (``Slurm job 12 TIMEOUT (TimeLimit, exit 0:15)``); ``None`` if not seen ended."""
        job = self._seen.get(run.executor_job or "")
        return job.describe() if job is not None and job.ended else None

    def cancel(self, run) -> None:
        """``scancel`` *run*'s job (quiet when it has ended or Slurm forgot it)."""
        if run.executor_job:
            self.client.cancel(run.executor_job)


# --- on the compute node ----------------------------------------------------------------

#: Seconds a job waits for its submitter to record the job's id on the run (sbatch returns
#: the id, then the submitter stores it; a job can start in between).
CLAIM_WAIT_S = 60.0


def _local_process_alive(marker: str | None) -> bool:
    """Whether a ``local:<pid>:<start>`` claim names a live process (the submitter)."""
    try:
        kind, pid, start = (marker or "").split(":")
        return kind == "local" and proc_start_time(int(pid)) == int(start)
    except ValueError:
        return False


def job_sandbox_config(environ=None) -> SandboxConfig | None:
    """The sandbox settings the submitter gave the job (:data:`ENV_SANDBOX_CONFIG`), or
    ``None`` when it gave none; :class:`InvalidInput` when they do not fit this version."""
    text = (os.environ if environ is None else environ).get(ENV_SANDBOX_CONFIG)
    if not text:
        return None
    try:
        values = json.loads(text)
        values["extra_ro_binds"] = [tuple(pair) for pair in values.get("extra_ro_binds", [])]
        return SandboxConfig(**values)
    except (ValueError, TypeError, AttributeError) as err:
        raise InvalidInput(f"the job's {ENV_SANDBOX_CONFIG} does not fit this MedZone "
                           f"({err}): the nodes must run the hub's version") from None


def execute_job(home, store, run_id: int, *, config=None, job_id: str | None = None,
                environ=None):
    """What a Slurm job runs (``medzone runs execute ID``): queued run *run_id*, executed
    here in its user's sandbox (:func:`medzone_hub.runner.execute_run`), if it is this
    job's (*job_id*, default ``$SLURM_JOB_ID``): a job left over from a submission the
    queue gave up on refuses a run that another job now holds, in one line.

    *config* is the zone's :class:`~medzone_hub.sandbox.SandboxConfig`; the sandbox gets a
    GPU only when Slurm gave the job one (``$SLURM_JOB_GPUS``)."""
    environ = os.environ if environ is None else environ
    job_id = job_id or environ.get("SLURM_JOB_ID")
    deadline = time.monotonic() + CLAIM_WAIT_S
    while True:
        with store.session() as session:
            run = session.get(Run, run_id)
            if run is None:
                raise NotFound(f"no run {run_id}")
            if run.state != "queued":
                raise Conflict(f"run {run_id} is {run.state}, not queued")
            holder, needs = run.executor_job, dict(run.needs or {})
        if job_id is None or holder == str(job_id):
            break
        if _local_process_alive(holder) and time.monotonic() < deadline:
            time.sleep(0.05)  # submitted a moment ago: the submitter records the job id
            continue
        raise Conflict(f"run {run_id} is not Slurm job {job_id}'s (its job: {holder or 'none'})")
    given = bool(environ.get("SLURM_JOB_GPUS")) if job_id else bool(needs.get("gpu_given"))
    return runner.execute_run(home, store, run_id,
                              config=run_config(config, {**needs, "gpu_given": given}))


__all__ = ["ENV_SANDBOX_CONFIG", "EXECUTE_COMMAND", "SlurmExecutor", "execute_job",
           "job_sandbox_config", "slurm_time"]
