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

from .model import BLOCK, REVIEW, RULE_DATASET_IMAGE, RULE_MALFORMED, Collector
from .regions import find_regions, recoloured, region_pixels

#: Images larger than this many pixels are not decoded (they are flagged for review).
MAX_PIXELS = 64_000_000


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
    check_figure(arr, col, location, indexes, data)


#: A region whose best candidate falls short of a bare copy's threshold by at most this
#: much has its edges moved pixel by pixel (an image drawn into axes is resampled to a
#: fractional pixel extent, and its frame hides where it ends: one pixel off costs a copy
#: up to 0.3 of detail correlation); farther off, it is an unrelated picture.
NUDGE_FROM = 0.45


def check_figure(arr: np.ndarray, col: Collector, location: str, indexes,
                 data: bytes | None = None) -> None:
    """The images drawn inside a figure (panels, insets, montage tiles: see
    :mod:`.regions`), each against the fingerprints. A region whose detail correlation with
    an indexed image comes within ``figure_block_leeway`` of what confirms a bare copy
    blocks; within ``figure_review_leeway``, the figure is reviewed. With the image's
    ``data``, a region drawn in a rainbow or diverging colour map is looked up by the
    values the map was given (its colours decoded once, only for figures with regions)."""
    cfg = col.config
    review = False
    regions = find_regions(arr, max_regions=cfg.max_figure_regions,
                           framed_fill=cfg.figure_framed_min_fill)
    colour = _colour(data) if regions and data is not None and arr.ndim == 2 else None
    for region in regions:
        source = arr
        if colour is not None:
            mapped = recoloured(region, colour, cfg.figure_overlay_tolerance)
            if mapped is not None:
                region, source = mapped, colour
        for ix in indexes:
            shortfall, cand = _closest(ix, source, region, cfg.figure_block_leeway,
                                       cfg.figure_overlay_tolerance)
            if cand is not None and shortfall <= cfg.figure_block_leeway:
                col.add(RULE_DATASET_IMAGE, BLOCK, location,
                        f"a figure that draws a dataset image ({cand.ref}; "
                        f"detail correlation {cand.detail_correlation:.2f})")
                return
            review = review or shortfall <= cfg.figure_review_leeway
    if review:
        col.add(RULE_DATASET_IMAGE, REVIEW, location,
                "a figure that draws what may be a dataset image")


def _colour(data: bytes) -> np.ndarray | None:
    """An image's RGB pixels (None: not a colour image, or not decodable)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.mode in ("L", "I;16", "I;16B", "I;16L", "I", "F", "1", "LA"):
                return None
            return np.asarray(image.convert("RGB"))
    except Exception:  # noqa: BLE001 - the grey pixels were read: they are looked up
        return None


def _shortfall(ix, pixels: np.ndarray):
    """How far the best candidate's detail correlation is below its threshold (≤ 0: as
    strong as a bare copy), and that candidate; (inf, None) without candidates."""
    best = (float("inf"), None)
    for cand in ix.image_candidates(pixels, min_detail_correlation=-1.0):
        shortfall = -1.0 if cand.exact else cand.threshold - cand.detail_correlation
        if shortfall < best[0]:
            best = (shortfall, cand)
    return best


def _closest(ix, arr: np.ndarray, region, enough: float, overlay: float | None = None):
    """:func:`_shortfall` of a region, its edges moved by a pixel at a time (each side,
    in or out, twice round) while that brings it closer, when it is near enough to try."""
    best = _shortfall(ix, region.pixels)
    if region.tile is not None or region.sampled or not best[0] <= NUDGE_FROM:
        return best
    edges = [region.top, region.bottom, region.left, region.right]
    limits = [arr.shape[0], arr.shape[0], arr.shape[1], arr.shape[1]]
    for _ in range(2):
        moved = False
        for side in range(4):
            for step in (-1, 1):
                trial = list(edges)
                trial[side] += step
                if not 0 <= trial[side] <= limits[side]:
                    continue
                found = _shortfall(ix, region_pixels(arr, *trial, overlay)[0])
                if found[0] < best[0]:
                    best, edges, moved = found, trial, True
                    if best[0] <= enough:
                        return best
        if not moved:
            break
    return best
