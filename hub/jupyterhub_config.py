"""MedZone's default JupyterHub config (``medzone hub`` runs JupyterHub with this file).

Read by JupyterHub, not imported: ``c`` is JupyterHub's config object. It takes its
settings from the environment :func:`medzone_hub.hubapp.run_hub` sets
(``MEDZONE_HOME``, ``MEDZONE_HUB_IP``, ``MEDZONE_HUB_PORT``, ``CONFIGPROXY_AUTH_TOKEN``).

To change a policy, copy this file, edit it and pass it as ``config_file``; or, to keep
these defaults and change a few, put ``load_subconfig(<this file>)`` at the top of yours.
Every SafeZoneSpawner policy is a traitlet (``jupyterhub --help-all`` lists them with
their help under ``SafeZoneSpawner``), e.g.::

    c.SafeZoneSpawner.memory_limit = "4G"
    c.SafeZoneSpawner.gpu_sessions_per_gpu = 2
    c.SafeZoneSpawner.poll_interval = 15
"""

import os

from medzone_hub.config import resolve_home
from medzone_hub.hubapp import (
    DEFAULT_IP,
    DEFAULT_PORT,
    ENV_HUB_IP,
    ENV_HUB_PORT,
    prepare_state,
    read_secret,
)

c = get_config()  # noqa: F821 - provided by JupyterHub when it loads this file

home = resolve_home()
paths = prepare_state(home)
ip = os.environ.get(ENV_HUB_IP, DEFAULT_IP)
port = int(os.environ.get(ENV_HUB_PORT, DEFAULT_PORT))

# --- where it listens ---------------------------------------------------------------
# The public side is the proxy on ip:port. The hub API listens on a unix socket, which
# sandboxes see read-only at the same path (they have no network at all).
c.JupyterHub.bind_url = f"http://{ip}:{port}/"
c.JupyterHub.hub_bind_url = paths.hub_url
c.JupyterHub.hub_connect_url = paths.hub_url
# Sandboxes run as other uids; they need write permission on the socket to connect.
# Every request still needs a token or a cookie.
c.JupyterHub.hub_socket_mode = 0o666

# The proxy is started by medzone_hub.hubapp.ensure_proxy and outlives hub restarts;
# its API is a unix socket in the hub's private state directory.
c.ConfigurableHTTPProxy.should_start = False
c.ConfigurableHTTPProxy.api_url = paths.proxy_api_url
c.ConfigurableHTTPProxy.auth_token = os.environ.get("CONFIGPROXY_AUTH_TOKEN") or read_secret(
    paths.proxy_token
)
# Servers keep running (and routed) while the hub restarts.
c.JupyterHub.cleanup_servers = False
c.JupyterHub.cleanup_proxy = False

# --- state under MEDZONE_HOME/hub (0700; files 0600) ---------------------------------
c.JupyterHub.db_url = f"sqlite:///{paths.db_path}"
c.JupyterHub.cookie_secret_file = str(paths.cookie_secret)
c.JupyterHub.pid_file = str(paths.state_dir / "jupyterhub.pid")

# --- accounts -------------------------------------------------------------------------
# Sign-up, then an admin approves (see medzone_hub.authenticator). Any other
# authenticator may replace it: the spawner still requires an approved store account.
c.JupyterHub.authenticator_class = "medzone_hub.authenticator.MedZoneAuthenticator"
c.MedZoneAuthenticator.medzone_home = str(home.root)
c.Authenticator.allow_all = True  # the approval check in the authenticator is the gate
c.Authenticator.enable_auth_state = False

# --- servers ---------------------------------------------------------------------------
c.JupyterHub.spawner_class = "medzone_hub.spawner.SafeZoneSpawner"
c.SafeZoneSpawner.medzone_home = str(home.root)
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 30
# One server per person: each has exactly one sandbox and one set of mounts.
c.JupyterHub.allow_named_servers = False
# Ask spawners often whether their server still runs (and still may: a grant that ended
# stops it at the next poll).
c.SafeZoneSpawner.poll_interval = 15
