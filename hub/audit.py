"""The append-only, hash-chained audit log.

Every decision and state change of the store is one :class:`~medzone_hub.models.AuditEvent`,
written in the same transaction as the change itself. Events carry a contiguous ``seq``
(1, 2, 3, …) and ``hash = sha256(canonical JSON of seq, time, actor, action, subject,
detail and prev_hash)``, where ``prev_hash`` is the previous event's hash (or
:data:`GENESIS_HASH` for the first). The one-row ``audit_head`` table holds the last
``seq`` and ``hash``, so that removing the newest events is noticed as well.

:func:`verify` recomputes the chain and names the first row that does not fit: edited,
missing, moved, or not matching the head.

The chain is unkeyed: someone able to rewrite the tables *and* recompute every hash
after the change is not detected by :func:`verify` alone. Recording the head hash
outside the database (a release record, a ticket, a print-out) closes that gap.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import AuditEvent, AuditHead, utcnow

#: ``prev_hash`` of the first event, and the head's hash while the log is empty.
GENESIS_HASH = "0" * 64

#: ``actor`` of changes the store makes on its own (e.g. grants expiring).
SYSTEM_ACTOR = "system"

_HEAD_ID = 1

_EVENT_COLUMNS = (
    AuditEvent.seq,
    AuditEvent.time,
    AuditEvent.actor,
    AuditEvent.action,
    AuditEvent.subject,
    AuditEvent.detail_json,
    AuditEvent.prev_hash,
    AuditEvent.hash,
)


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8 kept as is."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def format_time(time: datetime) -> str:
    """The ISO 8601 form of *time* in UTC that is hashed (microseconds, ``+00:00``)."""
    if time.tzinfo is None or time.utcoffset() is None:
        # astimezone() would take a naive time as local time: the hash would then
        # depend on the machine's zone.
        raise ValueError(f"naive datetime {time!r}: give a timezone-aware one")
    return time.astimezone(timezone.utc).isoformat(timespec="microseconds")


def event_hash(
    *,
    seq: int,
    time: datetime,
    actor: str,
    action: str,
    subject: str,
    detail_json: str,
    prev_hash: str,
) -> str:
    """The hash an event with these fields must carry.

    ``detail_json`` is hashed as the stored text; the time as :func:`format_time` writes
    it. Both are strings, so the result does not depend on the backend's column types.
    """
    payload = {
        "seq": seq,
        "time": format_time(time),
        "actor": actor,
        "action": action,
        "subject": subject,
        "detail": detail_json,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def _hash_of(event, *, seq: int | None = None) -> str:
    """The hash *event* (a model or a row with the same attributes) should carry."""
    return event_hash(
        seq=event.seq if seq is None else seq,
        time=event.time,
        actor=event.actor,
        action=event.action,
        subject=event.subject,
        detail_json=event.detail_json,
        prev_hash=event.prev_hash,
    )


def append(
    session: Session,
    *,
    actor: str,
    action: str,
    subject: str,
    detail: dict[str, Any],
    time: datetime | None = None,
) -> AuditEvent:
    """Add one event to the log in *session*'s transaction.

    The head row is locked first (``SELECT … FOR UPDATE`` on PostgreSQL; on SQLite the
    store's ``BEGIN IMMEDIATE`` already holds the database's write lock), so concurrent
    appends queue up instead of both claiming the same ``seq``. The lock is held until
    the caller's transaction ends: keep those transactions short.

    *time* defaults to now; service functions pass the ``now`` their decision used so the
    log and the decision agree on when it happened.
    """
    if not isinstance(detail, dict):
        raise TypeError(f"audit detail must be a dict, not {type(detail).__name__}")
    time = utcnow() if time is None else time
    format_time(time)  # refuses a naive time before anything is written
    detail_json = canonical_json(detail)

    head = session.execute(
        select(AuditHead)
        .where(AuditHead.id == _HEAD_ID)
        .with_for_update()
        # Another transaction may have moved the head since this session last saw it.
        .execution_options(populate_existing=True)
    ).scalar_one()

    seq = head.seq + 1
    event = AuditEvent(
        seq=seq,
        time=time.astimezone(timezone.utc),
        actor=actor,
        action=action,
        subject=subject,
        detail_json=detail_json,
        prev_hash=head.hash,
    )
    event.hash = _hash_of(event)
    session.add(event)
    head.seq = seq
    head.hash = event.hash
    session.flush()
    return event


def events(session: Session, *, subject: str | None = None) -> list[AuditEvent]:
    """Events in ``seq`` order, optionally only those about *subject*."""
    query = select(AuditEvent).order_by(AuditEvent.seq)
    if subject is not None:
        query = query.where(AuditEvent.subject == subject)
    return list(session.scalars(query))


@dataclass(frozen=True)
class AuditVerification:
    """What :func:`verify` found.

    ``first_bad`` is the ``seq`` of the first row that breaks the chain (for a removed
    row, the ``seq`` it had); ``reason`` is one line naming it. ``rows`` counts the rows
    present in the log.
    """

    ok: bool
    rows: int
    first_bad: int | None = None
    reason: str = "audit chain intact"

    def __bool__(self) -> bool:
        return self.ok


def verify(session: Session, *, batch_size: int = 1000) -> AuditVerification:
    """Recompute the chain from the first event and report the first row that is wrong."""
    count = session.scalar(select(func.count()).select_from(AuditEvent))
    head = session.execute(
        select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == _HEAD_ID)
    ).first()

    def bad(seq: int, reason: str) -> AuditVerification:
        return AuditVerification(ok=False, rows=count, first_bad=seq, reason=reason)

    expected_seq = 1
    prev_hash = GENESIS_HASH
    # Plain rows, not ORM objects: nothing lands in the caller's identity map, and long
    # logs stream through in batches.
    result = session.execute(
        select(*_EVENT_COLUMNS).order_by(AuditEvent.seq).execution_options(yield_per=batch_size)
    )
    try:
        for event in result:
            if event.seq != expected_seq:
                if event.seq < expected_seq:  # only a seq below 1 can get here
                    return bad(event.seq, f"audit row {event.seq} has a seq outside the chain")
                gap = (
                    f"row {expected_seq}"
                    if event.seq == expected_seq + 1
                    else f"rows {expected_seq} to {event.seq - 1}"
                )
                return bad(
                    expected_seq,
                    f"audit row {expected_seq} is missing: {gap} removed before row {event.seq}",
                )
            if _hash_of(event) != event.hash:
                return bad(event.seq, _mismatch_reason(session, event))
            if event.prev_hash != prev_hash:
                return bad(
                    event.seq,
                    f"audit row {event.seq} does not follow row {event.seq - 1}: its prev_hash "
                    f"is not that row's hash (a row before it was replaced)",
                )
            prev_hash = event.hash
            expected_seq += 1
    finally:
        result.close()

    last_seq = expected_seq - 1
    if head is None:
        return bad(
            last_seq + 1,
            "the audit head row is missing: removal of the newest rows cannot be ruled out",
        )
    if head.seq > last_seq:
        return bad(
            last_seq + 1,
            f"audit row {last_seq + 1} is missing: the audit head records {head.seq} rows "
            f"but the log ends at row {last_seq}",
        )
    if head.seq < last_seq:
        return bad(
            head.seq + 1,
            f"audit row {head.seq + 1} was not appended through the chain: "
            f"the audit head records only {head.seq} rows",
        )
    if head.hash != prev_hash:
        return bad(
            last_seq, f"audit row {last_seq} does not match the hash recorded in the audit head"
        )
    return AuditVerification(ok=True, rows=count)


def _mismatch_reason(session: Session, event) -> str:
    """Explain a row whose contents do not match its hash: edited, or moved from elsewhere.

    A moved row is intact but sits at another ``seq``: it still hashes correctly with the
    ``seq`` it was written with. The likeliest one (just after the row its ``prev_hash``
    names) is tried first, then every other ``seq`` the log has used; this costs one hash
    per row, and only on a log that is already known to be broken.
    """
    if event.prev_hash == GENESIS_HASH:
        likely = [1]
    else:
        predecessor = session.scalar(
            select(AuditEvent.seq).where(AuditEvent.hash == event.prev_hash).limit(1)
        )
        likely = [] if predecessor is None else [predecessor + 1]
    highest = max(
        session.scalar(select(func.max(AuditEvent.seq))) or 0,
        session.scalar(select(AuditHead.seq).where(AuditHead.id == _HEAD_ID)) or 0,
    )
    for original_seq in itertools.chain(likely, range(1, highest + 1)):
        if original_seq != event.seq and _hash_of(event, seq=original_seq) == event.hash:
            return (
                f"audit row {event.seq} is out of order: it holds the row written as "
                f"{original_seq} (rows reordered)"
            )
    return f"audit row {event.seq} was edited: its contents do not match its hash"
