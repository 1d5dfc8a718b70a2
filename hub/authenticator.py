"""Accounts at the hub: NativeAuthenticator made to work with JupyterHub 6, tied to MedZone's store.

People sign up at ``/hub/signup``; an admin or a data steward approves them at
``/hub/authorize`` or in the portal's steward queue; only then can they log in and spawn.
:class:`MedZoneAuthenticator` is ``nativeauthenticator.NativeAuthenticator`` (1.3.0) with
this compatibility layer:

* **Login works on JupyterHub 6.** NativeAuthenticator's ``LoginHandler.post`` times the
  login with ``self.statsd``, which JupyterHub 6.0 removed, so every login failed with
  ``'LoginHandler' object has no attribute 'statsd'``. :class:`LoginHandler` here is the
  same handler without the timer.
* **Approval is a POST with XSRF protection, and audited.** Upstream approves (and
  discards) accounts with a plain GET link, so any page an admin visits could approve an
  account with an ``<img src>``. Here ``GET /hub/authorize/<name>`` and
  ``GET /hub/discard/<name>`` change nothing (405); the authorization page posts a form
  carrying JupyterHub's ``_xsrf`` token, which JupyterHub checks on every cookie-
  authenticated POST. Each decision is one row of MedZone's audit log
  (``user.approve``, ``user.unapprove``, ``user.discard``).
* **One rule for who decides sign-ups.** :func:`decide_account` is the one place: approved
  admins and data stewards (the people who already decide who reaches data) may approve or
  discard sign-ups, nobody decides about their own account, and only an admin withdraws an
  admin's approval. The hub's page and the portal's steward queue both call it.
* **MedZone's store is the source of truth.** A sign-up creates an *unapproved* account in
  the store (so the name is taken there too); approving it in the hub approves it in the
  store, in the same step. Login requires a valid password **and** an approved account in
  the store, so an account unapproved with ``medzone`` cannot log in either. Sign-up is
  refused for a name the store already has: an admin approving "alice" must never hand an
  existing account to a stranger who signed up under that name.
* **Accounts created with ``medzone user add``** have no password; :func:`set_password`
  gives them one (the CLI's ``medzone user add NAME --password`` / ``medzone user
  password NAME`` call it).
* JupyterHub 6 rejects every user unless ``allow_all`` or an allow-list is set: this class
  defaults ``allow_all`` to True because the approval check above is the gate.
* The e-mail self-approval link (``/hub/confirm/…``) is switched off: it would approve an
  account without an admin and without the store.

Any other JupyterHub authenticator can be configured instead
(``c.JupyterHub.authenticator_class``); then accounts must be approved in the store with
``medzone user add``, because :class:`~medzone_hub.spawner.SafeZoneSpawner` refuses to
start a server for anyone the store does not list as approved, whoever authenticated them.
"""

from __future__ import annotations

import asyncio
from jinja2 import ChoiceLoader, DictLoader
from jupyterhub.handlers import BaseHandler
from nativeauthenticator import handlers as native_handlers
from nativeauthenticator.nativeauthenticator import NativeAuthenticator
from nativeauthenticator.orm import UserInfo
from sqlalchemy import select
from tornado import web
from traitlets import Bool, Unicode, default

from . import accounts, audit
from .config import MedZoneHome, resolve_home
from .errors import Conflict, InvalidInput, MedZoneError, NotFound, RuleViolation
from .models import User


#: Actor recorded for a sign-up (the person is not yet anyone the zone trusts).
SIGNUP_ACTOR = "hub:signup"

#: The minimum password length when the config does not set one.
DEFAULT_MIN_PASSWORD_LENGTH = 8


# --- the store side (plain functions, usable from the CLI and tests) -----------------

def approve_account(session, name: str, *, actor: str, via: str = "hub") -> User:
    """Approve *name* in the store (creating an approved account if there is none)."""
    account = session.scalar(select(User).where(User.name == name))
    if account is None:
        return accounts.add_user(session, name, approved=True, actor=actor)
    if not account.approved:
        account.approved = True
        audit.append(session, actor=actor, action="user.approve", subject=f"user:{name}",
                     detail={"via": via})
    return account


def unapprove_account(session, name: str, *, actor: str, via: str = "hub") -> User | None:
    """Withdraw *name*'s approval in the store: no login, no spawn, no grants mounted."""
    account = session.scalar(select(User).where(User.name == name))
    if account is not None and account.approved:
        account.approved = False
        audit.append(session, actor=actor, action="user.unapprove", subject=f"user:{name}",
                     detail={"via": via})
    return account


def hub_db_factory(home: MedZoneHome):
    """Sessions on the hub's own database (where NativeAuthenticator keeps sign-ups and
    passwords), creating it the way JupyterHub would: for code outside the hub process."""
    from jupyterhub import orm as hub_orm

    from .hubapp import prepare_state

    paths = prepare_state(home)
    factory = hub_orm.new_session_factory(f"sqlite:///{paths.db_path}")
    paths.db_path.chmod(0o600)
    return factory


def _hub_db(home: MedZoneHome):
    return hub_db_factory(home)()


#: What can be decided about a sign-up.
ACCOUNT_ACTIONS = ("approve", "unapprove", "discard")


def check_account_decider(session, name: str) -> User:
    """*name*'s store account if it may decide sign-ups, else :class:`RuleViolation`.

    Approved admins and data stewards may: stewards already decide who reaches which data,
    and approving an account grants no data (that is an access application).
    """
    account = session.scalar(select(User).where(User.name == name))
    if account is None or not account.approved:
        raise RuleViolation(f"{name!r} is not an approved user")
    if not (account.admin or account.has_role(accounts.ROLE_DATA_STEWARD)):
        raise RuleViolation(f"{name!r} may not decide accounts: only admins and "
                            f"{accounts.ROLE_DATA_STEWARD}s may")
    return account


def decide_account(session, hub_db, name: str, action: str, *, decider: str,
                   actor: str | None = None, via: str = "hub") -> UserInfo | None:
    """Approve, withdraw the approval of, or discard the account *name*: in the store and
    in NativeAuthenticator's sign-up table (*hub_db*, committed here) in one step.

    *decider* must pass :func:`check_account_decider` and may not decide about their own
    account; withdrawing an admin's approval needs an admin. *actor* is what the audit
    log records (default: *decider*). Returns the sign-up row (``None`` where there is
    none, e.g. an account made with ``medzone user add``; discarding needs one).
    """
    if action not in ACCOUNT_ACTIONS:
        raise InvalidInput(f"unknown action {action!r} (one of {', '.join(ACCOUNT_ACTIONS)})")
    me = check_account_decider(session, decider)
    if name == decider:
        raise RuleViolation(f"{decider!r} may not decide about their own account")
    account = session.scalar(select(User).where(User.name == name))
    # Read the row afresh: another process (the hub, the portal) may have changed it.
    info = (hub_db.query(UserInfo).filter(UserInfo.username == name)
            .populate_existing().first())
    if account is None and info is None:
        raise NotFound(f"no account or sign-up named {name!r}")
    actor = actor or decider
    if action == "discard":
        if info is None:
            raise NotFound(f"no sign-up named {name!r}")
        if info.is_authorized or (account is not None and account.approved):
            raise Conflict("withdraw the approval before discarding an account")
        audit.append(session, actor=actor, action="user.discard", subject=f"user:{name}",
                     detail={"in_store": account is not None, "via": via})
        hub_db.delete(info)
        # The store keeps the (unapproved) account: its name stays taken and its audit
        # rows keep a subject.
    elif action == "approve":
        approve_account(session, name, actor=actor, via=via)
        if info is not None:
            info.is_authorized = True
    else:
        if account is not None and account.admin and not me.admin:
            raise RuleViolation(f"only an admin may withdraw the approval of admin {name!r}")
        unapprove_account(session, name, actor=actor, via=via)
        if info is not None:
            info.is_authorized = False
    session.flush()  # a store refusal (e.g. a constraint) stops before the hub changes
    hub_db.commit()
    return None if action == "discard" else info


def set_password(home: MedZoneHome, name: str, password: str, *, actor: str,
                 min_length: int = DEFAULT_MIN_PASSWORD_LENGTH) -> None:
    """Let the approved store account *name* log in at the hub with *password*.

    For accounts made with ``medzone user add`` (which have no password), and to reset a
    forgotten one. Refuses an unknown or unapproved account. Audited as
    ``user.password_set`` (the password itself is never recorded).
    """
    import bcrypt

    from .db import connect

    if not isinstance(password, str) or len(password) < min_length:
        raise InvalidInput(f"a password needs at least {min_length} characters")
    store = connect(home.ensure().db_url)
    try:
        with store.session() as session:
            account = accounts.get_user(session, name)
            if not account.approved:
                raise RuleViolation(f"user {name!r} is not approved; approve the account first")
            db = _hub_db(home)
            try:
                info = UserInfo.find(db, name)
                hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt())
                if info is None:
                    db.add(UserInfo(username=name, password=hashed, is_authorized=True))
                else:
                    info.password = hashed
                    info.is_authorized = True
                db.commit()
            finally:
                db.close()
            audit.append(session, actor=actor, action="user.password_set",
                         subject=f"user:{name}", detail={"via": "cli"})
    finally:
        store.close()


# --- handlers --------------------------------------------------------------------------

AUTHORIZATION_TEMPLATE = "medzone-authorization-area.html"
_TEMPLATES = {
    AUTHORIZATION_TEMPLATE: """{% extends "page.html" %}
{% block main %}
<div class="container">
  <h1>Accounts</h1>
  <p>Approving an account lets the person log in and start a server; it does not grant any
  dataset (that is an access application). Every decision is recorded in the audit log.</p>
  <table class="table">
    <thead><tr><th>User name</th>{% if ask_email %}<th>E-mail</th>{% endif %}
      <th>Approved</th><th></th><th></th></tr></thead>
    <tbody>
    {% for u in users %}
      <tr id="{{ u.username }}">
        <td>{{ u.username }}</td>
        {% if ask_email %}<td>{{ u.email }}</td>{% endif %}
        <td>{{ "yes" if u.is_authorized else "no" }}</td>
        <td>
          <form method="post" action="{{ base_url }}authorize/{{ u.username }}">
            <input type="hidden" name="_xsrf" value="{{ xsrf }}"/>
            {% if u.is_authorized %}
            <button class="btn btn-default" name="action" value="unapprove">Withdraw approval</button>
            {% else %}
            <button class="btn btn-jupyter" name="action" value="approve">Approve</button>
            {% endif %}
          </form>
        </td>
        <td>
          {% if not u.is_authorized %}
          <form method="post" action="{{ base_url }}discard/{{ u.username }}">
            <input type="hidden" name="_xsrf" value="{{ xsrf }}"/>
            <button class="btn btn-danger" name="action" value="discard">Discard sign-up</button>
          </form>
          {% endif %}
        </td>
      </tr>
    {% endfor %}
    </tbody>
  </table>
</div>
{% endblock %}
""",
}


class _MedZoneTemplates(native_handlers.LocalBase):
    """Adds MedZone's templates (kept in this module) to the hub's template loader."""

    _registered = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not _MedZoneTemplates._registered:
            env = self.settings["jinja2_env"]
            env.loader = ChoiceLoader([DictLoader(_TEMPLATES), env.loader])
            _MedZoneTemplates._registered = True


class LoginHandler(native_handlers.LoginHandler):
    """NativeAuthenticator's login handler without ``self.statsd`` (gone in JupyterHub 6)."""

    async def post(self):
        data = {arg: self.get_argument(arg, strip=False) for arg in self.request.arguments}
        user = await self.login_user(data)
        if user:
            self._jupyterhub_user = user
            self.redirect(self.get_next_url(user))
            return
        error = "Invalid username or password."
        username = data.get("username", "")
        info = self.authenticator.get_user(username) if username else None
        if (info is not None and not info.is_authorized
                and info.is_valid_password(data.get("password", ""))):
            error = f"User {username} has not been approved by an administrator yet."
        html = await self._render(login_error=error, username=username)
        self.finish(html)


class _AccountsHandler(_MedZoneTemplates):
    """What the accounts pages share: :func:`decide_account`'s rule, with its refusals as
    HTTP errors (one line)."""

    def check_decider(self) -> None:
        from .hub_api import http_error

        try:
            with self.authenticator.store.session() as session:
                check_account_decider(session, self.current_user.name)
        except MedZoneError as err:
            raise http_error(err) from None

    def decide(self, name: str, action: str) -> UserInfo | None:
        from .hub_api import http_error

        try:
            with self.authenticator.store.session() as session:
                return decide_account(session, self.db, name, action,
                                      decider=self.current_user.name,
                                      actor=f"hub:{self.current_user.name}", via="hub")
        except MedZoneError as err:
            self.db.rollback()
            raise http_error(err) from None


class AuthorizationAreaHandler(_AccountsHandler):
    """``GET /hub/authorize``: the accounts page, with POST forms carrying ``_xsrf``."""

    @web.authenticated
    async def get(self):
        self.check_decider()
        html = await self.render_template(
            AUTHORIZATION_TEMPLATE,
            ask_email=self.authenticator.ask_email_on_signup,
            users=self.db.query(UserInfo).populate_existing().all(),
        )
        self.finish(html)


class _StateChangingHandler(_AccountsHandler):
    """GET changes nothing (405); POST is checked for XSRF by JupyterHub before it runs."""

    async def get(self, slug):
        raise web.HTTPError(405, "use POST (with the _xsrf token) to change an account")


class ToggleAuthorizationHandler(_StateChangingHandler):
    """``POST /hub/authorize/<name>`` with ``action=approve`` (default) or ``unapprove``."""

    @web.authenticated
    async def post(self, slug):
        action = self.get_body_argument("action", "approve")
        if action not in ("approve", "unapprove"):
            raise web.HTTPError(400, f"unknown action {action!r}")
        self.decide(slug, action)
        if action == "unapprove":
            user = self.find_user(slug)
            if user is not None and user.running:
                await self.stop_single_user(user)
        self.redirect(self.hub.base_url + "authorize#" + slug)


class DiscardHandler(_StateChangingHandler):
    """``POST /hub/discard/<name>``: delete an unapproved sign-up."""

    @web.authenticated
    async def post(self, slug):
        self.decide(slug, "discard")
        self.redirect(self.hub.base_url + "authorize")


class SelfApprovalDisabledHandler(BaseHandler):
    async def get(self, slug):
        raise web.HTTPError(404)


# --- the authenticator -----------------------------------------------------------------

class MedZoneAuthenticator(NativeAuthenticator):
    """NativeAuthenticator for JupyterHub 6 whose approvals live in MedZone's store."""

    medzone_home = Unicode(
        "",
        config=True,
        help="MEDZONE_HOME whose store holds the accounts (default: $MEDZONE_HOME or ~/.medzone).",
    )

    sync_admin = Bool(
        True,
        config=True,
        help="Make a user a hub admin at login exactly when the store says they are admin "
             "(`medzone user add NAME --admin`).",
    )

    @default("allow_all")
    def _allow_all_default(self):
        # JupyterHub 6 refuses everyone without allow_all or an allow-list; who may log in
        # is decided by authenticate() (password + approval in the store).
        return True

    @default("minimum_password_length")
    def _min_password_default(self):
        return DEFAULT_MIN_PASSWORD_LENGTH

    @default("check_common_password")
    def _common_password_default(self):
        return True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._store = None

    # store access ------------------------------------------------------------------

    @property
    def home(self) -> MedZoneHome:
        return resolve_home(self.medzone_home or None)

    @property
    def store(self):
        if self._store is None:
            from .db import connect

            self._store = connect(self.home.ensure().db_url)
        return self._store

    def _store_account(self, name: str) -> tuple[bool, bool] | None:
        """(approved, admin) of *name* in the store, or None if it is not there."""
        with self.store.session() as session:
            account = session.scalar(select(User).where(User.name == name))
            if account is None:
                return None
            return account.approved, account.admin

    # JupyterHub hooks ----------------------------------------------------------------

    def get_user(self, username):
        # The portal and `medzone user password` change sign-ups from other processes, and
        # the hub's session keeps rows across commits (expire_on_commit=False): read afresh.
        return (self.db.query(UserInfo)
                .filter(UserInfo.username == self.normalize_username(username))
                .populate_existing().first())

    async def authenticate(self, handler, data):
        name = await super().authenticate(handler, data)
        if not name:
            return None
        state = await asyncio.to_thread(self._store_account, name)
        if state is None or not state[0]:
            self.log.warning("login refused for %s: not an approved account in MedZone's store", name)
            return None
        model = {"name": name}
        if self.sync_admin:
            model["admin"] = state[1]
        return model

    async def check_allowed(self, username, authentication=None):
        state = await asyncio.to_thread(self._store_account, username)
        return state is not None and state[0]

    def create_user(self, username, password, **kwargs):
        username = self.normalize_username(username)
        try:
            accounts.validate_user_name(username)
        except InvalidInput:
            return None
        if username in accounts.RESERVED_NAMES:
            return None
        if self._store_account(username) is not None:
            # The store already has this name (e.g. `medzone user add`): a sign-up must not
            # be able to claim it.
            self.log.warning("sign-up refused: %s already exists in MedZone's store", username)
            return None
        info = super().create_user(username, password, **kwargs)
        if info is None:
            return None
        try:
            with self.store.session() as session:
                accounts.add_user(session, username, approved=bool(info.is_authorized),
                                  actor=SIGNUP_ACTOR)
        except Exception:
            self.db.delete(info)
            self.db.commit()
            raise
        return info

    def get_handlers(self, app):
        return [
            (r"/login", LoginHandler),
            (r"/signup", native_handlers.SignUpHandler),
            (r"/discard/([^/]*)", DiscardHandler),
            (r"/authorize", AuthorizationAreaHandler),
            (r"/authorize/([^/]*)", ToggleAuthorizationHandler),
            (r"/confirm/([^/]*)", SelfApprovalDisabledHandler),
            (r"/change-password", native_handlers.ChangePasswordHandler),
            (r"/change-password/([^/]+)", native_handlers.ChangePasswordAdminHandler),
        ]


__all__ = ["ACCOUNT_ACTIONS", "MedZoneAuthenticator", "approve_account", "check_account_decider",
           "decide_account", "hub_db_factory", "set_password", "unapprove_account"]
