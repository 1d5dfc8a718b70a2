"""The figure checks' shortcuts change no result: the solid blocks that start the search
for images drawn in a figure (``regions._solid_blocks``, integer comparisons and byte sums
for 8-bit grey) are the blocks of the float computation they replace, on real matplotlib
figures of every kind the bench draws and on noise with backgrounds at the ends of the
grey scale."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_screen import FIGURE_KINDS, _base_figure
from medzone_hub.screen import images, regions


def _float_blocks(trimmed: np.ndarray, bg: float, tolerance: float) -> np.ndarray:
    bh, bw = trimmed.shape[0] // regions.BLOCK, trimmed.shape[1] // regions.BLOCK
    ink = np.abs(trimmed.astype(np.float32) - bg) > tolerance
    return ink.reshape(bh, regions.BLOCK, bw, regions.BLOCK).sum(
        axis=(1, 3), dtype=np.int32) >= regions.SOLID * regions.BLOCK ** 2


def _trimmed(gray: np.ndarray) -> np.ndarray:
    h, w = gray.shape
    return gray[:h // regions.BLOCK * regions.BLOCK, :w // regions.BLOCK * regions.BLOCK]


@pytest.mark.parametrize("i", range(len(FIGURE_KINDS)))
def test_solid_blocks_of_real_figures(i):
    gray = images._decode(_base_figure(i))
    assert gray.dtype == np.uint8
    trimmed = _trimmed(gray)
    bg, _share = regions.background(gray)
    tolerance = regions.INK_TOLERANCE * regions._scale(gray)
    fast = regions._solid_blocks(trimmed, bg, tolerance)
    assert fast.shape == _float_blocks(trimmed, bg, tolerance).shape
    assert (fast == _float_blocks(trimmed, bg, tolerance)).all()
    assert fast.any() and not fast.all()


def test_solid_blocks_at_the_ends_of_the_grey_scale():
    rng = np.random.default_rng(7)
    for _ in range(40):
        gray = rng.integers(0, 256, (int(rng.integers(8, 70)), int(rng.integers(8, 70))))
        gray[rng.random(gray.shape) < 0.5] = int(rng.integers(0, 256))
        trimmed = _trimmed(gray.astype(np.uint8))
        for bg in (0.0, 1.0, 7.0, 8.0, 9.0, 128.0, 246.0, 247.0, 248.0, 255.0):
            assert (regions._solid_blocks(trimmed, bg, 8.0)
                    == _float_blocks(trimmed, bg, 8.0)).all(), bg
    wide = (rng.random((64, 64)) * 4000).astype(np.uint16)  # (16-bit: the float path)
    assert (regions._solid_blocks(wide, 100.0, 8.0 * regions._scale(wide))
            == _float_blocks(wide, 100.0, 8.0 * regions._scale(wide))).all()
