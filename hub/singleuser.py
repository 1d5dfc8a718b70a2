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
)

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
