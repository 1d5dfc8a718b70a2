"""Image-like regions inside a rendered figure: where a plotting library drew an image.

A figure is mostly background (white margins, an axes' face) with thin ink: lines, text,
ticks, frames. An image drawn into it (``imshow``, a panel of a subplot grid, an inset, a
montage of slices tiled edge to edge) is a solid rectangle of non-background pixels whose
values vary in both directions. :func:`find_regions` takes the decoded figure (grey or RGB)
and returns those rectangles as crops, each cut at the image's own edges (its frame
removed) so that it lines up cell by cell with the thumbnails of the index; a crop drawn
enlarged by nearest-neighbour interpolation (what matplotlib does from about ×3) is
sampled back to one pixel per source pixel. A montage is also split into its tiles.

Cheap first: a figure with no solid block of ink at least ``MIN_SIDE`` pixels a side
costs one comparison with its background and one block sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Smaller regions (in source pixels) cannot be compared with the fingerprints.
MIN_SIDE = 32
#: A pixel differing from the figure's background by more than this (of 255) is ink.
INK_TOLERANCE = 8
#: Blocks of BLOCK×BLOCK pixels at least this full of ink are solid; lines and text are not.
BLOCK = 4
SOLID = 0.75
#: A region's solid blocks fill at least this much of its bounding box.
MIN_FILL = 0.6
#: Pixels that differ from both their left and upper neighbour: an acquired image is noisy
#: almost everywhere, a colour bar or a bar chart is not. Below this share, the index could
#: not confirm a copy either (it needs 64 of 1024 coarse cells textured), so no lookup.
MIN_TEXTURE = 0.05
#: A montage is a region whose column (row) profile repeats with the tiles' period.
MONTAGE_CORRELATION = 0.5
MAX_TILES_PER_SIDE = 8


@dataclass(frozen=True)
class Region:
    """Where an image-like region lies in the figure (rows ``top:bottom``, columns
    ``left:right``), and its pixels as the index should see them."""

    top: int
    bottom: int
    left: int
    right: int
    pixels: np.ndarray
    tile: tuple[int, int, int, int] | None = None  # (row, col, rows, cols) of a montage
    sampled: bool = False  # one pixel per source pixel of a nearest-neighbour enlargement


def _grey(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3:
        rgb = arr[..., :3].astype(np.float32)
        arr = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return arr


def _scale(gray: np.ndarray) -> float:
    """What one grey level of 255 is worth in this array's values."""
    if gray.dtype == np.uint8:
        return 1.0
    top = float(gray.max()) if gray.size else 0.0
    return max(top, 1.0) / 255 if top > 255 else 1.0


def background(gray: np.ndarray) -> tuple[float, float]:
    """The figure's background value (most common value along its border) and the share
    of the border it covers."""
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    values, counts = np.unique(border, return_counts=True)
    i = int(np.argmax(counts))
    return float(values[i]), float(counts[i]) / border.size


def find_regions(image: np.ndarray, *, max_regions: int = 24) -> list[Region]:
    """Image-like regions of a figure, largest first, then the tiles of montages;
    at most ``max_regions``. The whole canvas is never one of them (the caller checks the
    whole image itself) unless it is a montage, whose tiles are returned."""
    gray = _grey(image)
    if gray.ndim != 2 or min(gray.shape) < MIN_SIDE:
        return []
    bg, share = background(gray)
    tolerance = INK_TOLERANCE * _scale(gray)
    h, w = gray.shape
    bh, bw = h // BLOCK, w // BLOCK
    trimmed = gray[:bh * BLOCK, :bw * BLOCK]
    ink = np.abs(trimmed.astype(np.float32) - bg) > tolerance
    full = ink.reshape(bh, BLOCK, bw, BLOCK).sum(axis=(1, 3), dtype=np.int32) \
        >= SOLID * BLOCK * BLOCK
    boxes = []
    if share < 0.5:
        boxes.append((0, h, 0, w))  # no margin: the canvas itself may be a montage
    if full.any():
        labels, _ = ndimage.label(full)
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            rows, cols = box
            bh_, bw_ = rows.stop - rows.start, cols.stop - cols.start
            if min(bh_, bw_) * BLOCK < MIN_SIDE:
                continue
            if np.count_nonzero(labels[box] == label) < MIN_FILL * bh_ * bw_:
                continue
            if not _moving(trimmed[rows.start * BLOCK:rows.stop * BLOCK:2,
                                   cols.start * BLOCK:cols.stop * BLOCK]):
                continue  # flat fills: bars, a confusion matrix, a blocky heatmap
            edges = _edges(gray, bg, tolerance, rows.start * BLOCK, rows.stop * BLOCK,
                           cols.start * BLOCK, cols.stop * BLOCK)
            if edges is not None:
                boxes.append(edges)
    out: list[Region] = []
    tiles: list[Region] = []
    for top, bottom, left, right in sorted(boxes, key=lambda b: -(b[1] - b[0]) * (b[3] - b[2])):
        pixels, sampled = region_pixels(gray, top, bottom, left, right)
        if min(pixels.shape) < MIN_SIDE or _texture(pixels) < MIN_TEXTURE:
            continue
        whole = (bottom - top, right - left) == (h, w)
        if not whole:
            out.append(Region(top, bottom, left, right, pixels, sampled=sampled))
        tiles += _tiles(pixels, top, bottom, left, right)
    # Every panel before any montage tile: a grid's last panel is never crowded out.
    return (out + tiles)[:max_regions]


def region_pixels(image: np.ndarray, top: int, bottom: int, left: int, right: int
                  ) -> tuple[np.ndarray, bool]:
    """A rectangle of the figure as the index should see it (see :func:`_clamped` and
    :func:`_source_pixels`), and whether it was sampled back to its source pixels."""
    return _source_pixels(_clamped(_grey(image)[top:bottom, left:right]))


def _edges(gray, bg, tolerance, r0, r1, c0, c1):
    """The rectangle's edges at full resolution (rows and columns mostly ink), less a frame
    drawn around it."""
    h, w = gray.shape
    r0, c0 = max(0, r0 - BLOCK), max(0, c0 - BLOCK)
    r1, c1 = min(h, r1 + BLOCK), min(w, c1 + BLOCK)
    window = np.abs(gray[r0:r1, c0:c1].astype(np.float32) - bg) > tolerance
    rr = np.flatnonzero(np.count_nonzero(window, axis=1) > 0.5 * (c1 - c0))
    cc = np.flatnonzero(np.count_nonzero(window, axis=0) > 0.5 * (r1 - r0))
    if rr.size < MIN_SIDE // 2 or cc.size < MIN_SIDE // 2:
        return None
    top, bottom, left, right = r0 + rr[0], r0 + rr[-1] + 1, c0 + cc[0], c0 + cc[-1] + 1
    top, bottom, left, right = _frame_around(gray, bg, tolerance, top, bottom, left, right)
    top, bottom, left, right = _unframe(gray, top, bottom, left, right, tolerance / INK_TOLERANCE)
    if min(bottom - top, right - left) < MIN_SIDE // 2:
        return None
    return top, bottom, left, right


def _frame_around(gray, bg, tolerance, top, bottom, left, right):
    """The axes' frame around a region whose own edges do not show (an image whose border
    has the figure's colour: ``gray_r`` with white air, a dark style with black air): the
    nearest lines, on all four sides, that run across the whole region; the region as it
    is when there is no such frame (``axis("off")``)."""
    h, w = gray.shape
    reach_v, reach_h = max(8, bottom - top), max(8, right - left)

    def find(block, axis, outward_first):
        """How far out the first line lies that runs across the region, with no more
        ink beyond it (the image itself may hold a long straight band)."""
        if block.size == 0:
            return None
        covered = np.count_nonzero(np.abs(block.astype(np.float32) - bg) > tolerance,
                                   axis=axis)
        span = block.shape[axis]
        if outward_first:
            covered = covered[::-1]
        lines = np.flatnonzero(covered >= 0.9 * span)
        for d in lines:
            if d + 1 < covered.size and covered[d + 1] < 0.5 * span:
                return int(d) + 1
        return None

    up = find(gray[max(0, top - reach_v):top, left:right], 1, True)
    down = find(gray[bottom:min(h, bottom + reach_v), left:right], 1, False)
    if up is None or down is None or max(up, down) <= 3:
        return top, bottom, left, right
    rows = slice(top - up, bottom + down)
    before = find(gray[rows, max(0, left - reach_h):left], 0, True)
    after = find(gray[rows, right:min(w, right + reach_h)], 0, False)
    if before is None or after is None:
        return top, bottom, left, right
    # The frame lines themselves go too (see _unframe).
    return top - up, bottom + down, left - before, right + after


def _unframe(gray, top, bottom, left, right, scale: float = 1.0, most: int = 3):
    """Drop up to ``most`` outer rows/columns per side that are a drawn line (a frame, a
    spine): nearly constant along their length and unlike the row or column inside."""
    def line(values, inner):
        values = values.astype(np.float32)
        inner = inner.astype(np.float32)
        span = max(float(np.ptp(inner)), 16.0 * scale)
        spread = float(np.percentile(values, 90) - np.percentile(values, 10))
        apart = float(np.mean(np.abs(values - inner)))
        return (spread <= 0.1 * span and apart > 0.15 * span) or apart > 0.35 * span
    for _ in range(most):
        if bottom - top > 2 and line(gray[top, left:right], gray[top + 1, left:right]):
            top += 1
        if bottom - top > 2 and line(gray[bottom - 1, left:right], gray[bottom - 2, left:right]):
            bottom -= 1
        if right - left > 2 and line(gray[top:bottom, left], gray[top:bottom, left + 1]):
            left += 1
        if right - left > 2 and line(gray[top:bottom, right - 1], gray[top:bottom, right - 2]):
            right -= 1
    return top, bottom, left, right


def _clamped(crop: np.ndarray, border: int = 2) -> np.ndarray:
    """The crop with its outer rows and columns held to the range of its inside: what is
    left of a frame (a line drawn over the edge, blended into it) must not become the
    image's darkest or brightest value, which tells the index where it is clipped."""
    inside = crop[border:-border, border:-border]
    if inside.size == 0:
        return crop
    return np.clip(crop, inside.min(), inside.max())


def _boundaries(changes: np.ndarray) -> np.ndarray | None:
    """Where a nearest-neighbour enlargement starts each source pixel (0 and the length
    included), given how often each column (row) differs from the previous one; None when
    the crop is not one. Runs of clipped values hide some starts: they are put back at the
    regular spacing of the others."""
    n = changes.size + 1
    top = float(np.percentile(changes, 98)) if changes.size else 0.0
    if top <= 0:
        return None
    starts = np.flatnonzero(changes > 0.1 * top) + 1
    if starts.size < 4:
        return None
    gaps = np.diff(starts)
    # Enlarged at least 1.5× (runs of repeats), and regularly: a smooth resampling or an
    # image drawn at its own size changes at nearly every column. A factor of 2.4 repeats
    # columns 2 and 3 times: the step is the mean of the gaps that are one source pixel.
    if np.count_nonzero(gaps == 1) > 0.2 * gaps.size:
        return None
    single = gaps[gaps < 1.6 * float(np.median(gaps))]
    step = float(single.mean()) if single.size else 0.0
    if step < 1.5:
        return None
    # The grid of source pixels: that step, at the phase the observed starts agree on.
    angle = np.angle(np.exp(2j * np.pi * starts / step).mean())
    phase = (angle / (2 * np.pi) * step) % step
    grid = phase + step * np.arange(int(n / step) + 2)
    edges = np.unique(np.r_[0, np.rint(grid[(grid > 0.5) & (grid < n - 0.5)]), n]).astype(int)
    widths = np.diff(edges)
    # A sliver at either end is a frame or a partly drawn pixel, not a source pixel.
    if widths[0] < 0.5 * step:
        edges = edges[1:]
    if widths[-1] < 0.5 * step:
        edges = edges[:-1]
    return edges if edges.size - 1 >= MIN_SIDE else None


def _source_pixels(crop: np.ndarray) -> tuple[np.ndarray, bool]:
    """One pixel per source pixel of a crop drawn enlarged with nearest-neighbour
    interpolation (the middle of each run of repeated columns and rows), and whether it
    was one; the crop as it is otherwise."""
    cols = _boundaries(np.mean(crop[:, 1:] != crop[:, :-1], axis=0))
    rows = _boundaries(np.mean(crop[1:] != crop[:-1], axis=1))
    if cols is None or rows is None:
        return crop, False
    return crop[(rows[:-1] + rows[1:]) // 2][:, (cols[:-1] + cols[1:]) // 2], True


def _moving(sample: np.ndarray) -> bool:
    """Whether enough pixels differ from their left or upper neighbour (every other row
    sampled) to be an image even if it was drawn enlarged: the cheap test before the edges
    of a region are looked for."""
    if sample.shape[0] < 2 or sample.shape[1] < 2:
        return False
    changed = (sample[1:, 1:] != sample[1:, :-1]) | (sample[1:, 1:] != sample[:-1, 1:])
    return float(changed.mean()) >= MIN_TEXTURE


def _texture(pixels: np.ndarray) -> float:
    moving = (pixels[1:, 1:] != pixels[1:, :-1]) & (pixels[1:, 1:] != pixels[:-1, 1:])
    return float(moving.mean()) if moving.size else 0.0


def _periods(profile: np.ndarray) -> list[int]:
    """Numbers of equal tiles (2…8) along a profile that repeats with their period."""
    n = profile.size
    out = []
    for k in range(2, MAX_TILES_PER_SIDE + 1):
        if n // k < MIN_SIDE:
            break
        if n % k > max(2, n // 200):  # tiles of whole pixels: the length divides (nearly)
            continue
        lag = round(n / k)
        a, b = profile[:-lag] - profile[:-lag].mean(), profile[lag:] - profile[lag:].mean()
        norm = float(np.sqrt((a @ a) * (b @ b)))
        if norm > 1e-9 and float(a @ b) / norm >= MONTAGE_CORRELATION:
            out.append(k)
    return out


def _tiles(pixels, top, bottom, left, right) -> list[Region]:
    """The tiles of a montage (equal tiles edge to edge), when its profiles repeat."""
    values = pixels.astype(np.float32)
    across = _periods(values.mean(axis=0)) or [1]
    down = _periods(values.mean(axis=1)) or [1]
    if across == [1] and down == [1]:
        return []
    # The finest grid that repeats: a 4×4 montage also repeats every 2 tiles.
    k, m = max(down), max(across)
    h, w = pixels.shape
    if not 0.6 <= (h / k) / (w / m) <= 1 / 0.6:
        return []  # slices are not slivers: an image's own profile repeating by chance
    out = []
    for i in range(k):
        for j in range(m):
            r0, r1 = round(i * h / k), round((i + 1) * h / k)
            c0, c1 = round(j * w / m), round((j + 1) * w / m)
            tile = pixels[r0:r1, c0:c1]
            if _texture(tile) >= MIN_TEXTURE:
                out.append(Region(top, bottom, left, right, tile, (i, j, k, m)))
    return out
