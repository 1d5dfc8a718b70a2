"""Template runs: a papermill notebook executed with parameters inside a user's sandbox.

A run is a row of the store's ``runs`` table (:class:`medzone_hub.models.Run`), and this
module owns its lifecycle: :func:`prepare_run` (steps 1–5, papermill aside; the row is
``queued``), :func:`execute_run` (papermill in the sandbox; ``running``, then ``done``,
``failed`` or ``cancelled``; step 6), :func:`list_runs`, :func:`get_run`,
:func:`run_progress` (cell i of n, read from the executed notebook through homefs) and
:func:`cancel_run` (the owner or an admin; the sandbox is killed by its recorded pid only
if that is still the same process). A run left ``running`` by a process that died is
marked failed, with the reason, when it is next read. ``medzone run`` calls
:func:`run_template` (prepare, then execute, in that process); ``medzone runs`` and the
portal call the others. Together they

1. finds the template (a name in the ``medzone_templates`` package, the repository's
   ``templates/``, or a path to an ``.ipynb``) and hashes it;
2. checks every ``-p`` against the template's ``parameters`` cell as papermill's
   :func:`papermill.inspect_notebook` reads it: an unknown name, or a value that is not of
   the default's type (int, float, bool, str, list, dict), is refused in one line;
3. refuses a dataset parameter (``dataset`` or ``*_dataset``) naming a dataset the user
   holds no live grant for, whether the value was given or is the template's default;
4. keeps the hub's own copy of the template, by sha256, under
   ``MEDZONE_HOME/run-templates/`` (root-only: the reviewer's diff base when the executed
   notebook is exported, see :func:`kept_template`);
5. copies the template into a new run folder in the user's home,
   ``/home/<user>/runs/<UTC timestamp>-<template>/`` (host:
   ``MEDZONE_HOME/homes/<user>/runs/…``), and runs papermill there **inside the user's
   sandbox** (:func:`medzone_hub.sessions.run_in_sandbox`: the same policy as the user's
   kernels, no network, ``/data`` holding only live grants). The run folder is the
   kernel's working directory and ``MEDZONE_RUN_DIR``: whatever the notebook writes
   (figures, metrics, models) lands next to the executed notebook ``<template>.ipynb``;
6. records ``run.execute`` (actor: the user) in the audit log with the template's sha256,
   the parameters, the executed notebook's path and sha256, the outcome and the
   environment the run had (kernel argv, environment variables, Python and package versions).

The user owns their home and may plant anything in it, so:

* the hub never touches the home by path: the run folder, the template copy and
  ``parameters.json`` are made, and the executed notebook is read back, through
  :class:`medzone_hub.homefs.UserHome` (descriptors, ``O_NOFOLLOW``): a ``~/runs`` that is a
  symbolic link is refused in one line and nothing is created where it points;
* nothing the user can write decides what the run executes: papermill and the kernel run
  with ``python -I`` (no user site-packages, no ``PYTHON*`` variables, no script folder on
  ``sys.path``), the kernel spec, Jupyter configuration and IPython profile come from a
  hub-written read-only folder bound at :data:`KERNEL_INSIDE`, and the kernel starts there
  (not in the run folder) and enters the run folder only once its start-up is done, so
  no module or ``matplotlibrc`` planted in the home or the run folder is read.

A failing cell raises :class:`RunFailed` whose one-line message names the cell (its index
in the template, its tags, its first source line) and the error; the partial notebook is
kept and its path is part of the message.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from medzone_kernel import contract

from . import audit
from .access import live_grants
from .accounts import get_user
from .config import MedZoneHome
from .homefs import UserHome
from .manifest import sha256_file
from .errors import Conflict, InvalidInput, MedZoneError, NotFound, RuleViolation
from .models import RUN_STATES, AuditEvent, Run, User, utcnow
from .sandbox import ensure_home, proc_start_time, release_resources
from .sessions import policy_for, run_in_sandbox
from .usage import record_run_usage

log = logging.getLogger(__name__)

#: Where the project's templates live: the ``medzone_templates`` package's data, so a wheel
#: install finds them as well as a checkout does.
TEMPLATES_DIR = Path(str(resources.files("medzone_templates")))

#: Environment variable naming the run folder inside the sandbox.
RUN_DIR_ENV = contract.ENV_RUN_DIR

#: Name of the copy of the template kept in each run folder (the diff base for export).
TEMPLATE_COPY = "template.ipynb"
PARAMETERS_FILE = "parameters.json"

#: Tags papermill adds to cells it inserts (not part of the template).
PAPERMILL_TAGS = ("injected-parameters", "papermill-error-cell-tag")

#: Exit status of the in-sandbox driver when a cell raised (the notebook says which).
CELL_FAILED = 3

#: Where a run's hub-written kernel folder (kernel spec, Jupyter configuration, IPython
#: profile) is bound read-only inside its sandbox.
KERNEL_INSIDE = contract.KERNEL_INSIDE
#: The run's writable scratch (IPython's profile copy, Jupyter runtime, matplotlib cache):
#: inside the run's own private ``/tmp``, which only this run's processes see.
SCRATCH_INSIDE = "/tmp/medzone-run"
#: The kernel spec name papermill asks for (templates say ``python3``).
RUN_KERNEL_NAME = "python3"
#: Packages whose versions a run records (those present in the kernel's environment).
RECORDED_PACKAGES = ("papermill", "nbclient", "jupyter_client", "ipykernel", "ipython",
                     "traitlets", "nbformat", "numpy", "pandas", "matplotlib", "torch",
                     "monai", "pydicom", "medzone")
#: The largest executed notebook the hub reads back (to name a failed cell).
MAX_NOTEBOOK_BYTES = 512 * 1024 * 1024

_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}

# Runs inside the sandbox: papermill with its progress bar on stderr. A failing cell exits
# CELL_FAILED quietly (the host names the cell from the partial notebook); anything else is
# one line on stderr.
DRIVER = r"""
import json, os, shutil, sys
src, out, params_file, run_dir, kernel_dir, result_fd = sys.argv[1:7]
os.environ["MEDZONE_RUN_DIR"] = run_dir
os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
try:
    # IPython needs a writable profile: a copy of the hub's, in this run's private /tmp.
    shutil.copytree(os.path.join(kernel_dir, "ipython"), os.environ["IPYTHONDIR"])
    for name in ("JUPYTER_RUNTIME_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME",
                 "XDG_DATA_HOME"):
        os.makedirs(os.environ[name], mode=0o700, exist_ok=True)
    import papermill
    from papermill.exceptions import PapermillExecutionError
    from traitlets.config import Config
    with open(params_file) as f:
        params = json.load(f)
    # The kernel talks to papermill over unix sockets in the sandbox's private /tmp.
    config = Config()
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = "/tmp/medzone-kernel"
    # The kernel starts in the hub's folder; its start-up file enters run_dir.
    nb = papermill.execute_notebook(src, out, parameters=params, cwd=kernel_dir,
                                    kernel_name="python3", progress_bar=True,
                                    log_output=False, config=config)
    # What the run produced, written once more and its hash told to the hub on a pipe: the
    # hub records it, whatever the home holds by the time the hub looks.
    import hashlib, nbformat
    data = nbformat.writes(nb).encode("utf-8")
    with open(out, "wb") as f:
        f.write(data)
    os.write(int(result_fd), hashlib.sha256(data).hexdigest().encode() + b"\n")
except PapermillExecutionError:
    sys.exit(3)
except KeyboardInterrupt:
    sys.exit(130)
except BaseException as err:
    if isinstance(err, SystemExit):
        raise
    line = (str(err).strip().splitlines() or [""])[0]
    print(f"papermill: {type(err).__name__}: {line}", file=sys.stderr)
    sys.exit(2)
"""


class RunFailed(MedZoneError):
    """The notebook ran but a cell failed (or papermill stopped); ``notebook`` is the
    partial executed notebook on the host, kept for inspection (``None`` if none was written)."""

    def __init__(self, message: str, notebook: Path | None = None):
        super().__init__(message)
        self.notebook = notebook


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter of a template: its name, type name and default (Python source)."""

    name: str
    type: str  # int, float, bool, str, list, dict, or "any"
    default: str
    help: str = ""

    @property
    def default_value(self) -> Any:
        try:
            return ast.literal_eval(self.default)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None


@dataclass
class RunResult:
    template: str
    user: str
    notebook: Path  # on the host
    notebook_inside: str  # as the user sees it
    run_dir: Path
    template_sha256: str
    output_sha256: str | None
    parameters: dict[str, Any]
    seconds: float
    status: str = "ok"
    files: list[str] = field(default_factory=list)  # what the run wrote, relative to run_dir


# --- templates and parameters ------------------------------------------------------------

def list_templates(templates_dir: str | os.PathLike | None = None) -> list[str]:
    folder = Path(templates_dir or TEMPLATES_DIR)
    return sorted(p.stem for p in folder.glob("*.ipynb") if not p.name.startswith("."))


def find_template(template: str, templates_dir: str | os.PathLike | None = None) -> Path:
    """A template's file: *template* is a name in *templates_dir* (default: the installed
    ``medzone_templates`` package) or a path to an ``.ipynb`` file."""
    if template.endswith(".ipynb") or os.sep in template:
        path = Path(template)
        if not path.is_file():
            raise NotFound(f"no template file {template}")
        return path.resolve()
    folder = Path(templates_dir or TEMPLATES_DIR)
    path = folder / f"{template}.ipynb"
    if not _TEMPLATE_NAME.fullmatch(template) or not path.is_file():
        names = ", ".join(list_templates(folder)) or "none"
        raise NotFound(f"no template {template!r} (templates: {names})")
    return path.resolve()


def _type_of(value: Any) -> str:
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str),
                       ("list", (list, tuple)), ("dict", dict)):
        if isinstance(value, kind):
            return name
    return "any"


def template_parameters(path: str | os.PathLike) -> dict[str, ParameterSpec]:
    """The template's parameters as papermill reads its ``parameters`` cell. The type is
    the annotation when there is one (``epochs: int = 3``), else the default's type."""
    import papermill

    try:
        found = papermill.inspect_notebook(str(path))
    except Exception as err:  # noqa: BLE001 - nbformat/papermill raise many kinds
        raise InvalidInput(f"cannot read template {path}: {err}") from None
    specs = {}
    for name, info in found.items():
        default = info.get("default", "None")
        hinted = (info.get("inferred_type_name") or "None").strip().lower()
        hinted = {"boolean": "bool", "integer": "int", "string": "str"}.get(hinted, hinted)
        try:
            value = ast.literal_eval(default)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = None
        kind = hinted if hinted in ("int", "float", "bool", "str", "list", "dict") else _type_of(value)
        specs[name] = ParameterSpec(name, kind, default, info.get("help", ""))
    return specs


def coerce_value(spec: ParameterSpec, raw: str) -> Any:
    """*raw* (as typed on the command line) as a value of *spec*'s type."""
    kind = spec.type
    bad = InvalidInput(f"parameter {spec.name!r} takes {_article(kind)}, not {raw!r} "
                       f"(default: {spec.default})")
    text = raw.strip()
    if kind == "str":
        return raw
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise bad
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise bad from None
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise bad from None
    value = _parse_literal(text)
    if kind == "list":
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return value
    if kind == "dict":
        if not isinstance(value, dict):
            raise bad
        return value
    # No default type to go by (e.g. ``= None``): a JSON/Python literal, else the text.
    return raw if value is _UNPARSED else value


_UNPARSED = object()


def _parse_literal(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _UNPARSED


def _article(kind: str) -> str:
    return {"int": "an int (whole number)", "float": "a float (number)",
            "bool": "a bool (true/false)", "str": "a str", "list": "a list (e.g. [1, 2])",
            "dict": "a dict (e.g. {\"a\": 1})"}.get(kind, "a value")


def check_parameters(specs: dict[str, ParameterSpec],
                     given: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The ``-p NAME VALUE`` pairs as typed values; :class:`InvalidInput` for an unknown
    name, a repeated one, or a value of the wrong type."""
    values: dict[str, Any] = {}
    for name, raw in given:
        if name not in specs:
            valid = ", ".join(sorted(specs)) or "none: the template takes no parameters"
            raise InvalidInput(f"unknown parameter {name!r} (valid: {valid})")
        if name in values:
            raise InvalidInput(f"parameter {name!r} given twice")
        values[name] = coerce_value(specs[name], raw)
    return values


def is_dataset_parameter(name: str) -> bool:
    return name == "dataset" or name.endswith("_dataset")


def datasets_named(specs: dict[str, ParameterSpec], values: dict[str, Any]) -> dict[str, str]:
    """Dataset parameters and the dataset each names once *values* override the defaults
    (an empty default means "the one dataset granted" and names none)."""
    named = {}
    for name, spec in specs.items():
        if not is_dataset_parameter(name):
            continue
        value = values[name] if name in values else spec.default_value
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise InvalidInput(f"parameter {name!r} names a dataset: give its id, not {value!r}")
        named[name] = value
    return named


# --- failures ----------------------------------------------------------------------------

def failed_cell(notebook: str | os.PathLike) -> str | None:
    """One line naming the cell that failed in an executed notebook (its index among the
    template's cells, tags, first source line, error), or ``None`` if none is marked."""
    import nbformat

    try:
        nb = nbformat.read(str(notebook), as_version=4)
    except Exception:  # noqa: BLE001 - a truncated notebook names nothing
        return None
    return _failed_cell_of(nb)


def _failed_cell_in_bytes(data: bytes) -> str | None:
    import nbformat

    try:
        nb = nbformat.reads(data.decode("utf-8"), as_version=4)
    except Exception:  # noqa: BLE001 - a truncated notebook names nothing
        return None
    return _failed_cell_of(nb)


def _failed_cell_of(nb) -> str | None:
    index = -1
    for cell in nb.cells:
        tags = list(cell.get("metadata", {}).get("tags", []))
        if any(t in PAPERMILL_TAGS for t in tags):
            continue
        index += 1
        meta = cell.get("metadata", {}).get("papermill", {})
        error = next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), None)
        if not (meta.get("exception") or meta.get("status") == "failed" or error):
            continue
        first = next((line.strip() for line in cell.source.splitlines() if line.strip()), "")
        if len(first) > 70:
            first = first[:67] + "..."
        where = f"cell {index}"
        if tags:
            where += f" [{', '.join(tags)}]"
        where += f" `{first}`" if first else " (empty)"
        if error:
            evalue = (str(error.get("evalue", "")).strip().splitlines() or [""])[0]
            if len(evalue) > 160:
                evalue = evalue[:157] + "..."
            what = f"{error.get('ename', 'Error')}: {evalue}" if evalue else error.get("ename", "Error")
        else:
            what = "it did not finish"
        return f"{where} failed: {what}"
    return None


# --- running -----------------------------------------------------------------------------

def _timestamp(now: datetime | None = None) -> str:
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ")


# --- the hub's copy of each template (the reviewer's diff base) ----------------------------

def template_store(home: MedZoneHome) -> Path:
    """``MEDZONE_HOME/run-templates``: one root-only file per template version run,
    named by its sha256. Never bound into a sandbox."""
    return home.run_templates_dir


def keep_template(home: MedZoneHome, data: bytes) -> str:
    """Keep *data* (a template's bytes) in :func:`template_store`; its sha256."""
    digest = hashlib.sha256(data).hexdigest()
    folder = template_store(home)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    target = folder / f"{digest}.ipynb"
    if target.is_file() and sha256_file(target) == digest:
        return digest
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o400)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return digest


def kept_template(home: MedZoneHome, digest: str) -> bytes | None:
    """The hub's copy of the template with sha256 *digest*, or ``None`` if none is kept
    (or the copy no longer matches its name)."""
    if not re.fullmatch(r"[0-9a-f]{64}", digest or ""):
        return None
    try:
        data = (template_store(home) / f"{digest}.ipynb").read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == digest else None


def recorded_run(session, user: str, notebook: str) -> dict[str, Any] | None:
    """The ``run.execute`` detail of *user*'s newest template run that wrote *notebook* (a
    path relative to the home, e.g. ``runs/<stamp>-<template>/<template>.ipynb``); ``None``
    if no template run of *user* wrote that path."""
    from sqlalchemy import select

    stem = PurePosixPath(notebook).stem
    inside = f"{contract.home_inside(user)}/{notebook.lstrip('/')}"
    rows = session.scalars(select(AuditEvent).where(
        AuditEvent.subject == f"template:{stem}", AuditEvent.action == "run.execute",
        AuditEvent.actor == user).order_by(AuditEvent.seq.desc()))
    for row in rows:
        try:
            detail = row.detail
        except ValueError:
            continue
        if isinstance(detail, dict) and detail.get("output") == inside:
            return detail
    return None


def run_base(home: MedZoneHome, session, user: str, notebook: str) -> bytes | None:
    """The template a run of *user* executed into *notebook* (relative to the home), as
    the hub kept it when the run was created; ``None`` when no run recorded one."""
    detail = recorded_run(session, user, notebook)
    if detail is None:
        return None
    return kept_template(home, str(detail.get("template_copy") or ""))


# --- the run's environment -------------------------------------------------------------

def _python_of(policy, config) -> tuple[str, str]:
    prefix = policy.env.get("VIRTUAL_ENV") or (config.python_prefix if config and
                                                config.python_prefix else sys.prefix)
    return prefix, os.path.join(prefix, "bin", "python")


def kernel_argv(python: str) -> list[str]:
    """The kernel a template run starts: isolated mode (``-I``: no user site-packages,
    ``PYTHON*`` variables ignored, nothing of the working folder on ``sys.path``)."""
    return [python, "-I", "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def run_environment() -> dict[str, str]:
    """What a template run's sandbox gets besides the user's usual environment: every
    place Jupyter, IPython and matplotlib read configuration or code from is the hub's
    (:data:`KERNEL_INSIDE`) or the run's own private scratch (:data:`SCRATCH_INSIDE`)."""
    scratch = SCRATCH_INSIDE
    return {
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "IPYTHONDIR": f"{scratch}/ipython",
        "JUPYTER_CONFIG_DIR": f"{KERNEL_INSIDE}/config",
        "JUPYTER_CONFIG_PATH": f"{KERNEL_INSIDE}/config",
        "JUPYTER_DATA_DIR": f"{KERNEL_INSIDE}/share",
        "JUPYTER_PATH": f"{KERNEL_INSIDE}/share",
        "JUPYTER_RUNTIME_DIR": f"{scratch}/runtime",
        "JUPYTER_PLATFORM_DIRS": "0",
        "MPLCONFIGDIR": f"{scratch}/matplotlib",
        "XDG_CONFIG_HOME": f"{scratch}/config",
        "XDG_CACHE_HOME": f"{scratch}/cache",
        "XDG_DATA_HOME": f"{scratch}/share",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "MEDZONE_TEMPLATE_RUN": "1",
    }


#: The IPython kernel's configuration in the hub's profile. (Its history goes to the
#: profile copy in the run's private /tmp; turning history off makes the kernel take
#: seconds to shut down.)
KERNEL_CONFIG = {
    "IPKernelApp": {"ignore_cwd": True, "exec_PYTHONSTARTUP": False, "extensions": [],
                    "exec_files": [], "exec_lines": [], "code_to_run": "",
                    "module_to_run": "", "file_to_run": ""},
}

#: The hub profile's start-up file: what libraries read from the working folder is read
#: while the kernel still sits in the hub's folder; then it enters the run folder (where
#: the notebook's relative paths point).
STARTUP = """\
import os as _os
try:
    import matplotlib as _mpl  # reads matplotlibrc now: no run-folder or home file is seen
except ImportError:
    pass
_os.chdir(_os.environ["MEDZONE_RUN_DIR"])
del _os
"""


def write_kernel_folder(folder: Path, python: str, inputs: dict[str, bytes] | None = None) -> None:
    """Fill *folder* (bound read-only at :data:`KERNEL_INSIDE`): the kernel spec
    ``python3``, the Jupyter configuration folder, the IPython profile and, under
    ``input/``, the run's *inputs* (the template and its parameters, as papermill reads
    them), owned by the hub (folders 0755, files 0644)."""
    spec = {"argv": kernel_argv(python), "display_name": "MedZone template run",
            "language": "python", "env": {"MEDZONE_KERNEL": "1"}}
    files = {
        f"share/kernels/{RUN_KERNEL_NAME}/kernel.json": json.dumps(spec, indent=1),
        "config/jupyter_config.json": "{}\n",
        "ipython/profile_default/ipython_kernel_config.json": json.dumps(KERNEL_CONFIG, indent=1),
        "ipython/profile_default/startup/00-medzone-run.py": STARTUP,
    }
    files.update({f"input/{name}": content for name, content in (inputs or {}).items()})
    os.chmod(folder, 0o755)
    for rel, text in files.items():
        path = folder / rel
        for parent in reversed(PurePosixPath(rel).parents):
            (folder / parent).mkdir(mode=0o755, exist_ok=True)
            os.chmod(folder / parent, 0o755)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        os.chmod(path, 0o644)


def environment_record(prefix: str, python: str, env: dict[str, str]) -> dict[str, Any]:
    """What the ``run.execute`` audit row says the run ran with."""
    return {
        "driver_argv": [python, "-I", "-c", "<driver>"],
        "kernel_argv": kernel_argv(python),
        "kernel_dir": KERNEL_INSIDE,
        "env": dict(sorted(env.items())),
        "python": _python_version(prefix),
        "packages": _package_versions(prefix),
    }


def _python_version(prefix: str) -> str | None:
    if os.path.realpath(prefix) == os.path.realpath(sys.prefix):
        return platform.python_version()
    try:
        for line in Path(prefix, "pyvenv.cfg").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() in ("version", "version_info"):
                return value.strip()
    except OSError:
        pass
    return None


def _package_versions(prefix: str) -> dict[str, str]:
    from importlib import metadata

    # Looked up by name: the finders match each name's folder, where walking every
    # distribution parses all their metadata (0.13 s against 0.02 s a run here).
    where = ({} if os.path.realpath(prefix) == os.path.realpath(sys.prefix) else
             {"path": [str(p) for p in Path(prefix).glob("lib/python3*/site-packages")]})
    found: dict[str, str] = {}
    for name in RECORDED_PACKAGES:
        dist = next(iter(metadata.distributions(name=name, **where)), None)
        if dist is not None:
            found[name] = dist.version
    return dict(sorted(found.items()))


# --- running -----------------------------------------------------------------------------

def user_home_fs(policy) -> UserHome:
    """The user's home as the hub may touch it (see :mod:`medzone_hub.homefs`)."""
    if policy.drop_to_uid:
        return UserHome(policy.home_host, policy.uid, policy.gid)
    return UserHome(policy.home_host)


def prepare_run(
    home: MedZoneHome,
    store,
    user: str,
    template: str,
    parameters: Sequence[tuple[str, str]] = (),
    *,
    templates_dir: str | os.PathLike | None = None,
    config=None,
    now: datetime | None = None,
    needs: dict[str, Any] | None = None,
    executor: str | None = None,
):
    """Check and prepare a run of *template* as *user* with ``(name, raw value)``
    *parameters* (steps 1–5 of the module docstring, papermill aside): the run folder and
    the user's copies of the template and parameters exist, and the run is recorded in the
    store, ``queued``. Returns the :class:`~medzone_hub.models.Run` row.

    *needs* (what the run needs: :func:`medzone_hub.runqueue.run_needs`) and *executor*
    (default ``local``) are recorded for the run queue.

    Raises :class:`InvalidInput`/:class:`NotFound` for a bad template or parameter and
    :class:`RuleViolation` for an ungranted dataset, before anything is created.
    """
    path = find_template(template, templates_dir)
    stem = path.stem
    data = path.read_bytes()  # hashed, kept and copied: the same bytes
    template_sha = hashlib.sha256(data).hexdigest()
    specs = template_parameters(path)
    values = check_parameters(specs, parameters)
    named = datasets_named(specs, values)

    with store.session() as session:
        granted = set(live_grants(session, user, now=now))
        for name, dataset_id in named.items():
            if dataset_id not in granted:
                held = ", ".join(sorted(granted)) or "none"
                raise RuleViolation(
                    f"user {user!r} holds no live grant for dataset {dataset_id!r} "
                    f"(parameter {name!r}; live grants: {held})")
        # The same policy the run gets: validates the account, gives the home's owner.
        policy = policy_for(home, session, user, config=config, now=now)
    release_resources(policy)  # run_in_sandbox reserves its own GPU, if any
    keep_template(home, data)

    ensure_home(home, policy)
    fs = user_home_fs(policy)
    # Refused in one line, before anything is created, if ~/runs (or any part) is a link.
    rel = fs.mkdir_unique("runs", f"{_timestamp(now)}-{stem}")
    # The user's copies, for reference; papermill reads the hub's (execute_run), which no
    # one else can swap while the run starts.
    fs.write_bytes(f"{rel}/{TEMPLATE_COPY}", data, mode=0o600)
    fs.write_bytes(f"{rel}/{PARAMETERS_FILE}", json.dumps(values, indent=1).encode(),
                   mode=0o600)
    with store.session() as session:
        run = Run(user=get_user(session, user), template=stem, template_sha256=template_sha,
                  parameters=values, state="queued", run_dir=rel,
                  output=f"{rel}/{stem}.ipynb", needs=needs, executor=executor or "local")
        if now is not None:
            run.created_at = now
        run.queued_at = run.created_at or utcnow()
        session.add(run)
        session.flush()
    return run


def execute_run(home: MedZoneHome, store, run_id: int, *, config=None) -> RunResult:
    """Execute the prepared (``queued``) run *run_id* in its user's sandbox, keeping its
    row up to date (``running``, then ``done``, ``failed`` or ``cancelled``), and append
    the ``run.execute`` audit row.

    Returns the :class:`RunResult`; raises :class:`RunFailed` (partial notebook kept) when
    the notebook fails or the run is cancelled.
    """
    runner_pid = os.getpid()
    with store.session() as session:
        run = session.get(Run, run_id, with_for_update=True)
        if run is None:
            raise NotFound(f"no run {run_id}")
        if run.state != "queued":
            raise Conflict(f"run {run_id} is {run.state}, not queued")
        user, stem, values, rel = run.user.name, run.template, dict(run.parameters), run.run_dir
        template_sha = run.template_sha256
        run.state, run.started_at = "running", utcnow()
        run.runner_pid, run.runner_start = runner_pid, proc_start_time(runner_pid)
    data = kept_template(home, template_sha)
    with store.session() as session:
        policy = policy_for(home, session, user, config=config)
    release_resources(policy)
    home_dir = ensure_home(home, policy)
    fs = user_home_fs(policy)
    if data is None:
        _finish(store, run_id, "failed", error="the hub's copy of the template is gone")
        raise RunFailed(f"run of {stem} failed: the hub's copy of the template is gone")

    run_dir = home_dir / rel
    inside = f"{policy.home_inside}/{rel}"
    params_json = json.dumps(values, indent=1).encode()
    output_rel = f"{rel}/{stem}.ipynb"
    output = home_dir / output_rel
    output_inside = f"{inside}/{stem}.ipynb"
    prefix, python = _python_of(policy, config)
    env = run_environment()
    result_read, result_write = os.pipe()
    command = [python, "-I", "-c", DRIVER, f"{KERNEL_INSIDE}/input/{TEMPLATE_COPY}",
               output_inside, f"{KERNEL_INSIDE}/input/{PARAMETERS_FILE}", inside, KERNEL_INSIDE,
               str(result_write)]

    def sandbox_started(pid: int) -> None:
        # Recorded for cancel_run; a run cancelled before its sandbox existed stops here.
        with store.session() as session:
            row = session.get(Run, run_id, with_for_update=True)
            row.sandbox_pid, row.sandbox_start = pid, proc_start_time(pid)
            cancelled = row.state == "cancelled"
        if cancelled:
            _kill(pid)

    started = time.monotonic()
    log.info("running %s as %s in %s", stem, user, inside)
    kernel_dir = Path(tempfile.mkdtemp(prefix="medzone-run-kernel-"))
    try:
        write_kernel_folder(kernel_dir, python,
                            inputs={TEMPLATE_COPY: data, PARAMETERS_FILE: params_json})
        try:
            rc = run_in_sandbox(home, store, user, command, config=config,
                                extra_ro_binds=[(str(kernel_dir), KERNEL_INSIDE)], extra_env=env,
                                pass_fds=(result_write,), on_start=sandbox_started)
        except KeyboardInterrupt:  # the sandbox is gone with its monitor; record and report it
            rc = 130
        except BaseException as err:
            _finish(store, run_id, "failed", error=_one_line(err))
            raise
    finally:
        shutil.rmtree(kernel_dir, ignore_errors=True)
        os.close(result_write)
        try:
            reported = os.read(result_read, 256).decode("ascii", "replace").strip()
        finally:
            os.close(result_read)
    seconds = time.monotonic() - started

    written = fs.is_file(output_rel)
    in_home = _read_back(fs.sha256, output_rel) if written else None
    # The run's own report (a finished run) wins over what the home holds now.
    output_sha = reported if re.fullmatch(r"[0-9a-f]{64}", reported) else in_home
    with store.session() as session:
        row = session.get(Run, run_id)
        cancelled_by = row.error if row.state == "cancelled" else None
    failure = None
    if cancelled_by is not None:
        failure = cancelled_by
    elif rc != 0:
        executed = (_read_back(fs.read_bytes, output_rel, max_bytes=MAX_NOTEBOOK_BYTES)
                    if written else None)
        cell = _failed_cell_in_bytes(executed) if executed else None
        if cell:
            failure = cell
        elif rc == 130:
            failure = "interrupted"
        else:
            failure = f"papermill exited with status {rc}"
    status = "ok" if failure is None else "cancelled" if cancelled_by is not None else "failed"
    detail = {
        "run": run_id,
        "template": stem,
        "template_sha256": template_sha,
        "template_copy": template_sha,
        "parameters": values,
        "output": output_inside,
        "output_sha256": output_sha,
        "status": status,
        "seconds": round(seconds, 1),
        "environment": environment_record(prefix, python, env),
    }
    if failure:
        detail["error"] = failure
    if output_sha is not None and in_home != output_sha:
        # Changed (or removed) in the home after the run wrote it.
        detail["output_sha256_in_home"] = in_home
    with store.session() as session:
        row = session.get(Run, run_id, with_for_update=True)
        if row.state != "cancelled":
            row.state, row.error = ("done", None) if failure is None else ("failed", failure)
        row.output_sha256, row.finished_at = output_sha, utcnow()
        row.runner_pid = row.runner_start = row.sandbox_pid = row.sandbox_start = None
        audit.append(session, actor=user, action="run.execute", subject=f"template:{stem}",
                     detail=detail)
        record_run_usage(session, row)  # what its sandbox used (medzone_hub.usage)
    if failure:
        kept = f"; partial notebook kept at {output}" if written else ""
        what = failure if cancelled_by is not None else f"failed: {failure}"
        error = RunFailed(f"run of {stem} {what}{kept}", output if written else None)
        if rc == 130 and cancelled_by is None:
            error.exit_code = 130
        raise error
    files = [f[len(rel) + 1:] for f in _read_back(fs.walk_files, rel, skip_hidden=True) or []]
    return RunResult(template=stem, user=user, notebook=output, notebook_inside=output_inside,
                     run_dir=run_dir, template_sha256=template_sha, output_sha256=output_sha,
                     parameters=values, seconds=seconds, status=status, files=files)


def run_template(
    home: MedZoneHome,
    store,
    user: str,
    template: str,
    parameters: Sequence[tuple[str, str]] = (),
    **options,
) -> RunResult:
    """Run *template* as *user* with ``(name, raw value)`` *parameters* (module docstring):
    :func:`prepare_run` (which takes the keyword *options*: ``templates_dir``, ``config``,
    ``now``) then :func:`execute_run`, in this process.

    Returns the :class:`RunResult`; raises :class:`InvalidInput`/:class:`NotFound` for a bad
    template or parameter, :class:`RuleViolation` for an ungranted dataset, and
    :class:`RunFailed` (partial notebook kept) when the notebook fails.
    """
    run = prepare_run(home, store, user, template, parameters, **options)
    return execute_run(home, store, run.id, config=options.get("config"))


# --- runs in the store -----------------------------------------------------------------

#: Why a run still marked ``running`` whose process is gone failed.
PROCESS_GONE = ("the run stopped before it finished: the process running it is gone "
                "(the portal or the machine restarted); run it again")

#: States a run ends in.
ENDED = ("done", "failed", "cancelled")

#: An actor starting with this is the zone's operator at the command line (never a hub
#: user: user names hold no colon), who may cancel any run.
OPERATOR_PREFIX = "cli:"


def _alive(pid: int | None, start: int | None) -> bool:
    return pid is not None and start is not None and proc_start_time(pid) == start


def _kill(pid: int) -> None:
    """Kill a sandbox's bubblewrap monitor (``--die-with-parent`` takes the sandbox with it)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _finish(store, run_id: int, state: str, *, error: str | None = None) -> None:
    with store.session() as session:
        row = session.get(Run, run_id, with_for_update=True)
        if row.state not in ENDED:
            row.state, row.error = state, error
        row.finished_at = utcnow()
        row.runner_pid = row.runner_start = row.sandbox_pid = row.sandbox_start = None
        record_run_usage(session, row)  # what its sandbox used, if it started one


def _check_alive(session, run) -> None:
    """Mark *run* failed if it is ``running`` but the process executing it is gone (a run
    executed on this machine: another executor's job is looked after by the run queue)."""
    if run.executor not in (None, "local"):
        return
    if run.state == "running" and run.runner_pid is not None and not _alive(
            run.runner_pid, run.runner_start):
        run.state, run.error, run.finished_at = "failed", PROCESS_GONE, utcnow()
        run.runner_pid = run.runner_start = run.sandbox_pid = run.sandbox_start = None
        session.flush()


#: Public names the run queue uses.
check_alive = _check_alive
process_alive = _alive
kill_process = _kill


def home_path(home: MedZoneHome, run) -> Path:
    """The host path of *run*'s executed notebook."""
    return home.homes_dir / run.user.name / run.output


def list_runs(session, user: str | None = None, state: str | None = None) -> list:
    """Runs, newest first: *user*'s only, or in *state* only, when given. A run whose
    process is gone is marked failed first."""
    from sqlalchemy import select

    if state is not None and state not in RUN_STATES:
        raise InvalidInput(f"no run state {state!r} (states: {', '.join(RUN_STATES)})")
    query = select(Run).order_by(Run.id.desc())
    if user is not None:
        query = query.join(Run.user).where(User.name == user)
    runs = list(session.scalars(query))
    for run in runs:
        _check_alive(session, run)
    return [r for r in runs if state is None or r.state == state]


def get_run(session, run_id: int, *, user: str | None = None):
    """Run *run_id* (*user*'s, when given): :class:`NotFound` otherwise."""
    run = session.get(Run, run_id)
    if run is None or (user is not None and run.user.name != user):
        raise NotFound(f"no run {run_id}" + (" of yours" if user is not None else ""))
    _check_alive(session, run)
    return run


def find_run(session, user: str, run_dir: str):
    """*user*'s run whose folder is *run_dir* (relative to the home), or ``None``."""
    from sqlalchemy import select

    run = session.scalar(select(Run).join(Run.user).where(User.name == user,
                                                          Run.run_dir == run_dir))
    if run is not None:
        _check_alive(session, run)
    return run


def cancel_run(session, run_id: int, by: str):
    """Cancel run *run_id* for *by* (its owner, an admin, or the operator): its sandbox is
    killed, if it is still the same process, and the run is marked ``cancelled``
    (audited ``run.cancel``). :class:`RuleViolation` for anyone else, :class:`Conflict`
    when the run has already ended."""
    run = session.get(Run, run_id, with_for_update=True)
    if run is None:
        raise NotFound(f"no run {run_id}")
    owner = run.user.name
    if by != owner and not by.startswith(OPERATOR_PREFIX):
        try:
            admin = get_user(session, by).admin
        except NotFound:
            admin = False
        if not admin:
            raise RuleViolation(f"run {run_id} is {owner}'s: only they or an admin may cancel it")
    _check_alive(session, run)
    if run.state in ENDED:
        raise Conflict(f"run {run_id} has already ended ({run.state})")
    killed = False
    if _alive(run.sandbox_pid, run.sandbox_start):
        _kill(run.sandbox_pid)
        killed = True
    run.state, run.error, run.finished_at = "cancelled", f"cancelled by {by}", utcnow()
    audit.append(session, actor=by, action="run.cancel", subject=f"template:{run.template}",
                 detail={"run": run.id, "user": owner, "output": run.output,
                         "sandbox_killed": killed})
    return run


def run_progress(home: MedZoneHome, run) -> dict[str, Any]:
    """How far *run* got, read from its executed notebook through the user's home
    (:mod:`medzone_hub.homefs`): cells finished, code cells, the running cell's number,
    papermill's duration, and whether the notebook could be read."""
    fs = UserHome.of(home, run.user.name)
    try:
        data = fs.read_bytes(run.output, max_bytes=MAX_PROGRESS_BYTES)
    except (OSError, MedZoneError):
        data = None
    nb = notebook_of(data)
    done, total, current = cell_progress(nb)
    seconds = (nb or {}).get("metadata", {}).get("papermill", {}).get("duration")
    if seconds is None and run.started_at is not None:
        end = run.finished_at or utcnow()
        seconds = (end - run.started_at).total_seconds()
    return {"cells_done": done, "cells_total": total, "current_cell": current,
            "seconds": None if seconds is None else round(float(seconds), 1),
            "notebook": nb is not None}


#: The largest executed notebook :func:`run_progress` reads.
MAX_PROGRESS_BYTES = 64 * 1024 * 1024


def notebook_of(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        nb = json.loads(data.decode("utf-8"))
    except ValueError:
        return None  # not written yet, or caught mid-write: the next read sees it
    return nb if isinstance(nb, dict) else None


def cell_progress(nb: dict | None) -> tuple[int, int, int | None]:
    """(cells finished, code cells, number of the running cell) of a notebook papermill
    is executing or has executed; (0, 0, None) before papermill first writes it."""
    if nb is None:
        return 0, 0, None
    cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    done, current = 0, None
    for i, cell in enumerate(cells):
        status = cell.get("metadata", {}).get("papermill", {}).get("status")
        if status == "completed":
            done += 1
        elif status == "running" and current is None:
            current = i + 1
    return done, len(cells), current


def run_summary(run) -> dict[str, Any]:
    """A run as the faces print it (``medzone runs list/show --json``)."""
    def iso(value):
        return value.isoformat(timespec="seconds") if value else None

    return {"id": run.id, "user": run.user.name, "template": run.template,
            "state": run.state, "template_sha256": run.template_sha256,
            "parameters": run.parameters, "run_dir": run.run_dir, "output": run.output,
            "output_sha256": run.output_sha256, "error": run.error,
            "created": iso(run.created_at), "started": iso(run.started_at),
            "finished": iso(run.finished_at)}


def _read_back(method, *args, **kwargs):
    """A homefs read of what the run left; ``None`` when the user swapped it for something
    the hub refuses to read (a link, a FIFO, another's file) or removed it."""
    try:
        return method(*args, **kwargs)
    except (MedZoneError, OSError):
        return None


__all__ = [
    "ParameterSpec", "RunFailed", "RunResult", "TEMPLATES_DIR", "check_parameters",
    "coerce_value", "datasets_named", "failed_cell", "find_template", "is_dataset_parameter",
    "cancel_run", "execute_run", "find_run", "get_run", "keep_template", "kept_template",
    "list_runs", "list_templates", "prepare_run", "recorded_run", "run_base", "run_progress",
    "run_summary", "run_template", "sha256_file", "template_parameters",
]
