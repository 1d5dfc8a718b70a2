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
    Float,
    ForeignKey,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
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


def as_utc(now: datetime | None) -> datetime:
    """*now* (default: the current time) in UTC; a naive datetime is refused, because a
    decision's time must not depend on the machine's time zone."""
    if now is None:
        return utcnow()
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"naive datetime {now!r}: give a timezone-aware one")
    return now.astimezone(timezone.utc)


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


# --- the export airlock (see medzone_hub.airlock) -----------------------------------------

#: States of an export request (``export_requests.state``); see :mod:`medzone_hub.airlock`.
EXPORT_STATES = ("pending", "blocked", "approved", "rejected", "released")
#: Screen verdicts, per file and per request.
EXPORT_VERDICTS = ("pass", "review", "block")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


class ExportPolicy(Base):
    """Per-dataset export settings: approvals a flagged (``review``) request needs."""

    __tablename__ = "export_policies"
    __table_args__ = (CheckConstraint("review_approvals >= 1", name="review_approvals"),)

    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), primary_key=True)
    review_approvals: Mapped[int] = mapped_column(default=2)
    updated_by: Mapped[str] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ExportRequest(Base):
    """A request to take files out of the zone, and the quarantine copy it points to.

    A row exists only once its quarantine folder ``MEDZONE_HOME/airlock/<id>`` is complete.
    ``screen_report`` is the exact JSON text whose sha256 is ``screen_report_sha256``.
    """

    __tablename__ = "export_requests"
    __table_args__ = (
        CheckConstraint(_in("state", EXPORT_STATES), name="state"),
        CheckConstraint(_in("verdict", EXPORT_VERDICTS), name="verdict"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    reason: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    verdict: Mapped[str] = mapped_column(String(8))
    #: Datasets the requester held live grants for: their indexes screened the files.
    dataset_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    approvals_required: Mapped[int]
    screen_report: Mapped[str] = mapped_column(Text)
    screen_report_sha256: Mapped[str] = mapped_column(String(64))
    #: Rule settings and tool versions the screen ran with.
    screen_settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[datetime | None]
    released_at: Mapped[datetime | None]
    #: Path of the file (one of ``files``) that is the requester's disclosure-risk report;
    #: a request holding model weights cannot be approved without one.
    risk_report_path: Mapped[str | None] = mapped_column(String(1024))

    user: Mapped[User] = relationship(lazy="joined", innerjoin=True)
    files: Mapped[list[ExportFile]] = relationship(
        back_populates="request", lazy="selectin", order_by="ExportFile.path"
    )
    reviews: Mapped[list[ExportReview]] = relationship(
        back_populates="request", lazy="selectin", order_by="ExportReview.id"
    )

    def __repr__(self) -> str:
        return f"<ExportRequest {self.id} {self.state} {self.verdict}>"


class ExportFile(Base):
    """One file of a request: its path in the requester's home and the quarantine copy's hash."""

    __tablename__ = "export_files"
    __table_args__ = (
        UniqueConstraint("request_id", "path"),
        CheckConstraint(_in("verdict", EXPORT_VERDICTS), name="verdict"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("export_requests.id"), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    verdict: Mapped[str] = mapped_column(String(8))
    findings: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)

    request: Mapped[ExportRequest] = relationship(back_populates="files")

    def __repr__(self) -> str:
        return f"<ExportFile {self.request_id}:{self.path} {self.verdict}>"


class ExportReview(Base):
    """One reviewer's decision on a request; a reviewer decides a request at most once."""

    __tablename__ = "export_reviews"
    __table_args__ = (UniqueConstraint("request_id", "reviewer_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("export_requests.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    approve: Mapped[bool]
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    request: Mapped[ExportRequest] = relationship(back_populates="reviews")
    reviewer: Mapped[User] = relationship(lazy="joined", innerjoin=True)

    def __repr__(self) -> str:
        return f"<ExportReview {self.request_id} {self.reviewer_id} {self.approve}>"


#: Run states stored in ``runs.state``: ``queued`` (prepared, not yet executing),
#: ``running``, and the three ends.
RUN_STATES = ("queued", "running", "done", "failed", "cancelled")


class Run(Base):
    """A template run: what was asked, where it writes, how it ended.

    ``run_dir`` and ``output`` are relative to the user's home. While a run executes,
    ``runner_pid``/``runner_start`` name the process executing it (a run whose process is
    gone is marked failed) and ``sandbox_pid``/``sandbox_start`` the sandbox's bubblewrap
    monitor (what a cancel kills); a start time is the kernel's, from ``/proc/<pid>/stat``,
    so a reused pid is never mistaken for the run's process.
    """

    __tablename__ = "runs"
    __table_args__ = (CheckConstraint(_in("state", RUN_STATES), name="state"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    template: Mapped[str] = mapped_column(String(255))
    template_sha256: Mapped[str] = mapped_column(String(64))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), index=True)
    run_dir: Mapped[str] = mapped_column(String(1024))
    output: Mapped[str] = mapped_column(String(1024))
    output_sha256: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    runner_pid: Mapped[int | None]
    runner_start: Mapped[int | None] = mapped_column(BigInteger)
    sandbox_pid: Mapped[int | None]
    sandbox_start: Mapped[int | None] = mapped_column(BigInteger)
    #: The executor that runs it (``local``, ``slurm``: :mod:`medzone_hub.executors`) and
    #: its job there once submitted; a queued run with no job is waiting for a slot.
    executor: Mapped[str] = mapped_column(String(32), default="local", server_default="local")
    executor_job: Mapped[str | None] = mapped_column(String(255))
    #: What the run needs: ``{"gpu": "none"|"optional"|"required", "cpus": int,
    #: "memory_bytes": int, "time_limit_s": int}`` (the template's, capped by the zone).
    needs: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: When it joined the queue (its place in its user's line) and when a worker took it.
    queued_at: Mapped[datetime | None]
    claimed_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(lazy="joined", innerjoin=True)

    def __repr__(self) -> str:
        return f"<Run {self.id} {self.template} {self.state}>"


# --- metering (medzone_hub.usage) ----------------------------------------------------------

#: What a usage row meters: a template run or an interactive server session.
USAGE_KINDS = ("run", "session")

#: Which datasets a usage row is attributed to (each mounted in the sandbox).
usage_datasets = Table(
    "usage_datasets",
    Base.metadata,
    Column("usage_id", ForeignKey("usage.id"), primary_key=True),
    Column("dataset_id", ForeignKey("datasets.id"), primary_key=True, index=True),
)


class UsageRecord(Base):
    """What one run or one server session used (:mod:`medzone_hub.metering`).

    ``ref`` names it once (``run:<id>``, ``session:<user>/<server>@<pid>:<start>``): it is
    recorded once. A quantity not measured (no NVML, no GPU, no CPU accounting) is NULL,
    never 0. ``sources`` says where each measured quantity came from.
    """

    __tablename__ = "usage"
    __table_args__ = (CheckConstraint(_in("kind", USAGE_KINDS), name="kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    ref: Mapped[str] = mapped_column(String(255), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), index=True)
    server: Mapped[str | None] = mapped_column(String(255))
    template: Mapped[str | None] = mapped_column(String(255), index=True)
    started_at: Mapped[datetime] = mapped_column(index=True)
    ended_at: Mapped[datetime]
    wall_s: Mapped[float] = mapped_column(Float)
    cpu_s: Mapped[float | None] = mapped_column(Float)
    mem_peak_bytes: Mapped[int | None] = mapped_column(BigInteger)
    gpu_s: Mapped[float | None] = mapped_column(Float)
    gpu_mem_peak_bytes: Mapped[int | None] = mapped_column(BigInteger)
    energy_j: Mapped[float | None] = mapped_column(Float)
    sources: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    user: Mapped[User] = relationship(lazy="joined", innerjoin=True)
    datasets: Mapped[list[Dataset]] = relationship(secondary=usage_datasets, lazy="selectin")

    def __repr__(self) -> str:
        return f"<UsageRecord {self.ref}>"


class DatasetProvider(Base):
    """A data provider's account bound to a dataset it supplied: it sees that dataset's
    usage and runs (``medzone dataset provider add``)."""

    __tablename__ = "dataset_providers"

    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True, index=True)
    added_by: Mapped[str] = mapped_column(String(128))
    added_at: Mapped[datetime] = mapped_column(default=utcnow)

    user: Mapped[User] = relationship(lazy="joined", innerjoin=True)
