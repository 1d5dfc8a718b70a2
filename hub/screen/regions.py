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

#: Smaller regions (in source pixels) cannot be compared with the fingerprints.
MIN_SIDE = 32
#: A pixel differing from the figure's background by more than this (of 255) is ink.
INK_TOLERANCE = 8
#: Blocks of BLOCK×BLOCK pixels at least this full of ink are solid; lines and text are not.
BLOCK = 4
SOLID = 0.75
#: A region's solid blocks fill at least this much of its bounding box.
MIN_FILL = 0.6
#: ... or this much, when an axes' frame is drawn around it (an image with white or black
#: air around the body: the body alone fills less of its box; ``ScreenConfig``'s
#: ``figure_framed_min_fill``).
FRAMED_MIN_FILL = 0.25
#: ... and its box covers at least this share of the frame (a body inside its image does;
#: a dense cloud of points in the middle of a scatter plot's axes does not).
FRAMED_MIN_SHARE = 0.4
#: The lines of an axes' frame are at most this thick (pixels); a colour bar is wider.
FRAME_THICKNESS = 4
#: Pixels that differ from both their left and upper neighbour: an acquired image is noisy
#: almost everywhere, a colour bar or a bar chart is not. Below this share, the index could
#: not confirm a copy either (it needs 64 of 1024 coarse cells textured), so no lookup.
MIN_TEXTURE = 0.05
#: A montage is a region whose column (row) profile repeats with the tiles' period.
MONTAGE_CORRELATION = 0.5
MAX_TILES_PER_SIDE = 8

#: Colour maps whose luminance does not follow the value (rainbow and diverging maps), as
#: 65 RGB colours evenly spaced along each (interpolated to 256: within 5 of 255 of
#: matplotlib's own table). A colour region whose colours lie on one of them is mapped back
#: to the values the map was given; maps whose luminance follows the value need no table.
COLOUR_MAPS = {
    "jet": (
        "0000800000920000a40000b60000c80000da0000ed0000ff0000ff0010ff0020ff0030ff0040ff00"
        "50ff0060ff0070ff0080ff0090ff00a0ff00b0ff00c0ff00d0ff00e0fb09f0ee16ffe123ffd430ff"
        "c73cffba49ffad56ffa063ff9470ff877dff7a8aff6d97ff60a4ff53b1ff46beff39caff2cd7ff1f"
        "e4ff13f1fc06feed00ffde00ffd000ffc100ffb200ffa300ff9400ff8600ff7700ff6800ff5900ff"
        "4a00ff3b00ff2d00ff1e00fa0f00e80000d60000c40000b200009f00008d0000800000"
    ),
    "turbo": (
        "30123b351e58392a733d358b4040a2424bb54456c74661d6466be34776ee4680f6458afc4294ff3d"
        "9efe37a8fa2fb2f428bceb22c5e21ccdd819d5cd18ddc219e3b91fe9af27eea432f2983ff68a4ef9"
        "7d5dfc6f6dfe627dff568bff4b99fe42a4fc3caffa37b9f635c3f134cdec34d7e535dfdf37e7d739"
        "eecf3af4c73af8be39fbb637fdac34fea130fe962bfd8a26fb7e21f8721cf46617f05b12eb500ee5"
        "470bdf3f08d83706d02f05c82803be2102b41b01a916019e1001920b018507027a0403"
    ),
    "rainbow": (
        "8000ff780dff7019ff6826fe6032fe583efd504afc4856fb4062fa386df93079f72884f6208ef418"
        "98f210a2f008acee00b5eb08bee910c6e618cde420d5e128dbde30e1da38e7d740ecd448f1d050f4"
        "cc58f8c960fac568fcc170febc78ffb880ffb488ffaf90feab99fca6a0faa1a8f79cb0f397b9ef92"
        "c0eb8dc8e688d0e082d9da7de0d377e8cb72f0c46cf9bb66ffb360ffa95bffa055ff964fff8c49ff"
        "8143ff763dff6b37ff5f30ff532aff4724ff3b1eff2f18ff2211ff160bff0905ff0000"
    ),
    "coolwarm": (
        "3b4cc03f53c6445acc4961d24e68d8536edd5875e15d7ce66282ea6788ee6c8ff17295f4779af77d"
        "a0f982a6fb88abfd8db0fe93b5fe98b9ff9ebeffa3c2fea9c6fdaec9fcb3cdfbb9d0f9bed2f6c3d5"
        "f4c7d7f0ccd9edd1dae9d5dbe5d9dce1dddcdce1dad6e5d8d1e9d5cbecd3c5efcfbff1ccb8f3c8b2"
        "f5c4acf6bfa6f7ba9ff7b599f7b093f7aa8cf6a586f59f80f4987af29274f08b6eee8468eb7d62e8"
        "765ce46e56e16751dd5f4bd85646d44e41cf453cca3b37c43032be242eb8122ab40426"
    ),
    "RdBu": (
        "67001f7304217f08238a0b25960f27a21328ae172ab61f2ebb2a34c13639c6413ecc4c44d25849d7"
        "634fdc6e57e17860e58368ea8e70ef9979f3a481f5ac8bf7b596f8bda1f9c6acfbceb7fcd7c2fddd"
        "cbfce2d2fbe6dafaeae1f9efe9f8f3f0f6f7f7f0f4f6eaf1f5e4eef4deebf2d8e9f1d2e6f0cae1ee"
        "c0dcebb6d7e8acd2e5a2cde398c8e08dc2dc81bad875b2d468abd05ca3cb4f9bc74393c33e8cbf38"
        "85bc337eb82e77b52870b12369ad1e61a51a589915508d1147810d3f7608366a053061"
    ),
    "bwr": (
        "0000ff0808ff1010ff1818ff2020ff2828ff3030ff3838ff4040ff4848ff5050ff5858ff6060ff68"
        "68ff7070ff7878ff8080ff8888ff9090ff9898ffa0a0ffa8a8ffb0b0ffb8b8ffc0c0ffc8c8ffd0d0"
        "ffd8d8ffe0e0ffe8e8fff0f0fff8f8fffffefefff6f6ffeeeeffe6e6ffdedeffd6d6ffceceffc6c6"
        "ffbebeffb6b6ffaeaeffa6a6ff9e9eff9696ff8e8eff8686ff7e7eff7676ff6e6eff6666ff5e5eff"
        "5656ff4e4eff4646ff3e3eff3636ff2e2eff2626ff1e1eff1616ff0e0eff0606ff0000"
    ),
    "seismic": (
        "00004c00005800006300006e00007900008400009000009b0000a60000b10000bc0000c80000d300"
        "00de0000e90000f40101ff1111ff2121ff3131ff4141ff5151ff6161ff7171ff8181ff9191ffa1a1"
        "ffb1b1ffc1c1ffd1d1ffe1e1fff1f1fffffdfdffededffddddffcdcdffbdbdffadadff9d9dff8d8d"
        "ff7d7dff6d6dff5d5dff4d4dff3d3dff2d2dff1d1dff0d0dfe0000f60000ee0000e60000de0000d6"
        "0000ce0000c60000be0000b60000ae0000a600009e00009600008e0000860000800000"
    ),
    "Spectral": (
        "9e0142a70b44af1446b81e48c1274ac9314cd23a4ed8434edd4a4ce2514ae75948eb6046f06744f4"
        "7044f67a49f7844ef98e52fa9857fba35cfdad60fdb567fdbd6dfdc574fecc7bfed481fedc88fee2"
        "8ffee797feec9ffff1a8fff6b0fffbb8ffffbefbfdb8f7fcb2f3faaceff9a6ebf7a0e7f59adff299"
        "d6ee9bcdeb9dc3e79fbae3a1b1dfa3a7dba49cd7a491d3a486cfa57ccaa571c6a566c2a55eb9a956"
        "b0ad4ea7b0459eb43d95b8358bbc3682ba3d79b64471b24b68ae525fa95956a55e4fa2"
    ),
    "RdYlBu": (
        "a50026ad0826b50f26bd1726c41e27cc2627d42d27da362ade402ee34933e75337ec5c3bf16640f4"
        "7044f67a49f7844ef98e52fa9857fba35cfdad60fdb567fdbd6ffdc576fecc7efed485fedc8cfee2"
        "94fee79bfeeca2fff1aafff6b1fffbb9feffc0fafdc9f5fbd2f0f9dbebf7e4e6f5ede1f3f6daf0f6"
        "d1ecf4c9e8f2c1e4efb9e0edb0dceaa8d6e89fd0e497c9e08ec2dc85bbd97db4d574add16da4cc65"
        "9bc85e93c3578abf4f81ba4878b6436fb14065ac3d5ba73a51a236479e333d99313695"
    ),
}
#: A region's colours lie on a map when three quarters of its pixels lie within this
#: distance (RGB, of 255) of the map's nearest colour (a mask overlay, contour lines and
#: text are fewer).
MAP_TOLERANCE = 6.0
#: A region with more distinct colours than this (a JPEG: its colours blur across edges
#: and blocks) has them rounded to 6 bits a channel, and lies on a map within
#: ``JPEG_MAP_TOLERANCE`` (other maps and grey lie 50 or more away).
MAX_MAP_COLOURS = 16384
JPEG_MAP_TOLERANCE = 24.0
_TABLES: dict[str, np.ndarray] = {}


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


def _table(name: str) -> np.ndarray:
    """A colour map's 256 colours (float RGB), from its 65 stored ones."""
    table = _TABLES.get(name)
    if table is None:
        anchors = np.frombuffer(bytes.fromhex(COLOUR_MAPS[name]), np.uint8).reshape(-1, 3)
        at = np.linspace(0, anchors.shape[0] - 1, 256)
        table = np.stack([np.interp(at, np.arange(anchors.shape[0]), anchors[:, k])
                          for k in range(3)], axis=1).astype(np.float32)
        _TABLES[name] = table
    return table


def _unmapped(crop: np.ndarray, overlay: float | None = None) -> np.ndarray | None:
    """The values (0…255) a rainbow or diverging colour map was given to draw an RGB crop,
    when its colours lie on one of :data:`COLOUR_MAPS`; None otherwise (a grey crop, a
    map whose luminance follows the value). With ``overlay``, the pixels of a PNG that lie
    farther than that from the map (a contour, a mask laid over it) take the value of the
    nearest pixel that does (see :func:`_filled`)."""
    rgb = np.ascontiguousarray(crop[..., :3]).astype(np.uint8, copy=False)
    spread = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
    if np.count_nonzero(spread > INK_TOLERANCE) < 0.05 * spread.size:
        return None  # grey: its luminance is the value (or its inverse)
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) \
        | rgb[..., 2]
    colours, inverse, counts = np.unique(packed.ravel(), return_inverse=True,
                                         return_counts=True)
    tolerance = MAP_TOLERANCE
    if colours.size > MAX_MAP_COLOURS:
        packed = (packed & 0xFCFCFC) | 0x020202
        colours, inverse, counts = np.unique(packed.ravel(), return_inverse=True,
                                             return_counts=True)
        tolerance = JPEG_MAP_TOLERANCE
    points = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255],
                      axis=1).astype(np.float32)
    weights = counts / counts.sum()
    best = (tolerance, None)
    for name in COLOUR_MAPS:
        table = _table(name)
        # |p − t|² = |p|² − 2 p·t + |t|²: one matrix product per map.
        d2 = (points ** 2).sum(1)[:, None] - 2 * points @ table.T + (table ** 2).sum(1)
        nearest = np.argmin(d2, axis=1)
        dist = np.sqrt(np.maximum(d2[np.arange(points.shape[0]), nearest], 0))
        order = np.argsort(dist)
        # The distance within which three quarters of the pixels lie.
        typical = float(dist[order][np.searchsorted(np.cumsum(weights[order]), 0.75)
                                    .clip(max=order.size - 1)])
        if typical <= best[0]:
            best = (typical, nearest, dist)
    if best[1] is None:
        return None
    values = best[1].astype(np.uint8)[inverse.reshape(-1)].reshape(rgb.shape[:2])
    if overlay is None or tolerance != MAP_TOLERANCE:
        return values
    return _filled(values, (best[2] > overlay)[inverse.reshape(-1)].reshape(rgb.shape[:2]))


def _off_map(crop: np.ndarray, overlay: float) -> np.ndarray | None:
    """The luminance of a PNG crop drawn in a map whose luminance follows the value, with
    what is laid over it (contour lines, a mask in another colour) filled in (see
    :func:`_filled`); None when nothing is laid over it. A map gives each luminance one
    colour: a pixel farther than ``overlay`` from the commonest colour of its luminance
    is not the map's."""
    rgb = np.ascontiguousarray(crop[..., :3]).astype(np.uint8, copy=False)
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) \
        | rgb[..., 2]
    colours, inverse, counts = np.unique(packed.ravel(), return_inverse=True,
                                         return_counts=True)
    if colours.size > MAX_MAP_COLOURS:
        return None  # a JPEG: its colours blur, one luminance has many
    points = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255],
                      axis=1).astype(np.float32)
    luma = np.rint(points @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.int64)
    # The commonest colour of each luminance.
    order = np.lexsort((-counts, luma))
    first = np.r_[True, luma[order][1:] != luma[order][:-1]]
    mode = np.zeros((256, 3), np.float32)
    mode[luma[order][first]] = points[order][first]
    far = np.sqrt(((points - mode[luma]) ** 2).sum(axis=1)) > overlay
    if not far.any():
        return None
    off = far[inverse.reshape(-1)].reshape(rgb.shape[:2])
    # Luminance as the figure's grey pixels have it (ITU-R 601, rounded to 8 bits).
    luminance = np.rint(_grey(rgb)).astype(np.uint8)
    filled = _filled(luminance, off)
    return None if filled is luminance else filled


def _filled(values: np.ndarray, off: np.ndarray) -> np.ndarray:
    """``values`` with the pixels ``off`` that form lines (up to 4 pixels wide) taking the
    value of the nearest pixel not off; as they are when nothing, or more than a quarter,
    is off (then the map is not what the region shows)."""
    from scipy import ndimage

    # Lines only: a mask laid over an area is blended with the image, whose values still
    # show through it; filling it in would lose them.
    off = off & ~ndimage.binary_opening(off, structure=np.ones((5, 5), bool))
    share = float(off.mean()) if off.size else 0.0
    if share == 0.0 or share > 0.25:
        return values

    index = ndimage.distance_transform_edt(off, return_distances=False, return_indices=True)
    return values[tuple(index)]


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


def find_regions(image: np.ndarray, *, max_regions: int = 24,
                 framed_fill: float = FRAMED_MIN_FILL) -> list[Region]:
    """Image-like regions of a figure, largest first, then the tiles of montages;
    at most ``max_regions``. A group of solid blocks that fills less than ``MIN_FILL`` of
    its box but at least ``framed_fill`` is one when an axes' frame is drawn around it. The whole canvas is never one of them (the caller checks the
    whole image itself) unless it is a montage, whose tiles are returned."""
    gray = _grey(image)
    if gray.ndim != 2 or min(gray.shape) < MIN_SIDE:
        return []
    bg, share = background(gray)
    tolerance = INK_TOLERANCE * _scale(gray)
    h, w = gray.shape
    bh, bw = h // BLOCK, w // BLOCK
    trimmed = gray[:bh * BLOCK, :bw * BLOCK]
    full = _solid_blocks(trimmed, bg, tolerance)
    boxes = []
    if share < 0.5:
        boxes.append((0, h, 0, w))  # no margin: the canvas itself may be a montage
    if full.any():
        from scipy import ndimage  # only for figures with solid ink: the CLI starts without it

        labels, _ = ndimage.label(full)
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            rows, cols = box
            bh_, bw_ = rows.stop - rows.start, cols.stop - cols.start
            if min(bh_, bw_) * BLOCK < MIN_SIDE:
                continue
            filled = np.count_nonzero(labels[box] == label)
            loose = filled < MIN_FILL * bh_ * bw_
            if loose and filled < framed_fill * bh_ * bw_:
                continue
            if not _moving(trimmed[rows.start * BLOCK:rows.stop * BLOCK:2,
                                   cols.start * BLOCK:cols.stop * BLOCK]):
                continue  # flat fills: bars, a confusion matrix, a blocky heatmap
            framed: list[bool] = []
            edges = _edges(gray, bg, tolerance, rows.start * BLOCK, rows.stop * BLOCK,
                           cols.start * BLOCK, cols.stop * BLOCK, framed)
            if edges is not None and loose and not (
                    framed == [True] and bh_ * bw_ * BLOCK * BLOCK
                    >= FRAMED_MIN_SHARE * (edges[1] - edges[0]) * (edges[3] - edges[2])):
                continue  # a dense cloud of points inside axes: not an image
            if edges is not None:
                boxes.append(edges)
    out: list[Region] = []
    tiles: list[Region] = []
    for top, bottom, left, right in sorted(boxes, key=lambda b: -(b[1] - b[0]) * (b[3] - b[2])):
        pixels, sampled = region_pixels(image, top, bottom, left, right)
        if min(pixels.shape) < MIN_SIDE or _texture(pixels) < MIN_TEXTURE:
            continue
        whole = (bottom - top, right - left) == (h, w)
        if not whole:
            out.append(Region(top, bottom, left, right, pixels, sampled=sampled))
        tiles += _tiles(pixels, top, bottom, left, right)
    # Every panel before any montage tile: a grid's last panel is never crowded out.
    return (out + tiles)[:max_regions]


def region_pixels(image: np.ndarray, top: int, bottom: int, left: int, right: int,
                  overlay: float | None = None) -> tuple[np.ndarray, bool]:
    """A rectangle of the figure as the index should see it (see :func:`_clamped` and
    :func:`_source_pixels`), and whether it was sampled back to its source pixels. With
    ``overlay``, what is laid over a colour region is filled in (see :func:`_values`)."""
    crop = np.asarray(image)[top:bottom, left:right]
    values = _values(crop, overlay) if crop.ndim == 3 and crop.shape[2] >= 3 else None
    return _source_pixels(_clamped(_grey(crop) if values is None else values))


def _values(crop: np.ndarray, overlay: float | None) -> np.ndarray | None:
    """The values a colour crop was drawn from: mapped back from a rainbow or diverging
    map (:func:`_unmapped`), or, with ``overlay``, its luminance with contour lines and
    masks filled in (:func:`_off_map`); None: its luminance as it is."""
    values = _unmapped(crop, overlay)
    if values is None and overlay is not None:
        values = _off_map(crop, overlay)
    return values


def recoloured(region: Region, colour: np.ndarray, overlay: float | None = None
               ) -> Region | None:
    """The region with the values a rainbow or diverging colour map was given in place of
    its luminance (see :func:`_unmapped`), from the figure's RGB pixels ``colour``; with
    ``overlay``, also a region whose luminance follows its map with contour lines or a
    mask laid over it filled in (:func:`_values`); None when neither applies."""
    crop = np.asarray(colour)[region.top:region.bottom, region.left:region.right]
    if crop.ndim != 3 or crop.shape[2] < 3 or min(crop.shape[:2]) < MIN_SIDE:
        return None
    values = _values(crop, overlay)
    if values is None:
        return None
    pixels, sampled = _source_pixels(_clamped(values))
    if region.tile is not None:
        i, j, k, m = region.tile
        h, w = pixels.shape
        pixels = pixels[round(i * h / k):round((i + 1) * h / k),
                        round(j * w / m):round((j + 1) * w / m)]
    if min(pixels.shape) < MIN_SIDE:
        return None
    return Region(region.top, region.bottom, region.left, region.right, pixels,
                  region.tile, sampled)


def _edges(gray, bg, tolerance, r0, r1, c0, c1, framed=None):
    """The rectangle's edges at full resolution (rows and columns mostly ink), less a frame
    drawn around it (``framed``: see :func:`_frame_around`)."""
    h, w = gray.shape
    r0, c0 = max(0, r0 - BLOCK), max(0, c0 - BLOCK)
    r1, c1 = min(h, r1 + BLOCK), min(w, c1 + BLOCK)
    window = np.abs(gray[r0:r1, c0:c1].astype(np.float32) - bg) > tolerance
    rr = np.flatnonzero(np.count_nonzero(window, axis=1) > 0.5 * (c1 - c0))
    cc = np.flatnonzero(np.count_nonzero(window, axis=0) > 0.5 * (r1 - r0))
    if rr.size < MIN_SIDE // 2 or cc.size < MIN_SIDE // 2:
        return None
    top, bottom, left, right = r0 + rr[0], r0 + rr[-1] + 1, c0 + cc[0], c0 + cc[-1] + 1
    top, bottom, left, right = _frame_around(gray, bg, tolerance, top, bottom, left, right,
                                             framed)
    top, bottom, left, right = _unframe(gray, top, bottom, left, right, tolerance / INK_TOLERANCE)
    if min(bottom - top, right - left) < MIN_SIDE // 2:
        return None
    return top, bottom, left, right


def _frame_around(gray, bg, tolerance, top, bottom, left, right, framed=None):
    """The axes' frame around a region whose own edges do not show (an image whose border
    has the figure's colour: ``gray_r`` with white air, a dark style with black air): the
    nearest thin lines (at most ``FRAME_THICKNESS`` pixels) that run across the region,
    rows and columns apart; the region as it is where there is no such frame
    (``axis("off")``). ``framed``, a list, is told whether all four lines were found."""
    h, w = gray.shape
    reach_v, reach_h = max(8, bottom - top), max(8, right - left)

    def find(block, axis, outward_first):
        """How far out the first thin line lies that runs across the region, with no more
        ink beyond it (the image itself may hold a long straight band, a colour bar is
        wide)."""
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
                inked = covered[:d + 1] >= 0.5 * span
                thick = d + 1 - (np.flatnonzero(~inked)[-1] + 1 if not inked.all() else 0)
                if thick <= FRAME_THICKNESS or d <= FRAME_THICKNESS:
                    return int(d) + 1
        return None

    up = find(gray[max(0, top - reach_v):top, left:right], 1, True)
    down = find(gray[bottom:min(h, bottom + reach_v), left:right], 1, False)
    if up is None or down is None:
        if framed is not None:
            framed.append(False)
        return top, bottom, left, right
    # Lines right at the region's rows: its own edges show there; the columns may not.
    rows = (top - up, bottom + down) if max(up, down) > 3 else (top, bottom)
    before = find(gray[rows[0]:rows[1], max(0, left - reach_h):left], 0, True)
    after = find(gray[rows[0]:rows[1], right:min(w, right + reach_h)], 0, False)
    if framed is not None:
        framed.append(before is not None and after is not None)
    if before is None or after is None:
        return top, bottom, left, right
    if max(before, after) > 3:
        left, right = left - before, right + after
    top, bottom = rows
    # The frame lines themselves go too (see _unframe).
    return top, bottom, left, right


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


def _solid_blocks(trimmed: np.ndarray, bg: float, tolerance: float) -> np.ndarray:
    """Which ``BLOCK`` x ``BLOCK`` blocks of the figure are mostly ink (differ from the
    background by more than ``tolerance``). For 8-bit grey, the same blocks by integer
    comparisons and byte additions over strided rows and columns (a figure's costliest
    step before any region is found, some 1.8 ms as a float array summed over two axes)."""
    bh, bw = trimmed.shape[0] // BLOCK, trimmed.shape[1] // BLOCK
    if trimmed.dtype != np.uint8 or bg != int(bg) or tolerance != int(tolerance):
        ink = np.abs(trimmed.astype(np.float32) - bg) > tolerance
        return ink.reshape(bh, BLOCK, bw, BLOCK).sum(axis=(1, 3), dtype=np.int32) \
            >= SOLID * BLOCK * BLOCK
    low, high = int(bg) - int(tolerance), int(bg) + int(tolerance)  # ink: below or above
    ink = np.zeros(trimmed.shape, np.uint8)
    if low > 0:
        np.less(trimmed, low, out=ink.view(bool))
    if high < 255:
        ink |= trimmed > high
    rows = ink[0::BLOCK].copy()
    for k in range(1, BLOCK):
        rows += ink[k::BLOCK]
    count = rows[:, 0::BLOCK].copy()
    for k in range(1, BLOCK):
        count += rows[:, k::BLOCK]
    return count >= SOLID * BLOCK * BLOCK


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
