"""Export pages: my exports (request, follow, download) and the review queue.

Requests, reviews and releases are :mod:`medzone_hub.airlock`'s functions: the airlock
decides who may review (never the requester), how many approvals a request needs and what
may be downloaded. A download is :func:`~medzone_hub.airlock.release_export` (audited,
every quarantine file re-hashed) and hands out exactly the bytes it wrote.
"""

from __future__ import annotations

import asyncio
import csv
import mimetypes
import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from tornado import web

from .. import airlock, previews
from ..errors import MedZoneError
from ..homefs import UserHome
from . import roles
from .base import PortalHandler, paginate, requires

#: Most files the picker lists from a home (newest first); others can be typed in.
MAX_PICKER_FILES = 300
#: Rows and bytes of a table or text shown in a review preview.
PREVIEW_ROWS = 20
PREVIEW_BYTES = 4096
# Which files get which preview is :mod:`medzone_hub.previews`' rule (the airlock's too).
IMAGE_TYPES = previews.IMAGE_TYPES
TEXT_SUFFIXES = previews.TEXT_SUFFIXES
TABLE_SUFFIXES = previews.TABLE_SUFFIXES


def home_files(fs: UserHome, limit: int = MAX_PICKER_FILES) -> list[dict]:
    """Regular files in a home (hidden folders skipped, links never followed: the home is
    walked from descriptors), newest first."""
    try:
        entries = fs.walk_stats("", skip_hidden=True)
    except MedZoneError:
        return []
    found = [{"path": rel, "size": st.st_size, "mtime": st.st_mtime} for rel, st in entries]
    found.sort(key=lambda f: (-f["mtime"], f["path"]))
    return found[:limit]


class ExportsHandler(PortalHandler):
    """My export requests, and the form to file one from files in my home."""

    @requires()
    def get(self):
        with self.store.session() as session:
            rows = [airlock.status(r) for r in airlock.requests_of(session, self.user_name)]
        files = home_files(UserHome.of(self.home, self.user_name))
        self.render_page("exports.html", page=paginate(rows, self.page_number(),
                                                       self.portal.page_size),
                         files=files, preselected=self.get_query_arguments("path"))

    @requires()
    async def post(self):
        paths = [p for p in self.get_body_arguments("path") if p.strip()]
        paths += [p.strip() for p in self.get_body_argument("other_paths", "").splitlines()
                  if p.strip()]
        # Copying and screening take a while: off the event loop, so other pages stay live.
        request_id = await asyncio.to_thread(
            airlock.submit_export, self.store, self.home, user=self.user_name, paths=paths,
            reason=self.get_body_argument("reason", ""), limits=self.portal.export_limits,
            screen_config=self.portal.screen_config, screen_pool=self.portal.screen_pool)
        self.redirect(self.url(f"exports/{request_id}"))


class ExportStatusHandler(PortalHandler):
    """One of my requests: its state, the screen's verdicts, the reviews, the download."""

    @requires()
    def get(self, request_id: str):
        with self.store.session() as session:
            request = airlock.get_own_request(session, int(request_id), user=self.user_name)
            info = airlock.status(request)
        self.render_page("export_status.html", info=info)


class DownloadHandler(PortalHandler):
    """POST: release the request (audited) and send exactly the released bytes: one file
    when ``path`` names it, else a zip of every file and ``release-<id>.json``."""

    @requires()
    async def post(self, request_id: str):
        wanted = self.get_body_argument("path", "") or None
        dest = Path(tempfile.mkdtemp(prefix="medzone-release-"))
        try:
            path = await asyncio.to_thread(self._release, int(request_id), wanted, dest)
            self._send(path, path.name)
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def _release(self, request_id: int, wanted: str | None, dest: Path) -> Path:
        """Release into *dest*; the file to send (the one wanted, or a zip of them all)."""
        record, written = airlock.release_export(self.store, self.home, request_id,
                                                 user=self.user_name, dest=dest / "files")
        if wanted is not None:
            if wanted not in {f["path"] for f in record["files"]}:
                raise web.HTTPError(404, f"export request {request_id} has no file {wanted}")
            return dest / "files" / wanted
        archive = dest / f"release-{request_id}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
            for path in written:
                z.write(path, path.relative_to(dest / "files").as_posix())
        return archive

    def _send(self, path: Path, name: str) -> None:
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Content-Disposition", previews.content_disposition(name))
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                self.write(chunk)
        self.finish()


class ReviewQueueHandler(PortalHandler):
    """Requests waiting for a review, other than my own; then the recently decided."""

    @requires(roles.REVIEWER)
    def get(self):
        with self.store.session() as session:
            queue = airlock.review_queue(session, self.user_name)
            mine = queue.own_ids
            pending = [airlock.status(r) for r in queue.pending]
            decided = [airlock.status(r) for r in queue.decided]
        for row in pending:
            row["reviewed_by_me"] = any(rv["reviewer"] == self.user_name for rv in row["reviews"])
        self.render_page("review_queue.html",
                         page=paginate(pending, self.page_number(), self.portal.page_size),
                         decided=decided, mine=mine)


class ReviewHandler(PortalHandler):
    """GET: everything a reviewer decides on. POST: approve or reject with a comment."""

    @requires(roles.REVIEWER)
    async def get(self, request_id: str):
        page = await asyncio.to_thread(self._gather, int(request_id))  # nbdime diffs take a while
        own = page["info"]["user"] == self.user_name
        decided = any(r["reviewer"] == self.user_name for r in page["info"]["reviews"])
        self.render_page("review.html", own=own, decided=decided, **page)

    def _gather(self, request_id: int) -> dict:
        with self.store.session() as session:
            request = airlock.get_request(session, request_id)
            info = airlock.status(request)
            return {
                "info": info,
                "report": airlock.screen_report(request),
                "diffs": airlock.notebook_views(self.home, request, session),
                "earlier": [airlock.status(r) for r in airlock.earlier_releases(session, request)],
                "previews": [preview(self.home, request.id, f["path"]) for f in info["files"]],
            }

    @requires(roles.REVIEWER)
    def post(self, request_id: str):
        decision = self.get_body_argument("decision", "")
        if decision not in ("approve", "reject"):
            raise web.HTTPError(400, "decision must be approve or reject")
        airlock.decide_export(self.store, int(request_id), reviewer=self.user_name,
                              approve=decision == "approve",
                              comment=self.get_body_argument("comment", ""))
        self.redirect(self.url(f"review/{request_id}"))


def preview(home, request_id: int, rel: str) -> dict:
    """How the review page shows one quarantined file (:func:`medzone_hub.previews.preview_kind`):
    an image, a table's first rows, a text's first bytes, a notebook (its diff or the whole
    notebook, further down the page), or "no preview — download to inspect" with a link
    to the quarantined file (``url``: the file's quoted path under ``review/<id>/files/``)."""
    path = airlock.quarantine_dir(home, request_id) / "files" / rel
    suffix = PurePosixPath(rel).suffix.lower()
    kind = previews.preview_kind(rel)
    url = f"review/{int(request_id)}/files/{previews.url_path(rel)}"
    if kind == "image":
        return {"path": rel, "kind": "image", "url": url}
    if kind == "notebook":
        return {"path": rel, "kind": "notebook", "url": url}
    if kind is None:
        return {"path": rel, "kind": "none", "note": previews.NO_PREVIEW_TEXT, "url": url}
    try:
        if suffix in TABLE_SUFFIXES:
            with open(path, newline="", encoding="utf-8", errors="replace") as f:
                reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
                rows = [row for _, row in zip(range(PREVIEW_ROWS + 1), reader)]
            return {"path": rel, "kind": "table", "header": rows[:1], "rows": rows[1:]}
        if suffix in TEXT_SUFFIXES:
            with open(path, "rb") as f:
                text = f.read(PREVIEW_BYTES).decode("utf-8", errors="replace")
            return {"path": rel, "kind": "text", "text": text,
                    "truncated": path.stat().st_size > PREVIEW_BYTES}
    except OSError as err:
        return {"path": rel, "kind": "none", "note": f"cannot read: {err.strerror}", "url": url}
    return {"path": rel, "kind": "none", "note": previews.NO_PREVIEW_TEXT, "url": url}


class PreviewFileHandler(PortalHandler):
    """A quarantined file, for reviewers (never to the requester: the download after
    approval is the only way out for them): an image inline for its preview, any other
    file as a download ("no preview — download to inspect"). *rel* arrives URL-decoded."""

    @requires(roles.REVIEWER)
    def get(self, request_id: str, rel: str):
        with self.store.session() as session:
            request = airlock.get_request_to_review(session, int(request_id),
                                                    reviewer=self.user_name)
            paths = {f.path for f in request.files}
        suffix = PurePosixPath(rel).suffix.lower()
        if rel not in paths:
            raise web.HTTPError(404, f"no file {rel} in export request {request_id}")
        data = (airlock.quarantine_dir(self.home, int(request_id)) / "files" / rel).read_bytes()
        if previews.preview_kind(rel) == "image":
            self.set_header("Content-Type", IMAGE_TYPES[suffix] or mimetypes.guess_type(rel)[0])
            self.set_header("Content-Disposition",
                            previews.content_disposition(PurePosixPath(rel).name, "inline"))
        else:
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header("Content-Disposition",
                            previews.content_disposition(PurePosixPath(rel).name))
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Security-Policy", "default-src 'none'; sandbox")
        self.set_header("Cache-Control", "no-store")
        self.finish(data)


ROUTES = [
    (r"exports", ExportsHandler),
    (r"exports/(\d+)", ExportStatusHandler),
    (r"exports/(\d+)/download", DownloadHandler),
    (r"review", ReviewQueueHandler),
    (r"review/(\d+)", ReviewHandler),
    (r"review/(\d+)/files/(.+)", PreviewFileHandler),
]
