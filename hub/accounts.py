"""Hub accounts as the governance store knows them: name, admin flag, approval, roles."""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import audit
from .errors import Conflict, InvalidInput, NotFound
from .models import User

#: May review access applications (besides admins).
ROLE_DATA_STEWARD = "data-steward"
#: May review export requests.
ROLE_EXPORT_REVIEWER = "export-reviewer"

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
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise Conflict(f"user {name!r} already exists")
    user = User(name=name, admin=bool(admin), approved=bool(approved), roles=roles)
    try:
        # A savepoint, so losing a race with a concurrent add leaves the caller's
        # transaction usable and reads as the same Conflict.
        with session.begin_nested():
            session.add(user)
    except IntegrityError:
        raise Conflict(f"user {name!r} already exists") from None
    audit.append(
        session,
        actor=actor,
        action="user.add",
        subject=f"user:{name}",
        detail={"admin": user.admin, "approved": user.approved, "roles": roles},
    )
    return user


def get_user(session: Session, name: str) -> User:
    """The account *name*; :class:`NotFound` if there is none."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"user {name!r} does not exist")
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))
