"""Idle culling in a real hub: jupyterhub-idle-culler as a hub-managed service stops a
server idle past its (short, for the test) timeout; the sandbox, its GPU reservation (a
stand-in GPU: character nodes made like /dev/null's, named nvidia0 and nvidiactl) and its
cgroup are gone, the audit log records ``sandbox.stop``, and the home keeps its files.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from medzone_hub import access, accounts, culling
from medzone_hub.sandbox.resources import cgroup_members

from .hub_harness import (
    DATASET,
    processes_of_uid,
    require_hub_tools,
    run_code,
    running_hub,
    wait_for,
)

require_hub_tools()

TIMEOUT, CULL_EVERY = 8, 4


def make_fake_gpu_dir(names=("nvidia0", "nvidiactl")) -> Path:
    """A 0755 folder of character nodes with /dev/null's numbers, named like NVIDIA's."""
    folder = Path(tempfile.mkdtemp(prefix="mz-fakegpu-", dir="/tmp"))
    os.chmod(folder, 0o755)
    null = os.stat("/dev/null").st_rdev
    for name in names:
        os.mknod(folder / name, 0o666 | stat.S_IFCHR, null)
    return folder


def add_gpu_user(hub, name: str) -> None:
    with hub.store.session() as session:
        accounts.add_user(session, name, roles=["gpu"], actor="test")
    with hub.store.session() as session:
        app_id = access.apply(session, user=name, dataset_ids=[DATASET], purpose="test").id
    with hub.store.session() as session:
        access.approve(session, app_id, reviewer="steward")


@pytest.fixture(scope="module")
def hub():
    fake = make_fake_gpu_dir()
    extra = (f"c.IdleCuller.timeout = {TIMEOUT}\n"
             f"c.IdleCuller.cull_every = {CULL_EVERY}\n"
             f"c.SafeZoneSpawner.gpu_device_dir = {str(fake)!r}\n")
    try:
        with running_hub({DATASET: "data\n"}, extra_config=extra) as h:
            h.fake_gpu_dir = fake
            yield h
    finally:
        shutil.rmtree(fake, ignore_errors=True)


def test_the_culler_role_holds_only_what_it_needs():
    assert culling.role() == {
        "name": "medzone-idle-culler", "services": ["medzone-idle-culler"],
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"]}
    assert culling.IdleCuller().timeout == 3600
    assert culling.hub_api_url("0.0.0.0", 8000) == "http://127.0.0.1:8000/hub/api"
    assert culling.IdleCuller(timeout=60, cull_every=10).culler_args("U")[:3] == [
        "--url=U", "--timeout=60", "--cull-every=10"]


def test_an_idle_server_is_culled_and_frees_its_gpu_and_cgroup(hub):
    add_gpu_user(hub, "ivan")
    assert hub.spawn("ivan").status_code in (201, 202)
    state = hub.server_state("ivan")
    assert state.get("gpu_key") and state.get("gpu_registry"), state
    registry = Path(state["gpu_registry"])
    assert state["gpu_key"] in json.loads(registry.read_text())
    token = hub.user_token("ivan")
    # The reserved (stand-in) GPU is what the sandbox sees, and the home gets a file.
    out = run_code(hub, "ivan", token,
                   "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], "
                   "sorted(n for n in os.listdir('/dev') if n.startswith('nvidia')))\n"
                   "open(os.path.expanduser('~/work.txt'), 'w').write('kept')")
    assert out.split(None, 1) == ["0", "['nvidia0', 'nvidiactl']\n"]
    uid = hub.user_uid("ivan")
    assert processes_of_uid(uid)
    cgroups = cgroup_members(state["cgroup"]) if state.get("cgroup") else []
    assert all(p.is_dir() for p in cgroups)

    # Idle now: stopped by the culler, not by the test.
    gone = wait_for(lambda: not hub.api("GET", "/users/ivan").json()["servers"], 180, 1)
    assert gone, hub.log()[-3000:]
    assert "medzone-idle-culler" in hub.log()
    assert wait_for(lambda: not processes_of_uid(uid), 30)
    assert state["gpu_key"] not in json.loads(registry.read_text())
    assert wait_for(lambda: not any(p.exists() for p in cgroups), 30)
    stops = [e for e in hub.audit("sandbox.stop") if e.subject == "user:ivan"]
    assert stops
    assert (hub.home.user_home("ivan") / "work.txt").read_text() == "kept"
