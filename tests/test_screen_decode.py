"""The fast PNG decoding path gives exactly Pillow's grey pixels (or Pillow's error) for
every PNG: plotted figures, every colour type and bit depth, interlaced, split image data,
broken and hostile files; it is the path taken for matplotlib figures."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from medzone_hub.screen import images

from .screen_corpus import _figure, _png


def _outcome(decode, data: bytes):
    try:
        arr = decode(data)
    except Exception as err:  # noqa: BLE001 - the error's name is what the finding says
        return type(err).__name__
    return (arr.dtype.str, arr.shape, arr.tobytes())


def _pillow(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _raw_png(width: int, height: int, colour: int, raw: bytes, interlace: int = 0) -> bytes:
    """A PNG of 8-bit samples whose image data is ``raw`` (filtered rows, compressed)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", raw)
            + _chunk(b"IEND", b""))


def _interlaced(rgb: np.ndarray) -> bytes:
    """An Adam7-interlaced RGB PNG (Pillow cannot write one)."""
    passes = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2),
              (0, 1, 2, 2), (1, 0, 2, 1))
    raw = b""
    for y0, x0, dy, dx in passes:
        sub = rgb[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    return _raw_png(rgb.shape[1], rgb.shape[0], 2, zlib.compress(raw), interlace=1)


_CACHE: dict[str, bytes] = {}


def _pngs() -> dict[str, bytes]:
    if not _CACHE:
        _CACHE.update(_make_pngs())
    return _CACHE


def _make_pngs() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    grey = (rng.random((96, 128)) * 255).astype(np.uint8)
    field = rng.random((48, 64)).cumsum(axis=1)
    out = {
        "line plot": _figure(lambda ax: ax.plot([0, 1, 2, 3], [3, 1, 2, 5])),
        "heatmap": _figure(lambda ax: ax.figure.colorbar(ax.imshow(field), ax=ax)),
        "bars": _figure(lambda ax: ax.bar(["a", "b", "c"], [5, 9, 2])),
        "grey": _png(grey),
        "rgb": _pillow(noise[:64, :80]),
        "rgba": _pillow(np.dstack([noise[:50, :60], grey[:50, :60]])),
        "rgb in several IDAT chunks": _pillow(noise),
        "grey with alpha": _pillow(np.dstack([grey, grey[::-1]]), "LA"),
        "palette": _pillow(noise[:40, :40], "P"),
        "16-bit grey": _pillow((grey.astype(np.uint16) * 257)),
        "1-bit": _pillow(grey > 128),
        "grey, transparent 0": _pillow(grey, transparency=0),
        "rgb, transparent white": _pillow(noise[:30, :30], transparency=(255, 255, 255)),
        "uncompressed": _pillow(grey, compress_level=0),
    }
    out["interlaced"] = _interlaced(noise[:70, :90])
    rows = b"".join(b"\x00" + bytes(range(i, i + 12)) for i in range(10))
    out["junk after the zlib stream"] = _raw_png(4, 10, 2, zlib.compress(rows) + b"junk" * 9)
    out["more rows than the image"] = _raw_png(4, 5, 2, zlib.compress(rows))
    out["fewer rows than the image"] = _raw_png(4, 20, 2, zlib.compress(rows))
    out["a bad filter byte"] = _raw_png(4, 10, 2, zlib.compress(b"\x07" + rows[1:]))
    out["a bad zlib checksum"] = _raw_png(4, 10, 2, zlib.compress(rows)[:-4] + b"\0\0\0\0")
    out["not zlib"] = _raw_png(4, 10, 2, b"\x12\x34" + rows)
    # a 2x2 image whose data inflates to 64 MB: only what the image holds is inflated
    out["zlib bomb"] = _raw_png(2, 2, 2, zlib.compress(bytes(64 << 20), 9))
    figure = out["line plot"]
    for cut in (40, 60, 200, len(figure) // 2, len(figure) - 12):
        out[f"cut at {cut}"] = figure[:cut]
    flipped = bytearray(figure)
    flipped[len(figure) // 2] ^= 0xFF
    out["a flipped byte in the image data"] = bytes(flipped)
    return out


@pytest.mark.parametrize("name, data", list(_pngs().items()), ids=list(_pngs()))
def test_fast_decoding_gives_pillows_pixels_or_error(name, data):
    assert _outcome(images._decode, data) == _outcome(images._decode_pillow, data)


@pytest.mark.skipif(images.pyspng is None, reason="pyspng or zlib-ng not installed")
def test_plotted_figures_take_the_fast_path():
    pngs = _pngs()
    for name in ("line plot", "heatmap", "bars", "grey", "rgb", "rgba",
                 "rgb in several IDAT chunks", "zlib bomb"):
        pixels = images._decode_png(pngs[name])
        assert pixels is not None, name
        assert np.array_equal(pixels, images._decode_pillow(pngs[name])), name
    for name in ("palette", "16-bit grey", "1-bit", "grey with alpha", "interlaced",
                 "grey, transparent 0"):
        assert images._decode_png(pngs[name]) is None, name
