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
* **One rule for who decides sign-ups.** :func:`medzone_hub.accounts.decide_account` is the
  one place: approved admins and data stewards (the people who already decide who reaches
  data) may approve or discard sign-ups, nobody decides about their own account, and only
  an admin withdraws an admin's approval. The hub's page and the portal's steward queue
  both call it.
* **MedZone's store is the source of truth.** A sign-up creates an *unapproved* account in
  the store (so the name is taken there too); approving it in the hub approves it in the
  store, in the same step. Login requires a valid password **and** an approved account in
  the store, so an account unapproved with ``medzone`` cannot log in either. Sign-up is
  refused for a name the store already has: an admin approving "alice" must never hand an
  existing account to a stranger who signed up under that name.
* **Accounts created with ``medzone user add``** have no password;
  :func:`medzone_hub.accounts.set_password`
  gives them one (the CLI's ``medzone user add NAME --password`` / ``medzone user
  password NAME`` call it).
* JupyterHub 6 rejects every user unless ``allow_all`` or an allow-list is set: this class
  defaults ``allow_all`` to True because the approval check above is the gate.
* The e-mail self-approval link (``/hub/confirm/…``) is switched off: it would approve an
  account without an admin and without the store.
* **Passwords are checked and hashed off the event loop.** bcrypt takes about 0.3 s per
  password on purpose; upstream runs it on the hub's event loop, so every login froze the
  whole hub (API included) for that long. Here logins, sign-ups and changes of password
  run :func:`~medzone_hub.accounts.check_password` /
  :func:`~medzone_hub.accounts.hash_password` in a small thread pool
  (``password_hash_threads``; bcrypt releases the GIL), so a storm of logins takes at most
  those threads' CPUs and the hub keeps answering. (``set_password`` hashes in the
  ``medzone`` command's process, never in the hub.)
* **Failed-login lockout and rate limit, on by default** (:class:`LoginGuard`): per
  username and per client address (the hop the proxy appended to ``X-Forwarded-For``).
  A locked or over-rate attempt is refused with one line (HTTP 403) *before* any password
  is checked, so guessing costs the hub nothing. Settings: ``allowed_failed_logins``,
  ``allowed_failed_logins_per_address``, ``seconds_before_next_try``,
  ``login_attempts_per_minute``, ``login_attempts_per_minute_per_address``.
* **An expired login form** (its XSRF cookie gone) gets the login page again with
  :data:`LOGIN_FORM_EXPIRED` (403), not an empty error page: upstream's ``_render`` did
  not accept the arguments JupyterHub passes when it renders an error as the login page.

Any other JupyterHub authenticator can be configured instead
(``c.JupyterHub.authenticator_class``); then accounts must be approved in the store with
``medzone user add``, because :class:`~medzone_hub.spawner.SafeZoneSpawner` refuses to
start a server for anyone the store does not list as approved, whoever authenticated them.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

from jinja2 import ChoiceLoader, DictLoader
from jupyterhub.handlers import BaseHandler
from nativeauthenticator import handlers as native_handlers
from nativeauthenticator.nativeauthenticator import NativeAuthenticator
from nativeauthenticator.orm import UserInfo
from tornado import web
from tornado.escape import url_escape
from tornado.httputil import url_concat
from tornado.netutil import is_valid_ip
from traitlets import Bool, Integer, Unicode, default

from . import accounts
from .accounts import (DEFAULT_MIN_PASSWORD_LENGTH, check_account_decider, check_password,
                       decide_account, hash_password)
from .config import MedZoneHome, resolve_home
from .db import open_store
from .errors import InvalidInput, MedZoneError


#: Actor recorded for a sign-up (the person is not yet anyone the zone trusts).
SIGNUP_ACTOR = "hub:signup"

#: What a login form posted after its XSRF cookie expired shows (with the login page).
LOGIN_FORM_EXPIRED = "Your login form expired; please sign in again."


# --- failed-login lockout and rate limit ------------------------------------------------

class LoginGuard:
    """Failed-login lockout and login rate limit, per username and per client address.

    :meth:`admit` is called before a password is checked: it refuses (with a one-line
    reason) a username or an address that is locked or over its rate. Otherwise the
    attempt is *pending* until :meth:`failed`, :meth:`succeeded` or :meth:`release`;
    pending attempts count as failures for the lock, so logins posted at the same moment
    cannot all pass the check before the first one fails. A key is locked once it has
    ``*_failures`` failures (pending ones included), each less than ``lock_seconds`` after
    the previous one; it is unlocked ``lock_seconds`` after its last failure, and a
    success forgets an account's failures (not an address's: one known password must not
    unlock guessing others). The rate limit counts every admitted attempt in the last
    ``rate_window`` seconds. A limit of 0 switches that check off. Kept in memory: a hub
    restart forgets it. Not thread-safe: used on the hub's event loop only.
    """

    def __init__(self, *, user_failures: int, address_failures: int, lock_seconds: float,
                 user_rate: int, address_rate: int, rate_window: float = 60.0,
                 clock=time.monotonic):
        self.limits = {"user": (user_failures, user_rate),
                       "address": (address_failures, address_rate)}
        self.lock_seconds = lock_seconds
        self.rate_window = rate_window
        self.clock = clock
        self._failures: dict[tuple[str, str], tuple[int, float]] = {}  # key -> (n, last)
        self._pending: dict[tuple[str, str], int] = {}
        self._attempts: dict[tuple[str, str], list[float]] = {}  # key -> times
        self._pruned = 0.0

    @staticmethod
    def _keys(username: str, address: str):
        yield ("user", username), "for this account"
        if address:
            yield ("address", address), "from your address"

    def _recent_failures(self, key, now: float) -> tuple[int, float]:
        count, last = self._failures.get(key, (0, now))
        return (count, last) if now - last < self.lock_seconds else (0, now)

    def _prune(self, now: float) -> None:
        if now - self._pruned < self.rate_window:
            return
        self._pruned = now
        self._failures = {k: v for k, v in self._failures.items()
                          if now - v[1] < self.lock_seconds}
        self._attempts = {k: kept for k, v in self._attempts.items()
                          if (kept := [t for t in v if now - t < self.rate_window])}

    def refusal(self, username: str, address: str) -> str | None:
        """Why a login for *username* from *address* is refused now, or None."""
        now = self.clock()
        for key, what in self._keys(username, address):
            allowed = self.limits[key[0]][0]
            count, last = self._recent_failures(key, now)
            if allowed and count + self._pending.get(key, 0) >= allowed:
                left = self.lock_seconds - (now - last) if count else self.lock_seconds
                return f"Too many failed logins {what}; try again in {math.ceil(left)} s."
        for key, _ in self._keys(username, address):
            rate = self.limits[key[0]][1]
            recent = [t for t in self._attempts.get(key, ()) if now - t < self.rate_window]
            if rate and len(recent) >= rate:
                left = self.rate_window - (now - recent[0])
                return f"Too many login attempts; try again in {math.ceil(left)} s."
        return None

    def admit(self, username: str, address: str) -> str | None:
        """None and the attempt pending, or the one-line reason it is refused (then
        nothing is counted)."""
        now = self.clock()
        self._prune(now)
        reason = self.refusal(username, address)
        if reason is not None:
            return reason
        for key, _ in self._keys(username, address):
            if self.limits[key[0]][1]:
                times = self._attempts.setdefault(key, [])
                times[:] = [t for t in times if now - t < self.rate_window] + [now]
            self._pending[key] = self._pending.get(key, 0) + 1
        return None

    def _settle(self, username: str, address: str) -> None:
        for key, _ in self._keys(username, address):
            left = self._pending.get(key, 0) - 1
            if left > 0:
                self._pending[key] = left
            else:
                self._pending.pop(key, None)

    def failed(self, username: str, address: str) -> None:
        """An admitted attempt had a wrong password (or an unknown username)."""
        self._settle(username, address)
        now = self.clock()
        for key, _ in self._keys(username, address):
            count, _ = self._recent_failures(key, now)
            self._failures[key] = (count + 1, now)

    def succeeded(self, username: str, address: str) -> None:
        """An admitted attempt logged in: the account's failures are forgotten."""
        self._settle(username, address)
        self._failures.pop(("user", username), None)

    def release(self, username: str, address: str) -> None:
        """An admitted attempt was not a wrong guess (the password was right but the
        account may not log in): it counts for nothing."""
        self._settle(username, address)


def client_address(handler) -> str:
    """The address a login came from: the last ``X-Forwarded-For`` hop that is not one of
    JupyterHub's ``trusted_downstream_ips`` (the proxy appends the address it saw), else
    the connection's own address. ``X-Real-Ip``, which tornado would let any client set
    through the proxy, is not used."""
    request = handler.request
    context = getattr(request.connection, "context", None)
    trusted = getattr(context, "trusted_downstream", None) or set()
    forwarded = request.headers.get("X-Forwarded-For", "")
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if hop not in trusted:
            if is_valid_ip(hop):
                return hop
            break
    return getattr(context, "_orig_remote_ip", None) or request.remote_ip or ""


#: A new password's hash, made off the event loop by a handler (sign-up, change of
#: password) before NativeAuthenticator's synchronous code stores it: (password, hash).
_prehashed: contextvars.ContextVar[tuple[str, bytes] | None] = contextvars.ContextVar(
    "medzone_prehashed", default=None)


def _hash_for(password: str) -> bytes:
    made = _prehashed.get()
    return made[1] if made is not None and made[0] == password else hash_password(password)


async def _with_prehashed(handler, password: str, confirmation: str, coro_fn):
    """Run *coro_fn()* with *password* hashed beforehand in the password threads (when it
    is one that will be stored: it matches its confirmation and is long enough)."""
    auth, token = handler.authenticator, None
    if password == confirmation and len(password) >= auth.minimum_password_length:
        token = _prehashed.set((password, await auth.hash_password(password)))
    try:
        return await coro_fn()
    finally:
        if token is not None:
            _prehashed.reset(token)


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
    """NativeAuthenticator's login handler without ``self.statsd`` (gone in JupyterHub 6).

    The reason a login was refused comes from :meth:`MedZoneAuthenticator.authenticate`
    (which checks the password off the event loop, once); a form posted after its XSRF
    cookie expired gets the login page again with :data:`LOGIN_FORM_EXPIRED` (403).
    """

    #: (message, HTTP status) set by the authenticator when it refuses a login.
    login_refusal: tuple[str, int] | None = None

    def check_xsrf_cookie(self):
        try:
            return super().check_xsrf_cookie()
        except web.HTTPError as err:
            if self.request.headers.get("Sec-Fetch-Mode", "navigate") != "navigate":
                raise
            raise web.HTTPError(err.status_code, LOGIN_FORM_EXPIRED) from None

    def _render(self, login_error=None, username=None, sync=False, **kwargs):
        # JupyterHub renders error pages of the login form (an expired XSRF cookie) through
        # _render with sync=True and the error page's namespace: accept both. The sync
        # template environment needs the same loaders as the async one.
        if sync:
            env, sync_env = self.settings["jinja2_env"], self.settings["jinja2_env_sync"]
            if sync_env.loader is not env.loader:
                sync_env.loader = env.loader
        return self.render_template(
            "native-login.html",
            sync=sync,
            next=url_escape(self.get_argument("next", default="")),
            username=username,
            login_error=login_error,
            custom_html=self.authenticator.custom_html,
            login_url=self.settings["login_url"],
            enable_signup=self.authenticator.enable_signup,
            two_factor_auth=self.authenticator.allow_2fa,
            authenticator_login_url=url_concat(
                self.authenticator.login_url(self.hub.base_url),
                {"next": self.get_argument("next", "")},
            ),
        )

    async def post(self):
        data = {arg: self.get_argument(arg, strip=False) for arg in self.request.arguments}
        user = await self.login_user(data)
        if user:
            self._jupyterhub_user = user
            self.redirect(self.get_next_url(user))
            return
        error, status = self.login_refusal or ("Invalid username or password.", 200)
        self.set_status(status)
        html = await self._render(login_error=error, username=data.get("username", ""))
        self.finish(html)


class SignUpHandler(native_handlers.SignUpHandler):
    """NativeAuthenticator's sign-up page, with the new password hashed off the event loop
    (in the authenticator's password threads) before the sign-up code stores it."""

    async def post(self):
        if not self.authenticator.enable_signup:
            return await super().post()
        return await _with_prehashed(
            self, self.get_body_argument("signup_password", "", strip=False),
            self.get_body_argument("signup_password_confirmation", "", strip=False),
            super().post)


class ChangePasswordHandler(native_handlers.ChangePasswordHandler):
    """``/hub/change-password``: upstream's page, with the current password checked and
    the new one hashed in the password threads; a wrong current password counts as a
    failed login for the account (and is refused while it is locked)."""

    @web.authenticated
    async def post(self):
        user = self.current_user
        old_password = self.get_body_argument("old_password", strip=False)
        new_password = self.get_body_argument("new_password", strip=False)
        confirmation = self.get_body_argument("new_password_confirmation", strip=False)
        auth = self.authenticator
        address = client_address(self)
        alert, message = "alert-danger", auth.login_guard.admit(user.name, address)
        if message is None:
            info = auth.get_user(user.name)
            if info is None or not await auth.check_password(old_password, info.password):
                auth.login_guard.failed(user.name, address)
                message = "Your current password was incorrect. Please try again."
            else:
                auth.login_guard.release(user.name, address)
        if message is None and new_password != confirmation:
            message = "Your new password didn't match the confirmation. Please try again."
        if message is None:
            changed = await _with_prehashed(self, new_password, confirmation, _async(
                auth.change_password, user.name, new_password))
            if changed:
                alert, message = "alert-success", "Your password has been changed successfully!"
            else:
                message = (f"Be sure your new password has at least "
                           f"{auth.minimum_password_length} characters and is not too common.")
        html = await self.render_template("change-password.html", user_name=user.name,
                                          result_message=message, alert=alert)
        self.finish(html)


class ChangePasswordAdminHandler(native_handlers.ChangePasswordAdminHandler):
    """``/hub/change-password/<name>`` (admins): the new password hashed in the password
    threads."""

    @native_handlers.admin_users_scope
    async def post(self, user_name):
        return await _with_prehashed(
            self, self.get_body_argument("new_password", "", strip=False),
            self.get_body_argument("new_password_confirmation", "", strip=False),
            lambda: super(ChangePasswordAdminHandler, self).post(user_name))


def _async(fn, *args):
    async def call():
        return fn(*args)
    return call


class _AccountsHandler(_MedZoneTemplates):
    """What the accounts pages share: :func:`decide_account`'s rule, with its refusals as
    HTTP errors (one line)."""

    def check_decider(self) -> None:
        try:
            with self.authenticator.store.session() as session:
                check_account_decider(session, self.current_user.name)
        except MedZoneError as err:
            raise web.HTTPError(err.http_status, str(err)) from None

    def decide(self, name: str, action: str) -> UserInfo | None:
        try:
            with self.authenticator.store.session() as session:
                return decide_account(session, self.db, name, action,
                                      decider=self.current_user.name,
                                      actor=f"hub:{self.current_user.name}", via="hub")
        except MedZoneError as err:
            self.db.rollback()
            raise web.HTTPError(err.http_status, str(err)) from None


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

    # failed-login lockout and rate limit (see LoginGuard) --------------------------------

    allowed_failed_logins = Integer(
        5,
        config=True,
        help="Failed logins for one username, each less than seconds_before_next_try after "
             "the previous one, after which that username is locked: every login for it, "
             "even with the right password, is refused without checking the password "
             "until seconds_before_next_try after its last failure. 0: no lockout.",
    )

    allowed_failed_logins_per_address = Integer(
        20,
        config=True,
        help="The same lockout per client address (all usernames together): guessing many "
             "accounts from one address stops there. People behind one NAT share an "
             "address, so keep it well above allowed_failed_logins. 0: no address lockout.",
    )

    seconds_before_next_try = Integer(
        300,
        config=True,
        help="How long (seconds) a locked username or address stays locked after its last "
             "failed login; failures further apart than this are forgotten.",
    )

    login_attempts_per_minute = Integer(
        10,
        config=True,
        help="Login attempts (right or wrong) accepted per username in any 60 s; more are "
             "refused without checking the password. 0: no limit.",
    )

    login_attempts_per_minute_per_address = Integer(
        60,
        config=True,
        help="Login attempts (right or wrong, all usernames) accepted per client address in "
             "any 60 s; more are refused without checking the password. 0: no limit.",
    )

    password_hash_threads = Integer(
        config=True,
        help="Threads that check and hash passwords (bcrypt), off the hub's event loop. "
             "Bounds the CPUs a storm of logins can take from the hub "
             "(default: half the CPUs, at least 1, at most 4).",
    )

    @default("password_hash_threads")
    def _password_hash_threads_default(self):
        return max(1, min(4, (os.cpu_count() or 2) // 2))

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
        self._password_pool: ThreadPoolExecutor | None = None
        self.login_guard = LoginGuard(
            user_failures=self.allowed_failed_logins,
            address_failures=self.allowed_failed_logins_per_address,
            lock_seconds=self.seconds_before_next_try,
            user_rate=self.login_attempts_per_minute,
            address_rate=self.login_attempts_per_minute_per_address,
        )

    # passwords, off the event loop -------------------------------------------------------

    def _run_password_work(self, fn, *args):
        if self._password_pool is None:
            self._password_pool = ThreadPoolExecutor(
                max_workers=max(1, self.password_hash_threads),
                thread_name_prefix="medzone-password")
        # bcrypt releases the GIL while it hashes: the event loop keeps running.
        return asyncio.get_running_loop().run_in_executor(self._password_pool, fn, *args)

    def _check_password(self, password: str, hashed: bytes) -> bool:
        """Runs in a password thread (one bcrypt check)."""
        return check_password(password, hashed)

    def _hash_password(self, password: str) -> bytes:
        """Runs in a password thread (one new bcrypt hash)."""
        return hash_password(password)

    async def check_password(self, password: str, hashed: bytes) -> bool:
        """Whether *password* matches *hashed*, checked in a password thread."""
        return await self._run_password_work(self._check_password, password, hashed)

    async def hash_password(self, password: str) -> bytes:
        """A new hash of *password*, made in a password thread."""
        return await self._run_password_work(self._hash_password, password)

    # store access ------------------------------------------------------------------

    @property
    def home(self) -> MedZoneHome:
        return resolve_home(self.medzone_home or None)

    @property
    def store(self):
        return open_store(self.home)

    def _store_account(self, name: str) -> tuple[bool, bool] | None:
        """(approved, admin) of *name* in the store, or None if it is not there."""
        with self.store.session() as session:
            account = accounts.find_user(session, name)
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
        name = self.normalize_username(data.get("username", ""))
        password = data.get("password", "")
        address = client_address(handler) if handler is not None else ""
        refusal = self.login_guard.admit(name, address)
        if refusal is not None:
            # Refused before any password check: guessing costs the hub nothing.
            self.log.warning("login refused for %s from %s: %s", name, address, refusal)
            self._refuse(handler, refusal, 403)
            return None
        pending = True
        try:
            info = self.get_user(name)
            valid = info is not None and await self.check_password(password, info.password)
            if valid and info.has_2fa:
                valid = info.is_valid_token(data.get("2fa"))
            if not valid:
                self.login_guard.failed(name, address)
                pending = False
                return None
            if not info.is_authorized:
                self._refuse(handler, f"User {name} has not been approved by an "
                                      f"administrator yet.", 200)
                return None
            state = await asyncio.to_thread(self._store_account, name)
            if state is None or not state[0]:
                self.log.warning("login refused for %s: not an approved account in "
                                 "MedZone's store", name)
                return None
            self.login_guard.succeeded(name, address)
            pending = False
        finally:
            if pending:
                self.login_guard.release(name, address)
        model = {"name": name}
        if self.sync_admin:
            model["admin"] = state[1]
        return model

    @staticmethod
    def _refuse(handler, message: str, status: int) -> None:
        if handler is not None:
            handler.login_refusal = (message, status)

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
        info = self._add_sign_up(username, password, **kwargs)
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

    def change_password(self, username, new_password):
        # NativeAuthenticator's, with the hash its handler made off the event loop.
        user = self.get_user(username)
        if user is None or not self.is_password_strong(new_password):
            return None
        user.password = _hash_for(new_password)
        self.db.commit()
        return True

    def _add_sign_up(self, username, password, **kwargs) -> UserInfo | None:
        """NativeAuthenticator's ``create_user``, with the hash made off the event loop
        where :class:`SignUpHandler` made it (and no self-approval e-mail: that route is
        off)."""
        if self.user_exists(username) or not self.validate_username(username):
            return None
        if not self.is_password_strong(password) or not self.enable_signup:
            return None
        infos = {"username": username, "password": _hash_for(password), **kwargs}
        if self.open_signup or username in self.get_authed_users():
            infos["is_authorized"] = True
        try:
            info = UserInfo(**infos)
        except AssertionError:  # an invalid e-mail address
            return None
        self.db.add(info)
        self.db.commit()
        return info

    def get_handlers(self, app):
        return [
            (r"/login", LoginHandler),
            (r"/signup", SignUpHandler),
            (r"/discard/([^/]*)", DiscardHandler),
            (r"/authorize", AuthorizationAreaHandler),
            (r"/authorize/([^/]*)", ToggleAuthorizationHandler),
            (r"/confirm/([^/]*)", SelfApprovalDisabledHandler),
            (r"/change-password", ChangePasswordHandler),
            (r"/change-password/([^/]+)", ChangePasswordAdminHandler),
        ]


__all__ = ["LOGIN_FORM_EXPIRED", "LoginGuard", "MedZoneAuthenticator", "client_address"]
