"""A per-user cache of arrays decoded from a series, so repeated epochs do not decode again.

One entry per series: ``<root>/<aa>/<key>.json`` (the sidecar: what the entry is valid
for, the caller's metadata, and the name of its array) and ``<root>/<aa>/<key>-<token>.npy``
(memory-mappable: a warm load maps it instead of reading it). The cache knows arrays and
series, not what they hold: :class:`medzone_kernel.imaging.VolumeCache` keeps CT volumes
in it.

Validity: an entry made from a dataset's series is valid for that dataset's **manifest
sha256 + series uid** — the manifest lists the sha256 of every stored file and the stored
copy is read-only, so the same manifest means the same pixels, and nothing of the DICOM is
touched on a warm load. When the dataset is re-ingested (a new manifest) the entry is
stale and rebuilt. A bare folder (no manifest) is fingerprinted by its files' names,
sizes and modification times instead.

Writes are atomic and safe when two kernels race: the array goes to a fresh file under a
unique name, then the sidecar naming it replaces the old one with ``os.replace``; a
reader therefore always sees a complete, matching pair (or a miss, and decodes).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path

import numpy as np

from .datasets import SeriesRef, resolve_series

ENV_CACHE = "MEDZONE_CACHE"
CACHE_FORMAT = 1
#: An array no sidecar names, older than this, is a leftover of a lost race.
ORPHAN_AGE_S = 600


def default_root() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "medzone" / "volumes"


class ArrayCache:
    """Arrays decoded from series, as memory-mappable ``.npy`` files under *root*
    (default ``~/.cache/medzone/volumes``, or ``$MEDZONE_CACHE``), each with a JSON dict of
    metadata. A subclass says which files of a bare folder make its series
    (:meth:`files_of`) and what the array means."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def files_of(self, folder: Path) -> list[Path]:
        """The files of a bare folder that make its series (default: every visible file)."""
        return sorted(p for p in Path(folder).iterdir()
                      if p.is_file() and not p.name.startswith("."))

    def _fingerprint(self, folder: Path) -> str:
        digest = hashlib.sha256()
        for path in self.files_of(folder):
            st = path.stat()
            digest.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    # --- keys ------------------------------------------------------------------------------

    def _identity(self, ref: SeriesRef | Path) -> tuple[str, str]:
        """(entry name, validity stamp) of a series."""
        if isinstance(ref, SeriesRef) and ref.manifest_sha256:
            name = f"dataset\0{ref.dataset}\0{ref.series_uid}"
            stamp = f"manifest:{ref.manifest_sha256}:{ref.series_uid}"
        else:
            folder = (ref.folder if isinstance(ref, SeriesRef) else Path(ref)).resolve()
            name = f"folder\0{folder}"
            stamp = f"files:{self._fingerprint(folder)}"
        return hashlib.sha256(name.encode()).hexdigest()[:40], stamp

    def _sidecar(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    # --- API -------------------------------------------------------------------------------

    def get_entry(self, series_ref) -> tuple[np.ndarray, dict] | None:
        """(the array as a read-only memmap, its metadata), or None when absent or stale."""
        ref = resolve_series(series_ref)
        key, stamp = self._identity(ref)
        sidecar = self._sidecar(key)
        for _attempt in range(3):
            try:
                meta = json.loads(sidecar.read_text())
            except (FileNotFoundError, ValueError, OSError):
                return None
            if meta.get("format") != CACHE_FORMAT or meta.get("stamp") != stamp:
                return None
            try:
                hu = np.load(sidecar.parent / meta["array"], mmap_mode="r")
                break
            except FileNotFoundError:
                continue  # a concurrent writer replaced it just now: read the new sidecar
            except (ValueError, OSError, KeyError):
                return None  # damaged: decode again
        else:
            return None
        if list(hu.shape) != meta.get("shape"):
            return None
        return hu, meta

    def put_entry(self, series_ref, array: np.ndarray, meta: dict) -> Path:
        """Store *array* and *meta* (JSON) for *series_ref* (atomically); the sidecar's path."""
        ref = resolve_series(series_ref)
        key, stamp = self._identity(ref)
        sidecar = self._sidecar(key)
        folder = sidecar.parent
        folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        array_name = f"{key}-{token}.npy"
        tmp_array = folder / f".{array_name}.tmp"
        array = np.asarray(array)
        try:
            with open(tmp_array, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_array, folder / array_name)
        except BaseException:
            _unlink(tmp_array)
            raise
        meta = {
            **meta, "format": CACHE_FORMAT, "stamp": stamp, "array": array_name,
            "dataset": ref.dataset if isinstance(ref, SeriesRef) else None,
            "shape": list(array.shape),
        }
        previous = None
        try:
            previous = json.loads(sidecar.read_text()).get("array")
        except (FileNotFoundError, ValueError, OSError):
            pass
        tmp_meta = folder / f".{key}-{token}.json.tmp"
        try:
            tmp_meta.write_text(json.dumps(meta))
            os.replace(tmp_meta, sidecar)
        except BaseException:
            _unlink(tmp_meta)
            _unlink(folder / array_name)
            raise
        # The array the old sidecar named is garbage now (a reader that mapped it keeps it),
        # and so are arrays of writers that lost a race long ago.
        if previous and previous != array_name and "/" not in previous:
            _unlink(folder / previous)
        now = time.time()
        for other in folder.glob(f"{key}-*.npy"):
            try:
                old_enough = now - other.stat().st_mtime > ORPHAN_AGE_S
            except FileNotFoundError:
                continue
            if other.name != array_name and old_enough:
                _unlink(other)
        return sidecar

    def clear(self) -> int:
        """Remove every entry; returns the number of files removed."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for path in self.root.rglob("*"):
            if path.is_file() and (path.suffix in (".npy", ".json", ".tmp")):
                _unlink(path)
                removed += 1
        return removed

    def size_bytes(self) -> int:
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.rglob("*.npy"))


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = ["ENV_CACHE", "ArrayCache", "default_root"]
