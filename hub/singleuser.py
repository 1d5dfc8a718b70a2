"""The single-user server inside a sandbox: JupyterLab with the download channels closed.

The browser is an output channel too. Results leave the zone only through the export
airlock, so the server a sandbox runs refuses:

* ``/files/…`` (the raw file download that JupyterLab's "Download" uses) and ``/view/…``;
* ``/nbconvert/…`` (notebook export/download in any format);
* contents-API reads (``GET /api/contents/<path>`` with content) of binary files, and of
  files larger than :attr:`MedZoneContentsManager.max_file_bytes` (notebooks: larger than
  :attr:`MedZoneContentsManager.max_notebook_bytes`). Text files and notebooks open
  normally; binary files can still be listed, copied, renamed and deleted.

JupyterLab's download and export commands are switched off as well (``disabledExtensions``
in the page config), so the interface does not offer what the server refuses. Terminals
are off unless ``MEDZONE_TERMINALS=1`` (a terminal is a direct line to the browser).

What this does not close: anything a kernel prints or displays reaches the browser (a
notebook can show an image it reads). That channel is inherent to interactive analysis;
it is bounded by what a person can copy by hand, not by a download link.

``python -m medzone_hub.singleuser`` starts ``jupyterhub-singleuser`` (the JupyterHub
extension of jupyter_server) with MedZone's kernelspec (:mod:`medzone_hub.kernelspec`) as
the only kernel. It serves on the listening unix socket the spawner bound outside the
sandbox and handed over as the inherited descriptor ``$MEDZONE_SERVER_FD``
(``$MEDZONE_SERVER_SOCKET`` is then only the name it is known by); without one, it binds
``$MEDZONE_SERVER_SOCKET`` itself. Its secrets arrive as JSON on the inherited pipe
``$MEDZONE_SECRET_FD``. This module imports nothing of the hub's store: it runs inside the
sandbox.
"""

from __future__ import annotations

import contextvars
import os
import sys

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from tornado import web
from traitlets import Integer

from . import kernelspec

try:
    from jupyter_server.auth.decorator import allow_unauthenticated
except ImportError:  # pragma: no cover - jupyter_server < 2.13
    def allow_unauthenticated(method):
        return method

#: Environment naming the socket the server listens on (a path inside the sandbox).
ENV_SOCKET = "MEDZONE_SERVER_SOCKET"
ENV_TERMINALS = "MEDZONE_TERMINALS"
ENV_SECRET_FILE = "MEDZONE_SECRET_ENV"
ENV_SOCKET_FD = "MEDZONE_SERVER_FD"
ENV_SECRET_FD = "MEDZONE_SECRET_FD"

#: JupyterLab plugins that download or export files through the browser.
DISABLED_LAB_PLUGINS = (
    "@jupyterlab/docmanager-extension:download",
    "@jupyterlab/filebrowser-extension:download",
    "@jupyterlab/notebook-extension:export",
    "@jupyterlab/docmanager-extension:open-browser-tab",
    "@jupyterlab/filebrowser-extension:open-browser-tab",
    # No "official Jupyter news" prompt or update check: the zone has no network.
    "@jupyterlab/apputils-extension:announcements",
    # jupyter-server-proxy (a dependency of jupyter-app-launcher) would serve whatever a
    # kernel listens on to the browser: a download channel. Its server side is off too.
    "@jupyterhub/jupyter-server-proxy",
)

#: Environment the spawner sets for the lab: where Help > MedZone guide and the portal are.
ENV_GUIDE_URL = "MEDZONE_GUIDE_URL"
ENV_PORTAL_URL = "MEDZONE_PORTAL_URL"
#: The portal's service name (medzone_hub.portal.SERVICE_NAME; not imported: this module
#: runs inside the sandbox and imports nothing of the portal).
PORTAL_SERVICE = "medzone-portal"
#: The launcher section MedZone's cards are in.
LAUNCHER_CATALOG = "MedZone"
#: Where the tutorials and the guide are in the home (medzone_hub.onboarding).
TUTORIALS_DIR = "tutorials"
GUIDE_PATH = "tutorials/GUIDE.md"
DATASETS_PATH = "datasets"

REFUSAL = "downloads are disabled in MedZone: request an export through the airlock"


class DownloadRefusedHandler(JupyterHandler):
    """403 for every method: the route is a download channel."""

    def _refuse(self, *args, **kwargs):
        raise web.HTTPError(403, REFUSAL)

    get = allow_unauthenticated(_refuse)
    head = allow_unauthenticated(_refuse)
    post = allow_unauthenticated(_refuse)
    put = allow_unauthenticated(_refuse)

    def check_xsrf_cookie(self):
        # Refused anyway; a missing token must not turn the answer into something else.
        return


#: Loaded through ``ServerApp.extra_services``, before jupyter_server's own handlers, so
#: these patterns win over ``/files/``, ``/view/`` and ``/nbconvert/``.
default_handlers = [
    (r"/files/(.*)", DownloadRefusedHandler),
    (r"/files", DownloadRefusedHandler),
    (r"/view/(.*)", DownloadRefusedHandler),
    (r"/nbconvert/(.*)", DownloadRefusedHandler),
    (r"/api/nbconvert(.*)", DownloadRefusedHandler),
    (r"/proxy/(.*)", DownloadRefusedHandler),
]


_internal_copy: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "medzone_internal_copy", default=False)


def _is_text(os_path: str) -> bool:
    with open(os_path, "rb") as f:
        data = f.read()
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class MedZoneContentsManager(AsyncLargeFileManager):
    """The default contents manager, refusing to hand binary or large files to the browser."""

    max_file_bytes = Integer(
        5 * 1024 * 1024,
        config=True,
        help="Largest text file the contents API returns with its content (bytes).",
    )
    max_notebook_bytes = Integer(
        50 * 1024 * 1024,
        config=True,
        help="Largest notebook the contents API returns with its content (bytes).",
    )

    async def get(self, path, content=True, type=None, format=None, require_hash=False):
        if content and not _internal_copy.get():
            self._check_readable(path, type, format)
        return await super().get(path, content=content, type=type, format=format,
                                 require_hash=require_hash)

    def _check_readable(self, path: str, type: str | None, format: str | None) -> None:
        api_path = path.strip("/")
        os_path = self._get_os_path(api_path)
        if not os.path.isfile(os_path):
            return  # a folder, or missing (the parent class answers)
        size = os.path.getsize(os_path)
        notebook = type == "notebook" or (type is None and api_path.endswith(".ipynb"))
        limit = self.max_notebook_bytes if notebook else self.max_file_bytes
        if size > limit:
            raise web.HTTPError(403, f"{api_path} is larger than {limit} bytes: {REFUSAL}")
        if notebook:
            return
        if format == "base64" or not _is_text(os_path):
            raise web.HTTPError(403, f"{api_path} is not a text file: {REFUSAL}")

    async def copy(self, from_path, to_path=None):
        # Copying inside the home is no download: the parent may read the source. A
        # context variable, so only this request's task skips the check.
        token = _internal_copy.set(True)
        try:
            return await super().copy(from_path, to_path)
        finally:
            _internal_copy.reset(token)


def portal_url(env=None) -> str:
    """The portal's URL path as the browser reaches it (through the hub's proxy)."""
    env = os.environ if env is None else env
    return env.get(ENV_PORTAL_URL) or (
        f"{env.get('JUPYTERHUB_BASE_URL', '/').rstrip('/')}/services/{PORTAL_SERVICE}/")


def server_prefix(env=None) -> str:
    env = os.environ if env is None else env
    prefix = env.get("JUPYTERHUB_SERVICE_PREFIX", "/")
    return prefix if prefix.endswith("/") else prefix + "/"


def launcher_cards(env=None) -> list[dict]:
    """The launcher's MedZone section (jupyter-app-launcher's YAML entries)."""
    portal, prefix = portal_url(env), server_prefix(env)

    def page(title, description, url):
        return {"title": title, "description": description, "type": "url",
                "source": url, "catalog": LAUNCHER_CATALOG,
                "args": {"createNewWindow": True}}

    return [
        {"title": "Tutorials", "type": "jupyterlab-commands", "catalog": LAUNCHER_CATALOG,
         "description": "Your copies of the MedZone tutorials, and the guide",
         "source": [
             {"label": "Show the tutorials", "id": "filebrowser:go-to-path",
              "args": {"path": TUTORIALS_DIR}},
             {"label": "Open the guide", "id": "docmanager:open",
              "args": {"path": GUIDE_PATH, "factory": "Markdown Preview"}}]},
        {"title": "Datasets", "type": "jupyterlab-commands", "catalog": LAUNCHER_CATALOG,
         "description": "The datasets granted to you (read-only, /data)",
         "source": [{"label": "Show the datasets", "id": "filebrowser:go-to-path",
                     "args": {"path": DATASETS_PATH}}]},
        page("Run a template", "Run one of the zone's template notebooks (queued)",
             f"{portal}run"),
        page("Request an export", "Ask to take the file you have open out of the zone",
             f"{prefix}medzone/request-export"),
        page("My datasets and grants", "Apply for datasets; see your grants",
             f"{portal}access"),
        page("MedZone portal", "Datasets, runs and exports", portal),
    ]


def lab_overrides(env=None) -> dict:
    """JupyterLab settings overrides: a MedZone menu (request an export of the open file,
    run a template, grants, portal, guide), Help > MedZone guide; no news, no update
    checks."""
    env = os.environ if env is None else env
    guide = env.get(ENV_GUIDE_URL) or f"{server_prefix(env)}medzone/guide"
    portal, prefix = portal_url(env), server_prefix(env)

    def link(text, url, rank):
        return {"command": "help:open", "rank": rank,
                "args": {"url": url, "text": text, "newBrowserTab": True}}

    return {
        "@jupyterlab/apputils-extension:notification": {
            "fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/mainmenu-extension:plugin": {"menus": [{
            # A menu of its own: "Request an export" from here keeps the open file current.
            "id": "jp-mainmenu-medzone", "label": "MedZone", "rank": 1000,
            "items": [
                link("Request an export of this file", f"{prefix}medzone/request-export", 1),
                link("Run a template", f"{portal}run", 2),
                link("My datasets and grants", f"{portal}access", 3),
                link("MedZone portal", portal, 4),
                link("MedZone guide", guide, 5),
            ]}, {
            "id": "jp-mainmenu-help",
            "items": [
                {"type": "separator", "rank": 0.5},
                {"command": "help:open", "rank": 0.6,
                 "args": {"url": guide, "text": "MedZone guide", "newBrowserTab": True}},
                {"command": "help:open", "rank": 0.7,
                 "args": {"url": portal_url(env), "text": "MedZone portal",
                          "newBrowserTab": True}},
            ]}]},
    }


def write_lab_files(data_dir: str, env=None) -> str:
    """Write the launcher cards (under *data_dir*, which is on ``JUPYTER_PATH``, where
    jupyter-app-launcher looks) and the settings overrides; the settings folder."""
    import json

    launcher = os.path.join(data_dir, "jupyter_app_launcher")
    os.makedirs(launcher, exist_ok=True)
    # JSON is YAML: the launcher parses it as its YAML.
    with open(os.path.join(launcher, "jp_app_launcher_medzone.yaml"), "w") as f:
        json.dump(launcher_cards(env), f, indent=1)
    settings = os.path.join(data_dir, "lab-settings")
    os.makedirs(settings, exist_ok=True)
    with open(os.path.join(settings, "overrides.json"), "w") as f:
        json.dump(lab_overrides(env), f, indent=1)
    return settings


def current_document(workspace: dict, exists) -> str | None:
    """The path of the document open and current in a saved JupyterLab *workspace*
    (``layout-restorer:data`` -> ``main.current``, e.g. ``notebook:tutorials/x.ipynb``),
    if *exists(path)* says it is a file."""
    data = workspace.get("data") if isinstance(workspace, dict) else None
    layout = data.get("layout-restorer:data") if isinstance(data, dict) else None
    main = layout.get("main") if isinstance(layout, dict) else None
    if not isinstance(main, dict):
        return None
    # The current tab first; when it is no document (a launcher), the last document tab.
    names = [main.get("current"), *reversed(_tab_names(main.get("dock")))]
    for name in names:
        if not isinstance(name, str) or ":" not in name:
            continue
        path = name.split(":", 1)[1].strip("/")
        if path and exists(path):
            return path
    return None


def _tab_names(area, depth: int = 0) -> list:
    """The widget names of a saved dock layout, in order (tab areas inside split areas)."""
    if not isinstance(area, dict) or depth > 20:
        return []
    names = [w for w in area.get("widgets") or [] if isinstance(w, str)]
    for child in area.get("children") or []:
        names += _tab_names(child, depth + 1)
    return names


class RequestExportHandler(JupyterHandler):
    """``/medzone/request-export``: to the portal's export form with the document open in
    the lab (read from the lab's saved workspace) already selected."""

    @web.authenticated
    def get(self):
        from urllib.parse import urlencode

        from jupyterlab.commands import get_workspaces_dir
        from jupyterlab_server.workspaces_handler import WorkspacesManager

        name = self.get_argument("workspace", "default")
        target = f"{portal_url()}exports"
        try:
            workspace = WorkspacesManager(get_workspaces_dir()).load(name)
        except Exception:  # noqa: BLE001 - no saved workspace: the plain form
            workspace = {}
        path = current_document(workspace, self._is_file)
        if path:
            target += "?" + urlencode({"path": path})
        self.redirect(target)


    def _is_file(self, path: str) -> bool:
        try:
            return os.path.isfile(self.contents_manager._get_os_path(path))
        except web.HTTPError:  # outside the home
            return False


class GuideHandler(JupyterHandler):
    """``/medzone/guide``: the guide in the student's home (``tutorials/GUIDE.md``) as a
    page, for Help > MedZone guide."""

    @web.authenticated
    def get(self):
        from html import escape

        path = os.path.join(self.contents_manager.root_dir, GUIDE_PATH)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(256 * 1024)
        except OSError:
            text = ("# MedZone\n\nThe guide is not in your home (tutorials/GUIDE.md): it "
                    "comes back at your server's next start if the tutorials folder is gone.")
        try:
            import mistune
            body = mistune.html(escape(text, quote=False))
        except Exception:  # noqa: BLE001 - plain text then
            body = f"<pre>{escape(text)}</pre>"
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish("<!doctype html><meta charset='utf-8'><title>MedZone guide</title>"
                    "<body style='font-family:sans-serif;max-width:50em;margin:2em auto'>"
                    f"{body}</body>")


default_handlers += [
    (r"/medzone/request-export", RequestExportHandler),
    (r"/medzone/guide", GuideHandler),
]


def page_config_hook(handler, page_config: dict) -> dict:
    """Switch off JupyterLab's download/export commands."""
    disabled = page_config.get("disabledExtensions")
    if isinstance(disabled, dict):
        disabled.update({name: True for name in DISABLED_LAB_PLUGINS})
    else:
        disabled = list(disabled or []) + [p for p in DISABLED_LAB_PLUGINS if p not in (disabled or [])]
        page_config["disabledExtensions"] = disabled
    return page_config


def server_config(socket_path: str, *, terminals: bool = False,
                  jupyter_data_dir: str = "/tmp/.medzone-jupyter"):
    """The jupyter_server config MedZone's single-user server runs with."""
    from traitlets.config import Config

    c = Config()
    c.ServerApp.sock = socket_path
    c.ServerApp.sock_mode = "0600"
    c.ServerApp.contents_manager_class = MedZoneContentsManager
    c.ServerApp.extra_services = [__name__]
    c.ServerApp.terminals_enabled = terminals
    kernelspec.configure(c, jupyter_data_dir)
    # Kernels whose websocket closed are culled after an hour of idleness.
    c.MappingKernelManager.cull_idle_timeout = 3600
    c.MappingKernelManager.cull_interval = 300
    c.ContentsManager.allow_hidden = False
    # The lab a student meets (docs/lab.md): MedZone's launcher section, Help > MedZone
    # guide, live memory/CPU; no news feed and no update checks (no network here).
    c.LabApp.app_settings_dir = write_lab_files(str(jupyter_data_dir))
    c.LabApp.news_url = None
    c.LabApp.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"
    c.ServerApp.jpserver_extensions = {"jupyter_server_proxy": False,
                                       "jupyter_app_launcher": True,
                                       "jupyter_resource_usage": True}
    c.ResourceUseDisplay.track_cpu_percent = True
    return c


def _load_secret_env() -> None:
    """Move the secrets the spawner passed on a pipe (or, from older spawners, left in a
    0600 file) into the environment."""
    import json

    fd = os.environ.pop(ENV_SECRET_FD, "")
    if fd:
        chunks = []
        with os.fdopen(int(fd), "rb") as pipe:
            while chunk := pipe.read(65536):
                chunks.append(chunk)
        os.environ.update(json.loads(b"".join(chunks) or b"{}"))
    path = os.environ.pop(ENV_SECRET_FILE, "")
    if not path:
        return
    try:
        with open(path) as f:
            os.environ.update(json.load(f))
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def serve_on_inherited_socket(serverapp, fd: int) -> None:
    """Make *serverapp* serve on the listening socket *fd* instead of binding its ``sock``
    path (jupyter_server binds in ``_bind_http_server_unix``, called once its loop runs)."""
    import socket

    listener = socket.socket(fileno=fd)
    listener.set_inheritable(False)  # kernels and terminals do not get it
    listener.setblocking(False)

    def bind() -> bool:
        serverapp.http_server.add_socket(listener)
        return True

    serverapp._bind_http_server_unix = bind


def main(argv: list[str] | None = None) -> None:
    _load_secret_env()
    inherited = os.environ.pop(ENV_SOCKET_FD, "")
    socket_path = os.environ.get(ENV_SOCKET)
    if not socket_path:
        sys.exit(f"{ENV_SOCKET} is not set: the server must listen on a unix socket")
    from jupyterhub.singleuser.extension import JupyterHubSingleUser

    config = server_config(socket_path, terminals=os.environ.get(ENV_TERMINALS) == "1")
    # What JupyterHubSingleUser.launch_instance does, with MedZone's config underneath
    # (CLI and the hub's environment still apply on top) and the page-config hook.
    serverapp = JupyterHubSingleUser.initialize_server(
        argv=argv if argv is not None else sys.argv[1:], config=config)
    serverapp.web_app.settings["page_config_hook"] = page_config_hook
    if inherited:
        serve_on_inherited_socket(serverapp, int(inherited))
    serverapp.start()


if __name__ == "__main__":
    main()
