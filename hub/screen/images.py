"""Copies of dataset images in PNG/JPEG/GIF: the indexes' fingerprints (exact pixel hash;
coarse thumbnail correlation confirmed by the correlation of fine detail; flips, resizes,
re-windowing and colour maps count), for the whole image and for images drawn in a figure."""

from __future__ import annotations

import io
import warnings

import numpy as np
from scipy import ndimage

from .model import BLOCK, REVIEW, RULE_DATASET_IMAGE, RULE_MALFORMED, Collector

#: Images larger than this many pixels are not decoded (they are flagged for review).
MAX_PIXELS = 64_000_000
_MIN_SIDE = 32
#: A pixel darker than this fraction of the figure's background is "ink".
_INK = 0.94
#: An image drawn in a figure is a box of ink this full (axes, lines and text are not).
_MIN_FILL = 0.8
_MAX_AREAS = 3
_FRAME = 1  # the axes' frame line, cropped off
#: Drawn into axes, an image is resampled and framed, which costs some of the detail that
#: confirms a copy: inside a figure, candidates are confirmed this far below the index's
#: thresholds. Measured with axes and a colour bar: copies of CT slices reach 0.69 and of
#: X-rays 0.85 (thresholds 0.66 and 0.85), other patients' images 0.42 and 0.73.
FIGURE_LEEWAY = 0.05


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_PIXELS:
            raise ValueError("too many pixels")
        if image.format == "JPEG" and image.mode != "L":
            # Decode the luma channel alone (no colour upsampling or conversion).
            image.draft("L", image.size)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
            return np.asarray(image)
        # Grey (ITU-R 601 luma): colour-mapped copies keep the order of their values.
        return np.asarray(image.convert("L"))


def _plot_areas(arr: np.ndarray) -> list[np.ndarray]:
    """Images drawn inside a figure: the largest boxes of ink (non-background pixels) that
    fill their bounding box, each cropped inside its frame; largest first."""
    gray = arr if arr.ndim == 2 else arr[..., 0]
    step = 4 if min(gray.shape) >= 8 * _MIN_SIDE else 1
    small = gray[::step, ::step]
    top = small.max()
    if top <= 0:
        return []
    ink = small < _INK * top
    labels, _ = ndimage.label(ink)
    found = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        rows, cols = box
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if min(h, w) * step < _MIN_SIDE:
            continue
        if np.count_nonzero(labels[box] == label) < _MIN_FILL * h * w:
            continue  # lines, text, a frame of axes
        crop = _refine(gray, arr, rows.start * step, rows.stop * step,
                       cols.start * step, cols.stop * step, step, _INK * top)
        if crop is not None and crop.shape[0] * crop.shape[1] < 0.9 * gray.size:
            found.append(crop)
    found.sort(key=lambda c: -c.shape[0] * c.shape[1])
    return found[:_MAX_AREAS]


def _refine(gray, arr, r0, r1, c0, c1, step, threshold) -> np.ndarray | None:
    """The box's edges at full resolution (rows and columns mostly ink), less its frame."""
    r0, c0 = max(0, r0 - step), max(0, c0 - step)
    r1, c1 = min(gray.shape[0], r1 + step), min(gray.shape[1], c1 + step)
    window = gray[r0:r1, c0:c1] < threshold
    rr = np.flatnonzero(np.count_nonzero(window, axis=1) > 0.5 * (c1 - c0))
    cc = np.flatnonzero(np.count_nonzero(window, axis=0) > 0.5 * (r1 - r0))
    if rr.size < _MIN_SIDE or cc.size < _MIN_SIDE:
        return None
    r0, r1, c0, c1 = r0 + rr[0], r0 + rr[-1] + 1, c0 + cc[0], c0 + cc[-1] + 1
    crop = arr[r0 + _FRAME:r1 - _FRAME, c0 + _FRAME:c1 - _FRAME]
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
                f"detail correlation {best.detail_correlation:.2f}")
            col.add(RULE_DATASET_IMAGE, BLOCK, location,
                    f"a copy of a dataset image ({best.ref}; {how})")
            return
    for crop in _plot_areas(arr):
        for ix in indexes:
            if ix.image_candidates(crop, leeway=FIGURE_LEEWAY):
                col.add(RULE_DATASET_IMAGE, REVIEW, location,
                        "a figure that draws a dataset image inside axes")
                return
