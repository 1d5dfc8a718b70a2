"""Idle culling: servers nobody uses are stopped, so a closed browser tab does not hold a
GPU, memory and CPU for ever.

``jupyterhub-idle-culler`` runs as a hub-managed service (``medzone-idle-culler``, added
by ``hub/jupyterhub_config.py``) with a role holding only the scopes it needs
(:data:`SCOPES`). Every :attr:`IdleCuller.cull_every` seconds it asks the hub for each
server's last activity and stops those idle for more than :attr:`IdleCuller.timeout`
seconds (and, with :attr:`IdleCuller.max_age`, those running longer than that, busy or
not). The hub stops a culled server like any other: :meth:`SafeZoneSpawner.stop` kills the
sandbox's pid 1 (kernels included), frees its GPU reservation and cgroup at once, and the
audit log records ``sandbox.stop``. The home is a folder on the host: nothing in it is
lost. A template run is not a server (runs are sandboxes of their own, started by the run
queue), so it is never culled, however long it takes.

The service is started as ``python -m medzone_hub.culler_service --hub-config FILE``: it reads
the settings from the hub config (:func:`medzone_hub.hubconfig.load_hub_config`, the
file every face reads, so a config that loads the default one and sets
``c.IdleCuller.timeout`` after it is obeyed) and then becomes the culler.
"""

from __future__ import annotations

from traitlets import Bool, Integer
from traitlets.config import Configurable

SERVICE_NAME = "medzone-idle-culler"
#: What the culler may do (the Zero to JupyterHub chart's role): nothing else.
SCOPES = ("list:users", "read:users:activity", "read:servers", "delete:servers")


class IdleCuller(Configurable):
    """Settings of the idle culler (``c.IdleCuller.…`` in the hub config)."""

    enabled = Bool(
        True, config=True,
        help="Stop idle servers (jupyterhub-idle-culler as a hub-managed service). Set "
             "c.IdleCuller.enabled = False before the default config is loaded to start "
             "no culler at all; set after it, the service starts and culls nothing.",
    )
    timeout = Integer(
        3600, config=True,
        help="Seconds without activity (no kernel running code, no request from a "
             "browser tab) after which a server is stopped. Its home stays.",
    )
    max_age = Integer(
        0, config=True,
        help="Seconds after which a server is stopped even if busy (0: no limit).",
    )
    cull_every = Integer(
        300, config=True,
        help="Seconds between two checks: an idle server stops between timeout and "
             "timeout + cull_every seconds after its last activity.",
    )
    concurrency = Integer(
        10, config=True,
        help="Most requests the culler has in flight to the hub at once.",
    )

    def culler_args(self, api_url: str) -> list[str]:
        """The ``jupyterhub_idle_culler`` command line arguments."""
        return [f"--url={api_url}", f"--timeout={self.timeout}",
                f"--cull-every={self.cull_every}", f"--max-age={self.max_age}",
                f"--concurrency={self.concurrency}"]


def hub_api_url(ip: str, port: int) -> str:
    """The hub API as the culler reaches it: through the proxy on loopback (the hub's own
    API listens on a unix socket, which the culler's HTTP client cannot use)."""
    host = "127.0.0.1" if ip in ("", "0.0.0.0", "::", "*") else ip
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/hub/api"


def service(python: str, hub_config: str, api_url: str, environment: dict) -> dict:
    """The hub-managed service entry."""
    return {
        "name": SERVICE_NAME,
        "command": [python, "-m", "medzone_hub.culler_service", "--hub-config", hub_config,
                    "--api-url", api_url],
        "environment": dict(environment),
    }


def role() -> dict:
    return {"name": SERVICE_NAME, "scopes": list(SCOPES), "services": [SERVICE_NAME]}
