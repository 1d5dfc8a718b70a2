"""Hub accounts: the store's accounts (name, admin flag, approval, roles), their sign-ups
and passwords at the hub, and the one rule for who decides about them.

The store is the source of truth; NativeAuthenticator's sign-up table in the hub's own
database holds the password and mirrors the approval. :func:`decide_account` changes both
in one step, and the hub's accounts page (:mod:`medzone_hub.authenticator`) and the
portal's steward queue both call it; :func:`set_password` is what ``medzone user
password`` calls.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import bcrypt
from sqlalchemy import select
from sqlalchemy.orm import Session

from . import audit
from .config import MedZoneHome, ensure_hub_state
from .db import add_unique, open_store
from .errors import Conflict, InvalidInput, NotFound, RuleViolation
from .models import User

if TYPE_CHECKING:
    from nativeauthenticator.orm import UserInfo

#: May review access applications (besides admins).
ROLE_DATA_STEWARD = "data-steward"
#: May review export requests.
ROLE_EXPORT_REVIEWER = "export-reviewer"
#: Supplied datasets: sees their usage and runs (bound by ``medzone dataset provider add``).
ROLE_DATA_PROVIDER = "data-provider"

#: The minimum password length when the config does not set one.
DEFAULT_MIN_PASSWORD_LENGTH = 8

_NAME = re.compile(r"[a-z0-9_-]{1,64}")
_ROLE = re.compile(r"[a-z][a-z0-9-]{0,63}")

#: Names that would read as something else in the audit log.
RESERVED_NAMES = frozenset({audit.SYSTEM_ACTOR})


def validate_user_name(name: str) -> str:
    """Return *name* if it is a valid hub user name, else raise :class:`InvalidInput`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid user name {name!r}: use 1-64 lowercase letters, digits, '-' or '_'"
        )
    return name


def validate_role(role: str) -> str:
    if not isinstance(role, str) or not _ROLE.fullmatch(role):
        raise InvalidInput(f"invalid role {role!r}: use lowercase letters, digits and '-'")
    return role


def add_user(
    session: Session,
    name: str,
    *,
    admin: bool = False,
    roles: Iterable[str] = (),
    approved: bool = True,
    actor: str,
) -> User:
    """Create the account *name*; :class:`Conflict` if it exists."""
    validate_user_name(name)
    if name in RESERVED_NAMES:
        raise InvalidInput(f"user name {name!r} is reserved")
    roles = sorted({validate_role(role) for role in roles})
    exists = f"user {name!r} already exists"
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise Conflict(exists)
    user = User(name=name, admin=bool(admin), approved=bool(approved), roles=roles)
    add_unique(session, user, exists)
    audit.append(
        session,
        actor=actor,
        action="user.add",
        subject=f"user:{name}",
        detail={"admin": user.admin, "approved": user.approved, "roles": roles},
    )
    return user


def find_user(session: Session, name: str) -> User | None:
    """The account *name*, or None."""
    return session.scalar(select(User).where(User.name == name))


def get_user(session: Session, name: str) -> User:
    """The account *name*; :class:`NotFound` if there is none."""
    user = find_user(session, name)
    if user is None:
        raise NotFound(f"user {name!r} does not exist")
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))


# --- passwords -------------------------------------------------------------------------

def hash_password(password: str) -> bytes:
    """A new bcrypt hash of *password* (slow on purpose: call it off the event loop)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt())


def check_password(password: str, hashed: bytes) -> bool:
    """Whether *password* matches the bcrypt hash *hashed* (slow: off the event loop)."""
    try:
        return bcrypt.checkpw(password.encode(), hashed)
    except ValueError:  # not a bcrypt hash
        return False


# --- sign-ups and approval -------------------------------------------------------------

def approve_account(session, name: str, *, actor: str, via: str = "hub") -> User:
    """Approve *name* in the store (creating an approved account if there is none)."""
    account = find_user(session, name)
    if account is None:
        return add_user(session, name, approved=True, actor=actor)
    if not account.approved:
        account.approved = True
        audit.append(session, actor=actor, action="user.approve", subject=f"user:{name}",
                     detail={"via": via})
    return account


def unapprove_account(session, name: str, *, actor: str, via: str = "hub") -> User | None:
    """Withdraw *name*'s approval in the store: no login, no spawn, no grants mounted."""
    account = find_user(session, name)
    if account is not None and account.approved:
        account.approved = False
        audit.append(session, actor=actor, action="user.unapprove", subject=f"user:{name}",
                     detail={"via": via})
    return account


def hub_db_factory(home: MedZoneHome):
    """Sessions on the hub's own database (where NativeAuthenticator keeps sign-ups and
    passwords), creating it the way JupyterHub would: for code outside the hub process."""
    # JupyterHub's and NativeAuthenticator's tables load here, not with the module: the
    # commands and services that never open the hub's database start without them.
    from jupyterhub import orm as hub_orm
    from nativeauthenticator.orm import UserInfo  # noqa: F401 - its table is created too

    db_path = ensure_hub_state(home).hub_db_path
    factory = hub_orm.new_session_factory(f"sqlite:///{db_path}")
    db_path.chmod(0o600)
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
    account = find_user(session, name)
    if account is None or not account.approved:
        raise RuleViolation(f"{name!r} is not an approved user")
    if not (account.admin or account.has_role(ROLE_DATA_STEWARD)):
        raise RuleViolation(f"{name!r} may not decide accounts: only admins and "
                            f"{ROLE_DATA_STEWARD}s may")
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
    from nativeauthenticator.orm import UserInfo

    account = find_user(session, name)
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
    if not isinstance(password, str) or len(password) < min_length:
        raise InvalidInput(f"a password needs at least {min_length} characters")
    with open_store(home).session() as session:
        account = get_user(session, name)
        if not account.approved:
            raise RuleViolation(f"user {name!r} is not approved; approve the account first")
        from nativeauthenticator.orm import UserInfo

        db = _hub_db(home)
        try:
            info = UserInfo.find(db, name)
            hashed = hash_password(password)
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
