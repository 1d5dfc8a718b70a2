"""Spawn latency (REST request → the proxied server answers) against SimpleLocalProcessSpawner.

Two hubs run side by side in one temporary zone, each with its own state and proxy on a
free 127.0.0.1 port:

* ``medzone``: MedZone's default config (``SafeZoneSpawner``: a bubblewrap sandbox, the
  server on a unix socket, the user's grants mounted);
* ``simple``: the same config with ``c.JupyterHub.spawner_class`` set to JupyterHub's
  ``SimpleLocalProcessSpawner`` (a plain ``jupyterhub-singleuser`` process on TCP
  127.0.0.1, its home under the temporary base).

Each zone has a tiny registered dataset and an approved user with a grant on it. One cycle
is: ``POST /hub/api/users/<name>/server`` with an admin token → poll
``GET <proxy>/user/<name>/api/status`` with the user's token until it answers 200 (the
recorded latency) → ``DELETE`` the server and wait until the hub lists it as gone. The
cycles of the two hubs alternate, so drift on the machine hits both alike; the first
cycle of each is a warm-up and is not counted.

Goal: MedZone's median ≤ 1.3 × the ``SimpleLocalProcessSpawner`` median.

``MEDZONE_BENCH_SPAWNS`` (default 7) sets the cycles per hub, warm-up included.

Then **a class logging in at once** on the MedZone hub (default settings: admission of
``max_concurrent_starts`` = the CPU count, at least 2; profiles on): ``MEDZONE_BENCH_BURST``
(default 24; 0 skips it) approved users with a grant each request their server at the
same moment (one thread each, released together). Recorded: failures (a request refused,
or a server that never became ready: goal 0), the seconds from the burst to the first and
to the last server ready (the hub's ``ready`` flag), and whether earlier requests were
served earlier (how many servers became ready out of their request order).
"""

from __future__ import annotations

import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from medzone_hub import access, accounts, registry
from medzone_hub.config import MedZoneHome
from medzone_hub.db import connect
from medzone_hub.hubapp import proxy_command, start_hub, stop_proxy
from medzone_hub.processes import terminate

SPAWNS = int(os.environ.get("MEDZONE_BENCH_SPAWNS", "7"))
GOAL_RATIO = 1.3
USER = "bench"
DATASET = "bench-ct"
#: Seconds between readiness checks through the proxy (the same for both hubs).
POLL_S = 0.05
SPAWN_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60
SIMPLE_SPAWNER = "jupyterhub.spawner.SimpleLocalProcessSpawner"
BURST = int(os.environ.get("MEDZONE_BENCH_BURST", "24"))
BURST_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Hub:
    """One hub (and its proxy) over its own MEDZONE_HOME under the benchmark's base."""

    def __init__(self, base: Path, variant: str):
        self.variant = variant
        self.root = base / variant
        self.home = MedZoneHome(self.root).ensure()
        self.store = connect(self.home.db_url)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(24)
        self.uid_base = 300000 + secrets.randbelow(500) * 1000
        self.log_path = self.root / "bench-hub.log"
        self.config = self.root / "bench_jupyterhub_config.py"
        self.proc: subprocess.Popen | None = None
        self.user_token = ""
        self._write_config()
        self._seed()

    def _write_config(self) -> None:
        lines = [
            "from medzone_hub.hubapp import DEFAULT_CONFIG",
            "load_subconfig(str(DEFAULT_CONFIG))",
            f"c.JupyterHub.services = [{{'name': 'bench-admin', 'api_token': {self.token!r}}}]",
            "c.JupyterHub.load_roles = [{'name': 'bench-admin', 'services': ['bench-admin'],",
            "    'scopes': ['admin:users', 'admin:servers', 'admin:server_state', 'tokens',",
            "               'access:servers', 'read:users']}]",
            f"c.SafeZoneSpawner.uid_base = {self.uid_base}",
        ]
        if self.variant == "simple":
            singleuser = os.path.join(sys.prefix, "bin", "jupyterhub-singleuser")
            lines += [
                f"c.JupyterHub.spawner_class = {SIMPLE_SPAWNER!r}",
                f"c.SimpleLocalProcessSpawner.home_dir_template = "
                f"{str(self.root / 'simple-homes' / '{username}')!r}",
                f"c.Spawner.cmd = [{singleuser!r}]",
                "c.Spawner.ip = '127.0.0.1'",
            ]
            if os.geteuid() == 0:
                # jupyter_server refuses to run as root without it (the sandbox never is).
                lines.append("c.Spawner.args = ['--allow-root']")
        self.config.write_text("\n".join(lines) + "\n")

    def _seed(self) -> None:
        """A tiny registered dataset and an approved user with a live grant on it."""
        text = "bench data\n"
        data = self.home.dataset_dir(DATASET) / "data"
        data.mkdir(parents=True)
        (data / "readme.txt").write_text(text)
        for p in (self.home.datasets_dir, self.home.dataset_dir(DATASET), data):
            os.chmod(p, 0o755)
        with self.store.session() as session:
            registry.register_dataset(
                session, dataset_id=DATASET, title=DATASET, manifest_sha256="0" * 64,
                deidentified=True, n_files=1, n_bytes=len(text), n_patients=1,
                modalities=["CT"], actor="bench")
        with self.store.session() as session:
            accounts.add_user(session, "steward", roles=["data-steward"], actor="bench")
            accounts.add_user(session, USER, approved=True, actor="bench")
        with self.store.session() as session:
            app_id = access.apply(session, user=USER, dataset_ids=[DATASET],
                                  purpose="spawn benchmark").id
        with self.store.session() as session:
            access.approve(session, app_id, reviewer="steward")

    # processes ------------------------------------------------------------------------

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = start_hub(self.home, port=self.port, config_file=self.config,
                                  stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.variant} hub exited:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/hub/api/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the {self.variant} hub did not come up:\n{self.log_tail()}")
        r = self.api("POST", f"/users/{USER}")
        if r.status_code not in (201, 409):
            raise RuntimeError(f"creating {USER} on the {self.variant} hub: "
                               f"{r.status_code} {r.text}")
        r = self.api("POST", f"/users/{USER}/tokens", json={"note": "spawn benchmark"})
        if r.status_code != 201:
            raise RuntimeError(f"a token for {USER}: {r.status_code} {r.text}")
        self.user_token = r.json()["token"]

    def stop(self) -> None:
        """Stop the server (if any), the hub and the proxy; never raises."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.api("DELETE", f"/users/{USER}/server", timeout=30)
                self._wait_gone(STOP_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the sweep below still ends the processes
                pass
            terminate(self.proc)
        self.proc = None
        try:
            stop_proxy(self.home)
        except Exception:  # noqa: BLE001
            pass
        try:
            self.store.engine.dispose()
        except Exception:  # noqa: BLE001
            pass

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def api(self, method: str, path: str, timeout: float = 60, **kwargs) -> requests.Response:
        return requests.request(method, f"{self.url}/hub/api{path}",
                                headers={"Authorization": f"token {self.token}"},
                                timeout=timeout, **kwargs)

    # one cycle ------------------------------------------------------------------------

    def _server_listed(self) -> bool:
        return bool(self.api("GET", f"/users/{USER}").json()["servers"])

    def _wait_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._server_listed():
                return
            time.sleep(0.1)
        raise RuntimeError(f"the {self.variant} server did not stop within {timeout:g} s:\n"
                           f"{self.log_tail()}")

    def cycle(self) -> float:
        """Spawn, wait until the proxied server answers, stop; the spawn latency (s)."""
        status_url = f"{self.url}/user/{USER}/api/status"
        headers = {"Authorization": f"token {self.user_token}"}
        t0 = time.perf_counter()
        r = self.api("POST", f"/users/{USER}/server")
        if r.status_code not in (201, 202):
            raise RuntimeError(f"spawn on the {self.variant} hub: {r.status_code} {r.text}\n"
                               f"{self.log_tail()}")
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while True:
            try:
                ok = requests.get(status_url, headers=headers, timeout=10,
                                  allow_redirects=False).status_code == 200
            except requests.RequestException:
                ok = False
            if ok:
                elapsed = time.perf_counter() - t0
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.variant} server did not answer within "
                                   f"{SPAWN_TIMEOUT_S} s:\n{self.log_tail()}")
            time.sleep(POLL_S)
        r = self.api("DELETE", f"/users/{USER}/server")
        if r.status_code not in (202, 204):
            raise RuntimeError(f"stop on the {self.variant} hub: {r.status_code} {r.text}")
        self._wait_gone(STOP_TIMEOUT_S)
        return elapsed

    def hub_reported_starts(self) -> list[float]:
        """Each start's duration as the hub logged it (request → server up; no proxy hop)."""
        return [float(x) for x in re.findall(r"took ([0-9.]+) seconds to start", self._log_text())]

    def spawner_start_times(self) -> list[float]:
        """SafeZoneSpawner.start()'s own duration as it logs it ("up in X s")."""
        return [float(x) for x in re.findall(r"up in ([0-9.]+) s", self._log_text())]

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def burst(hub: _Hub, n: int) -> dict:
    """*n* users request their servers at once; failures, first and last ready, order."""
    import threading

    names = [f"class{i:02d}" for i in range(n)]
    for name in names:
        with hub.store.session() as session:
            accounts.add_user(session, name, approved=True, actor="bench")
        with hub.store.session() as session:
            app_id = access.apply(session, user=name, dataset_ids=[DATASET],
                                  purpose="spawn burst").id
        with hub.store.session() as session:
            access.approve(session, app_id, reviewer="steward")
        r = hub.api("POST", f"/users/{name}")
        if r.status_code not in (201, 409):
            raise RuntimeError(f"creating {name}: {r.status_code} {r.text}")
    barrier = threading.Barrier(n + 1)
    requested: dict[str, float] = {}
    answers: dict[str, int] = {}

    def request(name: str, delay: float) -> None:
        barrier.wait()
        time.sleep(delay)  # arrivals a few ms apart, in name order
        requested[name] = time.perf_counter()
        try:
            answers[name] = hub.api("POST", f"/users/{name}/server", timeout=300).status_code
        except requests.RequestException:
            answers[name] = 0

    threads = [threading.Thread(target=request, args=(name, i * 0.02))
               for i, name in enumerate(names)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    ready: dict[str, float] = {}
    failed: set[str] = set()
    deadline = time.monotonic() + BURST_TIMEOUT_S
    while len(ready) + len(failed) < n and time.monotonic() < deadline:
        try:
            users = {u["name"]: u for u in hub.api("GET", "/users", timeout=30).json()}
        except (requests.RequestException, ValueError):
            time.sleep(0.5)
            continue
        now = time.perf_counter()
        for name in names:
            if name in ready or name in failed or name not in answers:
                continue
            if answers[name] not in (201, 202):
                failed.add(name)
                continue
            server = users.get(name, {}).get("servers", {}).get("")
            if server and server.get("ready"):
                ready[name] = now
            elif not server and now - requested[name] > 5:
                failed.add(name)  # gone without ever being ready: the spawn failed
        time.sleep(0.25)
    for t in threads:
        t.join(timeout=60)
    failed |= set(names) - set(ready)
    order = sorted(ready, key=ready.get)
    requested_order = [name for name in sorted(requested, key=requested.get) if name in ready]
    out_of_order = sum(1 for a, b in zip(order, requested_order) if a != b)
    for name in names:
        hub.api("DELETE", f"/users/{name}/server")
    times = sorted(ready.values())
    return {
        "burst_spawns": n,
        "burst_failures": len(failed),
        "burst_first_ready_s": round(times[0] - t0, 2) if times else None,
        "burst_last_ready_s": round(times[-1] - t0, 2) if times else None,
        "burst_ready_out_of_request_order": out_of_order,
        "burst_start_limit": hub_start_limit(),
        "burst_failure_messages": sorted({
            m for m in re.findall(r"Failed to spawn[^\n]{0,200}|Timeout[^\n]{0,200}",
                                  hub._log_text())})[:5],
    }


def hub_start_limit() -> int:
    return max(2, os.cpu_count() or 2)


def _sweep(base: Path, uid_ranges: list[range]) -> None:
    """SIGKILL what is left of this run: processes working under *base* or with a sandbox uid."""
    me = os.getpid()
    base_s = str(base)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            uid, cwd = None, ""
        if (cwd == base_s or cwd.startswith(base_s + "/")) or any(uid in r for r in uid_ranges):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _stats(samples: list[float]) -> dict:
    p90 = (statistics.quantiles(samples, n=10, method="inclusive")[8]
           if len(samples) > 1 else samples[0])
    return {
        "median_s": round(statistics.median(samples), 3),
        "p90_s": round(p90, 3),
        "min_s": round(min(samples), 3),
        "max_s": round(max(samples), 3),
    }


def run() -> dict:
    if SPAWNS < 2:
        raise SystemExit("MEDZONE_BENCH_SPAWNS must be at least 2 (the first is a warm-up)")
    if shutil.which("bwrap") is None:
        raise SystemExit("the spawn benchmark needs bubblewrap (bwrap)")
    proxy_command()  # a clear error when the npm proxy is missing

    # 0755: sandbox uids must traverse it to their homes, the datasets and the hub socket.
    base = Path(tempfile.mkdtemp(prefix="mzbench-", dir="/tmp"))
    os.chmod(base, 0o755)
    hubs: list[_Hub] = []
    wall0 = time.perf_counter()
    try:
        hubs = [_Hub(base, "medzone"), _Hub(base, "simple")]
        for hub in hubs:
            hub.start()
        samples: dict[str, list[float]] = {hub.variant: [] for hub in hubs}
        for i in range(SPAWNS):
            for hub in hubs:
                samples[hub.variant].append(hub.cycle())
            print(f"  cycle {i + 1}/{SPAWNS}: " + ", ".join(
                f"{v} {s[-1]:.2f} s" for v, s in samples.items()), flush=True)
        hub_starts = {hub.variant: hub.hub_reported_starts()[1:] for hub in hubs}
        spawner_starts = hubs[0].spawner_start_times()[1:]
        hubs[1].stop()  # the burst runs on the MedZone hub alone
        burst_result = burst(hubs[0], BURST) if BURST > 0 else {}
        if burst_result:
            print("  burst: " + ", ".join(f"{k} {v}" for k, v in burst_result.items()),
                  flush=True)
    finally:
        for hub in hubs:
            hub.stop()
        _sweep(base, [range(h.uid_base, h.uid_base + 100) for h in hubs])
        shutil.rmtree(base, ignore_errors=True)
    wall = time.perf_counter() - wall0

    medzone = samples["medzone"][1:]
    simple = samples["simple"][1:]
    m, s = _stats(medzone), _stats(simple)
    ratio = m["median_s"] / s["median_s"]
    result = {
        "benchmark": "spawn latency: REST request -> proxied /api/status answers 200",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}",
        "baseline": SIMPLE_SPAWNER,
        "spawns_counted": len(medzone),
        "warmup_discarded": 1,
        **{f"medzone_{k}": v for k, v in m.items()},
        **{f"simple_{k}": v for k, v in s.items()},
        "ratio_median": round(ratio, 2),
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio <= GOAL_RATIO,
        "medzone_hub_start_median_s": (round(statistics.median(hub_starts["medzone"]), 3)
                                       if hub_starts["medzone"] else None),
        "simple_hub_start_median_s": (round(statistics.median(hub_starts["simple"]), 3)
                                      if hub_starts["simple"] else None),
        "medzone_spawner_start_median_s": (round(statistics.median(spawner_starts), 3)
                                           if spawner_starts else None),
        "medzone_samples_s": [round(x, 3) for x in medzone],
        "simple_samples_s": [round(x, 3) for x in simple],
        **burst_result,
        "burst_goal_met": burst_result.get("burst_failures") == 0 if burst_result else None,
        "benchmark_wall_s": round(wall, 1),
    }
    for k, v in result.items():
        print(f"{k:>31}: {v}")
    return result
