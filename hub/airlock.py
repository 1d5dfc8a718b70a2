"""The export airlock: request, quarantine, screen, review, release.

Nothing leaves the zone except through these functions; the CLI and the portal call them
and add no rules of their own. Life of an export request::

    request --(screen: pass|review)--> pending --approvals reached--> approved --download--> released
       |                                  |                                                  |
       +--(screen: block)--> blocked      +--one reject--> rejected          (download again)+

- :func:`submit_export` copies the files, from the requester's home only, into a
  quarantine folder ``MEDZONE_HOME/airlock/<id>/files/…`` (read-only, fsynced, staged and
  renamed into place), hashes them and screens the quarantine copy with the indexes of
  every dataset the requester has ever held a grant on or run a template over
  (:func:`medzone_hub.access.screening_datasets`: a slice saved while a grant was live stays
  in the home after it ends). The home is read through :class:`medzone_hub.homefs.UserHome`
  (descriptors, ``O_NOFOLLOW``, only the user's own regular files), and sizes are checked
  against :class:`ExportLimits` before a byte is copied. The row is inserted, the staged folder
  renamed to its final name and the audit row appended in one transaction, so a request row
  only ever points to a complete quarantine.
- A request may carry a **disclosure-risk report** (:mod:`medzone_hub.risk_report`), a file
  from the same home, quarantined, hashed, screened and released with the others. A request
  holding model weights (the screen's ``model-weights`` rule) cannot be approved without one.
- :func:`decide_export`: reviewers hold the ``export-reviewer`` role (or are admins) and are
  never the requester. A ``pass`` request needs one approval, a ``review`` request
  :data:`DEFAULT_REVIEW_APPROVALS` distinct ones (per dataset: :func:`set_review_approvals`;
  the strictest dataset of a request wins); a ``block`` request cannot be approved. One
  rejection rejects.
- :func:`release_export` (``medzone export download``): only the requester, only once
  approved; every quarantine file is hashed again and must match the hash recorded at
  request time (a mismatch is refused and audited). The release is audited *before* any
  byte is written out, then exactly the quarantine bytes are written (staged, renamed) with
  ``release-<id>.json``.

Killed at any point, nothing is lost and nothing unreviewed leaves: state changes are one
transaction each, files are staged under ``airlock/.staging`` and renamed into place, and a
staged folder whose owner died (its lock is free) is swept by the next request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import secrets
import stat
from collections.abc import Iterable, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import __version__, audit, indexes, screen, staging
from .access import screening_datasets
from .accounts import ROLE_EXPORT_REVIEWER, get_user, validate_user_name
from .config import MedZoneHome
from .db import open_store
from .errors import Conflict, InvalidInput, NotFound, RuleViolation
from .homefs import FileTooLarge, UserHome, parts_of
from .manifest import sha256_file
from .models import ExportFile, ExportPolicy, ExportRequest, ExportReview, User, as_utc
from .previews import NO_PREVIEW_APPROVALS, add_preview_findings, needs_download, preview_kind
from .registry import get_dataset
from .risk_report import parse_risk_report
from .runner import run_base
from .screen import differencing
from .screen.model import RULE_MODEL_WEIGHTS

#: Approvals a ``review`` request needs unless its datasets say otherwise.
DEFAULT_REVIEW_APPROVALS = 2
#: Approvals a ``pass`` request needs.
PASS_APPROVALS = 1
MAX_APPROVALS = 10

#: Name of the copy of the template next to an executed run notebook (see runner).
TEMPLATE_COPY = "template.ipynb"
#: Mode of quarantined files and folders.
FILE_MODE = 0o444
DIR_MODE = 0o555
_CHUNK = 1 << 20


# --- places ------------------------------------------------------------------------------

def airlock_dir(home: MedZoneHome) -> Path:
    return home.airlock_dir


def staging_dir(home: MedZoneHome) -> Path:
    return home.airlock_staging_dir


def quarantine_dir(home: MedZoneHome, request_id: int) -> Path:
    """``MEDZONE_HOME/airlock/<id>``: ``files/`` (what may leave) and the screen report."""
    return home.quarantine_dir(request_id)


def user_home(home: MedZoneHome, user: str) -> Path:
    return home.user_home(user)




def _subject(request_id: int) -> str:
    return f"export:{request_id}"


# --- paths -------------------------------------------------------------------------------

def _link_refused(raw: str, user: str, why: str) -> RuleViolation:
    return RuleViolation(f"refusing {raw!r}: {why}; links are never followed, nothing that "
                         f"leads out of {user}'s home is exported")


def resolve_request_paths(user_root: UserHome | Path, user: str, paths: Iterable[str], *,
                          files_only: bool = False) -> list[str]:
    """The files named by *paths*, as POSIX paths relative to the user's home, sorted.

    A path is relative to the home, or absolute inside it (as the host sees it, or as the
    sandbox does: ``/home/<user>/…``). ``..`` components, symbolic links (a named one is
    refused, one inside a named folder is skipped: links in a home are never followed) and
    anything that is not a regular file or a folder are refused. A folder stands for the
    regular files under it (with *files_only*, it is refused). The home is walked from
    descriptors (:class:`~medzone_hub.homefs.UserHome`), never by path.
    """
    fs = user_root if isinstance(user_root, UserHome) else UserHome(Path(user_root))
    if isinstance(paths, str):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise InvalidInput("name at least one file to export")
    if not fs.is_dir(""):
        raise NotFound(f"user {user!r} has no home folder yet: nothing to export")
    host_roots = [PurePosixPath(str(fs.path)),
                  PurePosixPath(os.path.realpath(fs.path.parent)) / fs.path.name]
    inside_prefix = PurePosixPath("/home") / user
    chosen: dict[str, None] = {}
    for raw in paths:
        if not isinstance(raw, str) or not raw.strip() or "\x00" in raw:
            raise InvalidInput(f"invalid path {raw!r}")
        given = PurePosixPath(raw)
        if ".." in given.parts:
            raise RuleViolation(f"refusing {raw!r}: '..' is not allowed in export paths")
        if given.is_absolute():
            base = next((b for b in (inside_prefix, *host_roots) if given.is_relative_to(b)), None)
            if base is None:
                raise RuleViolation(f"refusing {raw!r}: only files in {user}'s home can be exported")
            rel = given.relative_to(base)
        else:
            rel = given
        rel_text = "/".join(parts_of(rel.as_posix()))
        try:
            st = fs.lstat(rel_text)
        except RuleViolation:
            raise _link_refused(raw, user, "it goes through a symbolic link or a non-folder") from None
        if st is None:
            raise NotFound(f"{raw!r} does not exist in {user}'s home")
        if stat.S_ISLNK(st.st_mode):
            raise _link_refused(raw, user, "it is a symbolic link")
        if stat.S_ISDIR(st.st_mode):
            if files_only:
                raise InvalidInput(f"{raw!r} is a folder: name a single file")
            try:
                found = fs.walk_files(rel_text)
            except RuleViolation:
                raise _link_refused(raw, user, "it was swapped for a symbolic link") from None
            for name in found:
                chosen[name] = None
        elif stat.S_ISREG(st.st_mode):
            if not rel_text:
                raise InvalidInput(f"invalid path {raw!r}")
            chosen[rel_text] = None
        else:
            raise RuleViolation(f"refusing {raw!r}: it is not a regular file")
    if not chosen:
        raise InvalidInput("the named folders hold no files to export")
    return sorted(chosen)


# --- limits ------------------------------------------------------------------------------

MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ExportLimits:
    """Size limits of export requests. Each is checked on the descriptor of the file opened
    in the home (``fstat``) before a byte is copied into quarantine, and again while
    copying (the copy stops at the limit: a file may grow while it is copied). A refusal
    names the limit and leaves nothing in staging or quarantine."""

    #: Largest file a request may hold (the screen blocks files over 16 MB anyway:
    #: ``ScreenConfig.max_file_bytes``).
    export_max_file_bytes: int = 16 * MB
    #: Largest total of one request's files (and the template copies kept as diff bases).
    export_max_request_bytes: int = 64 * MB
    #: Bytes one person's requests may hold in quarantine, all requests counted whatever
    #: their state (quarantine folders are kept as the record of what was asked for and
    #: what left, so blocked and rejected requests hold disk space too). An administrator
    #: raises it for a person who needs more.
    export_quarantine_quota_bytes: int = 1024 * MB

    @classmethod
    def from_config(cls, config) -> "ExportLimits":
        """The limits set in the ``ExportLimits`` section of the hub's config file (which
        the hub API and the portal both read), e.g.
        ``c.ExportLimits.export_max_file_bytes = 32 * 1024 * 1024``; defaults for the rest."""
        section = dict(config["ExportLimits"]) if config is not None and "ExportLimits" in config \
            else {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown export limit {unknown[0]!r} (one of {', '.join(sorted(known))})")
        return cls(**section)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a whole number of bytes above 0, "
                                 f"not {value!r}")


def _size_text(n: int) -> str:
    if n >= 10 * MB or (n >= MB and n % MB == 0):
        return f"{round(n / MB)} MB"
    if n >= MB:
        return f"{n / MB:.1f} MB"
    return f"{n} bytes"


class _Budget:
    """What one request may still copy: the per-file, per-request and quota limits."""

    def __init__(self, limits: ExportLimits, quota_used: int):
        self.limits = limits
        self.quota_used = quota_used
        self.spent = 0

    def check(self, name: str, size: int, *, counted: bool = True) -> None:
        """Refuse *name* at *size* bytes (one line naming the limit) if it is over one."""
        lim = self.limits
        if size > lim.export_max_file_bytes:
            raise FileTooLarge(
                f"refusing {name}: {_size_text(size)} is over the per-file limit of "
                f"{_size_text(lim.export_max_file_bytes)} (export_max_file_bytes)")
        if not counted:
            return
        if self.spent + size > lim.export_max_request_bytes:
            raise FileTooLarge(
                f"refusing {name}: the request would hold {_size_text(self.spent + size)}, over "
                f"the per-request limit of {_size_text(lim.export_max_request_bytes)} "
                "(export_max_request_bytes)")
        if self.quota_used + self.spent + size > lim.export_quarantine_quota_bytes:
            raise FileTooLarge(
                f"refusing {name}: your export requests would hold "
                f"{_size_text(self.quota_used + self.spent + size)} in quarantine, over the "
                f"quota of {_size_text(lim.export_quarantine_quota_bytes)} per person "
                "(export_quarantine_quota_bytes)")


def quarantine_bytes(session: Session, user: str) -> int:
    """Bytes *user*'s export requests hold in quarantine (every state counts)."""
    total = session.scalar(
        select(func.coalesce(func.sum(ExportFile.size), 0))
        .join(ExportRequest, ExportFile.request_id == ExportRequest.id)
        .join(User, ExportRequest.user_id == User.id)
        .where(User.name == user))
    return int(total or 0)


# --- files -------------------------------------------------------------------------------

def _copy_file(src: Path | str, dst: Path, *, home_fs: UserHome | None = None,
               budget: _Budget | None = None, counted: bool = True) -> tuple[str, int]:
    """Copy *src* to a new *dst*, fsynced, 0444; ``(sha256, size)``.

    With *home_fs*, *src* is a path relative to that home, opened through it (no link
    followed anywhere, a file the user does not own refused). With *budget*, the size
    from ``fstat`` of the opened descriptor is checked before a byte is copied and the
    copy stops at the limit. *dst* is removed again if the copy fails.
    """
    if home_fs is not None:
        opener = home_fs.open_file(src)
        shown = str(src)
    else:
        opener = _open_plain(Path(src))
        shown = Path(src).name
    digest = hashlib.sha256()
    size = 0
    created = False
    try:
        with opener as fd:
            if budget is not None:
                budget.check(shown, os.fstat(fd).st_size, counted=counted)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with open(dst, "xb") as fout:
                created = True
                while chunk := os.read(fd, _CHUNK):
                    size += len(chunk)
                    if budget is not None:
                        budget.check(shown, size, counted=counted)  # it grew while copied
                    digest.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
    except BaseException:
        if created:
            dst.unlink(missing_ok=True)
        raise
    if budget is not None and counted:
        budget.spent += size
    os.chmod(dst, FILE_MODE)
    return digest.hexdigest(), size


class _open_plain:
    """A read-only descriptor of a regular file of the zone's own (quarantine), no symlink
    followed at the last step."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> int:
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise RuleViolation(f"refusing {self.path.name}: not a regular file")
        return self.fd

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _new_staging(home: MedZoneHome) -> staging.StagedFolder:
    """A folder under ``airlock/.staging`` owned (flock) by this process while it lives."""
    home.root.mkdir(parents=True, exist_ok=True)
    airlock_dir(home).mkdir(mode=0o700, exist_ok=True)
    return staging.stage(staging_dir(home))


def sweep_staging(home: MedZoneHome) -> list[str]:
    """Remove staged folders whose owner died before publishing them; their names."""
    return staging.sweep(staging_dir(home))


# --- the screen --------------------------------------------------------------------------

def _screen(files_root: Path, rel_paths: Sequence[str], home: MedZoneHome,
            dataset_ids: Sequence[str], screen_config=None,
            earlier: Sequence[tuple[int, Sequence[str]]] = (), screen_pool=None,
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Screen the quarantined files; (per-file results in *rel_paths* order, settings).
    *earlier*: ``(request id, file paths)`` of released requests on the same datasets, whose
    tables the new ones are compared with (differencing). *screen_pool*: the service's
    :class:`~medzone_hub.screen.pool.ScreenPool`, if it has one."""
    config = screen_config or screen.ScreenConfig()  # the hub config's, when a face gives it
    loaded = indexes.load_indexes(home, dataset_ids) if dataset_ids else ()
    verdicts = screen.screen_paths([files_root / p for p in rel_paths], indexes=loaded,
                                   config=config, root=files_root, pool=screen_pool)
    by_path: dict[str, dict[str, Any]] = {}
    for verdict in verdicts:
        path = Path(verdict.path)
        rel = (path.relative_to(files_root) if path.is_absolute() else path).as_posix()
        by_path[rel] = {
            "path": rel,
            "verdict": verdict.verdict,
            "findings": [_finding_dict(f) for f in verdict.findings],
        }
    for rel, found in _differencing(files_root, rel_paths, home, earlier, config).items():
        if rel in by_path:
            by_path[rel]["findings"] += [_finding_dict(f) for f in found]
            by_path[rel]["verdict"] = overall_verdict(
                [by_path[rel]["verdict"]] + [f.severity for f in found])
    results = []
    for rel in rel_paths:
        if rel not in by_path:  # fail closed: a file the screen did not report on
            by_path[rel] = {"path": rel, "verdict": "block", "findings": [{
                "rule": "screen-missing", "severity": "block", "location": rel,
                "detail": "the screen returned no verdict for this file"}]}
        results.append(by_path[rel])
    settings = {
        "rules": _plain(config),
        "tools": _tool_versions(screen),
        "datasets": list(dataset_ids),
    }
    return results, settings


def released_files(session: Session, dataset_ids: Iterable[str]) -> list[tuple[int, list[str]]]:
    """``(request id, file paths)`` of every approved or released request, anyone's, over
    any of *dataset_ids*: the releases a new request's tables are compared with."""
    wanted = set(dataset_ids)
    if not wanted:
        return []
    rows = session.scalars(select(ExportRequest)
                           .where(ExportRequest.state.in_(("approved", "released")))
                           .order_by(ExportRequest.id))
    return [(r.id, [f.path for f in r.files]) for r in rows
            if wanted & set(r.dataset_ids or ())]


def _differencing(files_root: Path, rel_paths: Sequence[str], home: MedZoneHome,
                  earlier: Sequence[tuple[int, Sequence[str]]], config) -> dict[str, list]:
    """The ``differencing`` findings of the new files against the tables of *earlier*
    releases (read from their quarantine, which holds exactly the bytes released)."""
    if not earlier:
        return {}

    def tables(root: Path, paths: Iterable[str]) -> dict[str, list]:
        out = {}
        for rel in paths:
            path = root / rel
            try:
                if path.is_symlink() or not path.is_file() or \
                        path.stat().st_size > config.max_file_bytes:
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            found = differencing.file_tables(rel, data, config=config)
            if found:
                out[rel] = found
        return out

    new = tables(files_root, rel_paths)
    if not new:
        return {}
    old = [(request_id, tables(quarantine_dir(home, request_id) / "files", paths))
           for request_id, paths in earlier]
    return differencing.check_differencing(new, old, config)


def _finding_dict(finding) -> dict[str, Any]:
    return {key: _plain(getattr(finding, key)) for key in ("rule", "severity", "location", "detail")}


def _plain(value) -> Any:
    """A JSON-able form of a config or finding value."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _tool_versions(screen_module) -> dict[str, str]:
    versions = {"medzone": __version__, "python": platform.python_version()}
    screen_version = getattr(screen_module, "__version__", None)
    if screen_version:
        versions["screen"] = str(screen_version)
    for dist in ("nbdime", "nbformat", "pydicom", "numpy", "Pillow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def overall_verdict(verdicts: Iterable[str]) -> str:
    order = {"pass": 0, "review": 1, "block": 2}
    worst = "pass"
    for verdict in verdicts:
        if verdict not in order:
            return "block"  # fail closed on anything unexpected
        if order[verdict] > order[worst]:
            worst = verdict
    return worst


# --- policy ------------------------------------------------------------------------------

def set_review_approvals(session: Session, dataset_id: str, approvals: int, *,
                         actor: str, now: datetime | None = None) -> ExportPolicy:
    """Set how many distinct approvals a flagged (``review``) export touching *dataset_id* needs."""
    now = as_utc(now)
    if isinstance(approvals, bool) or not isinstance(approvals, int) or not (
            1 <= approvals <= MAX_APPROVALS):
        raise InvalidInput(f"approvals must be a whole number from 1 to {MAX_APPROVALS}")
    get_dataset(session, dataset_id)
    policy = session.get(ExportPolicy, dataset_id)
    if policy is None:
        policy = ExportPolicy(dataset_id=dataset_id)
        session.add(policy)
    policy.review_approvals = approvals
    policy.updated_by = actor
    policy.updated_at = now
    audit.append(session, actor=actor, action="export.policy", subject=f"dataset:{dataset_id}",
                 detail={"review_approvals": approvals}, time=now)
    return policy


def review_approvals(session: Session, dataset_ids: Iterable[str]) -> int:
    """Approvals a ``review`` request over *dataset_ids* needs: the strictest dataset's."""
    needed = DEFAULT_REVIEW_APPROVALS
    configured = [
        policy.review_approvals
        for policy in session.scalars(
            select(ExportPolicy).where(ExportPolicy.dataset_id.in_(list(dataset_ids))))
    ]
    if configured:
        needed = max(configured)
    return needed


# --- request -----------------------------------------------------------------------------

@dataclasses.dataclass
class StagedExport:
    """Files copied, hashed and screened in a staging folder, not yet a request.

    Made by :func:`stage_export` without the database; :func:`record_export` turns it into
    a request. :meth:`close` removes whatever was not published.
    """

    user: str
    dataset_ids: list[str]
    results: list[dict[str, Any]]
    hashes: dict[str, tuple[str, int]]
    settings: dict[str, Any]
    report: str
    verdict: str
    staging: staging.StagedFolder
    #: Path (relative to the home, one of the files) of the disclosure-risk report, if any.
    risk_report: str | None = None
    limits: ExportLimits | None = None

    def close(self) -> None:
        self.staging.close()


def stage_export(home: MedZoneHome, *, user: str, paths: Iterable[str],
                 dataset_ids: Sequence[str], risk_report: str | None = None,
                 limits: ExportLimits | None = None, quota_used: int = 0,
                 screen_config=None,
                 earlier: Sequence[tuple[int, Sequence[str]]] = (),
                 screen_pool=None) -> StagedExport:
    """Copy *paths* (and the *risk_report* file, if given) from *user*'s home into a sealed
    staging folder, hash and screen them there with the indexes of *dataset_ids*, and check
    the report's form. Touches no database.

    The home is read through :class:`~medzone_hub.homefs.UserHome` only. Every file's size
    is checked against *limits* (*quota_used*: bytes the user's requests already hold in
    quarantine) before the staging folder is made, and again while copying. Their tables
    are compared with those of the *earlier* releases (:func:`released_files`): a
    difference that is a small count is a ``differencing`` finding naming that release."""
    validate_user_name(user)
    limits = limits or ExportLimits()
    fs = UserHome.of(home, user)
    rel_paths = resolve_request_paths(fs, user, paths)
    report_rel = None
    if risk_report is not None:
        (report_rel,) = resolve_request_paths(fs, user, [risk_report], files_only=True)
        if report_rel not in rel_paths:
            rel_paths = sorted([*rel_paths, report_rel])
    # Sizes first, from the descriptors the copy would read: nothing is copied for a
    # request over a limit.
    budget = _Budget(limits, quota_used)
    for rel in rel_paths:
        with fs.open_file(rel) as fd:
            size = os.fstat(fd).st_size
        budget.check(rel, size)
        budget.spent += size
    budget.spent = 0
    sweep_staging(home)
    staged = _new_staging(home)
    try:
        files_root = staged.path / "files"
        files_root.mkdir()
        hashes: dict[str, tuple[str, int]] = {}
        for rel in rel_paths:
            hashes[rel] = _copy_file(rel, files_root / rel, home_fs=fs, budget=budget)
        if report_rel is not None:
            # The quarantined copy is checked: the bytes reviewers read and that leave.
            parse_risk_report(report_rel, (files_root / report_rel).read_bytes())
        # (Diff bases are the hub's own template copies, never files of the home.)
        results, settings = _screen(files_root, rel_paths, home, dataset_ids, screen_config,
                                    earlier, screen_pool)
        add_preview_findings(results)  # a file the review page cannot show needs a download
        report = audit.canonical_json({"files": results})
        (staged.path / "screen.json").write_text(report, encoding="utf-8")
        os.chmod(staged.path / "screen.json", FILE_MODE)
        staging.seal(staged.path, dir_mode=DIR_MODE)
    except BaseException:
        staged.close()
        raise
    return StagedExport(user=user, dataset_ids=list(dataset_ids), results=results,
                        hashes=hashes, settings=settings, report=report,
                        verdict=overall_verdict(r["verdict"] for r in results), staging=staged,
                        risk_report=report_rel, limits=limits)


def _requester(session: Session, user: str) -> User:
    requester = get_user(session, user)
    if not requester.approved:
        raise RuleViolation(f"user {user!r} is not approved yet")
    return requester


def _reason_text(reason: str) -> str:
    reason = reason.strip() if isinstance(reason, str) else ""
    if not reason:
        raise InvalidInput("the reason for the export is empty: say why these files must leave")
    return reason


class GrantsChanged(Conflict):
    """The requester's grants changed while the files were screened: screen again."""


def record_export(session: Session, home: MedZoneHome, staged: StagedExport, *, reason: str,
                  now: datetime | None = None) -> ExportRequest:
    """Turn *staged* into a request: insert the rows, rename the staging folder to
    ``airlock/<id>`` and audit, all in *session*'s transaction.

    The quarantine folder is removed again if that transaction rolls back.
    """
    now = as_utc(now)
    reason = _reason_text(reason)
    requester = _requester(session, staged.user)
    if screening_datasets(session, staged.user) != staged.dataset_ids:
        raise GrantsChanged(f"{staged.user}'s dataset grants changed while the files were "
                            "screened: request the export again")
    # Two requests staged side by side both fit the quota alone: count again, under the
    # transaction that records this one.
    limits = staged.limits or ExportLimits()
    held = quarantine_bytes(session, staged.user)
    size = sum(size for _sha, size in staged.hashes.values())
    if held + size > limits.export_quarantine_quota_bytes:
        raise FileTooLarge(
            f"refusing the request: {staged.user}'s export requests would hold "
            f"{_size_text(held + size)} in quarantine, over the quota of "
            f"{_size_text(limits.export_quarantine_quota_bytes)} per person "
            "(export_quarantine_quota_bytes)")
    verdict = staged.verdict
    required = (PASS_APPROVALS if verdict == "pass"
                else review_approvals(session, staged.dataset_ids))
    if any(needs_download(r["findings"]) for r in staged.results):
        required = max(required, NO_PREVIEW_APPROVALS)  # seen only by downloading it
    request = ExportRequest(
        user=requester, reason=reason, state="blocked" if verdict == "block" else "pending",
        verdict=verdict, dataset_ids=list(staged.dataset_ids), approvals_required=required,
        screen_report=staged.report,
        screen_report_sha256=hashlib.sha256(staged.report.encode("utf-8")).hexdigest(),
        screen_settings=staged.settings, created_at=now, risk_report_path=staged.risk_report,
    )
    request.files = [
        ExportFile(path=r["path"], sha256=staged.hashes[r["path"]][0],
                   size=staged.hashes[r["path"]][1], verdict=r["verdict"],
                   findings=r["findings"])
        for r in staged.results
    ]
    session.add(request)
    session.flush()  # the id names the quarantine folder
    _publish(home, staged.staging, request.id)
    _remove_if_rolled_back(session, home, request.id)
    audit.append(
        session, actor=staged.user, action="export.request", subject=_subject(request.id),
        detail={
            "user": staged.user, "reason": reason, "verdict": verdict, "state": request.state,
            "datasets": list(staged.dataset_ids), "approvals_required": required,
            "files": [{"path": f.path, "sha256": f.sha256, "verdict": f.verdict}
                      for f in request.files],
            "screen_report_sha256": request.screen_report_sha256,
            "model_weights": model_weight_paths(request),
            "risk_report": _risk_report_dict(request),
        },
        time=now,
    )
    return request


def submit_export(store, home: MedZoneHome, *, user: str, paths: Iterable[str], reason: str,
                  risk_report: str | None = None, now: datetime | None = None,
                  attempts: int = 3, limits: ExportLimits | None = None,
                  screen_config=None, screen_pool=None) -> int:
    """Request the export of *paths* from *user*'s home; the new request's id (committed).
    *screen_pool*: a service's screening processes (the hub API's, the portal's).

    Three steps, so a large request does not hold the database's write lock: read the
    datasets to screen against and the quarantine the requester holds, copy and screen
    (:func:`stage_export`) with no transaction open, then record (:func:`record_export`);
    if the grants changed meanwhile, screen again."""
    _reason_text(reason)
    paths = [paths] if isinstance(paths, str) else list(paths)
    for attempt in range(attempts):
        with store.session() as session:
            _requester(session, user)
            grants = screening_datasets(session, user)
            held = quarantine_bytes(session, user)
            released = released_files(session, grants)
        staged = stage_export(home, user=user, paths=paths, dataset_ids=grants,
                              risk_report=risk_report, limits=limits, quota_used=held,
                              screen_config=screen_config, earlier=released,
                              screen_pool=screen_pool)
        try:
            with store.session() as session:
                return record_export(session, home, staged, reason=reason, now=now).id
        except GrantsChanged:
            if attempt == attempts - 1:
                raise
        finally:
            staged.close()
    raise AssertionError("unreachable")


def _publish(home: MedZoneHome, staged: staging.StagedFolder, request_id: int) -> None:
    # No committed row has this id (we hold the row it would clash with): a folder already
    # there is what a crash left after the rename and before the commit; nothing points to it.
    staged.publish(quarantine_dir(home, request_id), mode=DIR_MODE)


def _remove_if_rolled_back(session: Session, home: MedZoneHome, request_id: int) -> None:
    """Remove the published quarantine folder if *session*'s transaction rolls back."""
    from sqlalchemy import event

    settled = []

    def on_commit(_session):
        settled.append(True)

    def on_rollback(_session, previous_transaction):
        if not settled and previous_transaction.parent is None:
            settled.append(False)
            staging.remove_tree(quarantine_dir(home, request_id))

    event.listen(session, "after_commit", on_commit)
    event.listen(session, "after_soft_rollback", on_rollback)


# --- read --------------------------------------------------------------------------------

def get_request(session: Session, request_id: int, *, lock: bool = False) -> ExportRequest:
    if isinstance(request_id, bool) or not isinstance(request_id, int):
        raise InvalidInput(f"export request id must be a whole number, not {request_id!r}")
    query = select(ExportRequest).where(ExportRequest.id == request_id)
    if lock:
        query = query.with_for_update(of=ExportRequest).execution_options(populate_existing=True)
    request = session.scalar(query)
    if request is None:
        raise NotFound(f"export request {request_id} does not exist")
    return request


def get_own_request(session: Session, request_id: int, *, user: str) -> ExportRequest:
    """*user*'s own request *request_id*: a requester sees their requests and nobody
    else's; anyone else's reads as :class:`NotFound`, as if it did not exist."""
    request = get_request(session, request_id)
    if request.user.name != user:
        raise NotFound(f"export request {request_id} does not exist")
    return request


def get_request_to_review(session: Session, request_id: int, *,
                          reviewer: str) -> ExportRequest:
    """Request *request_id* for *reviewer*'s eyes: :class:`RuleViolation` if it is their
    own (requesters never preview their own quarantine: the download after approval is
    their only way out)."""
    request = get_request(session, request_id)
    if request.user.name == reviewer:
        raise RuleViolation("requesters do not preview their own requests")
    return request


def requests_of(session: Session, user: str) -> list[ExportRequest]:
    """*user*'s export requests, newest first."""
    return list(session.scalars(select(ExportRequest).join(User).where(User.name == user)
                                .order_by(ExportRequest.id.desc())))


@dataclasses.dataclass
class ReviewQueue:
    """What a reviewer's queue shows: the pending requests of others, the recently
    decided ones of others, and the ids of the reviewer's own (which they never review)."""

    pending: list[ExportRequest]
    decided: list[ExportRequest]
    own_ids: list[int]


def review_queue(session: Session, reviewer: str, *, decided: int = 10) -> ReviewQueue:
    """*reviewer*'s queue, newest first; at most *decided* decided requests."""
    requests = list(session.scalars(select(ExportRequest).order_by(ExportRequest.id.desc())))
    others = [r for r in requests if r.user.name != reviewer]
    return ReviewQueue(pending=[r for r in others if r.state == "pending"],
                       decided=[r for r in others if r.state != "pending"][:decided],
                       own_ids=[r.id for r in requests if r.user.name == reviewer])


def earlier_releases(session: Session, request: ExportRequest) -> list[ExportRequest]:
    """The requester's earlier approved or released requests over the same datasets: what a
    reviewer compares against to spot differencing (two safe outputs that subtract to a
    disclosive one)."""
    earlier = session.scalars(
        select(ExportRequest).where(ExportRequest.user_id == request.user_id,
                                    ExportRequest.id < request.id,
                                    ExportRequest.state.in_(("approved", "released")))
        .order_by(ExportRequest.id.desc()))
    mine = set(request.dataset_ids or [])
    return [r for r in earlier if not mine or mine & set(r.dataset_ids or [])]


def approvals(request: ExportRequest) -> list[ExportReview]:
    return [r for r in request.reviews if r.approve]


def model_weight_paths(request: ExportRequest) -> list[str]:
    """Paths of the request's files that the screen flagged as model weights."""
    return [f.path for f in request.files
            if any(finding.get("rule") == RULE_MODEL_WEIGHTS for finding in f.findings or ())]


def risk_report_file(request: ExportRequest) -> ExportFile | None:
    """The quarantined file that is the request's disclosure-risk report, if it has one."""
    if not request.risk_report_path:
        return None
    return next((f for f in request.files if f.path == request.risk_report_path), None)


def risk_report_text(home: MedZoneHome, request: ExportRequest) -> str | None:
    """The quarantined report's text, as reviewers read it (checked as UTF-8 at request time)."""
    report = risk_report_file(request)
    if report is None:
        return None
    path = quarantine_dir(home, request.id) / "files" / report.path
    return path.read_bytes().decode("utf-8-sig", errors="replace")


def _risk_report_dict(request: ExportRequest) -> dict[str, Any] | None:
    report = risk_report_file(request)
    return report and {"path": report.path, "sha256": report.sha256, "size": report.size}


def status(request: ExportRequest) -> dict[str, Any]:
    """What ``medzone export status --json`` prints."""
    return {
        "id": request.id,
        "user": request.user.name,
        "reason": request.reason,
        "state": request.state,
        "verdict": request.verdict,
        "datasets": list(request.dataset_ids or []),
        "approvals_required": request.approvals_required,
        "approvals": len(approvals(request)),
        "created_at": audit.format_time(request.created_at),
        "decided_at": request.decided_at and audit.format_time(request.decided_at),
        "released_at": request.released_at and audit.format_time(request.released_at),
        "screen_report_sha256": request.screen_report_sha256,
        "files": [{"path": f.path, "sha256": f.sha256, "size": f.size, "verdict": f.verdict,
                   "findings": list(f.findings or [])} for f in request.files],
        "model_weights": model_weight_paths(request),
        "risk_report": _risk_report_dict(request),
        "reviews": [_review_dict(r) for r in request.reviews],
    }


def _review_dict(review: ExportReview) -> dict[str, Any]:
    return {"reviewer": review.reviewer.name, "decision": "approve" if review.approve else "reject",
            "comment": review.comment, "time": audit.format_time(review.created_at)}


def screen_report(request: ExportRequest) -> dict[str, Any]:
    return json.loads(request.screen_report)


# --- review ------------------------------------------------------------------------------

class MissingRiskReport(RuleViolation):
    """An approval of a request holding model weights without a disclosure-risk report."""

    def __init__(self, message: str, *, request_id: int, user: str, reviewer: str,
                 paths: Sequence[str]):
        super().__init__(message)
        self.request_id, self.user, self.reviewer = request_id, user, reviewer
        self.paths = list(paths)


def _check_reviewer(session: Session, reviewer: str, request: ExportRequest) -> User:
    account = get_user(session, reviewer)
    if not account.approved:
        raise RuleViolation(f"reviewer {reviewer!r} is not an approved user")
    if account.id == request.user_id:
        raise RuleViolation(f"{reviewer!r} may not review their own export request {request.id}")
    if not (account.admin or account.has_role(ROLE_EXPORT_REVIEWER)):
        raise RuleViolation(
            f"{reviewer!r} may not review export requests: only admins and holders of the "
            f"{ROLE_EXPORT_REVIEWER!r} role may")
    return account


def record_review(session: Session, request_id: int, *, reviewer: str, approve: bool,
                  comment: str | None = None, now: datetime | None = None) -> ExportRequest:
    """Record *reviewer*'s decision; the request becomes ``approved`` once enough distinct
    reviewers approved it, ``rejected`` at the first rejection.

    Approving a request that holds model weights and no disclosure-risk report raises
    :class:`MissingRiskReport` (:func:`decide_export` audits that refusal); rejecting it
    is always possible.
    """
    now = as_utc(now)
    request = get_request(session, request_id, lock=True)
    account = _check_reviewer(session, reviewer, request)
    if request.state == "blocked":
        raise RuleViolation(
            f"export request {request.id} was blocked by the screen and cannot be "
            f"{'approved' if approve else 'reviewed'}: fix the files and file a new request")
    if request.state != "pending":
        raise Conflict(f"export request {request.id} is {request.state}: only pending requests "
                       "can be reviewed")
    if any(r.reviewer_id == account.id for r in request.reviews):
        raise Conflict(f"{reviewer!r} has already reviewed export request {request.id}: "
                       "another reviewer must decide")
    weights = model_weight_paths(request)
    if approve and weights and risk_report_file(request) is None:
        raise MissingRiskReport(
            f"export request {request.id} holds model weights ({weights[0]}"
            + (f" and {len(weights) - 1} more" if len(weights) > 1 else "")
            + ") and no disclosure-risk report: it cannot be approved; the requester must "
            "file a new request with one attached",
            request_id=request.id, user=request.user.name, reviewer=reviewer, paths=weights)
    comment = (comment or "").strip() or None
    review = ExportReview(reviewer=account, approve=bool(approve), comment=comment, created_at=now)
    request.reviews.append(review)
    if not approve:
        request.state = "rejected"
        request.decided_at = now
    elif len(approvals(request)) >= request.approvals_required:
        request.state = "approved"
        request.decided_at = now
    session.flush()
    audit.append(
        session, actor=reviewer, action="export.approve" if approve else "export.reject",
        subject=_subject(request.id),
        detail={"user": request.user.name, "comment": comment, "state": request.state,
                "approvals": len(approvals(request)),
                "approvals_required": request.approvals_required,
                "screen_report_sha256": request.screen_report_sha256},
        time=now,
    )
    return request


def record_refused_approval(session: Session, err: MissingRiskReport, *,
                            now: datetime | None = None) -> None:
    """Audit a refused approval (in a session of its own, so the refusal is kept)."""
    audit.append(session, actor=err.reviewer, action="export.refuse",
                 subject=_subject(err.request_id),
                 detail={"user": err.user, "reviewer": err.reviewer,
                         "outcome": "approval refused",
                         "reason": "model weights without a disclosure-risk report",
                         "paths": err.paths}, time=as_utc(now))


def decide_export(store, request_id: int, *, reviewer: str, approve: bool,
                  comment: str | None = None, now: datetime | None = None) -> ExportRequest:
    """Record *reviewer*'s decision (:func:`record_review`) in its own transaction; an
    approval refused for a missing disclosure-risk report is audited (``export.refuse``)
    before the error is raised."""
    try:
        with store.session() as session:
            return record_review(session, request_id, reviewer=reviewer, approve=approve,
                                 comment=comment, now=now)
    except MissingRiskReport as err:
        with store.session() as session:
            record_refused_approval(session, err, now=now)
        raise


# --- release -----------------------------------------------------------------------------

class TamperedQuarantine(RuleViolation):
    """A quarantined file no longer has the hash recorded when it was requested."""

    def __init__(self, message: str, *, request_id: int, user: str, paths: Sequence[str]):
        super().__init__(message)
        self.request_id, self.user, self.paths = request_id, user, list(paths)


def check_quarantine(home: MedZoneHome, request: ExportRequest) -> list[str]:
    """Paths whose quarantine copy is missing or differs from the recorded hash."""
    files_root = quarantine_dir(home, request.id) / "files"
    bad = []
    for f in request.files:
        path = files_root / f.path
        try:
            if path.is_symlink() or sha256_file(path) != f.sha256:
                bad.append(f.path)
        except OSError:
            bad.append(f.path)
    return bad


def release_record(request: ExportRequest, *, released_at: datetime) -> dict[str, Any]:
    return {
        "format": "medzone-release",
        "version": 1,
        "request": request.id,
        "user": request.user.name,
        "reason": request.reason,
        "requested_at": audit.format_time(request.created_at),
        "approved_at": request.decided_at and audit.format_time(request.decided_at),
        "released_at": audit.format_time(released_at),
        "verdict": request.verdict,
        "datasets": list(request.dataset_ids or []),
        "files": [{"path": f.path, "sha256": f.sha256, "size": f.size, "verdict": f.verdict}
                  for f in request.files],
        "model_weights": model_weight_paths(request),
        "risk_report": _risk_report_dict(request),
        "screen_report_sha256": request.screen_report_sha256,
        "screen_settings": request.screen_settings,
        "approvals_required": request.approvals_required,
        "reviews": [_review_dict(r) for r in request.reviews],
    }


def authorize_release(session: Session, home: MedZoneHome, request_id: int, *, user: str,
                      now: datetime | None = None) -> tuple[ExportRequest, dict[str, Any]]:
    """Check that *user* may take request *request_id* out now; audit the release.

    Refuses anyone but the requester and anything not approved. Re-hashes every quarantine
    file; on a mismatch raises :class:`TamperedQuarantine` after auditing the refusal in
    its own committed transaction (the caller's session is left rolled back).
    """
    now = as_utc(now)
    request = get_request(session, request_id, lock=True)
    if request.user.name != user:
        raise RuleViolation(f"only {request.user.name!r}, who requested export {request.id}, "
                            "may download it")
    if request.state not in ("approved", "released"):
        raise RuleViolation(f"export request {request.id} is {request.state}: only approved "
                            "requests can be downloaded")
    if model_weight_paths(request) and risk_report_file(request) is None:
        # Approval already requires the report; this holds for rows approved before it did.
        raise RuleViolation(f"export request {request.id} holds model weights and no "
                            "disclosure-risk report: it cannot be released")
    bad = check_quarantine(home, request)
    if bad:
        raise TamperedQuarantine(
            f"export request {request.id} refused: the quarantine copy of {bad[0]} no longer "
            f"matches the hash recorded at request time" +
            (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
            request_id=request.id, user=user, paths=bad)
    first = request.state == "approved"
    request.state = "released"
    if first:
        request.released_at = now
    record = release_record(request, released_at=now)
    audit.append(session, actor=user, action="export.release", subject=_subject(request.id),
                 detail={"user": user, "first": first,
                         "files": [{"path": f["path"], "sha256": f["sha256"]}
                                   for f in record["files"]],
                         "record_sha256": hashlib.sha256(
                             audit.canonical_json(record).encode()).hexdigest()},
                 time=now)
    return request, record


def record_tamper(session: Session, err: TamperedQuarantine, *,
                  now: datetime | None = None) -> None:
    """Audit a refused download (in a session of its own, so the refusal is kept)."""
    audit.append(session, actor=err.user, action="export.tamper",
                 subject=_subject(err.request_id),
                 detail={"user": err.user, "paths": err.paths,
                         "outcome": "download refused"}, time=as_utc(now))


def write_release(home: MedZoneHome, request: ExportRequest, record: dict[str, Any],
                  dest: Path) -> list[Path]:
    """Write the quarantine bytes and ``release-<id>.json`` into *dest*; the paths written.

    Bytes are hashed again while copying; each file is staged beside its final name and
    renamed, so *dest* never holds a half-written file under a released name.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files_root = quarantine_dir(home, request.id) / "files"
    written = []
    staged: list[tuple[Path, Path]] = []
    token = secrets.token_hex(4)
    try:
        for f in request.files:
            final = dest / f.path
            if os.path.lexists(final):
                raise Conflict(f"{final} exists already: download into an empty folder")
            tmp = final.with_name(f".{final.name}.{token}.partial")
            staged.append((tmp, final))
            digest, _size = _copy_file(files_root / f.path, tmp)
            if digest != f.sha256:
                raise TamperedQuarantine(
                    f"the quarantine copy of {f.path} changed while it was copied: download "
                    "refused", request_id=request.id, user=request.user.name, paths=[f.path])
        record_path = dest / f"release-{request.id}.json"
        if os.path.lexists(record_path):
            raise Conflict(f"{record_path} exists already: download into an empty folder")
        tmp = dest / f".release-{request.id}.json.{token}.partial"
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        staged.append((tmp, record_path))
        for tmp, final in staged:
            os.chmod(tmp, 0o644)
            os.rename(tmp, final)
            written.append(final)
        for folder in {final.parent for _tmp, final in staged}:
            staging.fsync_dir(folder)
    except BaseException:
        for tmp, _final in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    return written


def release_export(store, home: MedZoneHome, request_id: int, *, user: str, dest: Path,
                   now: datetime | None = None) -> tuple[dict[str, Any], list[Path]]:
    """Audit and then write the release of *request_id* into *dest* (``export download``).

    The audit row is committed before a byte is written: a crash in between leaves an
    audited release that the requester downloads again, never an unaudited one.
    """
    try:
        with store.session() as session:
            request, record = authorize_release(session, home, request_id, user=user, now=now)
    except TamperedQuarantine as err:
        with store.session() as session:
            record_tamper(session, err, now=now)
        raise
    return record, write_release(home, request, record, dest)


# --- show --------------------------------------------------------------------------------

def notebook_diffs(home: MedZoneHome, request: ExportRequest,
                   session: Session | None = None) -> list[tuple[str, str]]:
    """(notebook path, text) for each notebook among the request's files: nbdime's
    pretty-printed diff against the template the hub kept when the requester's run that
    wrote this notebook was created (see :func:`notebook_base`), or, for a notebook no
    recorded run wrote, the whole notebook (:func:`render_notebook`), every cell and output.

    Nothing in the requester's folder decides the base: a ``template.ipynb`` beside the
    notebook is never read. The text of a whole notebook starts with
    :data:`WHOLE_NOTEBOOK_HEADER`."""
    return [(path, text) for path, _kind, text in notebook_views(home, request, session)]


#: First line of a notebook shown whole (no recorded template run wrote it).
WHOLE_NOTEBOOK_HEADER = ("(no recorded template run wrote this notebook: "
                         "shown whole, every cell and output)")


def notebook_views(home: MedZoneHome, request: ExportRequest,
                   session: Session | None = None) -> list[tuple[str, str, str]]:
    """(path, ``"diff"`` or ``"whole"``, text) per notebook: see :func:`notebook_diffs`."""
    import io

    import nbformat

    if session is None:
        session = Session.object_session(request)
    if session is None:  # a request read in a session since closed: look the runs up anew
        with open_store(home).session() as fresh:
            return notebook_views(home, request, fresh)
    base = quarantine_dir(home, request.id)
    out = []
    for f in request.files:
        if preview_kind(f.path) != "notebook":
            continue
        template = notebook_base(home, session, request.user.name, f.path)
        try:
            b = nbformat.read(str(base / "files" / f.path), as_version=4)
            a = (nbformat.reads(template.decode("utf-8"), as_version=4)
                 if template is not None else None)
        except Exception as err:  # noqa: BLE001 - a broken notebook is the screen's finding
            out.append((f.path, "whole", f"(cannot read: {type(err).__name__}: {err})\n"))
            continue
        if a is None:
            out.append((f.path, "whole", WHOLE_NOTEBOOK_HEADER + "\n\n" + render_notebook(b)))
            continue
        from nbdime import diff_notebooks
        from nbdime.prettyprint import PrettyPrintConfig, pretty_print_diff

        buffer = io.StringIO()
        pretty_print_diff(a, diff_notebooks(a, b), "notebook",
                          PrettyPrintConfig(out=buffer, use_color=False, use_git=False))
        out.append((f.path, "diff", buffer.getvalue()))
    return out


def notebook_base(home: MedZoneHome, session: Session, user: str, path: str) -> bytes | None:
    """The diff base of *user*'s notebook *path* (relative to the home): the hub's own copy
    of the template, by the sha256 the ``run.execute`` row of the run that wrote *path*
    records; ``None`` when no such run (or no kept copy) exists."""
    return run_base(home, session, user, path)


def render_notebook(nb) -> str:
    """Every cell of *nb* with its source and every output, as plain text: stream text,
    text and JSON representations in full; binary data (images) by type, size and sha256."""
    import base64
    import re as _re

    ansi = _re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    lines: list[str] = []
    for index, cell in enumerate(nb.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        head = f"--- cell {index} ({cell.get('cell_type', '?')})"
        lines.append(head + (f" [{', '.join(tags)}]" if tags else "") + " ---")
        lines.append(str(cell.get("source", "")))
        for n, output in enumerate(cell.get("outputs", []) or []):
            kind = output.get("output_type", "?")
            lines.append(f"  >>> output {n} ({kind})")
            if kind == "stream":
                lines.append(_text(output.get("text", "")))
            elif kind == "error":
                lines.append(f"{output.get('ename', '')}: {output.get('evalue', '')}")
                lines.append(ansi.sub("", "\n".join(output.get("traceback", []) or [])))
            for mime, value in sorted((output.get("data") or {}).items()):
                if mime.startswith("text/") or mime.endswith("json") or mime.endswith("+xml"):
                    text = value if isinstance(value, str) else (
                        "".join(value) if isinstance(value, list) else json.dumps(value))
                    lines.append(f"  [{mime}]")
                    lines.append(text)
                else:
                    raw = _text(value)
                    try:
                        data = base64.b64decode(raw, validate=False)
                    except (ValueError, TypeError):
                        data = raw.encode("utf-8", "replace")
                    lines.append(f"  [{mime}: {len(data)} bytes, sha256 "
                                 f"{hashlib.sha256(data).hexdigest()}; download to inspect]")
        for name, bundle in (cell.get("attachments") or {}).items():
            lines.append(f"  [attachment {name}: {', '.join(sorted(bundle))}]")
    return "\n".join(lines) + "\n"


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)
