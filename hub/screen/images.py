"""Copies of dataset images in PNG/JPEG/GIF: the indexes' fingerprints (exact pixel hash;
perceptual hash confirmed by thumbnail correlation; flips, resizes and re-windowing count)."""

from __future__ import annotations

import io
import warnings

import numpy as np

from .model import BLOCK, REVIEW, RULE_DATASET_IMAGE, RULE_MALFORMED, Collector

#: Images larger than this many pixels are not decoded (they are flagged for review).
MAX_PIXELS = 64_000_000
_MIN_SIDE = 32


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_PIXELS:
            raise ValueError("too many pixels")
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
            return np.asarray(image)
        # Grey (ITU-R 601 luma): colour-mapped copies still correlate; far cheaper than RGB.
        return np.asarray(image.convert("L"))


def _plot_area(arr: np.ndarray) -> np.ndarray | None:
    """The largest non-white box of a figure (an image drawn inside axes), or None."""
    gray = arr if arr.ndim == 2 else arr[..., 0]
    step = 4 if min(gray.shape) >= 8 * _MIN_SIDE else 1
    small = gray[::step, ::step]
    top = small.max()
    if top <= 0:
        return None
    ink = small < 0.94 * top
    rows = np.flatnonzero(np.count_nonzero(ink, axis=1) > 0.5 * small.shape[1])
    cols = np.flatnonzero(np.count_nonzero(ink, axis=0) > 0.5 * small.shape[0])
    if rows.size * step < _MIN_SIDE or cols.size * step < _MIN_SIDE:
        return None
    r0, r1 = rows[0] * step, (rows[-1] + 1) * step
    c0, c1 = cols[0] * step, (cols[-1] + 1) * step
    if step > 1:  # refine the edges at full resolution
        r0, c0 = max(0, r0 - step), max(0, c0 - step)
        r1, c1 = min(gray.shape[0], r1 + step), min(gray.shape[1], c1 + step)
        window = gray[r0:r1, c0:c1] < 0.94 * top
        rr = np.flatnonzero(np.count_nonzero(window, axis=1) > 0.5 * (c1 - c0))
        cc = np.flatnonzero(np.count_nonzero(window, axis=0) > 0.5 * (r1 - r0))
        if rr.size < _MIN_SIDE or cc.size < _MIN_SIDE:
            return None
        r0, r1, c0, c1 = r0 + rr[0], r0 + rr[-1] + 1, c0 + cc[0], c0 + cc[-1] + 1
    if (r1 - r0) * (c1 - c0) > 0.9 * gray.size:
        return None
    pad = 2
    crop = arr[r0 + pad:r1 - pad, c0 + pad:c1 - pad]
    return crop if min(crop.shape[:2]) >= _MIN_SIDE else None


def check_image(data: bytes, col: Collector, location: str) -> None:
    indexes = [ix for ix in col.indexes if getattr(ix, "counts", {}).get("images", 1)]
    if not indexes:
        return
    try:
        arr = _decode(data)
    except Exception as err:  # noqa: BLE001 - any undecodable image is a finding
        col.add(RULE_MALFORMED, BLOCK, location,
                f"an image that cannot be decoded ({type(err).__name__})")
        return
    if arr.ndim < 2 or min(arr.shape[:2]) < 2:
        return
    for ix in indexes:
        candidates = ix.image_candidates(arr)
        if candidates:
            best = candidates[0]
            how = "exact pixel copy" if best.exact else (
                f"perceptual match, correlation {best.correlation:.2f}")
            col.add(RULE_DATASET_IMAGE, BLOCK, location,
                    f"a copy of a dataset image ({best.ref}; {how})")
            return
    crop = _plot_area(arr)
    if crop is not None:
        for ix in indexes:
            if ix.image_candidates(crop):
                col.add(RULE_DATASET_IMAGE, REVIEW, location,
                        "a figure that draws a dataset image inside axes")
                return
