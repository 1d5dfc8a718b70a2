"""Access to datasets: applications, decisions on them, and the grants they become.

Every rule about who may see which dataset, and until when, lives here; the CLI, the
portal and the spawner call these functions and add none of their own.

Life of an application::

    pending --approve--> approved --(expires_at passes)--> expired
       |                    |
       +--reject--> rejected +--revoke--> revoked

A grant is *live* only while its state (see :func:`application_state`) is ``approved``:
the status column says ``approved`` and the expiry time has not passed. Expiry takes
effect at ``expires_at`` whether or not :func:`expire_due` has recorded it yet.

Functions taking ``now`` use it as the time of the decision (default: the current time);
it must be timezone-aware.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import audit
from .accounts import ROLE_DATA_STEWARD, get_user
from .errors import Conflict, InvalidInput, NotFound, RuleViolation
from .models import AccessApplication, AuditEvent, Dataset, User, as_utc
from .registry import get_dataset, validate_dataset_id

DEFAULT_DAYS = 90
MIN_DAYS = 1
MAX_DAYS = 3650

#: Stored as the reason of a decision made without one.
NO_REASON = "no reason given"




def _days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int):
        raise InvalidInput(f"days must be a whole number, not {days!r}")
    if not MIN_DAYS <= days <= MAX_DAYS:
        raise InvalidInput(f"days must be between {MIN_DAYS} and {MAX_DAYS}, not {days}")
    return days


def _name(what: str, name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(f"{what} must be named")
    return name


def _reason(reason: str | None) -> str:
    return (reason or "").strip() or NO_REASON


def application_state(app: AccessApplication, now: datetime | None = None) -> str:
    """``pending``, ``approved``, ``rejected``, ``revoked`` or ``expired`` at *now*.

    An approved grant whose expiry has passed is ``expired`` even before
    :func:`expire_due` has updated its status.
    """
    if app.status != "approved":
        return app.status
    # revoke() sets both status and revoked_at: a status set back by hand must not
    # restore access. Likewise approve() always sets an expiry; without one, fail closed.
    if app.revoked_at is not None:
        return "revoked"
    if app.expires_at is None or app.expires_at <= as_utc(now):
        return "expired"
    return "approved"


def get_application(session: Session, application_id: int) -> AccessApplication:
    """The application *application_id*; :class:`NotFound` if there is none."""
    return _get(session, application_id, lock=False)


def _get(session: Session, application_id: int, *, lock: bool) -> AccessApplication:
    if isinstance(application_id, bool) or not isinstance(application_id, int):
        raise InvalidInput(f"application id must be a whole number, not {application_id!r}")
    query = select(AccessApplication).where(AccessApplication.id == application_id)
    if lock:
        # Two reviewers deciding the same application at once: the second waits, then
        # sees the first decision (PostgreSQL; SQLite serialises whole transactions).
        query = query.with_for_update(of=AccessApplication).execution_options(
            populate_existing=True
        )
    app = session.scalar(query)
    if app is None:
        raise NotFound(f"access application {application_id} does not exist")
    return app


def _check_reviewer(session: Session, reviewer: str, app: AccessApplication) -> User:
    """The reviewer deciding *app*, if they may; else :class:`RuleViolation`."""
    user = get_user(session, _name("the reviewer", reviewer))
    if not user.approved:
        raise RuleViolation(f"reviewer {reviewer!r} is not an approved user")
    if not (user.admin or user.has_role(ROLE_DATA_STEWARD)):
        raise RuleViolation(
            f"{reviewer!r} may not review access applications: only admins and "
            f"holders of the {ROLE_DATA_STEWARD!r} role may"
        )
    if user.id == app.user_id:
        raise RuleViolation(f"{reviewer!r} may not decide their own application {app.id}")
    return user


def _subject(app: AccessApplication) -> str:
    return f"application:{app.id}"


def apply(
    session: Session,
    *,
    user: str,
    dataset_ids: Iterable[str],
    purpose: str,
    days: int = DEFAULT_DAYS,
    now: datetime | None = None,
) -> AccessApplication:
    """Apply as *user* for *dataset_ids*, for *purpose*, for *days* days once approved."""
    now = as_utc(now)
    if isinstance(dataset_ids, str):
        dataset_ids = [dataset_ids]
    ids = list(dict.fromkeys(dataset_ids))  # drop repeats, keep the order given
    if not ids:
        raise InvalidInput("name at least one dataset to apply for")
    for dataset_id in ids:
        validate_dataset_id(dataset_id)
    purpose = (purpose or "").strip() if isinstance(purpose, str) else ""
    if not purpose:
        raise InvalidInput("the purpose of the application must not be empty")
    days = _days(days)

    applicant = get_user(session, _name("the applicant", user))
    if not applicant.approved:
        raise RuleViolation(
            f"user {user!r} is not approved yet: an admin must approve the account first"
        )
    datasets = [get_dataset(session, dataset_id) for dataset_id in ids]

    app = AccessApplication(
        user=applicant,
        datasets=datasets,
        purpose=purpose,
        requested_days=days,
        status="pending",
        created_at=now,
    )
    session.add(app)
    session.flush()
    audit.append(
        session,
        actor=applicant.name,
        action="access.apply",
        subject=_subject(app),
        detail={"user": applicant.name, "datasets": ids, "purpose": purpose, "days": days},
        time=now,
    )
    return app


def approve(
    session: Session,
    application_id: int,
    *,
    reviewer: str,
    days: int | None = None,
    reason: str | None = None,
    now: datetime | None = None,
) -> AccessApplication:
    """Approve a pending application; the grant expires *days* (default: as requested) from now."""
    now = as_utc(now)
    app = _decide(session, application_id, reviewer, "approved", reason, now)
    days = app.requested_days if days is None else _days(days)
    app.granted_days = days
    app.expires_at = now + timedelta(days=days)
    audit.append(
        session,
        actor=reviewer,
        action="access.approve",
        subject=_subject(app),
        detail={
            "user": app.user.name,
            "datasets": app.dataset_ids,
            "days": days,
            "expires_at": audit.format_time(app.expires_at),
            "reason": app.decision_reason,
        },
        time=now,
    )
    return app


def reject(
    session: Session,
    application_id: int,
    *,
    reviewer: str,
    reason: str | None = None,
    now: datetime | None = None,
) -> AccessApplication:
    """Reject a pending application."""
    now = as_utc(now)
    app = _decide(session, application_id, reviewer, "rejected", reason, now)
    audit.append(
        session,
        actor=reviewer,
        action="access.reject",
        subject=_subject(app),
        detail={"user": app.user.name, "datasets": app.dataset_ids, "reason": app.decision_reason},
        time=now,
    )
    return app


def _decide(session: Session, application_id: int, reviewer: str, status: str,
            reason: str | None, now: datetime) -> AccessApplication:
    """Lock a pending application, check *reviewer* may decide it and record the decision."""
    app = _get(session, application_id, lock=True)
    _check_reviewer(session, reviewer, app)
    _check_pending(app, now, status)
    app.status = status
    app.decided_by = reviewer
    app.decided_at = now
    app.decision_reason = _reason(reason)
    return app


def _check_pending(app: AccessApplication, now: datetime, verb: str) -> None:
    state = application_state(app, now)
    if state != "pending":
        raise Conflict(
            f"access application {app.id} is {state}: only pending applications can be {verb}"
        )


def revoke(
    session: Session,
    application_id: int,
    *,
    actor: str,
    reason: str | None = None,
    now: datetime | None = None,
) -> AccessApplication:
    """End a live grant before its expiry."""
    now = as_utc(now)
    _name("whoever revokes", actor)
    app = _get(session, application_id, lock=True)
    state = application_state(app, now)
    if state != "approved":
        raise Conflict(
            f"access application {app.id} is {state}: only a live approved grant can be revoked"
        )

    app.status = "revoked"
    app.revoked_by = actor
    app.revoked_at = now
    app.revoke_reason = _reason(reason)
    audit.append(
        session,
        actor=actor,
        action="access.revoke",
        subject=_subject(app),
        detail={"user": app.user.name, "datasets": app.dataset_ids, "reason": app.revoke_reason},
        time=now,
    )
    return app


@dataclass(frozen=True)
class ApplicationAt:
    """An application and its :func:`application_state` at one moment, for faces that show
    both; every other attribute is the application's."""

    application: AccessApplication
    state: str

    def __getattr__(self, name: str):
        return getattr(self.application, name)


def list_applications(
    session: Session, *, user: str | None = None, now: datetime | None = None
) -> list[ApplicationAt]:
    """Applications by id, optionally only *user*'s, each with its state at *now*."""
    now = as_utc(now)
    query = select(AccessApplication).order_by(AccessApplication.id)
    if user is not None:
        query = query.where(AccessApplication.user_id == get_user(session, user).id)
    return [ApplicationAt(app, application_state(app, now)) for app in session.scalars(query)]


def live_grants(session: Session, user: str, now: datetime | None = None) -> list[str]:
    """Ids of the datasets *user* may read at *now*, sorted.

    Empty for an unknown or unapproved account: a spawner asking about someone the store
    does not know (or no longer trusts) mounts nothing.
    """
    now = as_utc(now)
    account = session.scalar(select(User).where(User.name == user))
    if account is None or not account.approved:
        return []
    candidates = session.scalars(
        select(AccessApplication).where(
            AccessApplication.user_id == account.id,
            AccessApplication.status == "approved",
        )
    )
    # The status column alone is not enough: application_state also checks the expiry.
    live = {
        dataset_id
        for app in candidates
        if application_state(app, now) == "approved"
        for dataset_id in app.dataset_ids
    }
    return sorted(live)


#: Application states of a grant that was once given (whatever became of it since).
HELD_STATES = ("approved", "expired", "revoked")


def screening_datasets(session: Session, user: str) -> list[str]:
    """Ids of every dataset an export request by *user* is screened against, sorted.

    A grant that ends does not take the data out of the home: a slice saved while it was
    live stays there. So this is every dataset *user* has *ever* held a grant on
    (approved, expired or revoked, whatever its state is now) and every dataset the
    provenance of their files names (the dataset parameters recorded by their template
    runs, ``run.execute`` in the audit log), not only :func:`live_grants`. Datasets no
    longer in the registry are left out (their index is gone with them).
    """
    account = session.scalar(select(User).where(User.name == user))
    if account is None:
        return []
    held = {
        dataset_id
        for app in session.scalars(select(AccessApplication).where(
            AccessApplication.user_id == account.id,
            AccessApplication.status.in_(HELD_STATES)))
        for dataset_id in (app.dataset_ids or ())
    }
    for detail in session.scalars(select(AuditEvent.detail_json).where(
            AuditEvent.action == "run.execute", AuditEvent.actor == user)):
        try:
            parameters = json.loads(detail).get("parameters") or {}
        except (ValueError, AttributeError):
            continue
        if isinstance(parameters, dict):
            held.update(value for name, value in parameters.items()
                        if _names_dataset(name) and isinstance(value, str) and value)
    if not held:
        return []
    known = set(session.scalars(select(Dataset.id).where(Dataset.id.in_(sorted(held)))))
    return sorted(held & known)


def _names_dataset(parameter: str) -> bool:
    """Whether a template parameter names a dataset (as :func:`medzone_hub.runner.is_dataset_parameter`)."""
    return parameter == "dataset" or parameter.endswith("_dataset")


def expire_due(session: Session, now: datetime | None = None) -> list[AccessApplication]:
    """Record the expiry of approved grants whose time has passed; one audit row each."""
    now = as_utc(now)
    due = session.scalars(
        select(AccessApplication)
        .where(AccessApplication.status == "approved", AccessApplication.expires_at <= now)
        .order_by(AccessApplication.id)
        .with_for_update(of=AccessApplication)
        .execution_options(populate_existing=True)
    ).all()
    expired = []
    for app in due:
        if application_state(app, now) != "expired":
            continue
        app.status = "expired"
        app.expired_at = now
        audit.append(
            session,
            actor=audit.SYSTEM_ACTOR,
            action="access.expire",
            subject=_subject(app),
            detail={
                "user": app.user.name,
                "datasets": app.dataset_ids,
                "expires_at": audit.format_time(app.expires_at),
            },
            time=now,
        )
        expired.append(app)
    return expired
