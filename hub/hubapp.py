"""Run the hub: JupyterHub 6 with MedZone's config, behind the npm configurable-http-proxy.

``medzone hub`` calls :func:`run_hub`. Everything the hub keeps lives under
``MEDZONE_HOME``::

    hub/                     0700  the hub's private state (never visible in a sandbox)
      jupyterhub.sqlite      0600  JupyterHub's own database (users, tokens, routes)
      jupyterhub_cookie_secret 0600
      proxy_token            0600  the proxy's API token
      proxy-api.sock               the proxy's REST API (no TCP port at all)
      proxy.pid, proxy.log         the proxy process, which outlives hub restarts
      jupyterhub.log
      portal_cookie_secret   0600  the portal's (medzone_hub.portal, a hub-managed service)
      servers/               0700  <hash>.sock: each user's server, bound by the spawner and
                                   handed to the server as a descriptor (medzone_hub.spawner)
    run/                     0755
      hub/                   0755  hub.sock: the hub API; bound read-only into sandboxes
    homes/<name>/            0700  the user's home: nothing of the hub's lives there

The proxy is started here, not by JupyterHub (``ConfigurableHTTPProxy.should_start`` is
off): JupyterHub kills a proxy it finds from an earlier run, which would drop every route.
A proxy started by :func:`ensure_proxy` keeps serving while the hub restarts, and
``JupyterHub.cleanup_servers`` is off too, so running servers stay up and routed.
:func:`stop_proxy` ends it. Stopping the service (SIGTERM or SIGINT to ``medzone hub``,
:func:`run_hub`) stops everything: servers, portal, hub and proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .config import ENV_HOME, MAX_SOCKET_PATH, MedZoneHome, ensure_hub_state, resolve_home
from .db import secure_sqlite_file
from .errors import Conflict, MedZoneError
from .ingest import seal_datasets
from .processes import pid_alive

#: Environment the config file reads (set by :func:`run_hub`).
ENV_HUB_IP = "MEDZONE_HUB_IP"
ENV_HUB_PORT = "MEDZONE_HUB_PORT"
#: The config file the hub runs with; the portal service reads its spawner settings.
ENV_HUB_CONFIG = "MEDZONE_HUB_CONFIG"

DEFAULT_IP = "127.0.0.1"
DEFAULT_PORT = 8000

#: The package's default hub config (``hub/jupyterhub_config.py``).
DEFAULT_CONFIG = Path(__file__).with_name("jupyterhub_config.py")



@dataclass(frozen=True)
class HubPaths:
    """Where the hub keeps its state and sockets: :class:`MedZoneHome`'s hub paths, with
    the proxy's files and the URLs JupyterHub and the proxy are given."""

    home: MedZoneHome

    @property
    def state_dir(self) -> Path:
        return self.home.hub_state_dir

    @property
    def db_path(self) -> Path:
        return self.home.hub_db_path

    @property
    def cookie_secret(self) -> Path:
        return self.home.hub_cookie_secret_path

    @property
    def proxy_token(self) -> Path:
        return self.home.proxy_token_path

    @property
    def server_socket_dir(self) -> Path:
        """Single-user servers' sockets: the hub's, outside every home."""
        return self.home.server_socket_dir

    @property
    def proxy_api_socket(self) -> Path:
        return self.home.proxy_api_socket

    @property
    def proxy_pid(self) -> Path:
        return self.state_dir / "proxy.pid"

    @property
    def proxy_info(self) -> Path:
        return self.state_dir / "proxy.json"

    @property
    def proxy_log(self) -> Path:
        return self.state_dir / "proxy.log"

    @property
    def hub_log(self) -> Path:
        return self.state_dir / "jupyterhub.log"

    @property
    def run_dir(self) -> Path:
        return self.home.run_dir

    @property
    def hub_socket_dir(self) -> Path:
        return self.home.hub_socket_dir

    @property
    def hub_socket(self) -> Path:
        return self.home.hub_socket

    # URLs -------------------------------------------------------------------------------

    @property
    def hub_url(self) -> str:
        """``http+unix://…`` of the hub API socket (the same path inside every sandbox)."""
        return unix_url(self.hub_socket)

    @property
    def proxy_api_url(self) -> str:
        return unix_url(self.proxy_api_socket)


def unix_url(path: os.PathLike | str) -> str:
    """``http+unix://<url-encoded path>`` as JupyterHub and the npm proxy understand it."""
    return "http+unix://" + quote(str(path), safe="")


def hub_paths(home: MedZoneHome) -> HubPaths:
    return HubPaths(home)


def prepare_state(home: MedZoneHome) -> HubPaths:
    """Create the hub's directories and secrets with their modes; idempotent."""
    return HubPaths(ensure_hub_state(home))


def secure_home(home: MedZoneHome) -> list[str]:
    """At hub start: the store, secrets and hub state owner-only, and every stored dataset
    sealed to its own group (:func:`medzone_hub.ingest.seal_datasets`: datasets published
    before datasets had groups are repaired). The ids of the datasets repaired."""
    home.ensure()
    if not os.environ.get("MEDZONE_DB_URL"):
        secure_sqlite_file(home.sqlite_path)
    for f in home.secrets_dir.iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o600)
    return seal_datasets(home)


def read_secret(path: Path) -> str:
    return path.read_text().strip()


# --- the proxy -------------------------------------------------------------------------

def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def proxy_command() -> list[str]:
    """The project's local npm ``configurable-http-proxy`` (never a global one)."""
    override = os.environ.get("MEDZONE_PROXY_COMMAND")
    if override:
        return override.split()
    exe = repo_root() / "node_modules" / ".bin" / "configurable-http-proxy"
    if not exe.exists():
        raise MedZoneError(
            f"configurable-http-proxy is not installed at {exe}: run `npm ci` in {repo_root()}"
        )
    return [str(exe)]


def _pid_alive(pid: int) -> bool:
    """Alive and still the proxy (a pid file can outlive its process and the pid be reused)."""
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"configurable-http-proxy" in cmdline


def proxy_pid(home: MedZoneHome) -> int | None:
    """The pid of this home's running proxy, or None."""
    paths = HubPaths(home)
    try:
        pid = int(paths.proxy_pid.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def _listening(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


def ensure_proxy(home: MedZoneHome, *, ip: str = DEFAULT_IP, port: int = DEFAULT_PORT,
                 timeout: float = 20) -> int:
    """Start this home's proxy on *ip*:*port* unless it already runs there; its pid.

    The proxy runs in its own session (Ctrl-C on ``medzone hub`` does not reach it) and
    forwards everything without a route to the hub's unix socket.
    """
    paths = prepare_state(home)
    pid = proxy_pid(home)
    if pid is not None:
        try:
            info = json.loads(paths.proxy_info.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("ip") == ip and info.get("port") == port:
            return pid
        raise Conflict(
            f"this home's proxy already runs (pid {pid}) on {info.get('ip')}:{info.get('port')}; "
            f"stop it first (medzone_hub.hubapp.stop_proxy) to use {ip}:{port}"
        )
    if _listening(ip, port):
        raise Conflict(f"{ip}:{port} is already in use by another program")
    try:
        paths.proxy_api_socket.unlink()
    except FileNotFoundError:
        pass
    env = dict(os.environ)
    env["CONFIGPROXY_AUTH_TOKEN"] = read_secret(paths.proxy_token)
    cmd = proxy_command() + [
        "--ip", ip,
        "--port", str(port),
        "--api-socket", str(paths.proxy_api_socket),
        "--default-target", paths.hub_url,
        "--error-target", paths.hub_url + "/hub/error",
        "--log-level", "warn",
    ]
    log = open(paths.proxy_log, "ab")
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(paths.state_dir), umask=0o077)
    finally:
        log.close()
    paths.proxy_pid.write_text(f"{proc.pid}\n")
    paths.proxy_info.write_text(json.dumps({"ip": ip, "port": port}) + "\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MedZoneError(
                f"configurable-http-proxy exited with status {proc.returncode}; "
                f"see {paths.proxy_log}"
            )
        if paths.proxy_api_socket.exists() and _listening(ip, port):
            return proc.pid
        time.sleep(0.05)
    proc.kill()
    raise MedZoneError(f"configurable-http-proxy did not start within {timeout:g} s")


def stop_proxy(home: MedZoneHome, timeout: float = 10) -> bool:
    """Stop this home's proxy; False if none was running."""
    paths = HubPaths(home)
    pid = proxy_pid(home)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.05)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    for f in (paths.proxy_pid, paths.proxy_info, paths.proxy_api_socket):
        try:
            f.unlink()
        except FileNotFoundError:
            pass
    return True


# --- the hub ---------------------------------------------------------------------------

def hub_env(home: MedZoneHome, *, ip: str, port: int) -> dict[str, str]:
    """The environment the hub process runs with (what the config file reads)."""
    env = dict(os.environ)
    env[ENV_HOME] = str(home.root)
    env[ENV_HUB_IP] = ip
    env[ENV_HUB_PORT] = str(port)
    env["CONFIGPROXY_AUTH_TOKEN"] = read_secret(HubPaths(home).proxy_token)
    return env


def hub_command(config_file: os.PathLike | str | None = None,
                extra_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "jupyterhub", "-f", str(config_file or DEFAULT_CONFIG),
            *extra_args]


def start_hub(home: MedZoneHome, *, ip: str = DEFAULT_IP, port: int = DEFAULT_PORT,
              config_file: os.PathLike | str | None = None,
              extra_args: list[str] | tuple[str, ...] = (),
              stdout=None, stderr=None) -> subprocess.Popen:
    """Start the proxy (if needed) and the hub process; the hub's :class:`Popen`."""
    paths = prepare_state(home)
    for dataset_id in secure_home(home):
        print(f"medzone hub: dataset {dataset_id!r} sealed to its own host group",
              file=sys.stderr, flush=True)
    ensure_proxy(home, ip=ip, port=port)
    env = hub_env(home, ip=ip, port=port)
    env[ENV_HUB_CONFIG] = str(Path(config_file or DEFAULT_CONFIG).resolve())
    return subprocess.Popen(hub_command(config_file, extra_args), env=env,
                            cwd=str(paths.state_dir), stdout=stdout, stderr=stderr)


#: How long ``medzone hub`` waits for JupyterHub to stop its servers and services after a
#: SIGTERM/SIGINT before it kills the hub (systemd's unit waits longer: deploy/).
STOP_TIMEOUT = 60.0


def run_hub(home: MedZoneHome, *, ip: str = DEFAULT_IP, port: int = DEFAULT_PORT,
            config_file: os.PathLike | str | None = None,
            extra_args: list[str] | tuple[str, ...] = (),
            stop_timeout: float = STOP_TIMEOUT) -> int:
    """``medzone hub``: the zone's service in the foreground; its exit status.

    SIGTERM or SIGINT (what systemd, Docker and Ctrl-C send) stops the whole service:
    JupyterHub stops every user's server and the portal, then the proxy stops, and the
    command exits 0 once nothing of it runs. If JupyterHub exits on its own (a crash), the
    proxy and the servers stay up, so that a supervisor's restart finds every server
    routed; the hub's status is returned.
    """
    # A service stop ends the users' sandboxes too (a stopped zone holds no GPU); the
    # config keeps them across a hub that merely restarts.
    hub = start_hub(home, ip=ip, port=port, config_file=config_file,
                    extra_args=[*extra_args, "--JupyterHub.cleanup_servers=True"])
    print(f"MedZone hub: http://{ip}:{port}/ (state in {HubPaths(home).state_dir})",
          file=sys.stderr, flush=True)
    stopping: list[int] = []

    def stop(signum, _frame):
        if not stopping:
            print(f"medzone hub: {signal.Signals(signum).name}: stopping the servers, the "
                  "portal, the hub and the proxy", file=sys.stderr, flush=True)
        stopping.append(signum)
        if hub.poll() is None:
            hub.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    deadline = None
    try:
        while True:
            try:
                status = hub.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if stopping and deadline is None:
                deadline = time.monotonic() + stop_timeout
            if deadline is not None and time.monotonic() > deadline:
                print("medzone hub: the hub did not stop in time; killing it", file=sys.stderr,
                      flush=True)
                hub.kill()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not stopping:
        return status
    stop_proxy(home)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medzone_hub.hubapp",
                                     description="run the MedZone hub")
    parser.add_argument("--home", help="MEDZONE_HOME (default: $MEDZONE_HOME or ~/.medzone)")
    parser.add_argument("--ip", default=DEFAULT_IP)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--config", default=None, help="a JupyterHub config file")
    parser.add_argument("--stop-proxy", action="store_true", help="stop this home's proxy and exit")
    args = parser.parse_args(argv)
    home = resolve_home(args.home)
    try:
        if args.stop_proxy:
            return 0 if stop_proxy(home) else 1
        return run_hub(home, ip=args.ip, port=args.port, config_file=args.config)
    except MedZoneError as err:
        print(f"medzone hub: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
