"""Tables of the governance store.

The schema is created and changed only by the Alembic revisions in
``medzone_hub/migrations/versions``; a test checks that they and these models agree.
Rules about what may change live in the service modules, not here.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.ext.mutable import MutableList
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: Application states stored in ``access_applications.status``.
APPLICATION_STATUSES = ("pending", "approved", "rejected", "revoked", "expired")

#: Named constraints, so later migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL keeps the instant (``timestamptz``) but returns it in the session's zone;
    SQLite keeps no zone at all. Values are converted to UTC on the way in and come back
    aware in UTC, so comparisons and ISO strings are the same on both. Naive datetimes are
    refused: guessing their zone is how expiry times end up off by hours.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: give a timezone-aware one")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime}


class User(Base):
    """A hub account. ``name`` is the hub user name and never changes."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(default=False)
    #: An admin approved the sign-up; unapproved accounts may not apply or review.
    approved: Mapped[bool] = mapped_column(default=True)
    #: Extra capabilities, e.g. ``"data-steward"`` or ``"export-reviewer"``.
    roles: Mapped[list[str]] = mapped_column(MutableList.as_mutable(JSON), default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    applications: Mapped[list[AccessApplication]] = relationship(back_populates="user")

    def has_role(self, role: str) -> bool:
        return role in (self.roles or ())

    def __repr__(self) -> str:
        return f"<User {self.name}{' admin' if self.admin else ''}>"


class Dataset(Base):
    """A registered dataset: its stored copy is described by the manifest with this hash."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str] = mapped_column(Text)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    deidentified: Mapped[bool]
    n_files: Mapped[int]
    n_bytes: Mapped[int] = mapped_column(BigInteger)
    n_patients: Mapped[int]
    modalities: Mapped[list[str]] = mapped_column(JSON, default=list)
    registered_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"<Dataset {self.id}>"


#: Which datasets an access application asks for (and, once approved, grants).
application_datasets = Table(
    "access_application_datasets",
    Base.metadata,
    Column("application_id", ForeignKey("access_applications.id"), primary_key=True),
    Column("dataset_id", ForeignKey("datasets.id"), primary_key=True),
)


class AccessApplication(Base):
    """A user's application for datasets, and the grant it becomes when approved.

    ``status`` is what was last decided; whether a grant is live also depends on the
    time (see :func:`medzone_hub.access.application_state`).
    """

    __tablename__ = "access_applications"
    __table_args__ = (
        CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in APPLICATION_STATUSES) + ")",
            name="status",
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    purpose: Mapped[str] = mapped_column(Text)
    requested_days: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # Approval or rejection.
    decided_by: Mapped[str | None] = mapped_column(String(128))
    decided_at: Mapped[datetime | None]
    decision_reason: Mapped[str | None] = mapped_column(Text)
    granted_days: Mapped[int | None]
    expires_at: Mapped[datetime | None]

    # End of an approved grant before its expiry.
    revoked_by: Mapped[str | None] = mapped_column(String(128))
    revoked_at: Mapped[datetime | None]
    revoke_reason: Mapped[str | None] = mapped_column(Text)

    #: When :func:`medzone_hub.access.expire_due` recorded the expiry.
    expired_at: Mapped[datetime | None]

    # Loaded eagerly: faces print these after the session has closed.
    user: Mapped[User] = relationship(back_populates="applications", lazy="joined", innerjoin=True)
    datasets: Mapped[list[Dataset]] = relationship(
        secondary=application_datasets, lazy="selectin", order_by=Dataset.id
    )

    #: Not a column: the state at the ``now`` given to
    #: :func:`medzone_hub.access.list_applications`, set by it.
    state = None

    @property
    def dataset_ids(self) -> list[str]:
        return [dataset.id for dataset in self.datasets]

    def __repr__(self) -> str:
        return f"<AccessApplication {self.id} {self.status}>"


class AuditEvent(Base):
    """One row of the append-only, hash-chained audit log (see :mod:`medzone_hub.audit`).

    ``detail`` is stored as the exact JSON text that was hashed, so verifying does not
    depend on how a backend would re-serialise a JSON column.
    """

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    time: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(256), index=True)
    detail_json: Mapped[str] = mapped_column("detail", Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    @property
    def detail(self) -> dict[str, Any]:
        return json.loads(self.detail_json)

    def __repr__(self) -> str:
        return f"<AuditEvent {self.seq} {self.action} {self.subject}>"


class AuditHead(Base):
    """The single row recording the last audit event's ``seq`` and ``hash``.

    Updated in the same transaction as each append, so removing the newest events is
    detected; locking it serialises appends.
    """

    __tablename__ = "audit_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    seq: Mapped[int]
    hash: Mapped[str] = mapped_column(String(64))

    def __repr__(self) -> str:
        return f"<AuditHead {self.seq} {self.hash[:12]}>"
