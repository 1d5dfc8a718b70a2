"""`medzone hub` as a service: SIGTERM or SIGINT stops everything it started.

A supervisor (systemd, Docker, a terminal's Ctrl-C) signals only the `medzone hub` process.
Afterwards no process of the hub, the proxy, the portal or a user's sandbox may remain,
the command exits 0, and the audit chain still verifies.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from .hub_harness import require_hub_tools

require_hub_tools()

from medzone_hub.audit import verify  # noqa: E402
from medzone_hub.hubapp import proxy_pid  # noqa: E402

from .hub_harness import DATASET, processes_of_uid, running_hub, wait_for  # noqa: E402


def _descendants(root: int) -> set[int]:
    """Every process below *root* (by parent pid), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_medzone_hub_stops_the_hub_the_proxy_the_portal_and_the_servers(signum):
    with running_hub({DATASET: "lifecycle"}, as_service=True) as hub:
        hub.add_store_user("ann")
        assert hub.spawn("ann").status_code in (201, 202)
        sandbox = wait_for(lambda: processes_of_uid(hub.user_uid("ann")), 30)
        assert sandbox, f"ann's server did not start:\n{hub.log()}"
        service = hub.proc
        started = _descendants(service.pid) | {proxy_pid(hub.home)} | set(sandbox)
        assert len(started) >= 4  # jupyterhub, portal, proxy, the sandbox

        service.send_signal(signum)
        try:
            status = service.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"medzone hub did not stop:\n{hub.log()}")
        hub.proc = None

        assert status == 0, hub.log()
        survivors = sorted(pid for pid in started if _alive(pid))
        assert not survivors, f"still running after {signum.name}: {survivors}\n{hub.log()}"
        assert not processes_of_uid(hub.user_uid("ann"))
        assert proxy_pid(hub.home) is None
        assert [e.subject for e in hub.audit("sandbox.stop")] == ["user:ann"]
        with hub.store.session() as session:
            assert verify(session).ok


def test_the_systemd_unit_verifies(tmp_path):
    """deploy/medzone-hub.service passes `systemd-analyze verify` with its paths pointed at
    this install (the command checks that ExecStart exists)."""
    repo = Path(__file__).resolve().parents[1]
    unit = (repo / "deploy" / "medzone-hub.service").read_text()
    assert "ExecStart=/opt/medzone/.venv/bin/medzone hub" in unit
    assert "KillSignal=SIGTERM" in unit and "KillMode=mixed" in unit
    local = tmp_path / "medzone-hub.service"
    local.write_text(unit.replace("/opt/medzone", str(repo))
                     .replace("/var/lib/medzone", str(tmp_path)))
    result = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                            text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
