"""The portal's Tornado application, as JupyterHub starts it (``python -m medzone_hub.portal``).

JupyterHub runs it as a managed service and hands it, in the environment, its URL
(``JUPYTERHUB_SERVICE_URL``), its prefix (``JUPYTERHUB_SERVICE_PREFIX``) and the OAuth
client settings. MedZone's settings come from the same JupyterHub config file the hub
runs with (``--hub-config``, which the hub passes on): the store and home from
``MEDZONE_HOME``/``MEDZONE_DB_URL``, and the sandbox settings from the ``SafeZoneSpawner``
section, so a template run from the portal gets exactly the sandbox the user's server gets.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

from jinja2 import Environment, FileSystemLoader, select_autoescape
from tornado import ioloop, web
from traitlets import Integer, Unicode, default
from traitlets.config import Application

from ..config import MedZoneHome, ensure_hub_state, resolve_home, write_secret
from ..accounts import hub_db_factory
from ..db import open_store
from ..logs import log_to_stderr
from ..hubconfig import export_limits, load_hub_config, sandbox_config, screen_config
from ..runqueue import queue_settings
from ..screen.pool import ScreenPool
from . import SERVICE_NAME, access_pages, audit_page, export_pages, run_pages, usage_pages
from .runs import RunTracker

#: The portal's page templates and style sheet: package data, found in a wheel install too.
HERE = Path(str(resources.files(__package__)))


@dataclass
class Portal:
    """What the handlers share: the zone, the sandbox settings, the templates, the runs."""

    home: MedZoneHome
    store: object
    prefix: str  # "/services/medzone-portal/"
    hub_prefix: str  # "/hub/"
    base_url: str  # "/": the hub's public base URL (servers are at <base>user/<name>/)
    templates: Environment
    sandbox_config: object = None
    templates_dir: str | None = None
    page_size: int = 25
    runs: object = field(default=None)
    #: How runs are queued (:class:`medzone_hub.runqueue.RunQueue`, the hub config's section).
    queue_settings: object = None
    #: Export size limits (:class:`medzone_hub.airlock.ExportLimits`; the hub config's
    #: ``ExportLimits`` section).
    export_limits: object = None
    #: The screen's settings (the hub config's ``ScreenConfig`` section).
    screen_config: object = None
    #: The processes that check images for every screen of the portal
    #: (:class:`medzone_hub.screen.pool.ScreenPool`), started with it.
    screen_pool: object = None
    _hub_db_factory: object = field(default=None, repr=False)

    def hub_db(self):
        """A session on the hub's database, where NativeAuthenticator keeps sign-ups (the
        accounts the steward queue approves); the caller closes it."""
        if self._hub_db_factory is None:
            self._hub_db_factory = hub_db_factory(self.home)
        return self._hub_db_factory()

    def sign_ups(self) -> set[str]:
        """Names with a sign-up at the hub (NativeAuthenticator's table)."""
        from nativeauthenticator.orm import UserInfo

        db = self.hub_db()
        try:
            return {name for (name,) in db.query(UserInfo.username)}
        finally:
            db.close()


def jinja_env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")),
                      autoescape=select_autoescape(["html"]), trim_blocks=True,
                      lstrip_blocks=True)
    env.filters["size"] = human_size
    return env


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def handlers(prefix: str) -> list:
    from jupyterhub.services.auth import HubOAuthCallbackHandler

    routes = [
        (r"oauth_callback", HubOAuthCallbackHandler),
        (r"static/(.*)", web.StaticFileHandler, {"path": str(HERE / "static")}),
        (r"", access_pages.IndexHandler),
        *access_pages.ROUTES,
        *run_pages.ROUTES,
        *export_pages.ROUTES,
        *audit_page.ROUTES,
        *usage_pages.ROUTES,
    ]
    return [(prefix + pattern, *rest) for pattern, *rest in routes]


def cookie_secret(home: MedZoneHome) -> bytes:
    """The portal's cookie secret, kept (0600) beside the hub's so logins survive restarts."""
    path = ensure_hub_state(home).portal_cookie_secret_path
    if not path.exists():
        write_secret(path, secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


class PortalApp(Application):
    """``python -m medzone_hub.portal``: serve the portal where JupyterHub says."""

    name = "medzone-portal"
    description = "MedZone's web pages, run by JupyterHub as a hub-managed service."

    hub_config = Unicode(
        "", config=True,
        help="The JupyterHub config file the hub runs with. The portal reads it too: its "
             "PortalApp section, and its SafeZoneSpawner settings, so template runs get the "
             "same sandbox as servers.")
    medzone_home = Unicode(
        "", config=True, help="MEDZONE_HOME (default: $MEDZONE_HOME or ~/.medzone).")
    templates_dir = Unicode(
        "", config=True,
        help="Folder of papermill templates offered on the run page (default: the ones "
             "installed with MedZone, the medzone_templates package).")
    page_size = Integer(25, config=True, help="Rows per page of long lists.")
    service_url = Unicode(config=True, help="Where to listen (default: $JUPYTERHUB_SERVICE_URL).")

    @default("service_url")
    def _service_url(self):
        return os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:8001")

    aliases = {
        "hub-config": "PortalApp.hub_config",
        "home": "PortalApp.medzone_home",
        "templates-dir": "PortalApp.templates_dir",
        "page-size": "PortalApp.page_size",
    }

    def initialize(self, argv=None):
        super().initialize(argv)
        if self.hub_config:
            # One config file for the hub and its portal; the command line still wins.
            self.update_config(load_hub_config(self.hub_config))
            self.update_config(self.cli_config)

    def make_app(self) -> web.Application:
        home = resolve_home(self.medzone_home or None).ensure()
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", f"/services/{SERVICE_NAME}/")
        base_url = os.environ.get("JUPYTERHUB_BASE_URL", "/")
        portal = Portal(home=home, store=open_store(home), prefix=prefix,
                        hub_prefix=base_url + "hub/", base_url=base_url, templates=jinja_env(),
                        sandbox_config=sandbox_config(self.config),
                        templates_dir=self.templates_dir or None, page_size=self.page_size)
        portal.runs = RunTracker(portal)
        portal.queue_settings = queue_settings(self.config)
        portal.export_limits = export_limits(self.config)
        portal.screen_config = screen_config(self.config)
        portal.screen_pool = ScreenPool(portal.screen_config.workers)
        return web.Application(
            handlers(prefix), portal=portal, cookie_secret=cookie_secret(home),
            xsrf_cookies=True, static_url_prefix=prefix + "static/",
            login_url=None,  # HubOAuthenticated sends people to the hub's login
        )

    def start(self):
        url = urlparse(self.service_url)
        app = self.make_app()
        app.listen(url.port or 80, address=url.hostname or "127.0.0.1", xheaders=True)
        self.log.info("MedZone portal at %s (public prefix %s)", self.service_url,
                      app.settings["portal"].prefix)
        try:
            ioloop.IOLoop.current().start()
        finally:
            app.settings["portal"].screen_pool.shutdown()


def main(argv: list[str] | None = None) -> int:
    log_to_stderr()  # template runs' lines, in the hub's log as before
    app = PortalApp()
    app.initialize(argv if argv is not None else sys.argv[1:])
    app.start()
    return 0
