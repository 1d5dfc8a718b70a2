"""Access pages: the catalog and the application form, my access, the steward queue.

Each handler reads the store and calls one :mod:`medzone_hub.access` function; who may
decide what is :mod:`medzone_hub.access`'s rule, not these pages'.
"""

from __future__ import annotations

from sqlalchemy import select
from tornado import web

from .. import access, registry
from ..accounts import decide_account
from ..manifest import dataset_stats
from ..errors import InvalidInput
from ..models import User, utcnow
from . import roles
from .base import PortalHandler, paginate, requires


def int_argument(handler: web.RequestHandler, name: str, default: int | None = None) -> int | None:
    raw = handler.get_body_argument(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be a whole number, not {raw!r}") from None


def grant_status(apps: list, dataset_id: str) -> dict:
    """The person's standing for one dataset: the best state among their applications."""
    order = ["approved", "pending", "expired", "revoked", "rejected"]
    best = None
    for app in apps:
        if dataset_id in app.dataset_ids and (
                best is None or order.index(app.state) < order.index(best.state)):
            best = app
    if best is None:
        return {"state": "none", "expires_at": None}
    expires = best.expires_at if best.state == "approved" else None
    return {"state": best.state, "expires_at": expires}


class IndexHandler(PortalHandler):
    @requires()
    def get(self):
        self.redirect(self.url("catalog"))


class CatalogHandler(PortalHandler):
    """Datasets with their size and the person's grant status; "apply" opens the form."""

    @requires()
    def get(self):
        with self.store.session() as session:
            datasets = registry.list_datasets(session)
            mine = access.list_applications(session, user=self.user_name)
            rows = [{"dataset": d, "grant": grant_status(mine, d.id),
                     "stats": dataset_stats(self.home, d)} for d in datasets]
        page = paginate(rows, self.page_number(), self.portal.page_size)
        self.render_page("catalog.html", page=page)


class ApplyHandler(PortalHandler):
    """The application form (datasets, purpose, duration); POST files it."""

    @requires()
    def get(self):
        with self.store.session() as session:
            datasets = registry.list_datasets(session)
        chosen = self.get_query_arguments("dataset")
        self.render_page("apply.html", datasets=datasets, chosen=chosen,
                         days=access.DEFAULT_DAYS, max_days=access.MAX_DAYS)

    @requires()
    def post(self):
        days = int_argument(self, "days", access.DEFAULT_DAYS)
        with self.store.session() as session:
            app = access.apply(session, user=self.user_name,
                               dataset_ids=self.get_body_arguments("dataset"),
                               purpose=self.get_body_argument("purpose", ""), days=days)
            session.flush()
            app_id = app.id
        self.redirect(self.url("access", applied=app_id))


class MyAccessHandler(PortalHandler):
    """My applications and grants, with expiry dates."""

    @requires()
    def get(self):
        with self.store.session() as session:
            apps = list(reversed(access.list_applications(session, user=self.user_name)))
            live = access.live_grants(session, self.user_name)
        page = paginate(apps, self.page_number(), self.portal.page_size)
        self.render_page("access.html", page=page, live=live,
                         applied=self.get_query_argument("applied", None))


class StewardHandler(PortalHandler):
    """Pending applications with each applicant's history; live grants; accounts waiting.

    Each list pages on its own: ``page`` (applications), ``grants`` and ``accounts``."""

    @requires(roles.STEWARD)
    def get(self):
        now = utcnow()
        with self.store.session() as session:
            apps = access.list_applications(session, now=now)
            pending = [a for a in apps if a.state == "pending"]
            live = [a for a in reversed(apps) if a.state == "approved"]
            history = {}
            for app in apps:
                history.setdefault(app.user.name, []).append(app)
            waiting = list(session.scalars(select(User).where(User.approved.is_(False))
                                           .order_by(User.name)))
        size = self.portal.page_size
        numbers = {"page": self.page_number(), "grants": self.page_number("grants"),
                   "accounts": self.page_number("accounts")}
        self.render_page(
            "steward.html", pending=paginate(pending, numbers["page"], size),
            live=paginate(live, numbers["grants"], size), history=history,
            waiting=paginate(waiting, numbers["accounts"], size), numbers=numbers,
            signed_up=self.portal.sign_ups(), default_days=access.DEFAULT_DAYS,
            done=self.get_query_argument("done", None),
            account_done=self.get_query_argument("account", None))


class StewardDecisionHandler(PortalHandler):
    """POST approve (with an expiry in days), reject (with a reason) or revoke."""

    @requires(roles.STEWARD)
    def post(self, app_id: str, action: str):
        reason = self.get_body_argument("reason", "").strip() or None
        with self.store.session() as session:
            if action == "approve":
                access.approve(session, int(app_id), reviewer=self.user_name,
                               days=int_argument(self, "days"), reason=reason)
            elif action == "reject":
                access.reject(session, int(app_id), reviewer=self.user_name, reason=reason)
            else:
                access.revoke(session, int(app_id), actor=self.user_name, reason=reason)
        self.redirect(self.url("steward", done=f"{action}:{app_id}"))


class AccountDecisionHandler(PortalHandler):
    """POST approve or discard a sign-up: :func:`medzone_hub.accounts.decide_account`,
    the function (and the rule) behind the hub's own accounts page."""

    @requires(roles.STEWARD)
    def post(self, name: str, action: str):
        db = self.portal.hub_db()
        try:
            with self.store.session() as session:
                decide_account(session, db, name, action, decider=self.user_name,
                               via="portal")
        finally:
            db.close()  # and roll back whatever a refusal left uncommitted
        self.redirect(self.url("steward", account=f"{action}:{name}") + "#accounts")


ROUTES = [
    (r"catalog", CatalogHandler),
    (r"apply", ApplyHandler),
    (r"access", MyAccessHandler),
    (r"steward", StewardHandler),
    (r"steward/applications/(\d+)/(approve|reject|revoke)", StewardDecisionHandler),
    (r"steward/accounts/([a-z0-9_-]+)/(approve|discard)", AccountDecisionHandler),
]
