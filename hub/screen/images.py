"""Copies of dataset images in PNG/JPEG/GIF: the indexes' fingerprints (exact pixel hash;
coarse thumbnail correlation confirmed by the correlation of fine detail; flips, resizes,
re-windowing and colour maps count), for the whole image and for images drawn in a figure."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np

try:  # optional: decode PNGs without Pillow's zlib (see _decode_png); Pillow does the rest
    import pyspng
    from zlib_ng import zlib_ng
except ImportError:  # pragma: no cover - the screen works (slower) with Pillow alone
    pyspng = zlib_ng = None
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
    """An image's pixels as the checks see them: grey uint8 (16-bit grey stays uint16).
    8-bit PNGs take the fast path when it applies; anything it does not take, or fails
    on, is decoded by Pillow (:func:`_decode_pillow`), so the pixels and the errors are
    Pillow's either way."""
    if data[:8] == _PNG_SIGNATURE and pyspng is not None:
        try:
            pixels = _decode_png(data)
        except Exception:  # noqa: BLE001 - Pillow decides (and names the error)
            pixels = None
        if pixels is not None:
            return pixels
    return _decode_pillow(data)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_STORED_BLOCK = 65535


def _decode_png(data: bytes) -> np.ndarray | None:
    """Pillow's pixels of a non-interlaced 8-bit grey, RGB or RGBA PNG, about 3x faster
    (or None: not such a PNG). The system's zlib inflates a figure at some 360 MB/s, half
    of its decoding time: zlib-ng inflates the image data (never more than the image
    holds), libspng undoes the row filters (SIMD) from the same data stored uncompressed,
    Pillow turns colour to grey as it does for every image."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))  # the chunks before the pixels, CRCs checked
    mode = image.mode
    if (mode not in _PNG_CHANNELS or len(image.tile) != 1 or image.tile[0][3] != mode
            or image.tile[0][0] != "zip" or data[12:16] != b"IHDR" or data[28] != 0
            or image.width * image.height > MAX_PIXELS or "transparency" in image.info
            or getattr(image, "is_animated", False)):
        return None
    width, height = image.size
    expected = height * (1 + width * _PNG_CHANNELS[mode])  # a filter byte per row
    inflate = zlib_ng.decompressobj()
    view = memoryview(data)
    parts, size, pos = [], 0, image.tile[0][2] - 8
    while size < expected and data[pos + 4:pos + 8] == b"IDAT":  # as Pillow: IDATs in a row
        (length,) = struct.unpack_from(">I", data, pos)
        part = inflate.decompress(view[pos + 8:pos + 8 + length], expected - size)
        parts.append(part)
        size += len(part)
        pos += 12 + length
    if size != expected:
        return None
    raw = parts[0] if len(parts) == 1 else b"".join(parts)
    pixels = pyspng.load(_stored_png(data[8:33], raw), mode)
    if mode == "L":
        return pixels
    # Grey (ITU-R 601 luma) exactly as Image.convert("L") computes it.
    return np.asarray(Image.frombuffer(mode, (width, height), pixels, "raw", mode, 0, 1)
                      .convert("L"))


def _stored_png(ihdr_chunk: bytes, raw: bytes) -> bytes:
    """A PNG of ``ihdr_chunk`` whose IDAT holds ``raw`` (filtered rows) uncompressed."""
    view = memoryview(raw)
    body = [b"IDAT\x78\x01"]  # zlib header: deflate, 32K window, no dictionary
    for start in range(0, len(raw), _STORED_BLOCK):
        block = view[start:start + _STORED_BLOCK]
        last = start + _STORED_BLOCK >= len(raw)
        body += [struct.pack("<BHH", last, len(block), len(block) ^ 0xFFFF), block]
    body.append(struct.pack(">I", zlib_ng.adler32(raw)))
    crc = 0
    for part in body:
        crc = zlib_ng.crc32(part, crc)
    length = sum(len(part) for part in body) - 4
    return b"".join([_PNG_SIGNATURE, ihdr_chunk, struct.pack(">I", length), *body,
                     struct.pack(">I", crc), _IEND])


def _decode_pillow(data: bytes) -> np.ndarray:
    """Any image Pillow reads, to grey (the baseline the fast path must equal)."""
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
