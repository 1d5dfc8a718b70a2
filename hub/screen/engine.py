"""The export screen: bytes (and the datasets' screening indexes) in, a verdict out.

A pure library: no database, web or sandbox. Every file is told apart by content; anything
that cannot be read is a finding and a block, never an exception."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from . import containers, embedded
from .images import check_image
from .model import (BLOCK, PASS, REVIEW, RULE_EMBEDDED_DATA, RULE_FILE_SIZE,
                    RULE_FILE_TYPE, RULE_MALFORMED, RULE_MODEL_WEIGHTS, RULE_PATH, Collector,
                    FileVerdict, Finding, ScreenConfig, worst)
from .notebook import NotebookScreen
from .tables import check_table, csv_table
from .text import IndexProbe, scan_text

_DEFAULT = ScreenConfig()


def _verdict(path: str, col: Collector) -> FileVerdict:
    return FileVerdict(path, worst([PASS] + [f.severity for f in col.findings]),
                       list(col.findings))


def _unreadable(col: Collector, error: str) -> None:
    if error == "RecursionError":
        col.add(RULE_MALFORMED, BLOCK, "file", "nested too deeply to screen")
    else:
        col.add(RULE_MALFORMED, BLOCK, "file", f"the screen could not read this file ({error})")


def screen_bytes(name: str, data: bytes, *, pool=None, indexes: Iterable = (),
                 config: ScreenConfig = _DEFAULT, seen_images: dict | None = None
                 ) -> FileVerdict:
    """Screen one file's bytes; ``name`` is only reported (and tells notebooks, CSV and model
    files apart from other text); the content decides everything else.

    ``seen_images``: the image checks of other files of the same request with the same
    indexes and config (a dict this call reads and adds to; :func:`screen_paths` shares
    one across its files), so that an image met again is not decoded again."""
    col = Collector(config, indexes)
    images = _ImageChecks(col, seen_images)
    images.shared = pool  # a ScreenPool the caller started (pool.py), or None
    error = None
    try:
        _Screen(col, IndexProbe(col.indexes), images).content(bytes(data), name, "file", 0)
    except Exception as err:  # noqa: BLE001 - never crash on hostile input: block instead
        error = type(err).__name__
    except BaseException:
        images.close()
        raise
    # Every image met before a failure was checked, as if inline; the first failure wins.
    error = images.finish() or error
    if error:
        _unreadable(col, error)
    return _verdict(name, col)


# --- image checks, in parallel for large files --------------------------------------------

_WORKER: tuple | None = None  # (config, indexes) of a forked image-check process


def _init_worker(config: ScreenConfig, indexes: list) -> None:
    global _WORKER
    _WORKER = (config, indexes)
    # Fingerprint matching is small matrix products: BLAS threads only spin against the
    # other workers (measured: 5x the CPU, 4x the wall time of one thread per process).
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def _check_images(batch: list, context: tuple | None = None) -> list:
    """[(findings, error type name or None)] of ``[(bytes, location)]``; stops at the first
    failure, which ends the screen of the file."""
    config, indexes = context or _WORKER
    out = []
    for data, location in batch:
        col = Collector(config, indexes)
        try:
            check_image(data, col, location)
        except Exception as err:  # noqa: BLE001 - reported as the file's failure
            out.append((col.findings, type(err).__name__))
            break
        out.append((col.findings, None))
    return out


def _relocated(found: list, origin: str, location: str) -> list:
    """The findings of an image checked at ``origin``, as if checked at ``location``."""
    if origin == location:
        return found
    return [Finding(f.rule, f.severity, location + f.location[len(origin):], f.detail)
            if f.location == origin or f.location.startswith(origin + " ") else f
            for f in found]


class _ImageChecks:
    """The image checks of one file, out of line: each image's findings are spliced back at
    the place it was met, so the findings and their order do not depend on where it ran.

    Identical image bytes (a re-run cell, an output that is also an attachment, the same
    figure in another file of the request) are checked once, keyed by their SHA-256: the
    copies get the first check's findings at their own place (``dedupe_images``).

    Images wait in a batch; once a file's images hold ``parallel_min_bytes`` they go to a
    pool of forked processes (while this one screens the text), so small files never start
    one. What is left runs here."""

    _BATCH_BYTES = 1 << 20
    _BATCH_IMAGES = 16

    def __init__(self, col: Collector, seen: dict | None = None):
        self.col = col
        cfg = col.config
        self.workers = cfg.workers or os.cpu_count() or 1
        self.places: list[int] = []  # len(col.findings) where each image was met
        self.locations: list[str] = []  # and its location
        # Per image: the number of the check that gives its findings, or (location,
        # findings) of a check done for an earlier file (from ``seen``).
        self.sources: list = []
        self.checks: list[tuple[bytes | None, str]] = []  # (digest, location) per check
        self.first: dict[bytes, int] = {}  # digest -> its check in this file
        self.seen = {} if seen is None else seen  # digest -> (location, findings), done
        self.pending: list[tuple[bytes, str]] = []
        self.pending_bytes = 0
        self.done: list = []  # results, or futures of batches, in order
        self.pool: ProcessPoolExecutor | None = None
        self.shared = None

    def add(self, data: bytes, location: str) -> None:
        self.places.append(len(self.col.findings))
        self.locations.append(location)
        digest = None
        if self.col.config.dedupe_images:
            digest = hashlib.sha256(data).digest()
            source = self.seen.get(digest, self.first.get(digest))
            if source is not None:
                self.sources.append(source)
                return
            self.first[digest] = len(self.checks)
        self.sources.append(len(self.checks))
        self.checks.append((digest, location))
        self.pending.append((data, location))
        self.pending_bytes += len(data)
        if self.pool is None and self.pending_bytes >= self.col.config.parallel_min_bytes:
            self.pool = self._start()
        if self.pool is not None and (self.pending_bytes >= self._BATCH_BYTES
                                      or len(self.pending) >= self._BATCH_IMAGES):
            self._submit()

    def _start(self) -> ProcessPoolExecutor | None:
        if self.shared is not None:  # spawned processes, safe from any thread
            if self.workers < 2 or len(self.pending) < 2 or not any(
                    getattr(ix, "counts", {}).get("images", 1) for ix in self.col.indexes):
                return None
            try:
                return self.shared.checker(self.col.config, self.col.indexes)
            except RuntimeError:  # the pool was shut down: check inline
                return None
        # Indexes without images have nothing to compare a figure with.
        # Called from a thread (the hub's or the portal's executor), this process is
        # multi-threaded: a fork could copy a lock another thread holds, so check inline.
        if threading.current_thread() is not threading.main_thread():
            return None
        if self.workers < 2 or len(self.pending) < 2 or multiprocessing.current_process().daemon \
                or not any(getattr(ix, "counts", {}).get("images", 1) for ix in self.col.indexes):
            return None
        try:
            return ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"),
                                       initializer=_init_worker,
                                       initargs=(self.col.config, self.col.indexes))
        except (OSError, ValueError):  # no fork here, or no processes left: check inline
            self.workers = 1
            return None

    def _submit(self) -> None:
        batch, self.pending, self.pending_bytes = self.pending, [], 0
        if batch:
            try:
                self.done.append(self.pool.submit(_check_images, batch))
            except Exception as err:  # noqa: BLE001 - the pool broke (a worker was killed)
                self.done.append([([], type(err).__name__)])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def finish(self) -> str | None:
        """Splice every image's findings in; the type name of the first failure, if any."""
        if self.pending:
            if self.pool is not None:
                self._submit()
            else:
                from threadpoolctl import threadpool_limits

                with threadpool_limits(1, user_api="blas"):
                    self.done.append(_check_images(
                        self.pending, (self.col.config, self.col.indexes)))
                self.pending = []
        results = []
        try:
            for batch in self.done:
                try:
                    got = batch if isinstance(batch, list) else batch.result()
                except Exception as err:  # noqa: BLE001 - a worker died (memory?)
                    got = [([], type(err).__name__)]
                results += got
                if got and got[-1][1]:
                    break
        finally:
            self.close()
        # Every image up to the first failure, each copy with its check's findings (the
        # first image of a failed check is the failure: its copies come later).
        inserts, error = [], None
        for place, location, source in zip(self.places, self.locations, self.sources):
            if isinstance(source, int):
                if source >= len(results):
                    break
                found, error = results[source]
                origin = self.checks[source][1]
            else:
                origin, found = source
            inserts.append((place, _relocated(found, origin, location)))
            if error:
                self.col.truncate(place)
                break
        self.col.splice(inserts)
        for (digest, location), (found, failed) in zip(self.checks, results):
            if digest is not None and not failed:
                self.seen[digest] = (location, found)
        return error


class _Screen:
    def __init__(self, col: Collector, probe: IndexProbe, images: _ImageChecks):
        self.col = col
        self.probe = probe
        self.images = images

    def nested(self, data: bytes, location: str, name: str, only_known: bool = False,
               depth: int = 1) -> bool:
        """Bytes found inside a file (base64 in a notebook, an archive member)."""
        kind = embedded.sniff(data, name)
        if only_known and kind is None:
            return False
        self.content(data, name, location, depth, kind=kind, nested=True)
        return True

    def content(self, data: bytes, name: str, where: str, depth: int, *, kind="?",
                nested: bool = False) -> None:
        col, cfg = self.col, self.col.config
        if len(data) > cfg.max_file_bytes and not nested:
            col.add(RULE_FILE_SIZE, BLOCK, where,
                    f"{len(data)} bytes, more than the limit of {cfg.max_file_bytes}")
        if kind == "?":
            kind = embedded.sniff(data, name)
        if kind in embedded.DATA_KINDS:
            col.add(RULE_EMBEDDED_DATA, BLOCK, where, f"{embedded.DATA_KINDS[kind]} (by content)")
            if kind == embedded.NPZ:
                self.archive(kind, data, where, depth)
            return
        if kind in embedded.WEIGHT_KINDS:
            col.add(RULE_MODEL_WEIGHTS, REVIEW, where,
                    f"{embedded.WEIGHT_KINDS[kind]}: needs a disclosure-risk report before release")
            return
        if kind in embedded.ARCHIVE_KINDS:
            col.add(RULE_FILE_TYPE, REVIEW, where,
                    f"{embedded.ARCHIVE_KINDS[kind]} (not an allowed output type; its members "
                    "were screened)")
            self.archive(kind, data, where, depth)
            return
        if kind in (embedded.PNG, embedded.JPEG, embedded.GIF):
            if kind not in cfg.allowed_types:
                col.add(RULE_FILE_TYPE, REVIEW, where, f"a {kind.upper()} image (not allowed)")
            self.image_layout(kind, data, where, depth)
            self.images.add(data, where)
            return
        if kind in embedded.UNREAD_IMAGE_KINDS:
            col.add(RULE_FILE_TYPE, BLOCK, where, f"{embedded.UNREAD_IMAGE_KINDS[kind]} (a format "
                    "the screen does not read: export PNG or JPEG)")
            return
        if kind == embedded.PDF:
            self.pdf(data, where, depth)
            if "pdf" not in cfg.allowed_types:
                col.add(RULE_FILE_TYPE, BLOCK, where, "a PDF (not an allowed output type)")
            return
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            col.add(RULE_FILE_TYPE if nested else RULE_MALFORMED, BLOCK, where,
                    "binary content of no allowed type (not UTF-8 text)")
            return
        if "\x00" in text:
            col.add(RULE_MALFORMED, BLOCK, where, "text with NUL characters")
        self.text(text, name, where)

    def text(self, text: str, name: str, where: str) -> None:
        col = self.col
        lower = name.lower()
        head = text.lstrip()[:1]
        if lower.endswith(".ipynb") or (head == "{" and '"cells"' in text[:4096] + text[-4096:]):
            NotebookScreen(col, self.probe, self.nested).run(text)
            return
        if lower.endswith(".json") or head in ("{", "["):
            import json

            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                if lower.endswith(".json"):
                    col.add(RULE_MALFORMED, BLOCK, where, "not valid JSON")
                value = None
            if value is not None:
                NotebookScreen(col, self.probe, self.nested).walk(value, where)
                NotebookScreen(col, self.probe, self.nested).text_bytes(text, where,
                                                                        numeric_only=True)
                return
        if lower.endswith((".csv", ".tsv")):
            scan_text(text, self.probe, col, where)
            NotebookScreen(col, self.probe, self.nested).text_bytes(text, where)
            table = csv_table(text)
            if table is not None:
                check_table(table, col, where, is_csv=True)
            return
        html = "<table" in text[:1 << 20].lower() or lower.endswith((".html", ".htm"))
        NotebookScreen(col, self.probe, self.nested).scan(text, where,
                                                         tables="html" if html else "text")

    def image_layout(self, kind: str, data: bytes, where: str, depth: int) -> None:
        """Every byte of an image that is not pixels: metadata blocks (a finding unless
        harmless, and screened), bytes after the end marker (block, and screened)."""
        col, cfg = self.col, self.col.config
        layout = containers.image_layout(kind, data, max_text_bytes=cfg.max_metadata_bytes,
                                         text_keys=cfg.harmless_png_text_keys)
        for severity, detail in layout.problems:
            col.add(RULE_MALFORMED, severity, where, detail)
        for n, extra in enumerate(layout.extras, 1):
            if extra.label:
                col.add(RULE_EMBEDDED_DATA, REVIEW, where,
                        f"{extra.label}: data beside the pixels, unseen by a reviewer")
            self.hidden(extra.data, f"{where} metadata {n}", depth)
        trailer = layout.trailer(data)
        if trailer:
            col.add(RULE_EMBEDDED_DATA, BLOCK, where,
                    f"{len(trailer)} bytes after the end of the {kind.upper()} image")
            self.hidden(trailer, f"{where} after the image", depth)

    def hidden(self, data: bytes, where: str, depth: int) -> None:
        """Bytes a container carries beside what it shows (image metadata, a trailer, a PDF
        stream): a file at its start or anywhere inside (by magic bytes), files in base64
        runs, and its text under the text rules."""
        if not data:
            return
        kind = embedded.sniff(data)
        if kind is not None and kind not in embedded.UNREAD_IMAGE_KINDS:  # EXIF is TIFF
            self.inner(data, where, depth, kind)
            return
        self.files_in(data, where, depth)
        for decoded in containers.base64_runs(data):
            kind = embedded.sniff(decoded)
            if kind is not None:
                self.inner(decoded, f"{where} base64", depth, kind)
            else:
                self.files_in(decoded, f"{where} base64", depth)
        NotebookScreen(self.col, self.probe, self.nested).scan(
            containers.readable_text(data), where)

    def files_in(self, data: bytes, where: str, depth: int) -> None:
        """Files that start anywhere inside ``data`` (by magic bytes)."""
        for start in containers.embedded_starts(data):
            kind = embedded.sniff(data[start:])
            if kind is not None:
                self.inner(data[start:], f"{where} at byte {start}", depth, kind)

    def inner(self, data: bytes, where: str, depth: int, kind: str) -> None:
        """A file of a known kind found inside a container, one level deeper."""
        cfg = self.col.config
        if depth >= cfg.max_archive_depth:
            self.col.add(RULE_EMBEDDED_DATA, BLOCK, where,
                         f"files nested deeper than {cfg.max_archive_depth} levels")
            return
        self.content(data, "", where, depth + 1, kind=kind, nested=True)

    def pdf(self, data: bytes, where: str, depth: int) -> None:
        """A PDF's text as it is stored and as its streams decode (Flate, ASCIIHex,
        ASCII85, LZW, RunLength; the strings that content streams show), files in its
        streams or between its objects, and bytes after its end."""
        col, cfg = self.col, self.col.config
        streams = containers.pdf_streams(data)
        skeleton = containers.pdf_skeleton(data, streams)
        scan_text(containers.readable_text(skeleton), self.probe, col, where)
        if b"/Encrypt" in skeleton:
            col.add(RULE_EMBEDDED_DATA, REVIEW, where, "an encrypted PDF (its streams cannot "
                    "be read)")
        budget = containers.Budget(cfg.max_unpacked_bytes)
        for s in streams:
            loc = f"{where} stream {s.number}"
            raw = data[s.start:s.end]
            try:
                decoded = containers.decode_stream(raw, s.filters, budget)
            except containers.DecodeError as err:
                col.add(RULE_EMBEDDED_DATA, REVIEW, loc,
                        f"a stream the screen cannot decode ({err})")
                continue
            except OverflowError:
                col.add(RULE_EMBEDDED_DATA, BLOCK, where, f"streams that decode to more than "
                        f"{cfg.max_unpacked_bytes} bytes (a decompression bomb?)")
                break
            if s.is_attachment:
                col.add(RULE_EMBEDDED_DATA, REVIEW, loc, "a file attached to the PDF")
            kind = embedded.sniff(decoded)
            if kind is not None:
                self.inner(decoded, loc, depth, kind)
                continue
            if s.is_image:  # pixels: compared with the fingerprints where they can be read
                png = containers.pdf_image_png(s, decoded)
                if png is not None:
                    self.images.add(png, f"{loc} image")
                continue
            scan_text(containers.readable_text(decoded), self.probe, col, loc)
            shown = containers.content_text(decoded)
            if shown:
                scan_text(shown, self.probe, col, f"{loc} text")
            self.files_in(decoded, loc, depth)
        for start in containers.embedded_starts(skeleton):
            if start and embedded.sniff(skeleton[start:]) is not None:
                col.add(RULE_EMBEDDED_DATA, BLOCK, where, "a file between the PDF's objects")
                self.hidden(skeleton[start:], f"{where} between objects", depth)
        after = containers.pdf_after_end(data)
        if after:
            col.add(RULE_EMBEDDED_DATA, BLOCK, where,
                    f"{len(after)} bytes after the end of the PDF (%%EOF)")
            self.hidden(after, f"{where} after the end", depth)

    def archive(self, kind: str, data: bytes, where: str, depth: int) -> None:
        col, cfg = self.col, self.col.config
        if depth >= cfg.max_archive_depth:
            col.add(RULE_EMBEDDED_DATA, BLOCK, where,
                    f"archives nested deeper than {cfg.max_archive_depth} levels")
            return
        try:
            for n, (member, content) in enumerate(embedded.unpack(
                    kind, data, max_members=cfg.max_archive_members,
                    max_bytes=cfg.max_unpacked_bytes, max_ratio=cfg.max_compression_ratio), 1):
                self.nested(content, f"{where} member {n}", member.rsplit("/", 1)[-1],
                            depth=depth + 1)
        except embedded.ArchiveError as err:
            col.add(RULE_EMBEDDED_DATA, BLOCK, where, str(err))


# --- files on disk -----------------------------------------------------------------------

def _within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _expand(paths: Iterable) -> list[Path]:
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir() and not p.is_symlink():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                for f in sorted(filenames + [d for d in dirnames
                                             if os.path.islink(os.path.join(dirpath, d))]):
                    out.append(Path(dirpath) / f)
        else:
            out.append(p)
    return out


def screen_path(path, *, pool=None, indexes: Sequence = (), config: ScreenConfig = _DEFAULT,
                root: Path | None = None, seen_images: dict | None = None) -> FileVerdict:
    path = Path(path)
    shown = str(path)
    col = Collector(config, indexes)
    try:
        if root is not None:
            root_real = Path(root).resolve()
            rel = path if not path.is_absolute() else None
            if (rel is not None and ".." in rel.parts) or ".." in path.parts:
                col.add(RULE_PATH, BLOCK, "path", "a path that climbs out of its folder (..)")
                return _verdict(shown, col)
            target = (path if path.is_absolute() else Path(root) / path)
            if not _within(target.resolve(), root_real):
                col.add(RULE_PATH, BLOCK, "path",
                        "resolves outside the allowed folder (a symlink or path traversal)")
                return _verdict(shown, col)
            path = target
        if path.is_symlink() and root is None:
            col.add(RULE_PATH, REVIEW, "path", "a symbolic link (its target was screened)")
        if not path.exists():
            col.add(RULE_PATH, BLOCK, "path", "no such file")
            return _verdict(shown, col)
        if not path.is_file():
            col.add(RULE_FILE_TYPE, BLOCK, "path", "not a regular file")
            return _verdict(shown, col)
        size = path.stat().st_size
        if size > 4 * config.max_file_bytes:
            with path.open("rb") as fh:
                head = fh.read(1024)
            col.add(RULE_FILE_SIZE, BLOCK, "file",
                    f"{size} bytes, more than the limit of {config.max_file_bytes} (not read)")
            kind = embedded.sniff(head, path.name)
            if kind in embedded.DATA_KINDS:
                col.add(RULE_EMBEDDED_DATA, BLOCK, "file", embedded.DATA_KINDS[kind])
            return _verdict(shown, col)
        data = path.read_bytes()
    except OSError as err:
        col.add(RULE_MALFORMED, BLOCK, "path", f"cannot be read ({type(err).__name__})")
        return _verdict(shown, col)
    verdict = screen_bytes(path.name, data, pool=pool, indexes=col.indexes, config=config,
                           seen_images=seen_images)
    return FileVerdict(shown, worst([verdict.verdict] + [f.severity for f in col.findings]),
                       list(col.findings) + verdict.findings)


def screen_paths(paths, *, pool=None, indexes: Sequence = (), config: ScreenConfig = _DEFAULT,
                 root: Path | None = None) -> list[FileVerdict]:
    """One verdict per file (folders are expanded). With ``root``, anything that resolves
    outside it (a symlink, ``..``) is blocked unread. An image met in several files is
    decoded and checked once. ``pool``: a :class:`~.pool.ScreenPool` that checks the images
    (a service's, started once; safe from any thread)."""
    seen: dict = {}
    return [screen_path(p, pool=pool, indexes=indexes, config=config, root=root,
                        seen_images=seen)
            for p in _expand(paths)]


__all__ = ["screen_bytes", "screen_path", "screen_paths"]
