"""Run a template: pick one, fill the form made from its parameters, follow the run.

The form is generated from :func:`medzone_hub.runner.template_parameters` (papermill's
inspection: names, types, defaults, help); a dataset parameter offers only the person's
live grants. Starting a run is :func:`medzone_hub.runner.prepare_run`, then
:func:`medzone_hub.runner.execute_run` in a background thread (papermill inside the
person's sandbox, exactly as ``medzone run``). A run's page is named after its run folder
and shows the run as the store records it (:mod:`.runs`); it polls ``runs/<folder>.json``
every second while the run is queued or running, and offers the owner a cancel button.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tornado import web

from .. import access, runner
from .base import PortalHandler, paginate, requires

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
    """The templates, and my runs (newest first, with their state)."""

    @requires()
    def get(self):
        names = runner.list_templates(self.portal.templates_dir)
        templates = []
        for name in names:
            path = runner.find_template(name, self.portal.templates_dir)
            templates.append({"name": name, "title": template_title(path)})
        runs = self.portal.runs
        page = paginate(runs.names(self.user_name), self.page_number(), self.portal.page_size)
        page.items = [runs.progress(self.user_name, name) for name in page.items]
        self.render_page("run_list.html", templates=templates, lab=self.lab_url, recent=page)


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
    async def post(self, template: str):
        _path, specs = self._specs(template)
        parameters = submitted_parameters(self, specs)
        runner.check_parameters(specs, parameters)  # a typing mistake is shown before starting
        # Returns once the run is prepared: a refusal (an ungranted dataset) shows here.
        name = await asyncio.to_thread(self.portal.runs.start, self.user_name, template,
                                       parameters)
        self.redirect(self.url(f"runs/{name}"))


class RunPageHandler(PortalHandler):
    """Live progress of one run, then the link to the executed notebook."""

    @requires()
    def get(self, name: str):
        progress = self.portal.runs.progress(self.user_name, name)
        self.render_page("run_progress.html", progress=progress, lab=self.lab_url)


class RunCancelHandler(PortalHandler):
    """POST ``runs/<folder>/cancel``: the owner stops their run."""

    @requires()
    async def post(self, name: str):
        await asyncio.to_thread(self.portal.runs.cancel, self.user_name, name)
        self.redirect(self.url(f"runs/{name}"))


class RunStatusHandler(PortalHandler):
    """``runs/<folder>.json``: what the progress page polls."""

    @requires()
    def get(self, name: str):
        progress = self.portal.runs.progress(self.user_name, name)
        self.set_header("Cache-Control", "no-store")
        self.finish(progress)


_RUN = r"([A-Za-z0-9][A-Za-z0-9_.-]*)"

ROUTES = [
    (r"run", TemplatesHandler),
    (r"run/([A-Za-z0-9][A-Za-z0-9_.-]*)", RunFormHandler),
    (rf"runs/{_RUN}\.json", RunStatusHandler),
    (rf"runs/{_RUN}/cancel", RunCancelHandler),
    (rf"runs/{_RUN}", RunPageHandler),
]
