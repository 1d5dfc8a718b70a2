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
# Failed logins lock the username (5) and the client address (20, all usernames together)
# for 5 minutes after the last failure, even for the right password; and at most 10
# attempts per username and 60 per address in any minute. A refused attempt checks no
# password. Passwords are checked and hashed in a few threads off the hub's event loop
# (MedZoneAuthenticator.password_hash_threads). 0 switches a limit off.
c.MedZoneAuthenticator.allowed_failed_logins = 5
c.MedZoneAuthenticator.allowed_failed_logins_per_address = 20
c.MedZoneAuthenticator.seconds_before_next_try = 300
c.MedZoneAuthenticator.login_attempts_per_minute = 10
c.MedZoneAuthenticator.login_attempts_per_minute_per_address = 60

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

# --- export requests from notebooks (medzone_kernel.export) ----------------------------
# POST /hub/api/medzone/exports, GET /hub/api/medzone/exports/<id> (medzone_hub.hub_api).
# JupyterHub logs that extra_handlers is deprecated in favour of services; a service
# would listen elsewhere, and a sandbox can reach nothing but the hub's socket, so the
# endpoints must live in the hub itself.
from medzone_hub.hub_api import api_handlers  # noqa: E402

# Export size limits (per file, per request, quarantine quota per person): the defaults of
# medzone_hub.airlock.ExportLimits unless set here, e.g.
# c.ExportLimits.export_max_file_bytes = 32 * 1024 * 1024. The portal reads them too.
# A config file loading this one may set them after it: the handlers read them lazily.
c.JupyterHub.extra_handlers = api_handlers(home)

# --- the MedZone portal (web pages for applicants, stewards and reviewers) ----------------
# A hub-managed service at /services/medzone-portal/ (see medzone_hub.portal and
# docs/portal.md). People log in to it through the hub (OAuth, no consent page). Which
# pages they see comes from the roles in MedZone's store (data-steward, export-reviewer),
# the same roles the service functions check on every decision, so there is one place a
# role is given or taken away. The portal reads this config file (the hub passes its
# path as MEDZONE_HUB_CONFIG) for the SafeZoneSpawner settings: a template run from the
# portal gets the same sandbox as the user's server.
import sys  # noqa: E402

from medzone_hub.hubapp import DEFAULT_CONFIG, ENV_HUB_CONFIG  # noqa: E402
from medzone_hub.portal import HUB_TEMPLATES, SERVICE_NAME as PORTAL  # noqa: E402

portal_port = int(os.environ.get("MEDZONE_PORTAL_PORT", port + 1))
portal_env = {"MEDZONE_HOME": str(home.root)}
if os.environ.get("MEDZONE_DB_URL"):
    portal_env["MEDZONE_DB_URL"] = os.environ["MEDZONE_DB_URL"]
c.JupyterHub.services = [
    *(c.JupyterHub.services if "services" in c.JupyterHub else []),
    {
        "name": PORTAL,
        "url": f"http://127.0.0.1:{portal_port}",
        "command": [sys.executable, "-m", "medzone_hub.portal",
                    "--hub-config", os.environ.get(ENV_HUB_CONFIG, str(DEFAULT_CONFIG))],
        "environment": portal_env,
        "oauth_no_confirm": True,
        "display": True,
    },
]
# --- the run queue's worker ----------------------------------------------------------------
# A hub-managed service without a URL: `medzone worker` starts queued template runs as the
# RunQueue settings allow (c.RunQueue.slots, per_user_limit, executor; see docs/runs.md).
# Set c.RunQueue.start_worker = False before this file is loaded to run none (then
# `medzone run` and the portal execute their own runs in turn).
if c.RunQueue.get("start_worker", True) is not False:
    c.JupyterHub.services = [
        *c.JupyterHub.services,
        {
            "name": "medzone-worker",
            "command": [sys.executable, "-m", "medzone_hub.cli", "worker",
                        "--hub-config", os.environ.get(ENV_HUB_CONFIG, str(DEFAULT_CONFIG))],
            "environment": portal_env,
        },
    ]
# --- idle culling ---------------------------------------------------------------------------
# jupyterhub-idle-culler as a hub-managed service with only the scopes it needs: a server
# idle for c.IdleCuller.timeout seconds (3600) is stopped, which frees its GPU and cgroup
# at once; the home stays (medzone_hub.culling, docs/lab.md). Template runs are not
# servers and are never culled. c.IdleCuller.enabled = False before this file is loaded
# starts no culler.
from medzone_hub import culling  # noqa: E402

if c.IdleCuller.get("enabled", True) is not False:
    c.JupyterHub.services = [
        *c.JupyterHub.services,
        culling.service(sys.executable, os.environ.get(ENV_HUB_CONFIG, str(DEFAULT_CONFIG)),
                        culling.hub_api_url(ip, port), portal_env),
    ]
    c.JupyterHub.load_roles = [
        *(c.JupyterHub.load_roles if "load_roles" in c.JupyterHub else []), culling.role()]
# Every user may log in to the portal; the pages themselves check store roles.
c.JupyterHub.extra_user_scopes = {
    *(c.JupyterHub.extra_user_scopes if "extra_user_scopes" in c.JupyterHub else ()),
    f"access:services!service={PORTAL}",
}
# The hub's home page links to the portal (hub_templates/home.html extends the default).
c.JupyterHub.template_paths = [
    HUB_TEMPLATES, *(c.JupyterHub.template_paths if "template_paths" in c.JupyterHub else []),
]
c.JupyterHub.template_vars = {
    **(c.JupyterHub.template_vars if "template_vars" in c.JupyterHub else {}),
    "medzone_portal_url": f"/services/{PORTAL}/",
}
