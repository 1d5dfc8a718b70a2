"""Template runs: a papermill notebook executed with parameters inside a user's sandbox.

``medzone run TEMPLATE --user USER -p NAME VALUE …`` (and the portal) call
:func:`run_template`, which

1. finds the template (a name in ``templates/`` or a path to an ``.ipynb``) and hashes it;
2. checks every ``-p`` against the template's ``parameters`` cell as papermill's
   :func:`papermill.inspect_notebook` reads it: an unknown name, or a value that is not of
   the default's type (int, float, bool, str, list, dict), is refused in one line;
3. refuses a dataset parameter (``dataset`` or ``*_dataset``) naming a dataset the user
   holds no live grant for, whether the value was given or is the template's default;
4. copies the template into a new run folder in the user's home,
   ``/home/<user>/runs/<UTC timestamp>-<template>/`` (host:
   ``MEDZONE_HOME/homes/<user>/runs/…``), and runs papermill there **inside the user's
   sandbox** (:func:`medzone_hub.sandbox.run_in_sandbox`: the same policy as the user's
   kernels, no network, ``/data`` holding only live grants). The run folder is the
   kernel's working directory and ``MEDZONE_RUN_DIR``: whatever the notebook writes
   (figures, metrics, models) lands next to the executed notebook ``<template>.ipynb``;
5. records ``run.execute`` (actor: the user) in the audit log with the template's sha256,
   the parameters, the executed notebook's sha256 and the outcome.

A failing cell raises :class:`RunFailed` whose one-line message names the cell (its index
in the template, its tags, its first source line) and the error; the partial notebook is
kept and its path is part of the message.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import MedZoneHome
from .manifest import sha256_file
from .errors import InvalidInput, MedZoneError, NotFound, RuleViolation

#: Where the project's templates live (next to the ``hub/`` package folder).
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"

#: Environment variable naming the run folder inside the sandbox.
RUN_DIR_ENV = "MEDZONE_RUN_DIR"

#: Name of the copy of the template kept in each run folder (the diff base for export).
TEMPLATE_COPY = "template.ipynb"
PARAMETERS_FILE = "parameters.json"

#: Tags papermill adds to cells it inserts (not part of the template).
PAPERMILL_TAGS = ("injected-parameters", "papermill-error-cell-tag")

#: Exit status of the in-sandbox driver when a cell raised (the notebook says which).
CELL_FAILED = 3

_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}

# Runs inside the sandbox: papermill with its progress bar on stderr. A failing cell exits
# CELL_FAILED quietly (the host names the cell from the partial notebook); anything else is
# one line on stderr.
DRIVER = r"""
import json, os, sys
src, out, params_file, run_dir = sys.argv[1:5]
os.environ["MEDZONE_RUN_DIR"] = run_dir
os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
try:
    import papermill
    from papermill.exceptions import PapermillExecutionError
    from traitlets.config import Config
    with open(params_file) as f:
        params = json.load(f)
    # The kernel talks to papermill over unix sockets in the sandbox's private /tmp.
    config = Config()
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = "/tmp/medzone-kernel"
    papermill.execute_notebook(src, out, parameters=params, cwd=run_dir, kernel_name="python3",
                               progress_bar=True, log_output=False, config=config)
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
    """A template's file: *template* is a name in *templates_dir* (default: the project's
    ``templates/``) or a path to an ``.ipynb`` file."""
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


def _new_run_dir(runs: Path, stem: str, now: datetime | None) -> Path:
    base = f"{_timestamp(now)}-{stem}"
    for n in range(1, 1000):
        path = runs / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:
            continue
    raise MedZoneError(f"cannot create a run folder under {runs}")


def _give(path: Path, policy) -> None:
    if policy.drop_to_uid:
        os.chown(path, policy.uid, policy.gid)


def _written_files(run_dir: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), run_dir)
            out.append(rel)
    return out


def run_template(
    home: MedZoneHome,
    store,
    user: str,
    template: str,
    parameters: Sequence[tuple[str, str]] = (),
    *,
    templates_dir: str | os.PathLike | None = None,
    config=None,
    now: datetime | None = None,
) -> RunResult:
    """Run *template* as *user* with ``(name, raw value)`` *parameters* (module docstring).

    Returns the :class:`RunResult`; raises :class:`InvalidInput`/:class:`NotFound` for a bad
    template or parameter, :class:`RuleViolation` for an ungranted dataset, and
    :class:`RunFailed` (partial notebook kept) when the notebook fails.
    """
    from . import audit
    from .access import live_grants
    from .sandbox import build_policy, ensure_home, release_resources, run_in_sandbox

    path = find_template(template, templates_dir)
    stem = path.stem
    template_sha = sha256_file(path)
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
        policy = build_policy(home, session, user, config=config, now=now)
    release_resources(policy)  # run_in_sandbox reserves its own GPU, if any

    home_dir = ensure_home(home, policy)
    runs = home_dir / "runs"
    if not runs.is_dir():
        runs.mkdir(mode=0o700)
        _give(runs, policy)
    run_dir = _new_run_dir(runs, stem, now)
    _give(run_dir, policy)
    inside = f"{policy.home_inside}/{run_dir.relative_to(home_dir).as_posix()}"
    for name, content in ((TEMPLATE_COPY, path.read_bytes()),
                          (PARAMETERS_FILE, json.dumps(values, indent=1).encode())):
        target = run_dir / name
        target.write_bytes(content)
        os.chmod(target, 0o600)
        _give(target, policy)
    output = run_dir / f"{stem}.ipynb"
    output_inside = f"{inside}/{stem}.ipynb"
    python = os.path.join(policy.env.get("VIRTUAL_ENV") or (config.python_prefix if config and
                          config.python_prefix else sys.prefix), "bin", "python")
    command = [python, "-c", DRIVER, f"{inside}/{TEMPLATE_COPY}", output_inside,
               f"{inside}/{PARAMETERS_FILE}", inside]

    started = time.monotonic()
    print(f"medzone: running {stem} as {user} in {inside}", file=sys.stderr, flush=True)
    try:
        rc = run_in_sandbox(home, store, user, command, config=config)
    except KeyboardInterrupt:  # the sandbox is gone with its monitor; record and report it
        rc = 130
    seconds = time.monotonic() - started

    output_sha = sha256_file(output) if output.is_file() else None
    failure = None
    if rc != 0:
        cell = failed_cell(output) if output.is_file() else None
        if cell:
            failure = cell
        elif rc == 130:
            failure = "interrupted"
        else:
            failure = f"papermill exited with status {rc}"
    status = "ok" if failure is None else "failed"
    detail = {
        "template": stem,
        "template_sha256": template_sha,
        "parameters": values,
        "output": output_inside,
        "output_sha256": output_sha,
        "status": status,
        "seconds": round(seconds, 1),
    }
    if failure:
        detail["error"] = failure
    with store.session() as session:
        audit.append(session, actor=user, action="run.execute", subject=f"template:{stem}",
                     detail=detail)
    if failure:
        kept = f"; partial notebook kept at {output}" if output.is_file() else ""
        error = RunFailed(f"run of {stem} failed: {failure}{kept}",
                          output if output.is_file() else None)
        if rc == 130:
            error.exit_code = 130
        raise error
    return RunResult(template=stem, user=user, notebook=output, notebook_inside=output_inside,
                     run_dir=run_dir, template_sha256=template_sha, output_sha256=output_sha,
                     parameters=values, seconds=seconds, status=status,
                     files=_written_files(run_dir))


__all__ = [
    "ParameterSpec", "RunFailed", "RunResult", "TEMPLATES_DIR", "check_parameters",
    "coerce_value", "datasets_named", "failed_cell", "find_template", "is_dataset_parameter",
    "list_templates", "run_template", "sha256_file", "template_parameters",
]
