"""Usage: what every run and server session used, and who may see it.

:mod:`medzone_hub.metering` measures a sandbox; this service records the measurement once
per run (:func:`record_run_usage`, in the transaction that ends the run) and once per
server session (:func:`record_server_usage`, when the spawner stops the server), each row
attributed to its user, its template (runs) and every dataset mounted in the sandbox.

Reports (:func:`usage_report`) group rows by user, dataset, template or month; ``medzone
usage`` and the portal's usage pages both call it. Who sees what (:func:`visible_datasets`):
admins and data stewards see everything; a **data provider** (the ``data-provider`` role,
bound to the datasets it supplied by :func:`bind_provider` — ``medzone dataset provider
add ID USER``) sees the usage and runs of those datasets only; anyone else is refused.

A quantity that was not measured stays ``None`` in every row and total (shown as ``—``),
never 0: a total is the sum of the rows that measured it, ``None`` when none did.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select

from . import audit, metering
from .accounts import ROLE_DATA_PROVIDER, ROLE_DATA_STEWARD, get_user, validate_user_name
from .db import open_store
from .errors import Conflict, InvalidInput, NotFound, RuleViolation
from .models import DatasetProvider, Run, UsageRecord, User, as_utc, usage_datasets, utcnow
from .registry import get_dataset
from .sandbox import cgroup_members

log = logging.getLogger(__name__)

#: How ``medzone usage --by`` may group rows.
GROUPINGS = ("user", "dataset", "template", "month")

#: The measured quantities of a row: summed in a report (peaks: the largest).
SUMMED = ("wall_s", "cpu_s", "gpu_s", "energy_j")
PEAKS = ("mem_peak_bytes", "gpu_mem_peak_bytes")

#: A CLI actor starting with this is the zone's operator (never a hub user name).
OPERATOR_PREFIX = "cli:"


# --- recording ------------------------------------------------------------------------------

def _add(session, *, kind: str, ref: str, user: User, measured: metering.Usage,
         run_id: int | None = None, server: str | None = None,
         template: str | None = None) -> UsageRecord | None:
    """One usage row (and its datasets), unless *ref* was recorded already."""
    if session.scalar(select(UsageRecord.id).where(UsageRecord.ref == ref)) is not None:
        return None
    row = UsageRecord(
        kind=kind, ref=ref, user=user, run_id=run_id, server=server, template=template,
        started_at=as_utc(measured.started), ended_at=as_utc(measured.ended),
        wall_s=float(measured.wall_s), cpu_s=measured.cpu_s,
        mem_peak_bytes=measured.mem_peak_bytes, gpu_s=measured.gpu_s,
        gpu_mem_peak_bytes=measured.gpu_mem_peak_bytes, energy_j=measured.energy_j,
        sources=dict(measured.sources))
    for dataset_id in sorted(set(measured.datasets)):
        with contextlib.suppress(NotFound):  # a dataset removed meanwhile is not attributed
            row.datasets.append(get_dataset(session, dataset_id))
    session.add(row)
    session.flush()
    return row


def record_run_usage(session, run, measured: metering.Usage | None = None) -> UsageRecord | None:
    """Record what *run* (a :class:`~medzone_hub.models.Run` that has ended) used, in the
    caller's transaction (the one that ends the run): *measured*, by default what the
    last sandbox of this thread used (:func:`medzone_hub.metering.take_last`). A run that
    never reached its sandbox gets its wall time only. Recorded once per run; never raises
    (metering must not stop a run from ending: a failure is logged)."""
    try:
        with session.begin_nested():
            if measured is None:
                measured = metering.take_last(since=run.started_at)
            if measured is None:
                if run.started_at is None:
                    return None  # never started (cancelled in the queue): nothing used
                ended = run.finished_at or utcnow()
                measured = metering.Usage(
                    started=run.started_at, ended=ended,
                    wall_s=max(0.0, (ended - run.started_at).total_seconds()),
                    sources={"wall_s": "the run's start and end times"})
            return _add(session, kind="run", ref=f"run:{run.id}", user=run.user,
                        measured=measured, run_id=run.id, template=run.template)
    except Exception:  # noqa: BLE001 - logged; the run's end is committed regardless
        log.exception("could not record the usage of run %s", getattr(run, "id", "?"))
        return None


def record_session_usage(session, user: str, server: str, measured: metering.Usage,
                         ref: str) -> UsageRecord | None:
    """Record what *user*'s server *server* used (once per *ref*)."""
    return _add(session, kind="session", ref=ref, user=get_user(session, user),
                measured=measured, server=server)


def record_server_usage(spawner) -> None:
    """What the spawner's server has used, measured now (call it just before the sandbox is
    stopped) and recorded once. *spawner* is a
    :class:`~medzone_hub.spawner.SafeZoneSpawner`: its persisted state names the sandbox
    (pid 1 and its start time, the cgroup, the datasets mounted). Never raises."""
    try:
        child_pid, child_start = spawner.child_pid, spawner.child_start
        if not child_pid:
            return
        user, server = spawner.user.name, spawner.name or ""
        ref = f"session:{user}/{server}@{child_pid}:{child_start}"
        store = open_store(spawner.home)
        with store.session() as session:
            if session.scalar(select(UsageRecord.id).where(UsageRecord.ref == ref)):
                return
        cgroup = spawner.cgroup or None
        folders = _cgroup_folders(cgroup)
        measured = metering.measure_tree(child_pid, child_start, folders,
                                         datasets=spawner.mounted or ())
        with store.session() as session:
            record_session_usage(session, user, server, measured, ref)
    except Exception:  # noqa: BLE001 - logged; the server stops regardless
        log.exception("could not record the usage of a server of %s",
                      getattr(getattr(spawner, "user", None), "name", "?"))


def _cgroup_folders(cgroup: str | None) -> list:
    return cgroup_members(cgroup) if cgroup else []


# --- data providers ---------------------------------------------------------------------------

def _may_manage(session, actor: str) -> None:
    if actor.startswith(OPERATOR_PREFIX):
        return
    try:
        account = get_user(session, actor)
    except NotFound:
        account = None
    if account is None or not (account.admin or account.has_role(ROLE_DATA_STEWARD)):
        raise RuleViolation(f"{actor} may not bind data providers: only an admin or a data "
                            "steward may")


def bind_provider(session, dataset_id: str, user: str, *, actor: str) -> DatasetProvider:
    """Bind *user* as a provider of *dataset_id* (giving them the ``data-provider`` role),
    audited ``dataset.provider.add``. Only an admin, a data steward or the operator."""
    _may_manage(session, actor)
    dataset = get_dataset(session, dataset_id)
    account = get_user(session, validate_user_name(user))
    if session.get(DatasetProvider, (dataset.id, account.id)) is not None:
        raise Conflict(f"{user} is already a provider of dataset {dataset_id}")
    if not account.has_role(ROLE_DATA_PROVIDER):
        account.roles = sorted({*(account.roles or ()), ROLE_DATA_PROVIDER})
    binding = DatasetProvider(dataset_id=dataset.id, user=account, added_by=actor)
    session.add(binding)
    audit.append(session, actor=actor, action="dataset.provider.add",
                 subject=f"dataset:{dataset.id}", detail={"user": account.name})
    session.flush()
    return binding


def unbind_provider(session, dataset_id: str, user: str, *, actor: str) -> None:
    """Undo :func:`bind_provider`; the role goes when the user provides no dataset any more."""
    _may_manage(session, actor)
    account = get_user(session, user)
    binding = session.get(DatasetProvider, (dataset_id, account.id))
    if binding is None:
        raise NotFound(f"{user} is not a provider of dataset {dataset_id}")
    session.delete(binding)
    session.flush()
    if not provider_datasets(session, user):
        account.roles = [r for r in account.roles or () if r != ROLE_DATA_PROVIDER]
    audit.append(session, actor=actor, action="dataset.provider.remove",
                 subject=f"dataset:{dataset_id}", detail={"user": account.name})


def list_providers(session, dataset_id: str | None = None) -> list[DatasetProvider]:
    query = select(DatasetProvider).order_by(DatasetProvider.dataset_id, DatasetProvider.user_id)
    if dataset_id is not None:
        query = query.where(DatasetProvider.dataset_id == dataset_id)
    return list(session.scalars(query))


def provider_datasets(session, user: str) -> list[str]:
    """The datasets *user* is bound to as a provider."""
    return sorted(session.scalars(select(DatasetProvider.dataset_id).join(DatasetProvider.user)
                                  .where(User.name == user)))


def visible_datasets(session, viewer: str | None) -> set[str] | None:
    """Whose usage *viewer* may see: ``None`` for everything (no *viewer*: the operator at
    the command line; an admin or a data steward), their datasets for a data provider;
    :class:`RuleViolation` (403) for anyone else."""
    if viewer is None:
        return None
    try:
        account = get_user(session, viewer)
    except NotFound:
        account = None
    if account is not None and account.approved:
        if account.admin or account.has_role(ROLE_DATA_STEWARD):
            return None
        if account.has_role(ROLE_DATA_PROVIDER):
            return set(provider_datasets(session, viewer))
    raise RuleViolation(f"{viewer} may not see usage: it needs the {ROLE_DATA_STEWARD!r} or "
                        f"{ROLE_DATA_PROVIDER!r} role")


def check_dataset_visible(session, viewer: str | None, dataset_id: str) -> None:
    """:class:`RuleViolation` (403) unless *viewer* may see *dataset_id*'s usage."""
    visible = visible_datasets(session, viewer)
    if visible is not None and dataset_id not in visible:
        raise RuleViolation(f"{viewer} is not a provider of dataset {dataset_id}")


# --- reading -----------------------------------------------------------------------------------

def parse_since(text: str | None) -> datetime | None:
    """``--since DATE``: ``YYYY-MM-DD`` (UTC midnight) or an ISO date-time."""
    if text in (None, ""):
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"--since takes a date (YYYY-MM-DD), not {text!r}") from None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else as_utc(value)


def usage_records(session, *, since: datetime | None = None,
                  datasets: Iterable[str] | None = None) -> list[UsageRecord]:
    """Usage rows, newest first: started at or after *since*; attributed to one of
    *datasets* when given (``None``: every row)."""
    query = select(UsageRecord).order_by(UsageRecord.started_at.desc(), UsageRecord.id.desc())
    if since is not None:
        query = query.where(UsageRecord.started_at >= as_utc(since))
    if datasets is not None:
        wanted = sorted(set(datasets))
        if not wanted:
            return []
        query = query.where(UsageRecord.id.in_(
            select(usage_datasets.c.usage_id).where(usage_datasets.c.dataset_id.in_(wanted))))
    return list(session.scalars(query))


def record_summary(row: UsageRecord, datasets: set[str] | None = None) -> dict[str, Any]:
    """A usage row as the faces show it (``datasets``: only those in *datasets*, if given)."""
    names = sorted(d.id for d in row.datasets)
    if datasets is not None:
        names = [d for d in names if d in datasets]
    return {"id": row.id, "kind": row.kind, "user": row.user.name, "run": row.run_id,
            "server": row.server, "template": row.template, "datasets": names,
            "started": row.started_at.isoformat(timespec="seconds"),
            "ended": row.ended_at.isoformat(timespec="seconds"),
            "month": row.started_at.strftime("%Y-%m"),
            "wall_s": _r(row.wall_s), "cpu_s": _r(row.cpu_s),
            "mem_peak_bytes": row.mem_peak_bytes, "gpu_s": _r(row.gpu_s),
            "gpu_mem_peak_bytes": row.gpu_mem_peak_bytes, "energy_j": _r(row.energy_j)}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _keys(summary: dict, by: str) -> list[str]:
    if by == "dataset":
        return summary["datasets"] or ["(none)"]
    if by == "template":
        return [summary["template"] or "(session)"]
    return [summary[by]]


def usage_report(session, *, by: str | None = None, since: datetime | None = None,
                 viewer: str | None = None) -> list[dict[str, Any]]:
    """What *viewer* may see (:func:`visible_datasets`) of the usage since *since*: one
    object per row (newest first) without *by*; with *by* (``user``, ``dataset``,
    ``template``, ``month``) one per group, sorted by key, with the count of runs and
    sessions, sums of ``wall_s``/``cpu_s``/``gpu_s``/``energy_j`` and the largest peaks.

    By dataset, a row mounted with two datasets counts in full for each (datasets are not
    shares of a row: a provider sees all the compute that had its data at hand)."""
    if by is not None and by not in GROUPINGS:
        raise InvalidInput(f"--by takes {', '.join(GROUPINGS)}, not {by!r}")
    visible = visible_datasets(session, viewer)
    rows = [record_summary(r, visible) for r in usage_records(session, since=since,
                                                             datasets=visible)]
    if by is None:
        return rows
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        for key in _keys(row, by):
            group = groups.setdefault(key, {by: key, "runs": 0, "sessions": 0,
                                            **{q: None for q in (*SUMMED, *PEAKS)}})
            group["runs" if row["kind"] == "run" else "sessions"] += 1
            for q in SUMMED:
                if row[q] is not None:
                    group[q] = round((group[q] or 0.0) + row[q], 3)
            for q in PEAKS:
                if row[q] is not None:
                    group[q] = max(group[q] or 0, row[q])
    return [groups[k] for k in sorted(groups)]


def runs_on_datasets(session, *, viewer: str | None = None,
                     since: datetime | None = None) -> list[dict[str, Any]]:
    """The runs *viewer* may see (those attributed to its datasets), newest first, with
    what each used."""
    visible = visible_datasets(session, viewer)
    out = []
    for row in usage_records(session, since=since, datasets=visible):
        if row.kind != "run" or row.run_id is None:
            continue
        run = session.get(Run, row.run_id)
        summary = record_summary(row, visible)
        summary.update(state=run.state if run else None,
                       finished=(run.finished_at.isoformat(timespec="seconds")
                                 if run and run.finished_at else None))
        out.append(summary)
    return out


def month_start(now: datetime | None = None) -> datetime:
    now = as_utc(now)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


__all__ = [
    "GROUPINGS", "bind_provider", "check_dataset_visible", "list_providers", "month_start",
    "parse_since", "provider_datasets", "record_run_usage", "record_server_usage",
    "record_session_usage", "record_summary", "runs_on_datasets", "unbind_provider",
    "usage_records", "usage_report", "visible_datasets",
]
