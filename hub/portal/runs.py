"""Template runs as the portal shows them: read from the run folders, not from memory.

:func:`medzone_hub.runner.run_template` makes one folder per run in the person's home
(``runs/<UTC timestamp>-<template>/``) and papermill rewrites the executed notebook there
after every cell, with each cell's status and, at the end, the run's end time and whether
a cell raised. A run's page is named after its folder and everything it shows comes from
that folder, so a restarted portal shows the runs an earlier one started (and those
started with ``medzone run``) exactly as they are.

What a folder cannot say is whether an unfinished notebook is still being executed or
its run was killed (the portal restarted: sandboxes die with the process that started
them). The portal knows the runs it started itself; for any other run it looks for the
sandbox executing it, whose command line names the run folder.

The portal runs as root and the home is the user's: every read of a run folder goes
through :class:`medzone_hub.homefs.UserHome` (descriptors, ``O_NOFOLLOW`` on every
component, only regular files the user owns), so a ``parameters.json``, notebook or
``runs`` folder swapped for a symbolic link is refused, never read.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tornado import web

from .. import runner
from ..airlock import user_home
from ..errors import MedZoneError
from ..homefs import UserHome

#: A run folder's name: ``<UTC timestamp>-<template>`` (``-<n>`` when two runs of a
#: template start in the same second).
RUN_NAME = re.compile(r"\d{8}T\d{6}Z-[A-Za-z0-9][A-Za-z0-9_.-]*")
_SUFFIX = re.compile(r"(.+)-\d+")

#: How long a start waits for run_template to make the run folder (checks come first).
START_TIMEOUT = 120.0

#: How many runs started here are remembered (only to keep a runner's own error line).
KEEP_RUNS = 200

#: Largest executed notebook / parameters file the portal reads back from a run folder.
MAX_NOTEBOOK_BYTES = 64 * 1024 * 1024
MAX_PARAMETERS_BYTES = 1024 * 1024

INTERRUPTED = ("the run stopped before it finished: the process running it is gone "
               "(the portal or the machine restarted); run it again")


@dataclass
class Started:
    """A run this portal process started, executing in a thread of its own."""

    user: str
    template: str
    parameters: list[tuple[str, str]]
    started: float
    thread: threading.Thread | None = field(default=None, repr=False)
    state: str = "running"  # running, ok, failed
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False)


class RunTracker:
    """Starts template runs and reads their state back from the run folders."""

    def __init__(self, portal):
        self.portal = portal
        self._started: dict[tuple[str, str], Started] = {}
        self._lock = threading.Lock()
        self._user_locks: dict[str, threading.Lock] = {}

    def home_fs(self, user: str) -> UserHome:
        return UserHome.of(self.portal.home, user)

    def names(self, user: str) -> list[str]:
        """*user*'s run folders, newest first (a ``runs`` that is a link lists nothing)."""
        fs = self.home_fs(user)
        try:
            entries = fs.listdir("runs")
        except MedZoneError:
            return []
        return sorted((n for n in entries if RUN_NAME.fullmatch(n) and fs.is_dir(f"runs/{n}")),
                      reverse=True)

    def run_dir(self, user: str, name: str) -> str:
        """*user*'s run folder *name*, relative to the home; 404 for anything else."""
        if not RUN_NAME.fullmatch(name):
            raise web.HTTPError(404, f"no run {name} of yours")
        rel = f"runs/{name}"
        try:
            found = self.home_fs(user).is_dir(rel)
        except MedZoneError:
            found = False
        if not found:
            raise web.HTTPError(404, f"no run {name} of yours")
        return rel

    # starting ---------------------------------------------------------------------------

    def start(self, user: str, template: str, parameters: list[tuple[str, str]]) -> str:
        """Start *template* for *user* and return its run folder's name once it exists.

        Blocks until then (call it off the IOLoop). A refusal from :func:`run_template`'s
        checks (an ungranted dataset, say) comes before the folder and is raised here.
        """
        stem = Path(template).stem
        with self._lock:
            user_lock = self._user_locks.setdefault(user, threading.Lock())
        # One start at a time per person, so the new folder is this run's.
        with user_lock:
            before = set(self.names(user))
            run = Started(user, template, list(parameters), time.time())
            run.thread = threading.Thread(target=self._run, args=(run,), daemon=True,
                                          name=f"run-{user}-{stem}")
            run.thread.start()
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                new = [n for n in self.names(user)
                       if n not in before and template_of(n) in (stem, n.split("-", 1)[1])]
                if new:
                    name = new[0]
                    break
                if not run.thread.is_alive():
                    if isinstance(run.exception, MedZoneError):
                        raise run.exception
                    raise MedZoneError(f"run of {stem} did not start: {run.error}")
                if time.monotonic() > deadline:
                    raise MedZoneError(f"run of {stem} did not start within "
                                       f"{START_TIMEOUT:.0f} s")
                time.sleep(0.05)
        with self._lock:
            self._started[(user, name)] = run
            finished = [k for k, r in self._started.items() if r.state != "running"]
            for key in finished[:max(0, len(self._started) - KEEP_RUNS)]:
                del self._started[key]
        return name

    def _run(self, run: Started) -> None:
        try:
            runner.run_template(
                self.portal.home, self.portal.store, run.user, run.template,
                run.parameters,
                templates_dir=self.portal.templates_dir, config=self.portal.sandbox_config)
        except MedZoneError as err:  # RunFailed included: its line names the cell
            run.state, run.error, run.exception = "failed", one_line(err), err
        except Exception as err:  # noqa: BLE001 - a run thread must always end in a state
            run.state, run.error, run.exception = "failed", f"{type(err).__name__}: {err}", err
        else:
            run.state = "ok"

    # reading ----------------------------------------------------------------------------

    def progress(self, user: str, name: str) -> dict[str, Any]:
        """What a run's page shows, from its folder (and, for a run started here, how the
        runner ended it)."""
        run_dir = self.run_dir(user, name)
        fs = self.home_fs(user)
        stem = template_of(name, run_dir, fs)
        notebook = f"{run_dir}/{stem}.ipynb"
        data = read_home_file(fs, notebook, MAX_NOTEBOOK_BYTES)
        nb = notebook_of(data)
        done, total, current = cell_progress(nb)
        meta = (nb or {}).get("metadata", {}).get("papermill", {})
        started = self._started.get((user, name))

        if started is not None and started.state != "running":
            state, error = started.state, started.error
            if state == "failed" and meta.get("exception"):
                # The cell's line, without the runner's host path of the partial notebook.
                error = runner._failed_cell_in_bytes(data) or error
        elif meta.get("end_time"):
            failed = bool(meta.get("exception"))
            state = "failed" if failed else "ok"
            error = (runner._failed_cell_in_bytes(data) or "a cell failed") if failed else None
        elif ((started is not None and started.thread is not None and started.thread.is_alive())
              or sandbox_running(user_home(self.portal.home, user), name)):
            state, error = "running", None
        else:
            state, error = "interrupted", INTERRUPTED

        seconds = meta.get("duration")
        if seconds is None:
            begun = parse_time(meta.get("start_time"))
            if begun is None and started is not None:
                begun = started.started
            seconds = (time.time() - begun) if begun is not None and state == "running" else None
        return {
            "id": name, "template": stem, "state": state, "error": error,
            "cells_done": done, "cells_total": total, "current_cell": current,
            "seconds": None if seconds is None else round(float(seconds), 1),
            "notebook": notebook if nb is not None else None,
            "parameters": read_parameters(fs, run_dir),
        }


def one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def template_of(name: str, run_dir: str | None = None, fs: UserHome | None = None) -> str:
    """The template a run folder *name* ran: the name after the timestamp, less a ``-<n>``
    suffix the runner adds when two runs start in the same second (the executed notebook,
    once written, says which). *run_dir* is relative to the home *fs*."""
    rest = name.split("-", 1)[1]
    if run_dir is not None and fs is not None:
        try:
            if fs.is_file(f"{run_dir}/{rest}.ipynb"):
                return rest
        except MedZoneError:
            pass
    match = _SUFFIX.fullmatch(rest)
    return match.group(1) if match else rest


def read_home_file(fs: UserHome, rel: str, max_bytes: int) -> bytes | None:
    """The bytes of the user's own regular file *rel*, read through *fs*; ``None`` when it
    is missing, a link (anywhere on its path), not the user's, or over *max_bytes*."""
    try:
        return fs.read_bytes(rel, max_bytes=max_bytes)
    except (OSError, MedZoneError):
        return None


def notebook_of(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        nb = json.loads(data.decode("utf-8"))
    except ValueError:
        return None  # not written yet, or caught mid-write: the next poll reads it
    return nb if isinstance(nb, dict) else None


def read_parameters(fs: UserHome, run_dir: str) -> dict:
    data = read_home_file(fs, f"{run_dir}/{runner.PARAMETERS_FILE}", MAX_PARAMETERS_BYTES)
    try:
        values = json.loads(data.decode("utf-8")) if data is not None else {}
    except ValueError:
        return {}
    return values if isinstance(values, dict) else {}


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


def parse_time(value) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def sandbox_running(home_host: Path, name: str) -> bool:
    """Whether a sandbox is executing run *name* of the home *home_host*: bubblewrap's
    command line binds that home and names the run folder (``/home/<user>/runs/<name>``)."""
    home_arg = os.fsencode(str(home_host))
    run_suffix = os.fsencode(f"/runs/{name}")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if home_arg in args and any(a.endswith(run_suffix) and a.startswith(b"/home/")
                                    for a in args):
            return True
    return False
