"""Runs in the store: prepared, executed, listed, shown and cancelled through the runner's
functions, which ``medzone runs`` and the portal call; a run whose process was killed is
found and marked failed with the reason.

Every run here is real: papermill inside the user's sandbox, as in ``test_runner.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from medzone_hub import runner
from medzone_hub.config import ENV_DB_URL, ENV_HOME
from medzone_hub.errors import Conflict, InvalidInput, NotFound, RuleViolation
from medzone_hub.sandbox import proc_start_time

from .test_runner import PROBE, _sha
from .test_runner import zone  # noqa: F401 - the module's zone: alice (granted ds-a), bob


@pytest.fixture(scope="module")
def wait_template(zone):  # noqa: F811
    """A template whose second code cell runs until its sandbox is stopped."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell('note = ""', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import time\nwhile True:\n    time.sleep(0.2)"),
        nbformat.v4.new_code_cell('print("never reached")'),
    ]
    path = zone.base / "wait_probe.ipynb"
    nbformat.write(nb, str(path))
    return path


def _cli(zone, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k not in (ENV_DB_URL, "MEDZONE_ACTOR")}
    env[ENV_HOME] = str(zone.home.root)
    return subprocess.run([sys.executable, "-m", "medzone_hub.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd="/")


def _start_cli_run(zone, user: str, template: Path) -> subprocess.Popen:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
    env[ENV_HOME] = str(zone.home.root)
    return subprocess.Popen([sys.executable, "-m", "medzone_hub.cli", "run", str(template),
                             "--user", user], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/")


def _wait_running(zone, user: str, template: str, timeout: float = 120):  # noqa: F811
    """The user's newest run of *template*, once its sandbox executes the waiting cell."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with zone.store.session() as session:
            runs = runner.list_runs(session, user=user, state="running")
            run = next((r for r in runs if r.template == template), None)
        if run is not None and run.sandbox_pid is not None:
            if runner.run_progress(zone.home, run)["current_cell"] == 2:
                return run
        time.sleep(0.2)
    raise AssertionError(f"no running {template} run of {user}")


def test_prepare_then_execute_records_the_run(zone):  # noqa: F811
    run = runner.prepare_run(zone.home, zone.store, "alice", str(PROBE),
                             [("message", "stored"), ("count", "2")])
    assert run.state == "queued" and run.template == "runner_probe"
    assert run.parameters == {"message": "stored", "count": 2}
    assert run.template_sha256 == _sha(PROBE)
    run_dir = zone.home.root / "homes" / "alice" / run.run_dir
    assert (run_dir / "template.ipynb").read_bytes() == PROBE.read_bytes()
    assert run.output == f"{run.run_dir}/runner_probe.ipynb"
    with zone.store.session() as session:
        assert run.id in [r.id for r in runner.list_runs(session, state="queued")]

    result = runner.execute_run(zone.home, zone.store, run.id)
    assert result.notebook == run_dir / "runner_probe.ipynb"
    with zone.store.session() as session:
        done = runner.get_run(session, run.id)
        assert runner.get_run(session, run.id, user="alice").id == run.id
        with pytest.raises(NotFound, match=f"no run {run.id} of yours"):
            runner.get_run(session, run.id, user="bob")
    assert done.state == "done" and done.error is None
    assert done.output_sha256 == _sha(result.notebook)
    assert done.started_at <= done.finished_at
    assert done.runner_pid is None and done.sandbox_pid is None
    progress = runner.run_progress(zone.home, done)
    assert progress["cells_done"] == progress["cells_total"] == 5
    detail = [d for _a, _s, d in zone.audit("run.execute") if d.get("run") == run.id]
    assert len(detail) == 1 and detail[0]["status"] == "ok"
    assert detail[0]["output_sha256"] == done.output_sha256
    # A run is executed once.
    with pytest.raises(Conflict, match="is done, not queued"):
        runner.execute_run(zone.home, zone.store, run.id)


def test_refusals_come_before_any_row(zone):  # noqa: F811
    with zone.store.session() as session:
        before = len(runner.list_runs(session))
    with pytest.raises(RuleViolation, match="no live grant for dataset 'ds-b'"):
        runner.prepare_run(zone.home, zone.store, "alice", str(PROBE), [("dataset", "ds-b")])
    with pytest.raises(InvalidInput, match="takes an int"):
        runner.prepare_run(zone.home, zone.store, "alice", str(PROBE), [("count", "x")])
    with zone.store.session() as session:
        assert len(runner.list_runs(session)) == before
        with pytest.raises(InvalidInput, match="no run state 'finished'"):
            runner.list_runs(session, state="finished")


def test_medzone_run_is_listed_and_shown(zone):  # noqa: F811
    done = zone.run("bob", str(PROBE), ("message", "from the cli"))
    assert done.returncode == 0, done.stderr
    notebook = Path(done.stdout.strip())

    listed = _cli(zone, "runs", "list", "--user", "bob", "--json")
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)
    assert runs and all(r["user"] == "bob" for r in runs)
    mine = runs[0]  # newest first
    assert {"id", "user", "template", "state"} <= set(mine)
    assert (mine["template"], mine["state"]) == ("runner_probe", "done")
    assert mine["output"] == f"runs/{notebook.parent.name}/runner_probe.ipynb"

    only_failed = json.loads(_cli(zone, "runs", "list", "--state", "failed", "--json").stdout)
    assert all(r["state"] == "failed" for r in only_failed)

    shown = _cli(zone, "runs", "show", str(mine["id"]), "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["parameters"]["message"] == "from the cli"
    assert info["output_sha256"] == _sha(notebook)
    assert info["progress"]["cells_done"] == info["progress"]["cells_total"] == 5

    text = _cli(zone, "runs", "show", str(mine["id"]))
    assert text.stdout.splitlines()[0] == f"run {mine['id']} of runner_probe by bob: done"
    assert "cells: 5 of 5 done" in text.stdout
    table = _cli(zone, "runs", "list", "--user", "bob").stdout.splitlines()
    assert table[0].split()[:4] == ["ID", "USER", "TEMPLATE", "STATE"]

    for args, message in ((("runs", "show", "999999"), "no run 999999"),
                          (("runs", "show", "x1"), "a run id is a number, not 'x1'"),
                          (("runs", "list", "--state", "finished"), "no run state 'finished'")):
        bad = _cli(zone, *args)
        assert bad.returncode == 1 and bad.stdout == ""
        assert bad.stderr.strip().splitlines() == [f"medzone: error: {message}"] or (
            len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr), bad.stderr


def test_cancel_kills_the_sandbox_only_for_the_owner_or_an_admin(zone, wait_template):  # noqa: F811
    proc = _start_cli_run(zone, "alice", wait_template)
    try:
        run = _wait_running(zone, "alice", "wait_probe")
        sandbox = run.sandbox_pid
        assert proc_start_time(sandbox) == run.sandbox_start

        with zone.store.session() as session, pytest.raises(RuleViolation) as refused:
            runner.cancel_run(session, run.id, "bob")
        assert str(refused.value) == (f"run {run.id} is alice's: only they or an admin "
                                      "may cancel it")
        with zone.store.session() as session:
            assert runner.get_run(session, run.id).state == "running"

        cancelled = _cli(zone, "runs", "cancel", str(run.id))
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.strip() == f"run {run.id} of wait_probe by alice: cancelled"
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert "medzone: error: run of wait_probe cancelled by cli:" in last
    assert proc_start_time(sandbox) is None  # the sandbox is gone
    with zone.store.session() as session:
        row = runner.get_run(session, run.id)
        assert (row.state, row.error) == ("cancelled", cancelled_by(row))
        assert row.finished_at is not None and row.sandbox_pid is None
        with pytest.raises(Conflict, match="already ended"):
            runner.cancel_run(session, run.id, "alice")
    assert [d["run"] for a, _s, d in zone.audit("run.cancel")] == [run.id]
    statuses = [d["status"] for _a, _s, d in zone.audit("run.execute") if d.get("run") == run.id]
    assert statuses == ["cancelled"]
    assert _cli(zone, "audit", "verify").returncode == 0


def cancelled_by(row) -> str:
    assert row.error.startswith("cancelled by cli:")
    return row.error


def test_a_killed_runner_leaves_its_run_failed_with_the_reason(zone, wait_template):  # noqa: F811
    proc = _start_cli_run(zone, "alice", wait_template)
    try:
        run = _wait_running(zone, "alice", "wait_probe")
        os.kill(proc.pid, signal.SIGKILL)  # no chance to record anything
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # bubblewrap's monitor dies with its parent, and the sandbox with the monitor.
    deadline = time.monotonic() + 30
    while proc_start_time(run.sandbox_pid) == run.sandbox_start:
        assert time.monotonic() < deadline, "the sandbox outlived its runner"
        time.sleep(0.1)
    listed = json.loads(_cli(zone, "runs", "list", "--user", "alice", "--json").stdout)
    row = next(r for r in listed if r["id"] == run.id)
    assert row["state"] == "failed"
    assert row["error"] == runner.PROCESS_GONE
    assert _cli(zone, "audit", "verify").returncode == 0


def test_the_portal_starts_lists_and_cancels_through_the_runner(zone, wait_template):  # noqa: F811
    from tornado import web

    from medzone_hub.portal.runs import RunTracker

    class PortalState:
        home = zone.home
        store = zone.store
        templates_dir = None
        sandbox_config = None

    tracker = RunTracker(PortalState())
    name = tracker.start("bob", str(wait_template), [("note", "portal")])
    assert name.endswith("-wait_probe") and tracker.names("bob")[0] == name
    deadline = time.monotonic() + 120
    # The parameters cell, papermill's injected one, then the waiting cell.
    while (progress := tracker.progress("bob", name))["current_cell"] != 3:
        assert time.monotonic() < deadline, progress
        time.sleep(0.2)
    assert progress["state"] == "running" and progress["cancellable"]
    assert progress["parameters"] == {"note": "portal"}
    with pytest.raises(web.HTTPError) as err:
        tracker.progress("alice", name)  # runs are their owner's
    assert err.value.status_code == 404
    with pytest.raises(RuleViolation):
        with zone.store.session() as session:
            runner.cancel_run(session, progress["run"], "alice")
    tracker.cancel("bob", name)
    progress = tracker.progress("bob", name)
    assert progress["state"] == "cancelled" and progress["error"] == "cancelled by bob"
    assert not progress["cancellable"]
