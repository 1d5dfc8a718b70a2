"""Request an export of results from a notebook, through the hub API.

::

    from medzone_kernel import export

    r = export.request(["results/roc.png", "results/counts.csv"], reason="paper figures")
    r["id"], r["state"], [(f["path"], f["verdict"]) for f in r["files"]]
    export.status(r["id"])["state"]          # "pending", then "approved", …

    # Model weights need a disclosure-risk report (see docs/airlock.md):
    export.request(["models/unet.pt"], reason="share the model", risk_report="models/risk.md")

The files are copied into the airlock's quarantine, hashed and screened by the hub at
request time; what is reviewed and released is that copy, so later changes to the files do
not matter. Paths are files or folders in your home: absolute (``/home/<you>/…``) or
relative to the current folder, as :func:`open` takes them.

The kernel has no network and no database: this module speaks HTTP to the hub over the
hub's unix socket (``$JUPYTERHUB_API_URL``, ``http+unix://…``; plain ``http(s)://`` works
too) with the server's ``$JUPYTERHUB_API_TOKEN``, using only the standard library. The hub
takes the requester from the token, so a request is always from your own home.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

ENV_API_URL = "JUPYTERHUB_API_URL"
ENV_API_TOKEN = "JUPYTERHUB_API_TOKEN"
#: Under the hub API URL.
ENDPOINT = "/medzone/exports"
#: Seconds to wait for the hub; copying and screening large files takes a while.
DEFAULT_TIMEOUT = 600.0


class ExportError(Exception):
    """An export request failed; ``str(err)`` is the hub's one-line reason."""

    status: int | None = None

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class HubUnavailable(ExportError):
    """No hub to talk to: not running under MedZone, or the hub is down."""


class ExportRefused(ExportError):
    """The airlock refused the request (a path outside your home, no reason, a bad report…)."""


class ExportNotFound(ExportError):
    """No such export request (or a file named in the request does not exist)."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: the only way out of a sandbox."""

    def __init__(self, socket_path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _hub() -> tuple[str, str]:
    """(hub API URL, token) from the environment."""
    url = os.environ.get(ENV_API_URL, "")
    token = os.environ.get(ENV_API_TOKEN, "")
    if not url or not token:
        raise HubUnavailable(f"${ENV_API_URL} and ${ENV_API_TOKEN} are not set: export "
                             "requests work in a MedZone server's kernels")
    return url, token


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    prefix = parts.path.rstrip("/")
    if parts.scheme == "http+unix":
        return _UnixHTTPConnection(unquote(parts.netloc), timeout), prefix
    if parts.scheme == "http":
        return http.client.HTTPConnection(parts.netloc, timeout=timeout), prefix
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.netloc, timeout=timeout), prefix
    raise HubUnavailable(f"unsupported hub API URL scheme {parts.scheme!r} in ${ENV_API_URL}")


def _call(method: str, path: str, body: dict | None = None, *,
          timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    url, token = _hub()
    conn, prefix = _connection(url, timeout)
    headers = {"Authorization": f"token {token}", "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, prefix + ENDPOINT + path, body=data, headers=headers)
        response = conn.getresponse()
        payload = response.read()
    except (OSError, http.client.HTTPException) as err:
        raise HubUnavailable(f"cannot reach the hub at {url}: {err}") from None
    finally:
        conn.close()
    try:
        answer = json.loads(payload) if payload else {}
    except ValueError:
        answer = {}
    if 200 <= response.status < 300 and isinstance(answer, dict):
        return answer
    message = (answer.get("message") if isinstance(answer, dict) else None) or (
        f"the hub answered {response.status} {response.reason}")
    if response.status == 404:
        raise ExportNotFound(message, response.status)
    if response.status in (400, 401, 403, 409):
        raise ExportRefused(message, response.status)
    raise ExportError(message, response.status)


def _path_list(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    # Relative to the current folder, as open() would take them; the hub maps
    # /home/<you>/… to your home and refuses anything else.
    return [os.path.abspath(os.fspath(p)) for p in paths]


def request(paths: str | os.PathLike | Iterable[str | os.PathLike], reason: str,
            risk_report: str | os.PathLike | None = None, *,
            timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Request the export of *paths* from your home; the new request's status.

    The answer holds ``id``, ``state`` (``pending``, or ``blocked`` when the screen blocked
    a file), ``verdict`` and ``files`` (``path``, ``sha256``, ``size``, ``verdict``,
    ``findings``), as ``medzone export status --json`` prints them. Raises
    :class:`ExportRefused`, :class:`ExportNotFound` or :class:`HubUnavailable`.
    """
    body: dict[str, Any] = {"paths": _path_list(paths), "reason": reason}
    if risk_report is not None:
        body["risk_report"] = _path_list(risk_report)[0]
    return _call("POST", "", body, timeout=timeout)


def status(request_id: int, *, timeout: float = 60.0) -> dict[str, Any]:
    """The status of one of your export requests (state, files, reviews)."""
    if isinstance(request_id, bool) or not isinstance(request_id, int) or request_id < 1:
        raise ExportNotFound(f"export request {request_id!r} does not exist")
    return _call("GET", f"/{request_id}", timeout=timeout)
