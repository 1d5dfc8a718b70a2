"""The hub end to end: real JupyterHub 6, the real npm proxy, real bubblewrap sandboxes.

One hub per test worker (module fixture, see tests/hub_harness.py) on a free 127.0.0.1
port, its MEDZONE_HOME in a 0755 folder under /tmp (sandbox uids must traverse it). All
traffic goes to loopback. Each test uses its own user, so the tests do not depend on their
order.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
import requests

from .hub_harness import require_hub_tools

require_hub_tools()
import websocket  # noqa: E402  (a test dependency: pip install -e '.[test]')

from medzone_hub import access, accounts  # noqa: E402
from medzone_hub.accounts import set_password  # noqa: E402
from medzone_hub.hubapp import HubPaths, proxy_pid  # noqa: E402
from medzone_hub.sandbox import ensure_home  # noqa: E402
from medzone_hub.sessions import policy_for  # noqa: E402

from .hub_harness import (  # noqa: E402
    DATASET,
    PASSWORD,
    Hub,
    running_hub,
)
from .hub_harness import login as _login  # noqa: E402
from .hub_harness import proxied_session  # noqa: E402
from .hub_harness import processes_of_uid as _processes_of_uid  # noqa: E402
from .hub_harness import run_code as _run_code  # noqa: E402
from .hub_harness import wait_for as _wait_for  # noqa: E402
from .hub_harness import xsrf_from as _xsrf_from  # noqa: E402

PROBE = Path(__file__).with_name("sandbox_probe.py").read_text()
OTHER_DATASET = "other-ct"
SECRET_TEXT = "granted data for the kernel\n"


@pytest.fixture(scope="module")
def hub():
    with running_hub({DATASET: SECRET_TEXT, OTHER_DATASET: "not granted\n"}) as h:
        yield h


# --- end to end ----------------------------------------------------------------------

def test_approved_user_spawns_through_proxy_and_kernel_reads_granted_data(hub):
    hub.add_store_user("alice")
    t0 = time.monotonic()
    r = hub.spawn("alice")
    assert r.status_code in (201, 202), r.text
    token = hub.user_token("alice")
    status = hub.user_api("alice", token, "GET", "/api/status")
    spawn_s = time.monotonic() - t0
    assert status.status_code == 200, hub.log()
    print(f"spawn latency (REST request -> proxied server answers): {spawn_s:.2f} s")

    specs = hub.user_api("alice", token, "GET", "/api/kernelspecs").json()
    assert specs["default"] == "medzone"
    assert set(specs["kernelspecs"]) == {"medzone"}
    assert specs["kernelspecs"]["medzone"]["spec"]["display_name"] == "MedZone (Python 3)"

    out = _run_code(hub, "alice", token, (
        "import os, socket\n"
        f"print(repr(open('/data/{DATASET}/readme.txt').read()))\n"
        "print(sorted(os.listdir('/data')))\n"
        "print(os.getuid())\n"
        "import medzone_kernel, torch, monai, pydicom\n"
        "print('imports ok')\n"
    ))
    lines = out.splitlines()
    assert lines[0] == repr(SECRET_TEXT)
    assert lines[1] == repr([DATASET])  # exactly the live grant: not other-ct
    assert int(lines[2]) == hub.user_uid("alice")
    assert lines[3] == "imports ok"

    starts = [e for e in hub.audit("sandbox.start") if e.subject == "user:alice"]
    assert starts and starts[-1].detail["datasets"] == [DATASET]


def test_unapproved_or_unknown_account_gets_no_server(hub):
    hub.add_store_user("bob", approved=False, grant=())
    for name in ("bob", "nobody-in-store"):
        r = hub.spawn(name)
        assert r.status_code >= 400, r.text
        model = hub.api("GET", f"/users/{name}").json()
        assert model["servers"] == {}, model
        assert not (hub.home.root / "homes" / name).exists()
    assert "refusing a server for bob" in hub.log()


def test_hub_restart_keeps_server_routed_and_stop_tears_down_sandbox(hub):
    hub.add_store_user("carol")
    assert hub.spawn("carol").status_code in (201, 202)
    token = hub.user_token("carol")
    state = hub.server_state("carol")
    child = state["child_pid"]
    uid = hub.user_uid("carol")
    assert _processes_of_uid(uid)
    proxy = proxy_pid(hub.home)

    hub.stop()
    # The server (and the proxy) keep running while the hub is down.
    time.sleep(1)
    assert Path(f"/proc/{child}").exists()
    assert proxy_pid(hub.home) == proxy
    hub.start()
    assert proxy_pid(hub.home) == proxy
    r = hub.user_api("carol", token, "GET", "/api/status")
    assert r.status_code == 200, hub.log()
    assert hub.server_state("carol")["child_pid"] == child
    # The hub re-checked the route it found: still the socket, not "<socket>:80".
    routes = requests.get(f"{hub.url}/hub/api/proxy", headers={
        "Authorization": f"token {hub.token}"}, timeout=10)
    assert routes.status_code == 200, routes.text
    target = routes.json()["/user/carol/"]["target"]
    assert target.startswith("http+unix://") and not target.endswith(":80"), target

    # A kernel is part of the sandbox; stop takes it down too.
    kernel = hub.user_api("carol", token, "POST", "/api/kernels", json={}).json()
    assert _wait_for(lambda: len(_processes_of_uid(uid)) >= 3, 30)
    r = hub.api("DELETE", "/users/carol/server")
    assert r.status_code in (202, 204), r.text
    assert _wait_for(lambda: not _processes_of_uid(uid), 15), _processes_of_uid(uid)
    assert not Path(f"/proc/{child}").exists()
    assert hub.api("GET", "/users/carol").json()["servers"] == {}
    assert kernel["id"]
    assert any(e.detail.get("reason") == "stopped"
               for e in hub.audit("sandbox.stop") if e.subject == "user:carol")


# --- download channels ---------------------------------------------------------------

def test_download_channels_are_closed(hub):
    import pydicom.data

    hub.add_store_user("erin")
    assert hub.spawn("erin").status_code in (201, 202)
    token = hub.user_token("erin")
    home = hub.home.root / "homes" / "erin"
    uid = hub.user_uid("erin")
    files = {
        "scan.dcm": Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes(),
        "figure.png": b"\x89PNG\r\n\x1a\n" + os.urandom(256),
        "notes.txt": b"plain text notes\n",
        "big.txt": b"x" * (6 * 1024 * 1024),
        "analysis.ipynb": json.dumps({
            "cells": [{"cell_type": "markdown", "metadata": {}, "source": "hello"}],
            "metadata": {}, "nbformat": 4, "nbformat_minor": 5}).encode(),
    }
    for name, data in files.items():
        (home / name).write_bytes(data)
        os.chown(home / name, uid, uid)

    def get(path, **kw):
        return hub.user_api("erin", token, "GET", path, **kw)

    # What still works: a notebook and a small text file open through the contents API.
    nb = get("/api/contents/analysis.ipynb")
    assert nb.status_code == 200 and nb.json()["type"] == "notebook"
    txt = get("/api/contents/notes.txt")
    assert txt.status_code == 200 and txt.json()["content"] == "plain text notes\n"
    assert get("/api/contents/scan.dcm?content=0").status_code == 200  # listing is fine

    # What is refused.
    for path in ("/files/scan.dcm", "/files/notes.txt", "/files/analysis.ipynb",
                 "/files/figure.png?download=1", "/view/figure.png",
                 "/nbconvert/html/analysis.ipynb?download=true",
                 "/nbconvert/script/analysis.ipynb",
                 "/api/contents/scan.dcm", "/api/contents/figure.png",
                 "/api/contents/scan.dcm?type=file&format=base64",
                 "/api/contents/notes.txt?format=base64",
                 "/api/contents/big.txt"):
        r = get(path)
        assert r.status_code in (403, 404), (path, r.status_code)
        assert files["scan.dcm"][128:200] not in r.content

    # JupyterLab does not offer the download/export commands.
    lab = get("/lab")
    assert lab.status_code == 200
    config = json.loads(re.search(
        r'<script id="jupyter-config-data" type="application/json">(.*?)</script>',
        lab.text, re.S).group(1))
    disabled = set(config["disabledExtensions"])
    assert {"@jupyterlab/docmanager-extension:download",
            "@jupyterlab/filebrowser-extension:download",
            "@jupyterlab/notebook-extension:export"} <= disabled
    assert config["terminalsAvailable"] is False

    hub.api("DELETE", "/users/erin/server")


# --- grants reach running servers ----------------------------------------------------

def test_revoked_grant_stops_running_server_and_next_spawn_does_not_mount_it(hub):
    app_id = hub.add_store_user("frank")
    assert hub.spawn("frank").status_code in (201, 202)
    assert hub.server_state("frank")["mounted"] == [DATASET]
    with hub.store.session() as session:
        access.revoke(session, app_id, actor="steward", reason="test")
    t0 = time.monotonic()
    stopped = _wait_for(lambda: hub.api("GET", "/users/frank").json()["servers"] == {}, 60)
    assert stopped, hub.log()
    print(f"server stopped {time.monotonic() - t0:.1f} s after the revocation")
    ended = [e for e in hub.audit("sandbox.stop")
             if e.subject == "user:frank" and e.detail.get("reason") == "grant ended"]
    assert ended and ended[0].detail["datasets"] == [DATASET]
    assert _wait_for(lambda: not _processes_of_uid(hub.user_uid("frank")), 15)

    # The next spawn mounts what is live now: nothing.
    assert hub.spawn("frank").status_code in (201, 202)
    assert hub.server_state("frank")["mounted"] == []
    token = hub.user_token("frank")
    assert _run_code(hub, "frank", token, "import os; print(os.listdir('/data'))").strip() == "[]"
    hub.api("DELETE", "/users/frank/server")


# --- accounts: sign-up, approval as a POST with XSRF, login --------------------------

def _store_approved(hub: Hub, name: str) -> bool | None:
    with hub.store.session() as session:
        try:
            return accounts.get_user(session, name).approved
        except Exception:  # noqa: BLE001
            return None


def test_signup_then_admin_approves_with_post_and_xsrf(hub):
    # An admin from `medzone user add --admin`, given a password for the hub.
    with hub.store.session() as session:
        accounts.add_user(session, "boss", admin=True, actor="test")
    set_password(hub.home, "boss", PASSWORD, actor="test")

    # Sign-up creates an unapproved account, in the hub and in the store.
    anon = proxied_session()
    page = anon.get(f"{hub.url}/hub/signup", timeout=30)
    r = anon.post(f"{hub.url}/hub/signup", data={
        "username": "dave", "signup_password": PASSWORD,
        "signup_password_confirmation": PASSWORD, "_xsrf": _xsrf_from(page.text)}, timeout=30)
    assert r.status_code == 200 and "sent to the admin" in r.text, r.text[-2000:]
    assert _store_approved(hub, "dave") is False
    # A sign-up cannot claim a name the store already has.
    page = anon.get(f"{hub.url}/hub/signup", timeout=30)
    anon.post(f"{hub.url}/hub/signup", data={
        "username": "steward", "signup_password": PASSWORD,
        "signup_password_confirmation": PASSWORD, "_xsrf": _xsrf_from(page.text)}, timeout=30)
    with hub.store.session() as session:
        assert accounts.get_user(session, "steward").approved  # unchanged, no second account

    # Not approved: no login.
    dave = _login(hub, "dave", PASSWORD)
    assert dave.login_response.status_code == 200
    assert "not been approved" in dave.login_response.text

    admin = _login(hub, "boss", PASSWORD)
    assert admin.login_response.status_code == 302, admin.login_response.text[-2000:]

    # A GET (what an <img src> on any page could trigger) changes nothing.
    r = admin.get(f"{hub.url}/hub/authorize/dave", timeout=30, allow_redirects=False)
    assert r.status_code == 405
    assert _store_approved(hub, "dave") is False
    # A POST without the XSRF token is refused.
    r = admin.post(f"{hub.url}/hub/authorize/dave", data={"action": "approve"}, timeout=30,
                   allow_redirects=False)
    assert r.status_code == 403
    assert _store_approved(hub, "dave") is False
    assert not hub.audit("user.approve")

    # The accounts page posts a form with the token: that approves, in the store too.
    area = admin.get(f"{hub.url}/hub/authorize", timeout=30)
    assert area.status_code == 200 and 'action="/hub/authorize/dave"' in area.text
    r = admin.post(f"{hub.url}/hub/authorize/dave",
                   data={"action": "approve", "_xsrf": _xsrf_from(area.text)},
                   timeout=30, allow_redirects=False)
    assert r.status_code == 302, r.text
    assert _store_approved(hub, "dave") is True
    (event,) = [e for e in hub.audit("user.approve") if e.subject == "user:dave"]
    assert event.actor == "hub:boss"

    dave = _login(hub, "dave", PASSWORD)
    assert dave.login_response.status_code == 302, dave.login_response.text[-2000:]


# --- escape suite, as code in a kernel ----------------------------------------------------

def test_escape_attempts_from_a_kernel_all_fail(hub):
    """The same probe as tests/test_sandbox.py, run as notebook code in a user's kernel."""
    hub.add_store_user("eve")
    hub.add_store_user("grace")
    with hub.store.session() as session:  # grace's home exists on the host, with a file
        grace_home = ensure_home(hub.home, policy_for(hub.home, session, "grace"))
    (grace_home / "private.txt").write_text("grace's notes\n")
    assert hub.spawn("eve").status_code in (201, 202), hub.log()
    token = hub.user_token("eve")
    paths = HubPaths(hub.home)
    with socket.socket() as listener, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        listener.settimeout(0.5)
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(0.5)
        plan = {
            "tcp_port": listener.getsockname()[1], "udp_port": udp.getsockname()[1],
            "udp_token": "escaped", "host_pid": os.getpid(),
            "paths": [str(hub.home.root), str(hub.home.sqlite_path), str(hub.home.secrets_dir),
                      str(paths.cookie_secret), str(paths.proxy_token), str(paths.state_dir),
                      str(hub.home.dataset_dir(OTHER_DATASET)), f"/data/{OTHER_DATASET}",
                      "/home/grace", str(grace_home), str(grace_home / "private.txt")],
            "write": [f"/data/{DATASET}/readme.txt", f"/data/{DATASET}/new.txt"],
            "listdir": ["/data", "/home"],
        }
        code = (f"import sys\nsys.argv = ['probe', {json.dumps(plan)!r}]\n"
                f"__name__ = '__main__'\nexec({PROBE!r})\n")
        result = json.loads(_run_code(hub, "eve", token, code).strip().splitlines()[-1])
        proxy_result = json.loads(_run_code(hub, "eve", token, code.replace(
            str(plan["tcp_port"]), str(hub.port), 1)).strip().splitlines()[-1])
        with pytest.raises(socket.timeout):
            listener.accept()
        with pytest.raises(socket.timeout):
            udp.recvfrom(64)

    assert result["interfaces"] == ["lo"]
    assert result["tcp_loopback_inside"] == "ok"  # connecting as such works inside …
    assert result["tcp_host"] != "ok"              # … but the host's 127.0.0.1 is unreachable
    assert proxy_result["tcp_host"] != "ok"        # the proxy's port on the host included
    assert result["uid"] == hub.user_uid("eve") and result["euid"] == result["uid"]
    assert not any(result["exists"].values()), result["exists"]
    assert all(v != "ok" for v in result["read"].values())
    assert all(v != "ok" for v in result["write"].values())
    assert result["listdir"]["/data"] == [DATASET]
    assert result["listdir"]["/home"] == ["eve"]
    assert result["host_pid_visible"] is False
    assert result["ptrace_host"] != "ok" and result["signal_host"] != "ok"
    assert len(result["pids"]) < 20
    assert result["setuid0"] != "ok" and result["unshare_user"] != "ok"
    assert result["unshare_cmd"]["rc"] != 0 and result["mount"]["rc"] != 0
    assert result["su"]["rc"] != 0
