"""Template runs as the portal shows them: started, listed and read through the runner.

A run is queued with :func:`medzone_hub.runqueue.enqueue` (the runner's checks, run folder
and store row, before the page answers); the worker the hub manages starts it when its
turn comes (so a run outlives a restart of the portal), or, in a zone configured without
one (``c.RunQueue.start_worker = False``), a background thread here waits for a free slot
and executes it (:func:`medzone_hub.runqueue.run_here`). Everything a run's page
shows comes from the store (:func:`medzone_hub.runner.find_run`: state, error,
parameters) and from its executed notebook (:func:`medzone_hub.runner.run_progress`, which
reads the home through :mod:`medzone_hub.homefs`), so a restarted portal shows the runs
an earlier one started, and those started with ``medzone run``, exactly as they are.

A run's page is named after its run folder (``runs/<UTC timestamp>-<template>``), the
name the person sees in their home.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import PurePosixPath
from typing import Any

from tornado import web

from .. import runner, runqueue
from ..errors import MedZoneError

log = logging.getLogger(__name__)

#: A run folder's name: ``<UTC timestamp>-<template>`` (``-<n>`` when two runs of a
#: template start in the same second).
RUN_NAME = re.compile(r"\d{8}T\d{6}Z-[A-Za-z0-9][A-Za-z0-9_.-]*")

#: How the page names a run's state: the store's, except that a run that ended because
#: its process died shows as interrupted.
SHOWN_STATES = {"queued": "queued", "running": "running", "done": "ok", "failed": "failed",
                "cancelled": "cancelled"}


class RunTracker:
    """Starts template runs and reads them back through the runner."""

    def __init__(self, portal):
        self.portal = portal

    def names(self, user: str) -> list[str]:
        """*user*'s runs' folder names, newest first."""
        with self.portal.store.session() as session:
            return [PurePosixPath(r.run_dir).name for r in runner.list_runs(session, user=user)]

    def start(self, user: str, template: str, parameters: list[tuple[str, str]]) -> str:
        """Prepare *template*'s run for *user*, execute it in the background, and return its
        run folder's name. A refusal (an ungranted dataset, say) is raised here. Blocks
        while the run is prepared (call it off the IOLoop)."""
        run = runqueue.enqueue(
            self.portal.home, self.portal.store, user, template, parameters,
            settings=self._settings(), templates_dir=self.portal.templates_dir,
            config=self.portal.sandbox_config)
        if not getattr(self.portal, "queue_settings", None) or \
                not self.portal.queue_settings.start_worker:
            # No worker of the hub's: this portal executes the run when a slot is free.
            threading.Thread(target=self._execute, args=(run.id,), daemon=True,
                             name=f"run-{run.id}").start()
        else:
            # The page answers once the worker has started it, unless it waits its turn.
            runqueue.wait_started(self.portal.store, run.id, settings=self._settings(),
                                  home=self.portal.home)
        return PurePosixPath(run.run_dir).name

    def _settings(self):
        return getattr(self.portal, "queue_settings", None) or runqueue.queue_settings()

    def _execute(self, run_id: int) -> None:
        try:
            # Returns at once when the zone's worker takes the run.
            runqueue.run_here(self.portal.home, self.portal.store, run_id,
                              settings=self._settings(), config=self.portal.sandbox_config)
        except MedZoneError as err:  # recorded in the run's row; RunFailed names the cell
            log.info("run %s: %s", run_id, err)
        except Exception:  # noqa: BLE001 - a run thread must never die silently
            log.exception("run %s failed", run_id)

    def find(self, session, user: str, name: str):
        """*user*'s run whose folder is *name*; 404 for anything else."""
        run = runner.find_run(session, user, f"runs/{name}") if RUN_NAME.fullmatch(name) else None
        if run is None:
            raise web.HTTPError(404, f"no run {name} of yours")
        return run

    def cancel(self, user: str, name: str) -> None:
        with self.portal.store.session() as session:
            run_id = self.find(session, user, name).id
        runqueue.cancel(self.portal.home, self.portal.store, run_id, user)

    def progress(self, user: str, name: str) -> dict[str, Any]:
        """What a run's page shows: the store's row and how far its notebook got."""
        with self.portal.store.session() as session:
            run = self.find(session, user, name)
            position = (runqueue.queue_positions(session).get(run.id)
                        if run.state == "queued" else None)
        progress = runner.run_progress(self.portal.home, run)
        state = SHOWN_STATES[run.state]
        if run.state == "failed" and run.error == runner.PROCESS_GONE:
            state = "interrupted"
        return {
            "id": name, "run": run.id, "template": run.template, "state": state,
            "error": run.error, "cells_done": progress["cells_done"],
            "cells_total": progress["cells_total"], "current_cell": progress["current_cell"],
            "seconds": progress["seconds"],
            "notebook": run.output if progress["notebook"] else None,
            "parameters": run.parameters if isinstance(run.parameters, dict) else {},
            "cancellable": run.state in ("queued", "running"),
            "position": position,
        }
