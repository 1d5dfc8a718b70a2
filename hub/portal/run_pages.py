"""Run a template: pick one, fill the form made from its parameters, follow the run.

The form is generated from :func:`medzone_hub.runner.template_parameters` (papermill's
inspection: names, types, defaults, help); a dataset parameter offers only the person's
live grants. The run itself is :func:`medzone_hub.runner.run_template` in a background
thread (papermill inside the person's sandbox, exactly as ``medzone run``); the progress
page polls ``runs/<id>.json``, which counts the executed cells in the notebook papermill
rewrites after every cell.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tornado import web

from .. import access, runner
from ..airlock import user_home
from ..errors import MedZoneError
from .base import PortalHandler, paginate, requires

#: How many finished runs the tracker remembers (older ones are still listed from the home).
KEEP_RUNS = 200


@dataclass
class Run:
    id: str
    user: str
    template: str
    parameters: list[tuple[str, str]]
    started: float
    before: set[str]  # run folders that existed before this run started
    state: str = "running"  # running, ok, failed
    error: str | None = None
    notebook: Path | None = None
    run_dir: Path | None = None
    seconds: float | None = None
    thread: threading.Thread | None = field(default=None, repr=False)


class RunTracker:
    """Template runs started from the portal, each in a thread of its own."""

    def __init__(self, portal):
        self.portal = portal
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()

    def runs_dir(self, user: str) -> Path:
        return user_home(self.portal.home, user) / "runs"

    def start(self, user: str, template: str, parameters: list[tuple[str, str]]) -> Run:
        folder = self.runs_dir(user)
        before = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        run = Run(secrets.token_hex(8), user, template, parameters, time.time(), before)
        run.thread = threading.Thread(target=self._run, args=(run,), daemon=True,
                                      name=f"run-{run.id}")
        with self._lock:
            self._runs[run.id] = run
            for old in sorted(self._runs.values(), key=lambda r: r.started)[:-KEEP_RUNS]:
                if old.state != "running":
                    del self._runs[old.id]
        run.thread.start()
        return run

    def _run(self, run: Run) -> None:
        try:
            result = runner.run_template(
                self.portal.home, self.portal.store, run.user, run.template, run.parameters,
                templates_dir=self.portal.templates_dir, config=self.portal.sandbox_config)
        except runner.RunFailed as err:
            run.state, run.error, run.notebook = "failed", str(err), err.notebook
        except MedZoneError as err:
            run.state, run.error = "failed", str(err)
        except Exception as err:  # noqa: BLE001 - a run thread must always end in a state
            run.state, run.error = "failed", f"{type(err).__name__}: {err}"
        else:
            run.state, run.notebook, run.run_dir = "ok", result.notebook, result.run_dir
            run.seconds = round(result.seconds, 1)
        if run.notebook is not None and run.run_dir is None:
            run.run_dir = run.notebook.parent

    def get(self, run_id: str, user: str) -> Run:
        run = self._runs.get(run_id)
        if run is None or run.user != user:
            raise web.HTTPError(404, f"no run {run_id} of yours")
        return run

    def find_run_dir(self, run: Run) -> Path | None:
        """The folder :func:`run_template` made for *run* (known before it finishes by
        being the new folder for this template in the person's ``runs/``)."""
        if run.run_dir is not None:
            return run.run_dir
        folder = self.runs_dir(run.user)
        stem = Path(run.template).stem
        if not folder.is_dir():
            return None
        new = sorted(p for p in folder.iterdir()
                     if p.name not in run.before and p.name.split("-", 1)[-1].startswith(stem))
        return new[-1] if new else None

    def progress(self, run: Run) -> dict[str, Any]:
        run_dir = self.find_run_dir(run)
        done = total = 0
        current = None
        if run_dir is not None:
            done, total, current = cell_progress(run_dir / f"{Path(run.template).stem}.ipynb")
        return {
            "id": run.id, "template": run.template, "state": run.state, "error": run.error,
            "cells_done": done, "cells_total": total, "current_cell": current,
            "seconds": (run.seconds if run.seconds is not None
                        else round(time.time() - run.started, 1)),
            "notebook": run.notebook and inside_path(run.notebook, self.runs_dir(run.user).parent),
        }


def cell_progress(notebook: Path) -> tuple[int, int, int | None]:
    """(cells finished, code cells, index of the running cell) of a notebook papermill is
    executing; (0, 0, None) before papermill first writes it."""
    try:
        nb = json.loads(notebook.read_text(encoding="utf-8"))
    except (OSError, ValueError):
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


def inside_path(path: Path, home_dir: Path) -> str:
    """*path* relative to the person's home (what JupyterLab's file browser shows)."""
    return path.relative_to(home_dir).as_posix()


# --- the form ----------------------------------------------------------------------------

def form_fields(specs: dict[str, runner.ParameterSpec], granted: list[str]) -> list[dict]:
    """One field per parameter: its input kind, the default as the form shows it, the
    dataset choices for a dataset parameter."""
    fields = []
    for name, spec in specs.items():
        value = spec.default_value
        if runner.is_dataset_parameter(name):
            fields.append({"name": name, "kind": "dataset", "type": spec.type, "help": spec.help,
                           "choices": granted, "value": value if value in granted else "",
                           "optional": value in (None, "")})
        elif spec.type == "bool":
            fields.append({"name": name, "kind": "bool", "type": "bool", "help": spec.help,
                           "value": bool(value)})
        elif spec.type in ("int", "float"):
            fields.append({"name": name, "kind": "number", "type": spec.type, "help": spec.help,
                           "value": spec.default, "step": "1" if spec.type == "int" else "any"})
        elif spec.type in ("list", "dict"):
            fields.append({"name": name, "kind": "text", "type": spec.type, "help": spec.help,
                           "value": json.dumps(value)})
        else:
            fields.append({"name": name, "kind": "text", "type": spec.type, "help": spec.help,
                           "value": value if isinstance(value, str) else spec.default})
    return fields


def submitted_parameters(handler: web.RequestHandler,
                         specs: dict[str, runner.ParameterSpec]) -> list[tuple[str, str]]:
    """The form's values as ``(name, raw value)`` pairs, as ``medzone run -p`` takes them."""
    pairs = []
    for name, spec in specs.items():
        if spec.type == "bool" and not runner.is_dataset_parameter(name):
            pairs.append((name, "true" if handler.get_body_argument(name, "") else "false"))
            continue
        raw = handler.get_body_argument(name, None)
        if raw is None or (runner.is_dataset_parameter(name) and raw == ""):
            continue  # not offered, or "the one dataset granted": the template's default
        pairs.append((name, raw))
    return pairs


# --- handlers ------------------------------------------------------------------------------

class TemplatesHandler(PortalHandler):
    """The templates, and my recent runs."""

    @requires()
    def get(self):
        names = runner.list_templates(self.portal.templates_dir)
        templates = []
        for name in names:
            path = runner.find_template(name, self.portal.templates_dir)
            templates.append({"name": name, "title": template_title(path)})
        folder = self.portal.runs.runs_dir(self.user_name)
        recent = sorted((p.name for p in folder.iterdir() if p.is_dir()),
                        reverse=True) if folder.is_dir() else []
        self.render_page("run_list.html", templates=templates, lab=self.lab_url,
                         recent=paginate(recent, self.page_number(), self.portal.page_size))


def template_title(path: Path) -> str:
    """The first heading of the template's first markdown cell (its description)."""
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        first = next(c for c in nb["cells"] if c.get("cell_type") == "markdown")
        source = "".join(first["source"]) if isinstance(first["source"], list) else first["source"]
        return source.strip().splitlines()[0].lstrip("# ").strip()
    except (OSError, ValueError, StopIteration, KeyError, IndexError):
        return path.stem


class RunFormHandler(PortalHandler):
    """GET: the form made from the template's parameters. POST: start the run."""

    def _specs(self, template: str):
        path = runner.find_template(template, self.portal.templates_dir)
        return path, runner.template_parameters(path)

    @requires()
    def get(self, template: str):
        path, specs = self._specs(template)
        with self.store.session() as session:
            granted = access.live_grants(session, self.user_name)
        self.render_page("run_form.html", template=template, title=template_title(path),
                         fields=form_fields(specs, granted), granted=granted)

    @requires()
    def post(self, template: str):
        _path, specs = self._specs(template)
        parameters = submitted_parameters(self, specs)
        runner.check_parameters(specs, parameters)  # a typing mistake is shown before starting
        run = self.portal.runs.start(self.user_name, template, parameters)
        self.redirect(self.url(f"runs/{run.id}"))


class RunPageHandler(PortalHandler):
    """Live progress of one run, then the link to the executed notebook."""

    @requires()
    def get(self, run_id: str):
        run = self.portal.runs.get(run_id, self.user_name)
        self.render_page("run_progress.html", run=run, progress=self.portal.runs.progress(run),
                         lab=self.lab_url)


class RunStatusHandler(PortalHandler):
    """``runs/<id>.json``: what the progress page polls."""

    @requires()
    def get(self, run_id: str):
        run = self.portal.runs.get(run_id, self.user_name)
        self.set_header("Cache-Control", "no-store")
        self.finish(self.portal.runs.progress(run))


ROUTES = [
    (r"run", TemplatesHandler),
    (r"run/([A-Za-z0-9][A-Za-z0-9_.-]*)", RunFormHandler),
    (r"runs/([0-9a-f]+)\.json", RunStatusHandler),
    (r"runs/([0-9a-f]+)", RunPageHandler),
]
