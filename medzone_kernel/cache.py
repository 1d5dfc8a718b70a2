"""A per-user cache of decoded CT volumes, so repeated epochs do not decode DICOM again.

One entry per series: ``<root>/<aa>/<key>.json`` (the sidecar: what the entry is valid
for, spacing, affine, and the name of its array) and ``<root>/<aa>/<key>-<token>.npy``
(HU as float32, memory-mappable: a warm load maps it instead of reading it).

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
from .imaging import CTVolume, decode_ct_volume, series_files

ENV_CACHE = "MEDZONE_CACHE"
CACHE_FORMAT = 1
#: An array no sidecar names, older than this, is a leftover of a lost race.
ORPHAN_AGE_S = 600


def default_root() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "medzone" / "volumes"


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in series_files(folder):
        st = path.stat()
        digest.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class VolumeCache:
    """Decoded CT volumes as memory-mappable ``.npy`` files under *root*
    (default ``~/.cache/medzone/volumes``, or ``$MEDZONE_CACHE``)."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"VolumeCache({str(self.root)!r})"

    # --- keys ------------------------------------------------------------------------------

    def _identity(self, ref: SeriesRef | Path) -> tuple[str, str]:
        """(entry name, validity stamp) of a series."""
        if isinstance(ref, SeriesRef) and ref.manifest_sha256:
            name = f"dataset\0{ref.dataset}\0{ref.series_uid}"
            stamp = f"manifest:{ref.manifest_sha256}:{ref.series_uid}"
        else:
            folder = (ref.folder if isinstance(ref, SeriesRef) else Path(ref)).resolve()
            name = f"folder\0{folder}"
            stamp = f"files:{_fingerprint(folder)}"
        return hashlib.sha256(name.encode()).hexdigest()[:40], stamp

    def _sidecar(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    # --- API -------------------------------------------------------------------------------

    def get(self, series_ref) -> CTVolume | None:
        """The cached volume (``hu`` a read-only memmap), or None when absent or stale."""
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
        if list(hu.shape) != meta.get("shape") or hu.dtype != np.float32:
            return None
        return CTVolume(hu=hu, spacing_mm=tuple(meta["spacing_mm"]),
                        affine_ras=np.array(meta["affine_ras"], dtype=float),
                        series_uid=meta["series_uid"], patient=meta["patient"])

    def put(self, series_ref, vol: CTVolume) -> Path:
        """Store *vol* for *series_ref* (atomically); returns the sidecar's path."""
        ref = resolve_series(series_ref)
        key, stamp = self._identity(ref)
        sidecar = self._sidecar(key)
        folder = sidecar.parent
        folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        array_name = f"{key}-{token}.npy"
        tmp_array = folder / f".{array_name}.tmp"
        hu = np.asarray(vol.hu, dtype=np.float32)
        try:
            with open(tmp_array, "wb") as fh:
                np.save(fh, hu, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_array, folder / array_name)
        except BaseException:
            _unlink(tmp_array)
            raise
        meta = {
            "format": CACHE_FORMAT, "stamp": stamp, "array": array_name,
            "series_uid": vol.series_uid, "patient": vol.patient,
            "dataset": ref.dataset if isinstance(ref, SeriesRef) else None,
            "shape": list(hu.shape), "spacing_mm": list(vol.spacing_mm),
            "affine_ras": np.asarray(vol.affine_ras, dtype=float).tolist(),
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

    def load(self, series_ref) -> CTVolume:
        """Warm: the cached memmap. Cold or stale: decode with pydicom, store, then map."""
        ref = resolve_series(series_ref)
        vol = self.get(ref)
        if vol is not None:
            self.hits += 1
            return vol
        self.misses += 1
        vol = decode_ct_volume(ref)
        try:
            self.put(ref, vol)
        except OSError:
            return vol  # a full or read-only cache never stops a load
        return vol

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


_DEFAULT: dict[str, VolumeCache] = {}


def default_cache() -> VolumeCache:
    """The user's cache (one object per root, so hit/miss counters add up)."""
    root = str(default_root())
    if root not in _DEFAULT:
        _DEFAULT[root] = VolumeCache(root)
    return _DEFAULT[root]


__all__ = ["ENV_CACHE", "VolumeCache", "default_cache", "default_root"]
