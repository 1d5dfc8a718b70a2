"""Resource profiles at spawn: the form offers what the user's roles allow; a chosen profile
gives the sandbox exactly its device(s) (``CUDA_VISIBLE_DEVICES`` and the bound
``/dev/nvidia*`` nodes: stand-in character nodes on machines without GPUs); a full profile
says who holds it and when it frees up. First as functions, then in a real hub.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from medzone_hub import spawn_profiles as sp
from medzone_hub.accounts import set_password
from medzone_hub.sandbox import GpuDevice

from .hub_harness import (
    DATASET,
    PASSWORD,
    login,
    require_hub_tools,
    run_code,
    running_hub,
    wait_for,
)
from .test_idle_culling import add_gpu_user, make_fake_gpu_dir

require_hub_tools()

GPUS = [GpuDevice(0, "/dev/nvidia0", "GPU-a"), GpuDevice(1, "/dev/nvidia1"),
        GpuDevice(2, "/dev/nvidia2")]
SLICES = [sp.MigSlice(2, "MIG-aaaa", "1g.10gb", 0), sp.MigSlice(2, "MIG-bbbb", "1g.10gb", 1)]


def inventory():
    return sp.Inventory.build(GPUS, SLICES, [1], 2)


def entry(gpu, user, since=1_700_000_000):
    return {"gpu": gpu, "user": user, "pid": os.getpid(), "since": since}


def test_pools_never_overlap():
    inv = inventory()
    assert [g.index for g in inv.whole] == [0]
    assert [g.index for g in inv.shared] == [1]
    assert [(m.uuid, d.path, d.cuda_id) for m, d in inv.slices] == [
        ("MIG-aaaa", "/dev/nvidia2", "MIG-aaaa"), ("MIG-bbbb", "/dev/nvidia2", "MIG-bbbb")]
    assert {d.index for _, d in inv.slices}.isdisjoint({0, 1, 2})


def test_choices_follow_the_role_and_the_registry():
    assert [c.key for c in sp.choices(inventory(), gpu_allowed=False, entries={})] == ["cpu"]
    found = sp.choices(inventory(), gpu_allowed=True, entries={})
    assert [c.key for c in found] == ["cpu", "gpu", "shared", "mig:MIG-aaaa", "mig:MIG-bbbb"]
    assert all(c.free for c in found)
    mig_a = sp.mig_registry_index(SLICES[0])
    entries = {"k1": entry(0, "hank"), "k2": entry(1, "ines"), "k3": entry(1, "joe"),
               "k4": entry(mig_a, "gina")}
    found = {c.key: c for c in sp.choices(inventory(), gpu_allowed=True, entries=entries,
                                          idle_timeout=3600, max_age=0)}
    assert not found["gpu"].free and "hank since" in found["gpu"].detail
    assert "after 1 h without activity" in found["gpu"].detail
    assert not found["shared"].free and "ines" in found["shared"].detail
    assert "joe" in found["shared"].detail
    assert not found["mig:MIG-aaaa"].free and "gina" in found["mig:MIG-aaaa"].detail
    assert found["mig:MIG-bbbb"].free and found["cpu"].free
    with pytest.raises(sp.Conflict, match="hank since .* frees up when that server stops"):
        sp.pick(list(found.values()), "gpu")
    with pytest.raises(sp.InvalidInput, match="not offered"):
        sp.pick(list(found.values()), "mig:MIG-zzzz")
    assert sp.pick(list(found.values()), "mig:MIG-bbbb").devices[0].cuda_id == "MIG-bbbb"


def test_the_form_disables_a_full_profile_and_names_its_holder():
    entries = {"k1": entry(0, "hank")}
    page = sp.form_html(sp.choices(inventory(), gpu_allowed=True, entries=entries))
    assert 'value="cpu" checked' in page
    assert 'value="gpu" disabled' in page and "in use by hank" in page
    assert 'value="mig:MIG-aaaa"' in page and "<script" not in page
    evil = {"k1": entry(0, "<script>x</script>")}
    assert "<script>x" not in sp.form_html(sp.choices(inventory(), gpu_allowed=True,
                                                      entries=evil))


def test_dead_owners_do_not_hold_a_profile(tmp_path):
    path = tmp_path / "gpu-sessions.json"
    path.write_text(json.dumps({"a": {"gpu": 0, "user": "x", "pid": 2 ** 22 + 7},
                                "b": entry(1, "y")}))
    assert list(sp.registry_entries(path)) == ["b"]
    assert sp.registry_entries(tmp_path / "missing.json") == {}


# --- in a real hub ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub():
    fake = make_fake_gpu_dir(("nvidia0", "nvidia1", "nvidia2", "nvidiactl"))
    extra = (f"c.SafeZoneSpawner.gpu_device_dir = {str(fake)!r}\n"
             "c.SafeZoneSpawner.shared_gpu_indices = [1]\n"
             "c.SafeZoneSpawner.mig_slices = [\n"
             "    {'parent': 2, 'uuid': 'MIG-aaaa', 'name': '1g.10gb', 'slot': 0},\n"
             "    {'parent': 2, 'uuid': 'MIG-bbbb', 'name': '1g.10gb', 'slot': 1}]\n")
    try:
        with running_hub({DATASET: "data\n"}, extra_config=extra) as h:
            yield h
    finally:
        shutil.rmtree(fake, ignore_errors=True)


PROBE = ("import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'), "
         "os.environ.get('MEDZONE_GPU_MEMORY_FRACTION'), "
         "','.join(sorted(n for n in os.listdir('/dev') if n.startswith('nvidia'))))")


def spawn_with(hub, name: str, profile: str):
    hub.api("POST", f"/users/{name}")
    r = hub.api("POST", f"/users/{name}/server", json={"profile": profile})
    if r.status_code == 202:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            server = hub.api("GET", f"/users/{name}").json()["servers"].get("", {})
            if server.get("ready") or not server:
                break
            time.sleep(0.2)
    return r


def sees(hub, name: str) -> list[str]:
    return run_code(hub, name, hub.user_token(name), PROBE).split()


def test_each_profile_sees_exactly_its_devices(hub):
    add_gpu_user(hub, "gina")
    assert spawn_with(hub, "gina", "mig:MIG-aaaa").status_code in (201, 202)
    assert sees(hub, "gina") == ["MIG-aaaa", "None", "nvidia2,nvidiactl"]
    add_gpu_user(hub, "hank")
    assert spawn_with(hub, "hank", "gpu").status_code in (201, 202)
    assert sees(hub, "hank") == ["0", "None", "nvidia0,nvidiactl"]
    add_gpu_user(hub, "ines")
    assert spawn_with(hub, "ines", "shared").status_code in (201, 202)
    assert sees(hub, "ines") == ["1", "0.500", "nvidia1,nvidiactl"]
    add_gpu_user(hub, "kemal")
    assert spawn_with(hub, "kemal", "cpu").status_code in (201, 202)
    assert sees(hub, "kemal") == ["None", "None", ""] or \
        sees(hub, "kemal") == ["None", "None"]


def test_a_full_profile_says_who_holds_it_and_a_cpu_user_gets_no_form(hub):
    add_gpu_user(hub, "lena")
    if hub.api("GET", "/users/hank").status_code == 404:  # run on its own
        add_gpu_user(hub, "hank")
    if not hub.api("GET", "/users/hank").json().get("servers"):
        assert spawn_with(hub, "hank", "gpu").status_code in (201, 202)
    r = spawn_with(hub, "lena", "gpu")
    text = r.text + json.dumps(hub.api("GET", "/users/lena").json())
    if r.status_code in (201, 202):  # failed in the background: the hub logged why
        text += hub.log()[-5000:]
    assert "hank since" in text and "frees up when that server stops" in text, text[-2000:]
    # The form, as lena's browser gets it: the whole GPU disabled with its holder.
    set_password(hub.home, "lena", PASSWORD, actor="test")
    s = login(hub, "lena", PASSWORD)
    page = s.get(f"{hub.url}/hub/spawn/lena", timeout=60).text
    assert 'name="profile"' in page and "in use by hank" in page, page[-3000:]
    assert 'value="mig:MIG-bbbb"' in page
    # A CPU-only user: no form, and no GPU profile by the API either.
    hub.add_store_user("milo")
    r = spawn_with(hub, "milo", "gpu")
    assert r.status_code == 400 and "not offered" in r.text, r.text
    set_password(hub.home, "milo", PASSWORD, actor="test")
    s = login(hub, "milo", PASSWORD)
    page = s.get(f"{hub.url}/hub/spawn/milo", timeout=60, allow_redirects=False)
    assert 'name="profile"' not in page.text


# --- a class logging in at once: admission of starts -------------------------------------

def test_admission_is_first_come_first_served():
    import asyncio

    from medzone_hub.spawner import SpawnAdmission

    async def scenario():
        adm = SpawnAdmission()
        order = []
        assert adm.ticket(2) is None and adm.ticket(2) is None  # two start at once
        waiting = [adm.ticket(2) for _ in range(3)]
        assert [adm.position(t) for t in waiting] == [0, 1, 2]

        async def wait(i, t):
            await t
            order.append(i)

        tasks = [asyncio.ensure_future(wait(i, t)) for i, t in enumerate(waiting)]
        await asyncio.sleep(0)
        adm.withdraw(waiting[1])  # gave up while waiting: its place goes
        tasks[1].cancel()
        adm.release(2.0)
        adm.release(4.0)
        await asyncio.sleep(0.01)
        assert order == [0, 2] and adm.active == 2 and not adm.waiters
        assert adm.estimate(0, 2) == 4.0 and adm.estimate(4, 2) == 12.0
        adm.release(None)
        adm.release(None)
        assert adm.active == 0

    asyncio.run(scenario())


def test_a_burst_larger_than_the_limit_starts_in_turn_without_failure():
    import tempfile
    import threading

    import requests

    # The first start admitted holds its slot (a pre-spawn hook that waits for a file), so
    # the others wait for admission however slow the machine is, and their progress can be
    # read while they wait; then the slot is let go and every start must still succeed.
    hold = Path(tempfile.mkdtemp(prefix="mzhold-", dir="/tmp")) / "go"
    extra = ("c.SafeZoneSpawner.max_concurrent_starts = 1\n"
             "import asyncio as _asyncio, os as _os\n"
             "async def _hold(spawner):\n"
             f"    while not _os.path.exists({str(hold)!r}):\n"
             "        await _asyncio.sleep(0.1)\n"
             "c.Spawner.pre_spawn_hook = _hold\n")
    with running_hub({DATASET: "data\n"}, extra_config=extra) as h:
        names = ["q1", "q2", "q3"]
        for name in names:
            h.add_store_user(name)
            h.api("POST", f"/users/{name}")
        codes = {}

        def post(name):
            codes[name] = h.api("POST", f"/users/{name}/server").status_code

        threads = [threading.Thread(target=post, args=(n,)) for n in names]
        for t in threads:
            t.start()
        assert wait_for(lambda: all(h.api("GET", f"/users/{n}").json()["servers"]
                                    .get("", {}).get("pending") == "spawn" for n in names),
                        120), h.log()[-3000:]

        def first_message(name) -> str:
            """The spawner's first message (after JupyterHub's own "Server requested")."""
            with requests.get(f"{h.url}/hub/api/users/{name}/server/progress", stream=True,
                              headers={"Authorization": f"token {h.token}"},
                              timeout=120) as r:
                for line in r.iter_lines(decode_unicode=True):
                    if line and line.startswith("data:"):
                        message = json.loads(line[5:]).get("message", "")
                        if message != "Server requested":
                            return message
            return ""

        # The spawn page's progress of a start that waits says the zone is busy.
        messages = [first_message(n) for n in names]
        busy = [m for m in messages if m.startswith("The zone is busy") and "starts in about" in m]
        assert len(busy) == 2, messages
        hold.write_text("")
        for t in threads:
            t.join(120)
        assert all(codes[n] in (201, 202) for n in names), codes
        for name in names:
            assert wait_for(lambda: h.api("GET", f"/users/{name}").json()["servers"]
                            .get("", {}).get("ready"), 120), h.log()[-3000:]
        shutil.rmtree(hold.parent, ignore_errors=True)
