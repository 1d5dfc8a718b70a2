"""Hub responsiveness during a storm of logins: is the event loop free while passwords
are checked?

One hub (MedZone's default config, its proxy on a free 127.0.0.1 port) over a temporary
zone with ``STORM`` approved accounts that have a password. A probe requests
``GET /hub/api/`` through the proxy every ``PROBE_GAP_S`` seconds and records how long
each answer takes:

* ``idle``: nothing else happens;
* ``correct``: ``STORM`` clients post the login form at once, each for its own account,
  with the right password;
* ``wrong``: the same with a wrong password (each account once);
* ``guessing``: ``STORM`` clients post wrong passwords for one account at once (what a
  password-guessing client does; with the lockout on, most are refused before any hash).

Each storm's clients first fetch the login page (for the ``_xsrf`` token), then post
together. Reported per phase: p50/p95/max probe latency, the storm's wall time and how
the logins ended (302 = logged in, else the status). Goal: the hub API answers within
``GOAL_MAX_S`` during every storm. ``MEDZONE_BENCH_LOGINS`` (default 20) sets ``STORM``.
"""

from __future__ import annotations

import os
import platform
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from medzone_hub import accounts
from medzone_hub.accounts import set_password
from medzone_hub.config import MedZoneHome
from medzone_hub.db import connect
from medzone_hub.hubapp import proxy_command, start_hub, stop_proxy
from medzone_hub.processes import terminate

STORM = int(os.environ.get("MEDZONE_BENCH_LOGINS", "20"))
PASSWORD = "bench-password-long-1"
PROBE_GAP_S = 0.05
IDLE_PROBES = 40
GOAL_MAX_S = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"n": len(samples), "p50_s": round(statistics.median(samples), 3),
            "p95_s": round(p95, 3), "max_s": round(max(samples), 3)}


class _Probe:
    """Requests ``GET /hub/api/`` back to back (with a small gap) until stopped."""

    def __init__(self, url: str):
        self.url = url + "/hub/api/"
        self.samples: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        s = requests.Session()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                ok = s.get(self.url, timeout=30).status_code == 200
            except requests.RequestException:
                ok = False
            if ok:
                self.samples.append(time.perf_counter() - t0)
            else:
                self.errors += 1
            self._stop.wait(PROBE_GAP_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _login_page(url: str) -> tuple[requests.Session, str]:
    s = requests.Session()
    page = s.get(url + "/hub/login", timeout=60)
    match = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
    if not match:
        raise RuntimeError(f"no _xsrf on the login page ({page.status_code})")
    return s, match.group(1)


def _storm(url: str, credentials: list[tuple[str, str]]) -> dict:
    forms = [_login_page(url) for _ in credentials]
    outcomes: list[str] = [""] * len(credentials)
    durations: list[float] = [0.0] * len(credentials)
    barrier = threading.Barrier(len(credentials))

    def one(i: int) -> None:
        session, xsrf = forms[i]
        name, password = credentials[i]
        barrier.wait()
        t0 = time.perf_counter()
        try:
            r = session.post(url + "/hub/login", data={
                "username": name, "password": password, "_xsrf": xsrf},
                timeout=120, allow_redirects=False)
            outcomes[i] = str(r.status_code)
        except requests.RequestException as err:
            outcomes[i] = type(err).__name__
        durations[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(credentials))]
    with _Probe(url) as probe:
        time.sleep(0.3)  # a few probes before the storm starts
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        time.sleep(0.3)
    return {"probe": _stats(probe.samples), "probe_errors": probe.errors,
            "storm_wall_s": round(wall, 2), "login_max_s": round(max(durations), 2),
            "login_median_s": round(statistics.median(durations), 2),
            "outcomes": dict(Counter(outcomes))}


def run() -> dict:
    proxy_command()  # a clear error when the npm proxy is missing
    base = Path(tempfile.mkdtemp(prefix="mzbench-login-", dir="/tmp"))
    os.chmod(base, 0o755)
    home = MedZoneHome(base / "home").ensure()
    store = connect(home.db_url)
    names = [f"bench{i:02d}" for i in range(STORM)]
    with store.session() as session:
        for name in names:
            accounts.add_user(session, name, approved=True, actor="bench")
    for name in names:
        set_password(home, name, PASSWORD, actor="bench")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    config = base / "bench_jupyterhub_config.py"
    config.write_text("import os\n"
                      f"os.environ['MEDZONE_PORTAL_PORT'] = '{_free_port()}'\n"
                      "from medzone_hub.hubapp import DEFAULT_CONFIG\n"
                      "load_subconfig(str(DEFAULT_CONFIG))\n")
    log_path = base / "bench-hub.log"
    proc = None
    phases: dict[str, dict] = {}
    try:
        with open(log_path, "ab") as log:
            proc = start_hub(home, port=port, config_file=config, stdout=log,
                             stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the hub exited:\n{log_path.read_text()[-4000:]}")
            try:
                if requests.get(url + "/hub/api/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the hub did not come up:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.1)
        time.sleep(2)  # let the portal service start before measuring
        with _Probe(url) as probe:
            while len(probe.samples) < IDLE_PROBES:
                time.sleep(0.1)
        phases["idle"] = {"probe": _stats(probe.samples), "probe_errors": probe.errors}
        phases["correct"] = _storm(url, [(n, PASSWORD) for n in names])
        phases["wrong"] = _storm(url, [(n, PASSWORD + "x") for n in names])
        phases["guessing"] = _storm(url, [(names[0], f"guess-{secrets.token_hex(4)}")
                                          for _ in names])
    finally:
        if proc is not None:
            terminate(proc)
        try:
            stop_proxy(home)
        except Exception:  # noqa: BLE001
            pass
        store.close()
        shutil.rmtree(base, ignore_errors=True)

    storm_max = max(phases[p]["probe"].get("max_s", 0) for p in ("correct", "wrong", "guessing"))
    result = {
        "benchmark": "GET /hub/api/ latency through the proxy during concurrent logins",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}",
        "logins_per_storm": STORM,
        **phases,
        "goal_max_s": GOAL_MAX_S,
        "goal_met": storm_max <= GOAL_MAX_S,
    }
    for k, v in result.items():
        print(f"{k:>17}: {v}")
    return result
