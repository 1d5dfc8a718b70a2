"""A dataset's screening index: how the export screen recognises the dataset in an output.

Two parts, both without a single plaintext identifier:

* ``index.json`` — keyed hashes (HMAC-SHA256, 128 bits) of every identifier-like value of
  the stored dataset (pseudonymous patient ids, accession numbers, UIDs, dates, remaining
  header text), normalised first so that other spellings match (case, separators,
  full-width digits, date formats);
* ``fingerprints.npz`` — per image (slice or frame): a keyed exact hash of the pixel values,
  a coarse 32×32 thumbnail that finds candidates and a fine one (cells of about 2×2
  pixels) whose detail confirms them. A coarse likeness alone confuses different patients
  with the same anatomy; the detail (rank-transformed, coarse shape removed) is mostly the
  acquisition noise and small structures of one image, which a copy keeps through
  windowing, colour maps, flips, resizing and JPEG.

The key is the zone's own screening key, not the data provider's pseudonymization key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import unicodedata
from collections.abc import MutableSequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .model import ScreenConfig
from .recognizers import (COLUMN_ACCESSION, COLUMN_DATE, COLUMN_PATIENT_ID, COLUMN_UID,
                          classify_column_name, looks_like_uid, parse_date)

FORMAT = "medzone-screening-index"
FORMAT_VERSION = 3
#: Versions this MedZone reads: 2 kept its fingerprints in one compressed ``.npz`` (read
#: into memory), 3 in plain ``.npy`` arrays that are memory-mapped.
READABLE_VERSIONS = (2, 3)
INDEX_FILE = "index.json"
FINGERPRINTS_FILE = "fingerprints.npz"  # version 2
FINGERPRINTS_DIR = "fingerprints"  # version 3: one .npy per array, and the ANN index
ANN_FILE = "ann.usearch"
#: The approximate nearest-neighbour search compares 16×16 cells (2×2 coarse cells each)...
ANN_SIZE = 16
#: ... and hands this many images per orientation and sign to the exact coarse check.
ANN_CANDIDATES = 32


class InvalidIndex(ValueError):
    """A key, image or index folder the screening index cannot use; ``str(err)`` is the one
    line a person sees (the hub side reports it as its own invalid-input error)."""

PATIENT_ID, ACCESSION, UID, DATE, TEXT = "patient_id", "accession", "uid", "date", "text"
KINDS = (PATIENT_ID, ACCESSION, UID, DATE, TEXT)
#: Shorter normalised values are not indexed: "1" or "CT" would match everything.
MIN_VALUE_CHARS = 6

THUMBNAIL_SIZE = 32
#: Candidates are found with a coarse thumbnail (32×32 cells) ...
COARSE_SIZE = 32
#: ... whose unclipped cells correlate at least this well with an indexed image's ...
COARSE_THRESHOLD = 0.6
#: ... (the best few, in any flip or quarter turn) ...
MAX_CANDIDATES = 8
#: ... and confirmed when the detail of their fine thumbnails correlates at least this well:
#: 0.66 for fine thumbnails of up to 64 cells a side, 0.85 from 128 (linear in between).
#: Calibrated on synthetic cohorts (seeds 1, 2, 3, 5, 6, 42, 99 against seed 11): other
#: patients' CT slices (128², fine 64) reach 0.62, degraded copies (JPEG 75, resized
#: ×0.5/×2) 0.70 and up; other patients' X-rays (256², fine 128), whose detail is mostly
#: the anatomy they share, reach 0.82, their degraded copies 0.88 and up.
DETAIL_THRESHOLDS = ((64, 0.66), (128, 0.85))
FINE_MIN, FINE_MAX = 32, 128
DETAIL_SIGMA = 0.6
STORED_BLURS = (0.0, 0.4, 0.6, 0.8, 1.0, 1.3)
BLUR_MARGIN = 1.1
SATURATION_TOLERANCE = 0.02
#: An image with fewer unclipped cells than these cannot be compared (nothing is looked up).
MIN_COARSE_CELLS = 64
COARSE_CLIPPED = 0.25
TEXTURED = 0.25
MIN_FINE_CELLS = 256

_SEPARATORS_RE = re.compile(r"[\s\-._/:,;'\"()\[\]{}^=\\|+]+")
_STANDARD_UID_ROOT = "1.2.840.10008."
_NUMBER_RE = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", re.I)
_CODE_RE = re.compile(r"[A-Z0-9_]+")
#: Header text from vocabularies or written by de-identification: the same in every dataset.
_VOCABULARY_KEYWORDS = frozenset({
    "CodeMeaning", "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion",
    "ContextIdentifier", "MappingResource", "DeidentificationMethod", "SpecificCharacterSet"})
_TEXT_VRS = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "PN"})


# --- normalisation and hashing ---------------------------------------------------------

def normalize_identifier(value) -> str:
    """Case-folded, separators (- . / _ space …) removed, full-width as ASCII; a value that
    spells a date (2023-01-15, 2023.1.15, 20230115, 2023-01-15T10:30, 2023년 1월 15일) becomes
    ``YYYYMMDD``."""
    text = unicodedata.normalize("NFKC", str(value)).strip()
    day = parse_date(text)
    if day is not None:
        return f"{day:%Y%m%d}"
    return _SEPARATORS_RE.sub("", text.casefold())


def _derive(key: bytes, purpose: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
        raise InvalidIndex("the screening index key must be at least 16 bytes")
    return hmac.new(bytes(key), b"medzone screening index v1: " + purpose,
                    hashlib.sha256).digest()


class _Hasher:
    def __init__(self, key: bytes):
        self._values = _derive(key, b"values")
        self._pixels = _derive(key, b"pixels")

    def value(self, normalized: str) -> str:
        mac = hmac.new(self._values, normalized.encode("utf-8"), hashlib.sha256)
        return mac.digest()[:16].hex()

    def pixels(self, pixels: np.ndarray) -> bytes:
        canonical = canonical_pixels(pixels)
        mac = hmac.new(self._pixels, f"{canonical.dtype.str}{canonical.shape}".encode(),
                       hashlib.sha256)
        mac.update(canonical.tobytes())
        return mac.digest()[:16]


# --- image fingerprints ----------------------------------------------------------------

def canonical_pixels(pixels: np.ndarray) -> np.ndarray:
    """Pixel values independent of how they were stored: integral values as the smallest
    of int16/int32/int64 that holds them, other values as float64; C order, little-endian."""
    arr = np.asarray(pixels)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.int16)
    if arr.dtype.kind == "f":
        if not (np.isfinite(arr).all() and (np.mod(arr, 1) == 0).all()):
            return np.ascontiguousarray(arr, dtype="<f8")
    if arr.dtype.kind in "fiu":
        lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)
        for dtype in ("<i2", "<i4", "<i8"):
            info = np.iinfo(np.dtype(dtype))
            if info.min <= lo and hi <= info.max:
                return np.ascontiguousarray(arr, dtype=dtype)
    return np.ascontiguousarray(arr, dtype="<f8")


def _gray(pixels: np.ndarray) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].astype(np.float32).mean(axis=-1)
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise InvalidIndex("an image fingerprint needs a 2-D (or RGB) image")
    if arr.dtype.kind not in "iuf":
        arr = arr.astype(np.float32)
    return arr


def _box(arr: np.ndarray, size: int) -> np.ndarray:
    """``arr`` averaged down (or up) to size×size cells, float32; the aspect ratio is not
    kept, so a copy with other margins still lines up cell by cell."""
    h, w = arr.shape
    if h % size == 0 and w % size == 0:
        blocks = arr.reshape(size, h // size, size, w // size)
        return blocks.sum(axis=3, dtype=np.float32).sum(axis=1) / ((h // size) * (w // size))
    image = Image.fromarray(np.asarray(arr, dtype=np.float32))
    return np.asarray(image.resize((size, size), Image.BOX))


def thumbnail(pixels: np.ndarray, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """A size×size float thumbnail (box average), stretched between its 1st and 99th
    percentile: re-windowing, rescaling or another bit depth change it little. With
    :func:`perceptual_hash`, a compact likeness key (the index itself keeps thumbnails)."""
    small = _box(_gray(pixels), size)
    lo, hi = np.percentile(small, [1, 99])
    if hi - lo <= 1e-6:
        return np.zeros((size, size), dtype=np.float32)
    return np.clip((small - lo) / (hi - lo), 0, 1).astype(np.float32)


def perceptual_hash(thumb: np.ndarray) -> int:
    """64-bit DCT pHash: the 8×8 lowest frequencies against their median (DC excluded)."""
    from scipy.fft import dctn

    coefficients = dctn(thumb.astype(np.float64), norm="ortho")[:8, :8].ravel()
    bits = coefficients > np.median(coefficients[1:])
    return int(np.packbits(bits).view(">u8")[0])


def detail_threshold(size: int) -> float:
    """The detail correlation that confirms a candidate whose fine thumbnail is size²."""
    (small, low), (large, high) = DETAIL_THRESHOLDS
    return float(np.interp(size, [small, large], [low, high]))


def fine_size(shape) -> int:
    """The side of an image's fine thumbnail: cells of about 2×2 pixels, so that the
    acquisition noise of each image survives (it is what tells two patients with the same
    anatomy apart), between 32 and 128 cells."""
    return int(min(FINE_MAX, max(FINE_MIN, min(shape[:2]) // 2)))


def unsaturated_cells(gray: np.ndarray, size: int, allowed: float = 0.0) -> np.ndarray:
    """size×size mask of the cells of which no more than ``allowed`` of the pixels lie at
    the image's darkest or brightest value (within 2 % of its range). A window, a colour
    map or a bit depth change is a monotone map of the values that clips at both ends:
    inside these cells it keeps their order, at the clipped ones it does not."""
    lo, hi = float(gray.min()), float(gray.max())
    if hi <= lo:
        return np.zeros((size, size), dtype=bool)
    tolerance = SATURATION_TOLERANCE * (hi - lo)
    clipped = (gray <= lo + tolerance) | (gray >= hi - tolerance)
    return _box(clipped.view(np.uint8), size) <= allowed


def textured_cells(gray: np.ndarray, size: int) -> np.ndarray:
    """size×size mask of the cells where at least a quarter of the pixels differ from their
    left neighbour. Acquired images are noisy everywhere (and stay so through windowing,
    resizing and compression); figures, plots and text are flat fills with edges. A flat
    cell has no detail, so it could not confirm a copy anyway."""
    moving = np.zeros(gray.shape, dtype=np.uint8)
    moving[:, 1:] = gray[:, 1:] != gray[:, :-1]
    return _box(moving, size) >= TEXTURED


def _to_uint16(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint16)
    return np.rint((values - lo) * (65535 / (hi - lo))).astype(np.uint16)


def _orient(thumb: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 flips and quarter turns: an output may be transposed or mirrored."""
    t = thumb.T if k >= 4 else thumb
    return (t, t[::-1], t[:, ::-1], t[::-1, ::-1])[k % 4]


def _ranks(values: np.ndarray) -> np.ndarray:
    out = np.empty(values.size, dtype=np.float64)
    out[np.argsort(values, kind="stable")] = np.arange(values.size)
    return out


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    norm = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / norm) if norm > 1e-12 else 0.0


class _Query:
    """A query image's thumbnails and detail, computed once per size and reused for every
    candidate and orientation."""

    def __init__(self, pixels: np.ndarray):
        self.gray = _gray(pixels).astype(np.float32, copy=False)
        self._cells: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._details: dict[int, _Detail] = {}

    def cells(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if size not in self._cells:
            if size == COARSE_SIZE:
                # Coarse cells only find candidates: a few clipped pixels are tolerable,
                # flat ones are not (see textured_cells). Every other pixel of a large
                # image tells that as well, at a quarter of the cost.
                step = 2 if min(self.gray.shape) >= 8 * size else 1
                sample = self.gray[::step, ::step]
                valid = unsaturated_cells(sample, size, COARSE_CLIPPED)
                if valid.sum() >= MIN_COARSE_CELLS:
                    valid &= textured_cells(sample, size)
                if valid.sum() < MIN_COARSE_CELLS:
                    self._cells[size] = (np.zeros((size, size), np.float32), valid)
                    return self._cells[size]
            else:
                valid = unsaturated_cells(self.gray, size)
            self._cells[size] = (_box(self.gray, size), valid)
        return self._cells[size]

    def detail(self, size: int) -> "_Detail":
        if size not in self._details:
            self._details[size] = _Detail(*self.cells(size))
        return self._details[size]


class _Detail:
    """A thumbnail's ranks and detail over its valid cells (see :func:`detail_correlations`).
    A flip or quarter turn permutes the cells and the Gaussian is symmetric, so they are
    computed once and oriented afterwards."""

    def __init__(self, values: np.ndarray, valid: np.ndarray):
        self.valid = valid
        from scipy import ndimage  # 0.2 s to import: not for every `medzone` command

        self.cells = int(valid.sum())
        self.support = np.maximum(ndimage.gaussian_filter(valid.astype(np.float64),
                                                          DETAIL_SIGMA), 1e-6)
        self.ranked, self.residual = _rank_detail(values, valid, self.support)


def _rank_detail(values: np.ndarray, valid: np.ndarray, support: np.ndarray):
    from scipy import ndimage

    ranked = np.zeros(valid.shape)
    ranked[valid] = _ranks(values[valid])
    return ranked, ranked - ndimage.gaussian_filter(ranked, DETAIL_SIGMA) / support


def detail_correlations(query: np.ndarray, valid: np.ndarray, stored: np.ndarray
                        ) -> tuple[float, float]:
    """(rank correlation, detail correlation) of two fine thumbnails over ``valid`` cells.

    Both are rank-transformed there first, so any monotone map of the values (a window,
    a colour map, a gamma) leaves them unchanged, and an inverted one only flips their sign.
    The detail is each cell minus a Gaussian-weighted mean of its valid neighbours (σ 0.6
    cells): the coarse anatomy that different patients share cancels out, the acquisition
    noise and small structures of this one image remain.
    """
    return _compare(_Detail(query, valid), 0, stored)


def _compare(query: _Detail, k: int, stored: np.ndarray) -> tuple[float, float]:
    if query.cells < MIN_FINE_CELLS:
        return 0.0, 0.0
    valid, support = _orient(query.valid, k), _orient(query.support, k)
    q_ranked, q_detail = _orient(query.ranked, k)[valid], _orient(query.residual, k)[valid]
    s_ranked, s_detail = (a[valid] for a in _rank_detail(stored, valid, support))
    plain = _correlation(q_ranked, s_ranked)
    sign = -1.0 if plain < 0 else 1.0  # an inverted copy (MONOCHROME1 shown as stored)
    # A downscaled or compressed copy has lost some of its finest detail: blur the stored
    # image (in steps up to σ 1.3 cells) only as far as needed to be no sharper than the
    # query; blurring it further would leave mostly the anatomy that patients share.
    sharpness = _energy(q_detail, q_ranked) * BLUR_MARGIN
    from scipy import ndimage
    for blur in STORED_BLURS[1:]:
        if _energy(s_detail, s_ranked) <= sharpness:
            break
        s_ranked, s_detail = (a[valid] for a in _rank_detail(
            ndimage.gaussian_filter(stored, blur), valid, support))
    return sign * plain, sign * _correlation(q_detail, s_detail)


def _energy(residual: np.ndarray, ranked: np.ndarray) -> float:
    return float(residual.var() / max(ranked.var(), 1e-12))


@dataclass(frozen=True)
class ImageCandidate:
    """An indexed image that ``pixels`` is likely a copy of."""

    ref: str
    correlation: float  # rank correlation of the fine thumbnails (unclipped cells)
    detail_correlation: float  # of their detail: what tells two patients apart
    exact: bool = False
    threshold: float = 0.0  # the detail correlation that confirms a copy of this image


# --- building --------------------------------------------------------------------------

class ScreeningIndexBuilder:
    """Collects a dataset's identifier-like values and image fingerprints, then writes them."""

    def __init__(self, key: bytes):
        self._hasher = _Hasher(key)
        self._values: dict[str, set[str]] = {kind: set() for kind in KINDS}
        self._exact: list[tuple[bytes, int]] = []
        self._shapes: set[tuple[int, ...]] = set()
        self._coarse: list[np.ndarray] = []
        self._fine: list[np.ndarray] = []
        self._refs: list[str] = []
        self._series: dict[str, int] = {}
        self._seen: set[tuple[str, str]] = set()

    # identifiers

    def add_identifier(self, kind: str, value) -> bool:
        """Index one value; False when it is empty or too short to be telling."""
        if kind not in self._values:
            raise ValueError(f"unknown identifier kind {kind!r} (one of {', '.join(KINDS)})")
        if value is None:
            return False
        if isinstance(value, str) and (kind, value) in self._seen:
            return True  # every slice of a series repeats its UIDs, dates and ids
        normalized = normalize_identifier(value)
        if len(normalized) < MIN_VALUE_CHARS:
            return False
        self._values[kind].add(self._hasher.value(normalized))
        if isinstance(value, str):
            self._seen.add((kind, value))
        return True

    def add_dicom(self, ds, ref: str | None = None) -> None:
        """Every identifier-like value of a (de-identified) dataset and each frame's pixels.

        ``ref`` names its images in candidates (written as is: never pass an identifier);
        by default "<modality> series <n> image <InstanceNumber>".
        """
        self._add_elements(ds)
        if "PixelData" in ds:
            if ref is None:
                ref = self.dicom_ref(*dicom_ref_facts(ds))
            self._add_dicom_pixels(ds, ref)

    def dicom_ref(self, series_uid: str, modality: str, instance: str | None) -> str:
        """The name :meth:`add_dicom` gives a file's images by default (see
        :func:`dicom_ref_facts`): series are numbered in the order they are first seen."""
        ordinal = self._series.setdefault(series_uid, len(self._series) + 1)
        return (f"{modality} series {ordinal} "
                f"image {len(self._refs) + 1 if instance is None else instance}")

    def merge(self, part: "ScreeningIndexBuilder", ref: str | None = None) -> None:
        """Add what ``part`` (a builder with the same key, filled elsewhere: e.g. an ingest's
        worker process) collected, as if its calls had been made on this builder; in its
        image names, :data:`REF_SLOT` becomes ``ref``."""
        for kind, values in part._values.items():
            self._values[kind] |= values
        offset = len(self._refs)
        self._exact.extend((digest, i + offset) for digest, i in part._exact)
        self._shapes |= part._shapes
        self._coarse.extend(part._coarse)
        self._fine.extend(part._fine)
        self._refs.extend(r.replace(REF_SLOT, ref) if ref is not None else r
                          for r in part._refs)

    def _add_elements(self, ds) -> None:
        for elem in ds:
            keyword, vr = elem.keyword, elem.VR
            if elem.tag.is_private:
                continue  # not in a de-identified dataset; raw vendor data otherwise
            if vr == "SQ":
                for item in elem.value or []:
                    self._add_elements(item)
                continue
            value = elem.value
            values = list(value) if isinstance(value, (list, tuple, MutableSequence)) else [value]
            for value in values:
                if value is None or isinstance(value, bytes) or value == "":
                    continue
                text = str(value).strip()
                if keyword in ("PatientID", "PatientName", "OtherPatientIDs"):
                    self.add_identifier(PATIENT_ID, text)
                elif keyword in ("AccessionNumber", "StudyID"):
                    self.add_identifier(ACCESSION, text)
                elif vr == "UI":
                    if not text.startswith(_STANDARD_UID_ROOT):
                        self.add_identifier(UID, text)
                elif vr in ("DA", "DT"):
                    day = parse_date(text[:8])
                    if day is not None:
                        self.add_identifier(DATE, f"{day:%Y%m%d}")
                elif vr in _TEXT_VRS and keyword not in _VOCABULARY_KEYWORDS:
                    if _is_telling_text(text):
                        self.add_identifier(TEXT, text)

    def _add_dicom_pixels(self, ds, ref: str) -> None:
        pixels = ds.pixel_array
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        if pixels.ndim == (2 if samples == 1 else 3):
            pixels = pixels[np.newaxis]  # one frame
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        for i, frame in enumerate(pixels):
            frame_ref = ref if len(pixels) == 1 else f"{ref} frame {i + 1}"
            self.add_image(frame, frame_ref)
            if samples == 1 and (slope, intercept) != (1.0, 0.0):
                # Outputs usually hold modality values (HU), not the stored ones.
                self._exact.append((self._hasher.pixels(_rescaled(frame, slope, intercept)),
                                    len(self._refs) - 1))

    def add_table(self, df) -> None:
        """Values of patient-id, accession, UID and date columns (by name or content)."""
        for name in df.columns:
            column_kind = classify_column_name(name)
            cells = [c for c in (_cell_text(v) for v in df[name].dropna().unique()) if c]
            if not cells:
                continue
            if column_kind == COLUMN_PATIENT_ID:
                kind = PATIENT_ID
            elif column_kind == COLUMN_ACCESSION:
                kind = ACCESSION
            elif column_kind == COLUMN_UID or all(looks_like_uid(c) for c in cells):
                kind = UID
            elif column_kind == COLUMN_DATE or sum(parse_date(c) is not None and not c.isdigit()
                                                   for c in cells) >= 0.8 * len(cells):
                kind = DATE
            else:
                continue
            for cell in cells:
                self.add_identifier(kind, cell)

    def add_image(self, pixels: np.ndarray, ref: str) -> None:
        """Fingerprint one 2-D image (or RGB): exact hash, coarse and fine thumbnails."""
        gray = _gray(pixels).astype(np.float32, copy=False)
        self._refs.append(str(ref))
        self._exact.append((self._hasher.pixels(pixels), len(self._refs) - 1))
        self._shapes.add(np.shape(pixels))
        self._coarse.append(_to_uint16(_box(gray, COARSE_SIZE)))
        self._fine.append(_to_uint16(_box(gray, fine_size(gray.shape))))

    # output

    @property
    def counts(self) -> dict[str, int]:
        counts = {kind: len(values) for kind, values in self._values.items()}
        counts["images"] = len(self._refs)
        return counts

    def write(self, directory, *, ann_min_images: int | None = None) -> Path:
        """Write ``index.json`` and the ``fingerprints/`` arrays into ``directory`` (created).

        The arrays are plain ``.npy`` files, memory-mapped when the index is loaded; with
        more than ``ann_min_images`` images (by default ``ScreenConfig.ann_min_images``) an
        approximate nearest-neighbour index of the coarse thumbnails is written too."""
        if ann_min_images is None:
            ann_min_images = ScreenConfig().ann_min_images
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        n = len(self._refs)
        document = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "hash": "HMAC-SHA256 (first 128 bits) of normalize_identifier(value), keyed",
            "normalization": "NFKC, case-folded, separators removed, dates as YYYYMMDD",
            "counts": self.counts,
            "identifiers": {kind: sorted(values) for kind, values in self._values.items()},
            "images": {"directory": FINGERPRINTS_DIR,
                       "coarse": [COARSE_SIZE, COARSE_SIZE],
                       "fine": f"min(side/2, {FINE_MAX}) squared, at least {FINE_MIN}",
                       "coarse_threshold": COARSE_THRESHOLD,
                       "detail_sigma": DETAIL_SIGMA,
                       "detail_thresholds": DETAIL_THRESHOLDS,
                       "ann": ANN_FILE if n > ann_min_images else None,
                       "ann_size": [ANN_SIZE, ANN_SIZE]},
        }
        exact = np.frombuffer(b"".join(h for h, _ in self._exact), dtype=np.uint8)
        exact = exact.reshape(len(self._exact), 16)
        exact_image = np.array([i for _, i in self._exact], dtype=np.int64)
        order = np.lexsort(exact.T[::-1]) if len(exact) else np.zeros(0, dtype=np.int64)
        sizes = np.array([f.shape[0] for f in self._fine], dtype=np.int64)
        arrays = {
            # sorted, so that a digest is found by bisection in the mapped file
            "exact": exact[order], "exact_image": exact_image[order],
            "coarse": (np.stack(self._coarse) if n else
                       np.zeros((0, COARSE_SIZE, COARSE_SIZE), dtype=np.uint16)),
            "fine": (np.concatenate([f.ravel() for f in self._fine]) if n else
                     np.zeros(0, dtype=np.uint16)),
            "fine_size": sizes,
            "fine_offset": np.concatenate([[0], np.cumsum(sizes * sizes)[:-1]]).astype(np.int64)
            if n else np.zeros(0, dtype=np.int64),
            # Sizes only: an image of another shape cannot be an exact copy (not hashed).
            "shapes": np.array(sorted(_shape_key(shape) for shape in self._shapes), dtype=str),
            "refs": np.array(self._refs, dtype=str)}
        folder = directory / FINGERPRINTS_DIR
        folder.mkdir(exist_ok=True)
        for name, array in arrays.items():
            np.save(folder / f"{name}.npy", array, allow_pickle=False)
        if n > ann_min_images:
            _build_ann(arrays["coarse"]).save(str(folder / ANN_FILE))
        (directory / FINGERPRINTS_FILE).unlink(missing_ok=True)  # an older version's
        (directory / INDEX_FILE).write_text(json.dumps(document, indent=1) + "\n")
        return directory


#: A placeholder image name for :meth:`ScreeningIndexBuilder.merge` to fill in.
REF_SLOT = "\x00ref\x00"


def dicom_ref_facts(ds) -> tuple[str, str, str | None]:
    """What :meth:`ScreeningIndexBuilder.dicom_ref` needs of a dataset: series UID, modality
    and instance number (None when absent), as text."""
    instance = f"{ds.get('InstanceNumber')}" if "InstanceNumber" in ds else None
    return str(ds.get("SeriesInstanceUID", "")), f"{ds.get('Modality', 'image')}", instance


def _shape_key(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


def _cell_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # an id column read as float because of empty cells
    return str(value).strip()


def _rescaled(frame: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Modality values; in integers when they are integers (the usual CT case, much faster)."""
    if frame.dtype.kind in "iu" and slope.is_integer() and intercept.is_integer():
        slope_i, intercept_i = int(slope), int(intercept)
        ends = [int(frame.min()) * slope_i + intercept_i, int(frame.max()) * slope_i + intercept_i]
        for dtype in (np.int16, np.int32, np.int64):
            info = np.iinfo(dtype)
            if info.min <= min(ends) and max(ends) <= info.max:
                out = frame.astype(dtype)
                if slope_i != 1:
                    out *= slope_i
                out += intercept_i
                return out
    return frame * slope + intercept


def _is_telling_text(text: str) -> bool:
    """Header text worth indexing: long enough, with letters, not a number or a code."""
    if _NUMBER_RE.fullmatch(text) or _CODE_RE.fullmatch(text):
        return False
    return len(normalize_identifier(text)) >= MIN_VALUE_CHARS and any(c.isalpha() for c in text)


# --- using ------------------------------------------------------------------------------

def _ann_vectors(coarse: np.ndarray) -> np.ndarray:
    """Unit vectors of the coarse thumbnails, averaged to 16×16 and centred: their inner
    product with a query's (:meth:`ScreeningIndex._ann_queries`) approximates the coarse
    correlation the exact check computes."""
    n = len(coarse)
    step = COARSE_SIZE // ANN_SIZE
    cells = np.asarray(coarse, dtype=np.float32).reshape(n, ANN_SIZE, step, ANN_SIZE, step)
    flat = cells.mean(axis=(2, 4)).reshape(n, -1)
    flat -= flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.maximum(norms, 1e-6)


def _build_ann(coarse: np.ndarray, chunk: int = 20_000):
    """A usearch HNSW index (inner product, half floats) of the coarse thumbnails; keys
    are image numbers."""
    from usearch.index import Index

    ann = Index(ndim=ANN_SIZE * ANN_SIZE, metric="ip", dtype="f16", connectivity=16,
                expansion_add=64, expansion_search=2 * ANN_CANDIDATES)
    for start in range(0, len(coarse), chunk):  # bounded memory for the float copies
        part = _ann_vectors(coarse[start:start + chunk])
        ann.add(np.arange(start, start + len(part), dtype=np.uint64), part)
    return ann


def _reopen(directory: str, hasher: "_Hasher", ann_min_images: int | None) -> "ScreeningIndex":
    return ScreeningIndex._open(Path(directory), hasher, ann_min_images)


class ScreeningIndex:
    """A written index, opened for screening: its arrays are memory-mapped (version 3), so
    opening costs the same whatever the number of images, and a lookup reads only the
    pages it needs. With more than ``ann_min_images`` images, candidates are found by an
    approximate nearest-neighbour search (usearch HNSW) and checked exactly; with fewer, by
    comparing the query with every image (see :meth:`image_candidates`)."""

    def __init__(self, directory: Path, hasher: _Hasher, document: dict, arrays: dict,
                 ann_min_images: int | None = None):
        self.directory = directory
        self._hasher = hasher
        self._values = {kind: set(document["identifiers"].get(kind, [])) for kind in KINDS}
        self.counts = document.get("counts", {})
        self._shapes = {str(shape) for shape in arrays["shapes"]}
        self._refs = arrays["refs"]
        self._exact = arrays["exact"]
        self._exact_image = arrays["exact_image"]
        # the first 8 bytes of each (sorted) digest, for bisection
        self._exact_high = (np.ascontiguousarray(self._exact[:, :8]).view(">u8").ravel()
                            if len(self._exact) else np.zeros(0, dtype=">u8"))
        self._coarse_cells = arrays["coarse"]
        self._fine_flat, self._fine_size = arrays["fine"], arrays["fine_size"]
        self._fine_offset = arrays["fine_offset"]
        self._ann_file = document.get("images", {}).get("ann")
        self.ann_min_images = (ScreenConfig().ann_min_images if ann_min_images is None
                               else int(ann_min_images))
        self._lazy: dict = {}  # exact search matrices, the ANN: made on first use, shared
        self._views: dict = {}  # by the copies that configured() makes

    @classmethod
    def load(cls, directory, key: bytes, *, ann_min_images: int | None = None
             ) -> "ScreeningIndex":
        """Open the index written in ``directory``; ``ann_min_images``: see
        ``ScreenConfig.ann_min_images`` (its default when None)."""
        return cls._open(Path(directory), _Hasher(key), ann_min_images)

    @classmethod
    def _open(cls, directory: Path, hasher: _Hasher, ann_min_images) -> "ScreeningIndex":
        try:
            document = json.loads((directory / INDEX_FILE).read_text())
        except (OSError, ValueError) as err:
            raise InvalidIndex(f"{directory}: not a readable screening index ({err})") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise InvalidIndex(f"{directory}: unsupported screening index format")
        version = document.get("version")
        if version not in READABLE_VERSIONS:
            raise InvalidIndex(
                f"{directory}: screening index version {version}, this MedZone reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))}: add the dataset again "
                f"to rebuild it")
        try:
            if version == 2:
                arrays = _read_version_2(directory / FINGERPRINTS_FILE)
            else:
                folder = directory / FINGERPRINTS_DIR
                arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r",
                                        allow_pickle=False)
                          for name in ("exact", "exact_image", "coarse", "fine", "fine_size",
                                       "fine_offset", "shapes", "refs")}
        except (OSError, ValueError, KeyError) as err:
            raise InvalidIndex(f"{directory}: not a readable screening index ({err})") from None
        return cls(directory, hasher, document, arrays, ann_min_images)

    def __reduce__(self):
        # Worker processes open the same files again instead of receiving copies.
        return _reopen, (str(self.directory), self._hasher, self.ann_min_images)

    def configured(self, config) -> "ScreeningIndex":
        """This index with ``config.ann_min_images`` (the same object when it already has
        it; otherwise one copy per value, sharing the arrays)."""
        n = getattr(config, "ann_min_images", None)
        if n is None or n == self.ann_min_images:
            return self
        if n not in self._views:
            view = object.__new__(type(self))  # not copy.copy: __reduce__ reopens
            view.__dict__.update(self.__dict__)
            view.ann_min_images, view._views = int(n), {}
            self._views[n] = view
        return self._views[n]

    @property
    def uses_ann(self) -> bool:
        """Whether candidates are found by the approximate search."""
        return len(self._refs) > self.ann_min_images

    def disk_bytes(self) -> dict:
        """Bytes on disk: ``total``, ``ann`` (its nearest-neighbour index), ``per_image``."""
        total = sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())
        ann = self.directory / FINGERPRINTS_DIR / ANN_FILE
        images = len(self._refs)
        return {"total": total, "ann": ann.stat().st_size if ann.exists() else 0,
                "images": images, "per_image": round(total / images) if images else None}

    def contains(self, value) -> str | None:
        """The kind under which ``value`` (in any spelling) is indexed, or None."""
        normalized = normalize_identifier(value)
        if len(normalized) < MIN_VALUE_CHARS:
            return None
        digest = self._hasher.value(normalized)
        return next((kind for kind in KINDS if digest in self._values[kind]), None)

    def exact_matches(self, pixels: np.ndarray) -> list[str]:
        """Refs of indexed images with exactly these pixel values (stored or rescaled)."""
        if _shape_key(np.shape(pixels)) not in self._shapes:
            return []
        digest = self._hasher.pixels(pixels)
        high = np.frombuffer(digest[:8], dtype=">u8")[0]
        lo = int(np.searchsorted(self._exact_high, high, side="left"))
        hi = int(np.searchsorted(self._exact_high, high, side="right"))
        return [str(self._refs[int(self._exact_image[j])]) for j in range(lo, hi)
                if bytes(self._exact[j]) == digest]

    def _fine(self, i: int) -> np.ndarray:
        n, start = int(self._fine_size[i]), int(self._fine_offset[i])
        return np.asarray(self._fine_flat[start:start + n * n]).reshape(n, n)

    def image_candidates(self, pixels: np.ndarray, *,
                         min_detail_correlation: float | None = None,
                         leeway: float = 0.0) -> list[ImageCandidate]:
        """Indexed images that ``pixels`` (2-D or RGB) copies: exact matches, and the
        images whose coarse thumbnail correlates with it (any flip or quarter turn) and
        whose fine thumbnail's detail correlates at least ``min_detail_correlation``
        (by default :func:`detail_threshold` less ``leeway``; see
        :func:`detail_correlations`). Best first."""
        found = {ref: ImageCandidate(ref, 1.0, 1.0, exact=True)
                 for ref in self.exact_matches(pixels)}
        if len(self._refs):
            query = _Query(pixels)
            for i, orientations in self._coarse_candidates(query):
                best = self._confirm(i, orientations, query)
                threshold = (detail_threshold(int(self._fine_size[i])) - leeway
                             if min_detail_correlation is None else min_detail_correlation)
                if best.detail_correlation >= threshold:
                    found.setdefault(best.ref, best)
        return sorted(found.values(), key=lambda c: (not c.exact, -c.detail_correlation))

    def _exact_matrices(self, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """Coarse thumbnails as float rows (all of them, kept; or only ``rows``) and their
        squares: Σc, Σc² and Σc·q over the query's unclipped cells are matrix products."""
        if rows is None and "coarse" in self._lazy:
            return self._lazy["coarse"]
        cells = self._coarse_cells if rows is None else self._coarse_cells[rows]
        flat = np.asarray(cells).reshape(len(cells), -1).astype(np.float64) / 65535
        out = (flat, flat * flat)
        if rows is None:
            self._lazy["coarse"] = out
        return out

    def _ann(self):
        if "ann" not in self._lazy:
            path = self.directory / FINGERPRINTS_DIR / ANN_FILE
            ann = None
            if self._ann_file and path.exists():
                from usearch.index import Index

                ann = Index.restore(str(path), view=True)  # memory-mapped
            if ann is None or len(ann) != len(self._refs):
                ann = _build_ann(self._coarse_cells)  # an older index, or a lower setting
            self._lazy["ann"] = ann
        return self._lazy["ann"]

    def _ann_rows(self, cells: np.ndarray, oriented: list[tuple[np.ndarray, np.ndarray]]
                  ) -> np.ndarray:
        """Image numbers the approximate search finds for the query's orientations (each
        as ``(centred values, mask)`` on the coarse grid) and for all its ``cells``
        (clipped ones too: a window keeps the order of the values, and the stored vectors
        are of all cells), of either sign."""
        step = COARSE_SIZE // ANN_SIZE
        queries = []
        every = [_orient(cells, k).ravel().astype(np.float64) for k in range(8)]
        for centred in [c for c, _ in oriented] + [v - v.mean() for v in every]:
            small = centred.reshape(ANN_SIZE, step, ANN_SIZE, step).sum(axis=(1, 3)).ravel()
            small /= max(float(np.linalg.norm(small)), 1e-12)
            queries += [small, -small]
        found = self._ann().search(np.array(queries, dtype=np.float32),
                                   min(ANN_CANDIDATES, len(self._refs)), threads=1)
        keys = np.asarray(found.keys).ravel()
        return np.unique(keys[keys < len(self._refs)]).astype(np.int64)

    def _coarse_candidates(self, query: _Query) -> list[tuple[int, list[int]]]:
        """The indexed images most like ``query`` on the coarse grid, each with the
        orientations worth confirming; none when too few cells are unclipped (an image
        that is mostly background or clipped: the detail could not be compared either).
        Above ``ann_min_images`` images only those the approximate search finds are
        compared, with the same scores."""
        cells, valid = query.cells(COARSE_SIZE)
        if int(valid.sum()) < MIN_COARSE_CELLS:
            return []
        oriented = []
        for k in range(8):
            mask = _orient(valid, k).ravel().astype(np.float64)
            values = _orient(cells, k).ravel().astype(np.float64)
            n = mask.sum()
            centred = (values - (values @ mask) / n) * mask
            if centred @ centred <= 1e-12:
                return []
            oriented.append((centred, mask))
        if self.uses_ann:
            rows = self._ann_rows(cells, oriented)
            coarse, squared = self._exact_matrices(rows)
        else:
            rows = None
            coarse, squared = self._exact_matrices()
        scores = np.full((len(coarse), 8), -1.0)
        for k, (centred, mask) in enumerate(oriented):
            n = mask.sum()
            sums = coarse @ mask
            spread = squared @ mask - sums * sums / n
            # Either sign: an inverted copy counts too.
            scores[:, k] = np.abs(coarse @ centred) / np.sqrt(
                np.maximum(spread, 1e-12) * (centred @ centred))
        best = scores.max(axis=1)
        order = [i for i in np.argsort(-best)[:MAX_CANDIDATES] if best[i] >= COARSE_THRESHOLD]
        image = (lambda i: int(i)) if rows is None else (lambda i: int(rows[i]))
        # A chest is nearly symmetric: a mirrored copy may correlate about as well unmirrored.
        return [(image(i), [int(k) for k in np.argsort(-scores[i])[:2]
                            if scores[i, k] >= best[i] - 0.02]) for i in order]

    def _confirm(self, i: int, orientations: list[int], query: _Query) -> ImageCandidate:
        stored = self._fine(i).astype(np.float64)
        detail_of_query = query.detail(stored.shape[0])
        threshold = detail_threshold(stored.shape[0])
        ref = str(self._refs[i])
        best = ImageCandidate(ref, 0.0, -1.0, threshold=threshold)
        for k in orientations:
            plain, detail = _compare(detail_of_query, k, stored)
            if detail > best.detail_correlation:
                best = ImageCandidate(ref, plain, detail, threshold=threshold)
        return best


def _read_version_2(path: Path) -> dict:
    """A version 2 index's arrays (one compressed .npz), in memory, as version 3 lays them
    out."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    order = (np.lexsort(arrays["exact"].T[::-1]) if len(arrays["exact"])
             else np.zeros(0, dtype=np.int64))
    arrays["exact"], arrays["exact_image"] = arrays["exact"][order], arrays["exact_image"][order]
    sizes = arrays["fine_size"].astype(np.int64)
    arrays["fine_offset"] = (np.concatenate([[0], np.cumsum(sizes * sizes)[:-1]]).astype(np.int64)
                             if len(sizes) else np.zeros(0, dtype=np.int64))
    return arrays
