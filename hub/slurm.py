"""A small client of a Slurm cluster, over its own commands (``sbatch``, ``scontrol``,
``scancel``), for the ``slurm`` run executor (:mod:`medzone_hub.executors.slurm`).

Nothing here talks to Slurm's daemons directly: the commands read the cluster's
``slurm.conf`` (``$SLURM_CONF``, or the one the client is given) and authenticate with
munge, as any user's would. A job's state is Slurm's answer to ``scontrol show job -o``
(kept by the controller for ``MinJobAge`` seconds after the job ends, 300 by default);
``sacct`` is not used, so no accounting database is needed.

Every failure is one line (:class:`SlurmMissing` when the commands or the configuration
are not there, :class:`SlurmUnreachable` when the controller does not answer,
:class:`SlurmError` when Slurm refuses a request, e.g. an unknown partition).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import MedZoneError

#: Slurm job states (``JobState``), by what they mean for a run.
PENDING_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
                            "REQUEUE_FED", "RESV_DEL_HOLD"})
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING",
                            "RESIZING", "STOPPED"})
#: Ended well; every other state not above ended badly (FAILED, CANCELLED, TIMEOUT,
#: NODE_FAIL, OUT_OF_MEMORY, PREEMPTED, BOOT_FAIL, DEADLINE, SPECIAL_EXIT…).
COMPLETED_STATES = frozenset({"COMPLETED"})

#: What Slurm's commands say when the controller cannot be reached.
_UNREACHABLE = ("unable to contact slurm controller", "socket timed out",
                "connection refused", "zero bytes were transmitted",
                "unable to establish", "communication connection failure",
                "slurm_receive_msg", "connect failure")

#: Seconds a command may take (the commands themselves retry for a while when the
#: controller is down: ~9 s for sbatch with the default MessageTimeout).
DEFAULT_TIMEOUT = 60.0


class SlurmError(MedZoneError):
    """Slurm refused a request (its own message, in one line)."""


class SlurmMissing(SlurmError):
    """Slurm's commands or its configuration are not on this machine."""


class SlurmUnreachable(SlurmError):
    """The Slurm controller does not answer."""


@dataclass(frozen=True)
class SlurmJob:
    """One job as ``scontrol show job -o`` shows it."""

    id: str
    state: str  # JobState: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, …
    reason: str  # Reason: None, Resources, Priority, NonZeroExitCode, TimeLimit, …
    exit_code: str  # ExitCode: "status:signal", e.g. "0:0", "1:0", "0:9"
    fields: Mapping[str, str]

    @property
    def pending(self) -> bool:
        return self.state in PENDING_STATES

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    @property
    def ended(self) -> bool:
        return not (self.pending or self.running)

    @property
    def succeeded(self) -> bool:
        return self.state in COMPLETED_STATES

    def describe(self) -> str:
        """One line: ``Slurm job 12 TIMEOUT (TimeLimit, exit 0:15)``."""
        extra = [r for r in (self.reason,) if r and r != "None"]
        if self.ended and self.exit_code not in ("", "0:0"):
            extra.append(f"exit {self.exit_code}")
        return f"Slurm job {self.id} {self.state}" + (f" ({', '.join(extra)})" if extra else "")


_FIELD = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_/:]*)=(\S*)")
_JOB_ID = re.compile(r"[0-9]+(?:_[0-9]+)?(?:\+[0-9]+)?")


def parse_job(line: str) -> SlurmJob:
    """A job from one line of ``scontrol show job -o`` (``Key=value`` fields)."""
    fields = dict(_FIELD.findall(line))
    return SlurmJob(id=fields.get("JobId", ""),
                    state=fields.get("JobState", "UNKNOWN").split("+")[0].upper(),
                    reason=fields.get("Reason", ""), exit_code=fields.get("ExitCode", ""),
                    fields=fields)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # The last line is the verdict ("Batch job submission failed: …"), earlier ones detail.
    for line in reversed(lines):
        if "error" in line.lower() or "fail" in line.lower() or "invalid" in line.lower():
            return line
    return lines[-1] if lines else ""


class SlurmClient:
    """Slurm's commands for one cluster.

    *conf*: its ``slurm.conf`` (default ``$SLURM_CONF``, else the commands' own default,
    ``/etc/slurm/slurm.conf``); *bin_dir*: where ``sbatch`` and the others are (default:
    ``$PATH``); *timeout*: seconds one command may take.
    """

    def __init__(self, conf: str | os.PathLike | None = None,
                 bin_dir: str | os.PathLike | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.conf = str(conf) if conf else (os.environ.get("SLURM_CONF") or None)
        self.bin_dir = str(bin_dir) if bin_dir else None
        self.timeout = timeout

    # --- commands -----------------------------------------------------------------------

    def command(self, name: str) -> str:
        """The path of Slurm command *name*; :class:`SlurmMissing` if it is not there."""
        path = shutil.which(name, path=self.bin_dir) if self.bin_dir else shutil.which(name)
        if path is None:
            where = self.bin_dir or "$PATH"
            raise SlurmMissing(f"Slurm's {name} is not installed (not in {where}): install "
                               "the Slurm client (Debian: apt-get install slurm-client) "
                               "or set SlurmExecutor.bin_dir")
        return path

    def environment(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """*env* (default: this process's) with ``SLURM_CONF`` set to this cluster's."""
        out = dict(os.environ if env is None else env)
        if self.conf:
            out["SLURM_CONF"] = self.conf
        return out

    def run(self, name: str, args: Sequence[str], *, input: str | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run Slurm command *name* with *args*; its completed process (any exit status).

        :class:`SlurmMissing` when the command or the configuration file is missing,
        :class:`SlurmUnreachable` when it times out or cannot reach the controller."""
        path = self.command(name)
        conf = self.conf or "/etc/slurm/slurm.conf"
        # The commands wait a minute for a missing configuration file: say so at once.
        if not os.path.isfile(conf):
            raise SlurmMissing(f"no Slurm configuration at {conf} (set SLURM_CONF or "
                               "SlurmExecutor.slurm_conf to the cluster's slurm.conf)")
        try:
            done = subprocess.run([path, *args], input=input, capture_output=True, text=True,
                                  env=self.environment(env), timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise SlurmUnreachable(f"Slurm's {name} did not answer within {self.timeout:g} s "
                                   f"(is slurmctld running? configuration: {conf})") from None
        except OSError as err:
            raise SlurmMissing(f"cannot run Slurm's {name}: {err.strerror or err}") from None
        if done.returncode != 0:
            text = _one_line(done.stderr) or _one_line(done.stdout)
            if any(s in text.lower() for s in _UNREACHABLE):
                raise SlurmUnreachable(f"the Slurm controller does not answer ({name}: {text}; "
                                       f"configuration: {conf})")
        return done

    def _check(self, name: str, done: subprocess.CompletedProcess) -> str:
        if done.returncode != 0:
            text = _one_line(done.stderr) or _one_line(done.stdout) or f"exit status {done.returncode}"
            raise SlurmError(f"Slurm's {name} failed: {text}")
        return done.stdout

    # --- what the executor needs --------------------------------------------------------

    def ping(self) -> None:
        """:class:`SlurmUnreachable` unless the controller answers."""
        done = self.run("scontrol", ["ping"])
        if done.returncode != 0 or " is UP" not in done.stdout:
            first = _one_line(done.stdout) or _one_line(done.stderr)
            raise SlurmUnreachable(f"the Slurm controller does not answer ({first})")

    def submit(self, script: str, options: Sequence[str] = (), *,
               env: Mapping[str, str] | None = None) -> str:
        """Submit batch *script* (its text) with sbatch *options*; the job id.

        The job's environment is *env* (``--export=ALL`` of the environment sbatch runs
        with), not this process's, when *env* is given."""
        done = self.run("sbatch", ["--parsable", *options], input=script, env=env)
        out = self._check("sbatch", done).strip()
        job_id = out.splitlines()[-1].split(";")[0].strip() if out else ""
        if not _JOB_ID.fullmatch(job_id):
            raise SlurmError(f"Slurm's sbatch answered no job id: {out[:200]!r}")
        return job_id

    def job(self, job_id: str) -> SlurmJob | None:
        """Job *job_id* as the controller knows it; ``None`` when it knows no such job
        (never submitted, or ended more than ``MinJobAge`` seconds ago)."""
        if not _JOB_ID.fullmatch(str(job_id)):
            raise SlurmError(f"not a Slurm job id: {job_id!r}")
        done = self.run("scontrol", ["show", "job", "-o", str(job_id)])
        if done.returncode != 0 and "invalid job id" in done.stderr.lower():
            return None
        out = self._check("scontrol", done)
        lines = [line for line in out.splitlines() if line.strip()]
        if not lines:
            return None
        return parse_job(lines[0])

    def cancel(self, job_id: str, *, signal: str | None = None) -> None:
        """Cancel job *job_id* (``scancel``); quiet when it has already ended or is unknown."""
        if not _JOB_ID.fullmatch(str(job_id)):
            raise SlurmError(f"not a Slurm job id: {job_id!r}")
        args = [f"--signal={signal}"] if signal else []
        done = self.run("scancel", [*args, str(job_id)])
        if done.returncode != 0:
            text = (_one_line(done.stderr) or "").lower()
            if "invalid job id" in text or "already completing or completed" in text:
                return
            self._check("scancel", done)


__all__ = ["COMPLETED_STATES", "PENDING_STATES", "RUNNING_STATES", "SlurmClient",
           "SlurmError", "SlurmJob", "SlurmMissing", "SlurmUnreachable", "parse_job"]
