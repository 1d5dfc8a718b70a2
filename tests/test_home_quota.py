"""A home over its quota gets no new sandbox: no server, no template run, no `sandbox exec`.

Each refusal is one line that says how much the home uses and what its quota is, and
nothing is started or recorded. Back under the quota, everything works again.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from medzone_hub import access, accounts
from medzone_hub.accounts import ROLE_DATA_STEWARD

from .fixtures import add_tiny_dataset
from .security.home_zone import drop_zone, make_zone, needs_root

pytestmark = needs_root

QUOTA = 2 << 20  # 2 MiB
PROBE = Path(__file__).resolve().parent / "runner_probe.ipynb"


@pytest.fixture(scope="module")
def zone():
    z = make_zone("medzone-quota-")
    z.config = z.base / "hub_config.py"
    z.config.write_text("from medzone_hub.hubapp import DEFAULT_CONFIG\n"
                        "load_subconfig(str(DEFAULT_CONFIG))\n"
                        f"c.SafeZoneSpawner.home_quota_bytes = {QUOTA}\n")
    with z.store.session() as session:
        accounts.add_user(session, "steward", roles=[ROLE_DATA_STEWARD], actor="test")
        add_tiny_dataset(session, z.home, "ds-q")
        app = access.apply(session, user="alice", dataset_ids=["ds-q"], purpose="quota")
        session.flush()
        access.approve(session, app.id, reviewer="steward")
    yield z
    drop_zone(z)


def _exec(zone, script: str) -> subprocess.CompletedProcess:
    return zone.cli("sandbox", "exec", "--hub-config", zone.config, "--user", "alice", "--",
                    "sh", "-c", script)


def _run(zone) -> subprocess.CompletedProcess:
    return zone.cli("run", PROBE, "--hub-config", zone.config, "--user", "alice",
                    "-p", "message", "q", "-p", "dataset", "ds-q", timeout=180)


def _run_folders(zone) -> list[str]:
    runs = zone.home_of("alice") / "runs"
    return sorted(os.listdir(runs)) if runs.is_dir() else []


def test_over_the_quota_nothing_starts_and_the_user_is_told_by_how_much(zone):
    # Under the quota: fills the home past it (3 MiB of real blocks, not a sparse file).
    filled = _exec(zone, "head -c 3145728 /dev/urandom > ~/big.bin && echo ok")
    assert filled.returncode == 0 and "ok" in filled.stdout, filled.stderr
    runs_before = _run_folders(zone)

    refused = _exec(zone, "echo should-not-run")
    assert refused.returncode != 0
    assert "should-not-run" not in refused.stdout
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "over its quota of 2.0 MiB" in lines[0] and "uses 3.0 MiB" in lines[0], lines[0]

    run = _run(zone)
    assert run.returncode != 0
    assert "over its quota" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert _run_folders(zone) == runs_before  # nothing made in the home
    listed = zone.cli("runs", "list", "--json")
    assert listed.returncode == 0 and listed.stdout.strip() in ("[]", ""), listed.stdout

    # Deleted (here by root, as a steward would): everything works again.
    os.unlink(zone.home_of("alice") / "big.bin")
    again = _exec(zone, "echo back")
    assert again.returncode == 0 and "back" in again.stdout, again.stderr
    assert zone.audit_ok()


def test_a_link_to_a_big_host_file_does_not_count(zone):
    big = zone.base / "host-big.bin"
    big.write_bytes(os.urandom(3 << 20))
    os.symlink(big, zone.home_of("alice") / "link-to-big")
    try:
        done = _exec(zone, "echo fine")
        assert done.returncode == 0 and "fine" in done.stdout, done.stderr
    finally:
        os.unlink(zone.home_of("alice") / "link-to-big")


def test_the_hub_refuses_a_server_to_a_home_over_its_quota():
    from .hub_harness import (DATASET, processes_of_uid, require_hub_tools, running_hub,
                              wait_for)

    require_hub_tools()
    with running_hub({DATASET: "quota"},
                     extra_config=f"c.SafeZoneSpawner.home_quota_bytes = {QUOTA}\n") as hub:
        hub.add_store_user("ann")
        uid = hub.user_uid("ann")
        home = hub.home.root / "homes" / "ann"
        home.mkdir(mode=0o700, parents=True)
        (home / "big.bin").write_bytes(os.urandom(3 << 20))
        for path in (home, home / "big.bin"):
            os.chown(path, uid, uid)

        hub.spawn("ann")
        failed = wait_for(lambda: "over its quota" in hub.log(), 60)
        assert failed, hub.log()
        model = hub.api("GET", "/users/ann").json()
        assert not model["servers"].get("", {}).get("ready")
        assert not processes_of_uid(uid)
        assert "uses 3.0 MiB, over its quota of 2.0 MiB" in hub.log()

        (home / "big.bin").unlink()
        hub.api("DELETE", "/users/ann/server")
        wait_for(lambda: not hub.api("GET", "/users/ann").json()["servers"], 30)
        hub.spawn("ann")
        assert wait_for(lambda: hub.api("GET", "/users/ann").json()["servers"]
                        .get("", {}).get("ready"), 60), hub.log()
