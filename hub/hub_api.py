"""Export requests through the hub API: what ``medzone_kernel.export`` talks to.

A sandbox has no network: the only thing its processes can reach is the hub's unix socket
(see :mod:`medzone_hub.spawner`). So the endpoints live in the hub itself, registered with
``JupyterHub.extra_handlers`` (JupyterHub prefixes them with ``/hub``)::

    POST /hub/api/medzone/exports        {"paths": [...], "reason": "...", "risk_report": "..."}
                                          → 201 and the request's status (id, state, files with
                                            their screen verdicts and findings)
    GET  /hub/api/medzone/exports/<id>    → 200 and the request's status
    GET  /hub/api/medzone/usage?by=…&since=…
                                          → 200 and the usage the token's owner may see
                                            (data stewards: all; data providers: their
                                            datasets'; anyone else 403)

The requester is the owner of the token, never something the body says: a user requests
only from their own home. The token must also reach that user's own server
(``access:servers!server=<user>/``), as the server's ``JUPYTERHUB_API_TOKEN`` and the
user's own full tokens do: whoever can reach the server can run a kernel there and so
request an export anyway, while tokens issued for narrower purposes (activity, reading the
user model) cannot. Both endpoints call the airlock's service functions
(:func:`medzone_hub.airlock.submit_export`, :func:`~medzone_hub.airlock.status`); no rule
lives here. A refusal is a JSON error with the airlock's one-line message.
"""

from __future__ import annotations

import asyncio
import atexit
import json
from typing import Any

from jupyterhub.apihandlers import APIHandler
from tornado import web

from . import airlock, usage
from .config import MedZoneHome, resolve_home
from .db import open_store
from .errors import MedZoneError
from .hubconfig import screen_config
from .screen.pool import ScreenPool

#: Keys a request body may have.
REQUEST_KEYS = frozenset({"paths", "reason", "risk_report"})



def http_error(err: MedZoneError) -> web.HTTPError:
    return web.HTTPError(err.http_status, str(err))


class _MedZoneAPIHandler(APIHandler):
    def initialize(self, medzone_home: str, export_limits: airlock.ExportLimits | None = None,
                   screen_pool: ScreenPool | None = None):
        self.medzone_home = resolve_home(medzone_home)
        self.export_limits = export_limits
        self.screen_pool = screen_pool

    def limits(self) -> airlock.ExportLimits:
        """The export limits: given to :func:`api_handlers`, else the ``ExportLimits``
        section of the hub's config (read when used, so a config file that loads MedZone's
        and sets them afterwards counts)."""
        if self.export_limits is not None:
            return self.export_limits
        return airlock.ExportLimits.from_config(self.settings.get("config"))

    @property
    def store(self):
        return open_store(self.medzone_home)

    def requester(self) -> str:
        """The name of the user the token belongs to, if it may act in that user's server."""
        user = self.current_user
        if user is None:
            raise web.HTTPError(403, "Missing or invalid credentials.")
        if getattr(user, "kind", None) != "user":
            raise web.HTTPError(403, "export requests are made with a user's token, not a "
                                     "service's")
        if not self.has_scope(f"access:servers!server={user.name}/"):
            raise web.HTTPError(403, f"this token may not act in {user.name}'s server, so it "
                                     "may not request exports")
        return user.name

    async def run(self, func, *args, **kwargs):
        """Call a (blocking) airlock function in a thread; its refusals become HTTP errors."""
        try:
            return await asyncio.to_thread(func, *args, **kwargs)
        except MedZoneError as err:
            raise http_error(err) from None

    def _status(self, request_id: int, user: str) -> dict[str, Any]:
        with self.store.session() as session:
            return airlock.status(airlock.get_own_request(session, request_id, user=user))


class ExportsHandler(_MedZoneAPIHandler):
    """``POST /hub/api/medzone/exports``: request an export from the token owner's home."""

    async def post(self):
        user = self.requester()
        body = self.get_json_body()
        if not isinstance(body, dict):
            raise web.HTTPError(400, 'send a JSON object: {"paths": [...], "reason": "..."}')
        if "user" in body:
            raise web.HTTPError(400, "the requester is the token's owner: remove 'user' from "
                                     "the request")
        unknown = sorted(set(body) - REQUEST_KEYS)
        if unknown:
            raise web.HTTPError(400, f"unknown key {unknown[0]!r}: expected "
                                     f"{', '.join(sorted(REQUEST_KEYS))}")
        paths = body.get("paths")
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise web.HTTPError(400, "'paths' must be a list of paths in your home")
        reason = body.get("reason")
        if not isinstance(reason, str):
            raise web.HTTPError(400, "give the reason for the export ('reason')")
        risk_report = body.get("risk_report")
        if risk_report is not None and not isinstance(risk_report, str):
            raise web.HTTPError(400, "'risk_report' must be the path of one file in your home")
        request_id = await self.run(airlock.submit_export, self.store, self.medzone_home,
                                    user=user, paths=paths, reason=reason,
                                    risk_report=risk_report, limits=self.limits(),
                                    screen_config=screen_config(self.settings.get("config")),
                                    screen_pool=self.screen_pool)
        self.log.info("export request %s by %s through the hub API", request_id, user)
        info = await self.run(self._status, request_id, user)
        self.set_status(201)
        self.set_header("Location", f"{self.request.path.rstrip('/')}/{request_id}")
        self.write(info)


class ExportHandler(_MedZoneAPIHandler):
    """``GET /hub/api/medzone/exports/<id>``: the status of one of the token owner's requests."""

    async def get(self, request_id: str):
        user = self.requester()
        self.write(await self.run(self._status, int(request_id), user))


class UsageHandler(_MedZoneAPIHandler):
    """``GET /hub/api/medzone/usage[?by=…&since=…]``: the usage the token's owner may see
    (:func:`medzone_hub.usage.usage_report`: a data steward all of it, a data provider its
    datasets' only; anyone else 403), as a JSON list."""

    async def get(self):
        user = self.current_user
        if user is None or getattr(user, "kind", None) != "user":
            raise web.HTTPError(403, "usage is read with a user's token")
        by = self.get_query_argument("by", "") or None
        since = self.get_query_argument("since", "") or None
        rows = await self.run(self._report, user.name, by, since)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(rows))

    def _report(self, viewer: str, by: str | None, since: str | None) -> list:
        with self.store.session() as session:
            return usage.usage_report(session, by=by, since=usage.parse_since(since),
                                      viewer=viewer)


def api_handlers(home: str | MedZoneHome | None = None,
                 export_limits: airlock.ExportLimits | None = None,
                 screen_pool: ScreenPool | None = None) -> list[tuple]:
    """The handlers to give ``JupyterHub.extra_handlers`` for the store under *home*
    (*export_limits*: :meth:`medzone_hub.airlock.ExportLimits.from_config` of the config).

    Their screens check images in *screen_pool*, by default one made here, with the hub:
    its processes start when a screen first needs them (spawned, so the hub's threads do
    not matter), serve every later request, and stop when the hub exits."""
    root = str(home.root if isinstance(home, MedZoneHome) else resolve_home(home).root)
    if screen_pool is None:
        screen_pool = ScreenPool()
        atexit.register(screen_pool.shutdown)
    kwargs = {"medzone_home": root, "export_limits": export_limits, "screen_pool": screen_pool}
    return [
        (r"/api/medzone/exports/?", ExportsHandler, kwargs),
        (r"/api/medzone/exports/(\d{1,18})/?", ExportHandler, kwargs),
        (r"/api/medzone/usage/?", UsageHandler, kwargs),
    ]
