"""What every portal page shares: hub login (OAuth), the store account, role gates,
templates, one-line errors and pagination."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from jupyterhub.services.auth import HubOAuthenticated
from sqlalchemy import select
from tornado import web

from ..errors import MedZoneError
from ..models import User
from . import roles

def one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class PortalHandler(HubOAuthenticated, web.RequestHandler):
    """A page of the portal. ``self.portal`` is the :class:`~.app.Portal` (store, home,
    settings) the application was built with."""

    @property
    def portal(self):
        return self.settings["portal"]

    @property
    def store(self):
        return self.portal.store

    @property
    def home(self):
        return self.portal.home

    @property
    def user_name(self) -> str:
        return self.current_user["name"]

    def account(self, session) -> User | None:
        """The store account of the person logged in (``None`` if the store has none)."""
        return session.scalar(select(User).where(User.name == self.user_name))

    def check_role(self, role: str | None) -> None:
        """403 unless the person is an approved store account holding *role* (if any)."""
        with self.store.session() as session:
            account = self.account(session)
            if account is None or not account.approved:
                raise web.HTTPError(403, f"{self.user_name} is not an approved MedZone account")
            if role is not None and not roles.holds(account, role):
                raise web.HTTPError(403, f"this page needs the {role!r} role")
            self._nav = roles.page_roles(account)

    # pages ------------------------------------------------------------------------------

    def url(self, path: str = "", /, **query) -> str:
        """The portal URL of *path* (relative to the service prefix)."""
        url = self.portal.prefix + path.lstrip("/")
        query = {k: v for k, v in query.items() if v not in (None, "")}
        return url + ("?" + urlencode(query) if query else "")

    def render_page(self, page: str, /, **namespace: Any) -> None:
        nav = getattr(self, "_nav", None) or {}
        html = self.portal.templates.get_template(page).render(
            url=self.url, user=self.current_user and self.current_user["name"], nav=nav,
            hub=self.portal.hub_prefix, xsrf_form_html=self.xsrf_form_html, page_id=page[:-5],
            xsrf_token=self._xsrf_text(), **namespace)
        self.finish(html)

    @property
    def lab_url(self) -> str:
        """JupyterLab's file browser in the person's own server (paths relative to home)."""
        return f"{self.portal.base_url}user/{self.user_name}/lab/tree/"

    def _xsrf_text(self) -> str:
        # Scripts send it as X-XSRFToken: JupyterHub checks XSRF on fetch() GETs too.
        token = self.xsrf_token
        return token.decode() if isinstance(token, bytes) else token

    def page_number(self, name: str = "page") -> int:
        """The page of a long list asked for (query argument *name*, default 1)."""
        try:
            return max(1, int(self.get_query_argument(name, "1")))
        except ValueError:
            raise web.HTTPError(400, f"{name} must be a whole number") from None

    # errors -----------------------------------------------------------------------------

    def _handle_request_exception(self, e: BaseException) -> None:
        # A refusal from a service function is the person's to fix: its one line, no trace.
        if isinstance(e, MedZoneError):
            e = web.HTTPError(e.http_status, "%s", one_line(e))
        super()._handle_request_exception(e)

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, web.HTTPError):
            self.log_refusal(value)
            return
        super().log_exception(typ, value, tb)

    def log_refusal(self, err: web.HTTPError) -> None:
        from tornado.log import gen_log

        gen_log.warning("%d %s %s: %s", err.status_code, self.request.method, self.request.uri,
                        err.log_message % err.args if err.args else err.log_message)

    def write_error(self, status_code: int, **kwargs) -> None:
        message = self._reason
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, MedZoneError):
            message = one_line(exc)
        elif isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        self.set_status(status_code)
        try:
            self.render_page("error.html", status=status_code, message=message)
        except Exception:  # noqa: BLE001 - never fail while reporting a failure
            self.finish(f"{status_code}: {message}\n")


def requires(role: str | None = None):
    """Page method decorator: logged in through the hub (else to the hub's login), an
    approved store account, and *role* (see :mod:`.roles`) when given; else 403."""

    def decorate(method):
        @web.authenticated
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            self.check_role(role)
            return method(self, *args, **kwargs)

        return wrapper

    return decorate


# --- pagination ----------------------------------------------------------------------------

@dataclass
class Page:
    items: list
    number: int
    pages: int
    total: int

    @property
    def has_prev(self) -> bool:
        return self.number > 1

    @property
    def has_next(self) -> bool:
        return self.number < self.pages


def paginate(items: list, number: int, size: int) -> Page:
    pages = max(1, math.ceil(len(items) / size))
    number = min(number, pages)
    start = (number - 1) * size
    return Page(items[start:start + size], number, pages, len(items))
