"""A dataset's screening index: how the export screen recognises the dataset in an output.

Two parts, both without a single plaintext identifier:

* ``index.json`` — keyed hashes (HMAC-SHA256, 128 bits) of every identifier-like value of
  the stored dataset (pseudonymous patient ids, accession numbers, UIDs, dates, remaining
  header text), normalised first so that other spellings match (case, separators,
  full-width digits, date formats);
* ``fingerprints.npz`` — per image (slice or frame): a keyed exact hash of the pixel values,
  a 64-bit DCT perceptual hash and a 32×32 normalised thumbnail. A pHash alone confuses
  different patients with the same anatomy, so a candidate is confirmed by correlating
  thumbnails, both as they are and after removing their coarse shape (the detail that
  differs between patients).

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
from scipy import ndimage
from scipy.fft import dctn

from ..errors import InvalidInput
from .recognizers import (COLUMN_ACCESSION, COLUMN_DATE, COLUMN_PATIENT_ID, COLUMN_UID,
                          classify_column_name, looks_like_uid, parse_date)

FORMAT = "medzone-screening-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
FINGERPRINTS_FILE = "fingerprints.npz"

PATIENT_ID, ACCESSION, UID, DATE, TEXT = "patient_id", "accession", "uid", "date", "text"
KINDS = (PATIENT_ID, ACCESSION, UID, DATE, TEXT)
#: Shorter normalised values are not indexed: "1" or "CT" would match everything.
MIN_VALUE_CHARS = 6

THUMBNAIL_SIZE = 32
HAMMING_THRESHOLD = 14
CORRELATION_THRESHOLD = 0.9
DETAIL_CORRELATION_THRESHOLD = 0.9

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
        raise InvalidInput("the screening index key must be at least 16 bytes")
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
        raise InvalidInput("an image fingerprint needs a 2-D (or RGB) image")
    if arr.dtype.kind not in "iuf":
        arr = arr.astype(np.float32)
    return arr


def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """A 32×32 float thumbnail (box average), stretched between its 1st and 99th percentile:
    re-windowing, rescaling or another bit depth change it little."""
    arr = _gray(pixels)
    h, w = arr.shape
    s = THUMBNAIL_SIZE
    if h % s == 0 and w % s == 0:
        blocks = arr.reshape(s, h // s, s, w // s)
        small = blocks.sum(axis=3, dtype=np.float32).sum(axis=1) / ((h // s) * (w // s))
    else:
        image = Image.fromarray(arr.astype(np.float32, copy=False))
        small = np.asarray(image.resize((s, s), Image.BOX))
    lo, hi = np.percentile(small, [1, 99])
    if hi - lo <= 1e-6:
        return np.zeros((s, s), dtype=np.float32)
    return np.clip((small - lo) / (hi - lo), 0, 1).astype(np.float32)


def perceptual_hash(thumb: np.ndarray) -> int:
    """64-bit DCT pHash: the 8×8 lowest frequencies against their median (DC excluded)."""
    coefficients = dctn(thumb.astype(np.float64), norm="ortho")[:8, :8].ravel()
    bits = coefficients > np.median(coefficients[1:])
    return int(np.packbits(bits).view(">u8")[0])


def _zscore(values: np.ndarray) -> np.ndarray | None:
    flat = values.astype(np.float64).ravel()
    flat = flat - flat.mean()
    norm = np.sqrt(flat @ flat)
    return flat / norm if norm > 1e-9 else None


def _detail(thumb: np.ndarray) -> np.ndarray:
    """The thumbnail without its coarse shape (body outline, lungs): what tells patients apart."""
    return thumb - ndimage.gaussian_filter(thumb.astype(np.float64), 2.0)


def _orientations(thumb: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and quarter turns: an output may be transposed or mirrored."""
    out = []
    for t in (thumb, thumb.T):
        out += [t, t[::-1], t[:, ::-1], t[::-1, ::-1]]
    return out


@dataclass(frozen=True)
class ImageCandidate:
    """An indexed image that ``pixels`` is likely a copy of."""

    ref: str
    hamming: int
    correlation: float
    detail_correlation: float
    exact: bool = False


# --- building --------------------------------------------------------------------------

class ScreeningIndexBuilder:
    """Collects a dataset's identifier-like values and image fingerprints, then writes them."""

    def __init__(self, key: bytes):
        self._hasher = _Hasher(key)
        self._values: dict[str, set[str]] = {kind: set() for kind in KINDS}
        self._exact: list[tuple[bytes, int]] = []
        self._phashes: list[int] = []
        self._thumbs: list[np.ndarray] = []
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
                series = str(ds.get("SeriesInstanceUID", ""))
                ordinal = self._series.setdefault(series, len(self._series) + 1)
                ref = (f"{ds.get('Modality', 'image')} series {ordinal} "
                       f"image {ds.get('InstanceNumber', len(self._refs) + 1)}")
            self._add_dicom_pixels(ds, ref)

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
        """Fingerprint one 2-D image (or RGB): exact hash, pHash and thumbnail."""
        thumb = thumbnail(pixels)
        self._refs.append(str(ref))
        self._exact.append((self._hasher.pixels(pixels), len(self._refs) - 1))
        self._phashes.append(perceptual_hash(thumb))
        self._thumbs.append(np.round(thumb * 255).astype(np.uint8))

    # output

    @property
    def counts(self) -> dict[str, int]:
        counts = {kind: len(values) for kind, values in self._values.items()}
        counts["images"] = len(self._refs)
        return counts

    def write(self, directory) -> Path:
        """Write ``index.json`` and ``fingerprints.npz`` into ``directory`` (created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        document = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "hash": "HMAC-SHA256 (first 128 bits) of normalize_identifier(value), keyed",
            "normalization": "NFKC, case-folded, separators removed, dates as YYYYMMDD",
            "counts": self.counts,
            "identifiers": {kind: sorted(values) for kind, values in self._values.items()},
            "images": {"file": FINGERPRINTS_FILE, "phash_bits": 64,
                       "thumbnail": [THUMBNAIL_SIZE, THUMBNAIL_SIZE],
                       "hamming_threshold": HAMMING_THRESHOLD,
                       "correlation_threshold": CORRELATION_THRESHOLD,
                       "detail_correlation_threshold": DETAIL_CORRELATION_THRESHOLD},
        }
        (directory / INDEX_FILE).write_text(json.dumps(document, indent=1) + "\n")
        n = len(self._refs)
        exact = np.frombuffer(b"".join(h for h, _ in self._exact), dtype=np.uint8)
        np.savez_compressed(
            directory / FINGERPRINTS_FILE,
            exact=exact.reshape(len(self._exact), 16),
            exact_image=np.array([i for _, i in self._exact], dtype=np.int64),
            phash=np.array(self._phashes, dtype=np.uint64),
            thumbs=(np.stack(self._thumbs) if n else
                    np.zeros((0, THUMBNAIL_SIZE, THUMBNAIL_SIZE), dtype=np.uint8)),
            refs=np.array(self._refs, dtype=str))
        return directory


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

class ScreeningIndex:
    """A written index, loaded for screening."""

    def __init__(self, hasher: _Hasher, values: dict[str, set[str]], exact: dict[bytes, list[int]],
                 phashes: np.ndarray, thumbs: np.ndarray, refs: list[str], counts: dict):
        self._hasher = hasher
        self._values = values
        self._exact = exact
        self._phashes = phashes
        self._thumbs = thumbs
        self._refs = refs
        self.counts = counts

    @classmethod
    def load(cls, directory, key: bytes) -> "ScreeningIndex":
        directory = Path(directory)
        try:
            document = json.loads((directory / INDEX_FILE).read_text())
            arrays = np.load(directory / FINGERPRINTS_FILE, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InvalidInput(f"{directory}: not a readable screening index ({err})") from None
        if document.get("format") != FORMAT or document.get("version") != FORMAT_VERSION:
            raise InvalidInput(f"{directory}: unsupported screening index format")
        values = {kind: set(document["identifiers"].get(kind, [])) for kind in KINDS}
        exact: dict[bytes, list[int]] = {}
        for digest, image in zip(arrays["exact"], arrays["exact_image"]):
            exact.setdefault(digest.tobytes(), []).append(int(image))
        return cls(_Hasher(key), values, exact, arrays["phash"], arrays["thumbs"],
                   [str(r) for r in arrays["refs"]], document.get("counts", {}))

    def contains(self, value) -> str | None:
        """The kind under which ``value`` (in any spelling) is indexed, or None."""
        normalized = normalize_identifier(value)
        if len(normalized) < MIN_VALUE_CHARS:
            return None
        digest = self._hasher.value(normalized)
        return next((kind for kind in KINDS if digest in self._values[kind]), None)

    def exact_matches(self, pixels: np.ndarray) -> list[str]:
        """Refs of indexed images with exactly these pixel values (stored or rescaled)."""
        return [self._refs[i] for i in self._exact.get(self._hasher.pixels(pixels), [])]

    def image_candidates(self, pixels: np.ndarray, *, hamming: int = HAMMING_THRESHOLD,
                         min_correlation: float = CORRELATION_THRESHOLD,
                         min_detail_correlation: float = DETAIL_CORRELATION_THRESHOLD,
                         ) -> list[ImageCandidate]:
        """Indexed images that ``pixels`` (2-D or RGB) copies: exact matches, and images
        within ``hamming`` bits of its pHash (any flip or quarter turn) whose thumbnails
        correlate with it as they are and in their detail. Best first."""
        found = {ref: ImageCandidate(ref, 0, 1.0, 1.0, exact=True)
                 for ref in self.exact_matches(pixels)}
        if len(self._refs):
            query = thumbnail(pixels)
            views = _orientations(query)
            hashes = np.array([perceptual_hash(v) for v in views], dtype=np.uint64)
            distances = np.bitwise_count(self._phashes[:, None] ^ hashes[None, :])
            for i in np.flatnonzero(distances.min(axis=1) <= hamming):
                best = self._confirm(i, views, distances[i], hamming)
                if best and best.correlation >= min_correlation and \
                        best.detail_correlation >= min_detail_correlation:
                    found.setdefault(best.ref, best)
        return sorted(found.values(), key=lambda c: (not c.exact, -c.detail_correlation))

    def _confirm(self, i: int, views, distances, hamming: int) -> ImageCandidate | None:
        stored = self._thumbs[i].astype(np.float64) / 255
        stored_plain, stored_detail = _zscore(stored), _zscore(_detail(stored))
        if stored_plain is None or stored_detail is None:
            return None
        best = None
        for view, distance in zip(views, distances):
            if distance > hamming:
                continue
            plain, detail = _zscore(view), _zscore(_detail(view))
            if plain is None or detail is None:
                continue
            candidate = ImageCandidate(self._refs[i], int(distance), float(plain @ stored_plain),
                                       float(detail @ stored_detail))
            if best is None or candidate.detail_correlation > best.detail_correlation:
                best = candidate
        return best
