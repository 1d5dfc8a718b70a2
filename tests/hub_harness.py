"""A real hub for the tests: JupyterHub 6, the npm proxy, bubblewrap sandboxes, the portal.

:func:`running_hub` starts one on a free 127.0.0.1 port (and the portal, a hub-managed
service, on another), its MEDZONE_HOME in a 0755 folder under /tmp (sandbox uids must
traverse it), and tears everything down afterwards. All traffic goes to loopback.
Used by tests/test_hub.py, tests/test_portal.py and tests/test_portal_browser.py.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import requests
import websocket
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from medzone_hub import access, accounts, registry
from medzone_hub.config import MedZoneHome
from medzone_hub.db import connect
from medzone_hub.hubapp import proxy_command, start_hub, stop_proxy
from medzone_hub.models import AuditEvent
from medzone_hub.processes import terminate

PASSWORD = "a-long-test-password-7"
#: How often the test hub polls servers (the default is 15 s; the property is the same).
POLL_INTERVAL = 2
DATASET = "demo-ct"


def require_hub_tools(*, browser: str | None = None) -> None:
    """Fail, never skip, when something the installer (.ci/install) provides is missing:
    a green run must mean the hub, the sandboxes (and the browser) were really tested.
    Call at module level; *browser* is the Chromium binary a browser test drives."""
    import pytest

    missing = []
    try:
        import nativeauthenticator  # noqa: F401
    except ImportError:
        missing.append("the Python package jupyterhub-nativeauthenticator (pip install -e .)")
    if shutil.which("bwrap") is None:
        missing.append("bubblewrap (apt-get install bubblewrap)")
    try:
        proxy_command()
    except Exception as err:  # noqa: BLE001 - its message says what to install
        missing.append(str(err))
    if browser is not None:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing.append("the Python package playwright (pip install -e '.[test]')")
        if not Path(browser).exists():
            missing.append(f"{browser} (apt-get install chromium)")
    if missing:
        pytest.fail("missing: " + "; ".join(missing) + ". .ci/install provides all of them.",
                    pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Hub:
    def __init__(self, base: Path, extra_config: str = ""):
        self.base = base
        self.home = MedZoneHome(base / "home").ensure()
        self.store = connect(self.home.db_url)
        self.port = _free_port()
        self.portal_port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.portal_url = f"{self.url}/services/medzone-portal/"
        self.token = secrets.token_hex(24)
        self.uid_base = 300000 + secrets.randbelow(500) * 1000
        self.config = base / "test_jupyterhub_config.py"
        self.config.write_text(
            "import os\n"
            f"os.environ['MEDZONE_PORTAL_PORT'] = '{self.portal_port}'\n"
            "from medzone_hub.hubapp import DEFAULT_CONFIG\n"
            "load_subconfig(str(DEFAULT_CONFIG))\n"
            "c.JupyterHub.services = [*c.JupyterHub.services,\n"
            f"    {{'name': 'test-admin', 'api_token': {self.token!r}}}]\n"
            "c.JupyterHub.load_roles = [*c.JupyterHub.load_roles,\n"
            "    {'name': 'test-admin', 'services': ['test-admin'],\n"
            "    'scopes': ['admin:users', 'admin:servers', 'admin:server_state', 'tokens',\n"
            "               'access:servers', 'read:users', 'proxy']}]\n"
            f"c.SafeZoneSpawner.uid_base = {self.uid_base}\n"
            f"c.SafeZoneSpawner.poll_interval = {POLL_INTERVAL}\n"
            "c.SafeZoneSpawner.poll_jitter = 0\n"
            + extra_config
        )
        self.log_path = base / "hub.log"
        self.proc: subprocess.Popen | None = None

    # processes ----------------------------------------------------------------------

    def start(self, *, as_service: bool = False):
        """Start the hub; *as_service*: through ``medzone hub`` in a session of its own, as
        a supervisor (systemd, Docker) runs it, instead of JupyterHub directly."""
        log = open(self.log_path, "ab")
        if as_service:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "medzone_hub.cli", "--home", str(self.home.root), "hub",
                 "--port", str(self.port), "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        else:
            self.proc = start_hub(self.home, port=self.port, config_file=self.config,
                                  stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"hub exited:\n{self.log()}"
            try:
                if (requests.get(self.url + "/hub/api/", timeout=2).status_code == 200
                        and self._portal_routed()):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"hub did not come up:\n{self.log()}")

    def _portal_routed(self) -> bool:
        """The portal listens and the proxy routes to it (it sends people to log in)."""
        if not _listening(self.portal_port):
            return False
        r = requests.get(self.portal_url, timeout=5, allow_redirects=False)
        return r.status_code == 302 and "/hub/api/oauth2/authorize" in r.headers["Location"]

    def portal_pid(self) -> int | None:
        """The portal process the hub started (its child running medzone_hub.portal)."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and b"medzone_hub.portal" in cmdline:
                return int(entry)
        return None

    def restart_portal(self, timeout: float = 120) -> int:
        """Kill the portal process; the hub starts a new one (it polls its services every
        30 s). Returns the new process's pid once the proxy routes to it again."""
        old = self.portal_pid()
        assert old is not None, f"no portal process:\n{self.log()}"
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            new = self.portal_pid()
            try:
                if new not in (None, old) and self._portal_routed():
                    return new
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the hub did not restart the portal:\n{self.log()}")

    def stop(self):
        if self.proc is not None:
            terminate(self.proc)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    # API ----------------------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"token {self.token}", **kwargs.pop("headers", {})}
        return requests.request(method, f"{self.url}/hub/api{path}", headers=headers,
                                timeout=60, **kwargs)

    def add_store_user(self, name: str, *, approved=True, admin=False, grant=(DATASET,)):
        with self.store.session() as session:
            accounts.add_user(session, name, approved=approved, admin=admin, actor="test")
        if grant:
            with self.store.session() as session:
                app_id = access.apply(session, user=name, dataset_ids=list(grant),
                                      purpose="hub test").id
            with self.store.session() as session:
                access.approve(session, app_id, reviewer="steward")
            return app_id
        return None

    def spawn(self, name: str) -> requests.Response:
        self.api("POST", f"/users/{name}")
        r = self.api("POST", f"/users/{name}/server")
        if r.status_code == 202:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                model = self.api("GET", f"/users/{name}").json()
                if model["servers"].get("", {}).get("ready"):
                    break
                time.sleep(0.2)
        return r

    def server_state(self, name: str) -> dict:
        model = self.api("GET", f"/users/{name}").json()
        server = model["servers"].get("")
        return server.get("state", {}) if server else {}

    def user_token(self, name: str) -> str:
        r = self.api("POST", f"/users/{name}/tokens", json={"note": "test"})
        assert r.status_code == 201, r.text
        return r.json()["token"]

    def user_api(self, name: str, token: str, method: str, path: str, **kw):
        headers = {"Authorization": f"token {token}", **kw.pop("headers", {})}
        return requests.request(method, f"{self.url}/user/{name}{path}", headers=headers,
                                timeout=60, allow_redirects=False, **kw)

    def audit(self, action: str) -> list[AuditEvent]:
        from sqlalchemy import select

        with self.store.session() as session:
            return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))

    def user_uid(self, name: str) -> int:
        with self.store.session() as session:
            return self.uid_base + accounts.get_user(session, name).id


def processes_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}")
            except OSError:
                continue
            if st.st_uid == uid:
                pids.append(int(entry))
    return pids


def wait_for(predicate, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def add_dataset(h: Hub, dataset_id: str, text: str, *, title: str | None = None,
                n_patients: int = 1, modalities=("CT",)) -> None:
    """A small stored dataset (one readme) that sandboxes can mount, with a screening
    index (one patient id, one image) for the export screen."""
    from medzone_hub.ingest import screening_index_key
    from medzone_hub.screen.index import ScreeningIndexBuilder

    data = h.home.dataset_dir(dataset_id) / "data"
    data.mkdir(parents=True)
    (data / "readme.txt").write_text(text)
    index = ScreeningIndexBuilder(screening_index_key(h.home))
    index.add_identifier("patient_id", f"{dataset_id}-patient-0001")
    # One fingerprinted image (noise, like no figure a test draws), as ingest would index.
    noise = np.random.default_rng(len(dataset_id)).integers(0, 4096, (64, 64), dtype=np.uint16)
    index.add_image(noise, f"{dataset_id}/image-1")
    index.write(h.home.dataset_dir(dataset_id) / "index")
    for p in (h.home.datasets_dir, h.home.dataset_dir(dataset_id), data):
        os.chmod(p, 0o755)
    with h.store.session() as session:
        registry.register_dataset(
            session, dataset_id=dataset_id, title=title or dataset_id, manifest_sha256="0" * 64,
            deidentified=True, n_files=1, n_bytes=len(text), n_patients=n_patients,
            modalities=list(modalities), actor="test")


@contextmanager
def running_hub(datasets: dict[str, str], *, extra_config: str = "", setup=None,
                as_service: bool = False):
    """A started :class:`Hub` with *datasets* (id -> readme text) and a ``steward``
    account; *setup(hub)* runs before the hub starts (*as_service*: see
    :meth:`Hub.start`). Everything is torn down after."""
    base = Path(tempfile.mkdtemp(prefix="mzhub-", dir="/tmp"))
    os.chmod(base, 0o755)
    h = Hub(base, extra_config)
    for dataset_id, text in datasets.items():
        add_dataset(h, dataset_id, text)
    with h.store.session() as session:
        accounts.add_user(session, "steward", roles=["data-steward"], actor="test")
    try:
        if setup is not None:
            setup(h)
        h.start(as_service=as_service)
        yield h
    finally:
        try:
            if h.proc is not None and h.proc.poll() is None:
                for name in [u["name"] for u in h.api("GET", "/users").json()]:
                    h.api("DELETE", f"/users/{name}/server")
        except Exception:  # noqa: BLE001
            pass
        h.stop()
        stop_proxy(h.home)
        for uid in range(h.uid_base, h.uid_base + 50):
            for pid in processes_of_uid(uid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        h.store.close()
        shutil.rmtree(base, ignore_errors=True)


def run_code(hub: Hub, name: str, token: str, code: str, timeout: float = 120) -> str:
    """Start a kernel through the proxy, run *code*, return its stdout (and stop it)."""
    r = hub.user_api(name, token, "POST", "/api/kernels", json={})
    assert r.status_code == 201, r.text
    kernel = r.json()
    assert kernel["name"] == "medzone"
    ws_url = f"ws://127.0.0.1:{hub.port}/user/{name}/api/kernels/{kernel['id']}/channels"
    ws = websocket.create_connection(ws_url, header=[f"Authorization: token {token}"],
                                     timeout=timeout)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": name, "session": uuid.uuid4().hex,
                       "msg_type": "execute_request", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False},
        }))
        out, errors = [], []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                errors.append("\n".join(msg["content"]["traceback"]))
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert not errors, errors
        return "".join(out)
    finally:
        ws.close()
        hub.user_api(name, token, "DELETE", f"/api/kernels/{kernel['id']}")


def xsrf_from(html: str) -> str:
    match = re.search(r'name="_xsrf" value="([^"]+)"', html)
    assert match, html[:2000]
    return match.group(1)


def proxied_session() -> requests.Session:
    """A browser-like session for requests through the proxy.

    The npm proxy (configurable-http-proxy 5, http-proxy-3) now and then loses the race
    between writing a request's body and the hub's prompt answer (``write EPIPE``) and
    answers 503 itself; the tests assert on what the hub answers, so a 503 is retried.
    """
    s = requests.Session()
    retry = Retry(total=3, status_forcelist=[503], allowed_methods=None, backoff_factor=0.2,
                  raise_on_status=False, respect_retry_after_header=False)
    s.mount("http://", HTTPAdapter(max_retries=retry))
    return s


def login(hub: Hub, name: str, password: str) -> requests.Session:
    s = proxied_session()
    page = s.get(f"{hub.url}/hub/login", timeout=30)
    r = s.post(f"{hub.url}/hub/login", data={
        "username": name, "password": password, "_xsrf": xsrf_from(page.text)},
        timeout=30, allow_redirects=False)
    s.login_response = r
    return s
