"""Dataset images inside matplotlib figures (tests/screen_corpus_figures.py): the region
search finds every panel, inset and montage tile where matplotlib drew it, a dataset image
drawn in a figure blocks like a bare copy, and other patients' images and ordinary plots
drawn the same ways pass."""

from __future__ import annotations

import io

import numpy as np
import pytest

from medzone_hub.screen import ScreenConfig, screen_bytes
from medzone_hub.screen.images import _decode
from medzone_hub.screen.regions import find_regions

from .screen_corpus import demo_indexes, demo_zone  # noqa: F401 (fixtures)
from .screen_corpus_figures import build_figure_cases, load_images, ordinary_figure

#: The other cohort: not the seed the figure thresholds were calibrated on (1).
OTHER_SEED = 23


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, **kw) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kw)
    _plt().close(fig)
    return buf.getvalue()


def _box(fig, artist) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixel rows/columns of an artist in the saved PNG."""
    fig.canvas.draw()
    b = artist.get_window_extent()
    height = fig.canvas.get_width_height()[1]
    return (round(height - b.y1), round(height - b.y0), round(b.x0), round(b.x1))


def _near(region, box, tolerance=3) -> bool:
    return all(abs(a - b) <= tolerance for a, b in
               zip((region.top, region.bottom, region.left, region.right), box))


@pytest.fixture(scope="module")
def slices(cohort_dir):
    return [v for kind, v in load_images(cohort_dir, ct_step=9) if kind == "CT"]


@pytest.fixture(scope="module")
def other_root(tmp_path_factory):
    from medzone_hub.demodata import generate_cohort

    root = tmp_path_factory.mktemp("other-figures") / "cohort"
    generate_cohort(root, patients=2, seed=OTHER_SEED, progress=False)
    return root


@pytest.fixture(scope="module")
def figure_cases(zone, other_root, tmp_path_factory):
    # One figure per style of each kind (a sample of the corpus: the evaluation script
    # builds all of it), and a dozen ordinary plots.
    return build_figure_cases(zone.home.dataset_dir("demo"), other_root,
                              tmp_path_factory.mktemp("figures"), seed=7, per_style=1,
                              ordinary=12)


def test_every_panel_of_a_subplot_grid_is_a_region(slices):
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(6, 6), dpi=80)
    images = [ax.imshow(v, cmap="bone", vmin=-1000, vmax=400)
              for ax, v in zip(axes.ravel(), slices)]
    for ax in axes.ravel():
        ax.set_title("slice")
    boxes = [_box(fig, im) for im in images]
    regions = find_regions(_decode(_png(fig)))
    for box in boxes:
        assert any(_near(r, box) for r in regions), (box, [(r.top, r.bottom, r.left, r.right)
                                                          for r in regions])


def test_an_inset_over_a_line_plot_is_a_region(slices):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(np.linspace(0, 1, 50), np.linspace(0, 1, 50) ** 0.5)
    inset = ax.inset_axes([0.5, 0.1, 0.4, 0.45])
    image = inset.imshow(slices[1], cmap="gray", vmin=-160, vmax=240)
    inset.set_xticks([])
    inset.set_yticks([])
    box = _box(fig, image)
    regions = find_regions(_decode(_png(fig)))
    assert any(_near(r, box) for r in regions)


def test_a_montage_is_split_into_its_slices_at_their_own_resolution(slices):
    plt = _plt()
    grid = np.vstack([np.hstack(slices[0:3]), np.hstack(slices[3:6])])
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    ax.imshow(grid, cmap="gray", vmin=-1000, vmax=400, interpolation="nearest")  # ×2.2
    ax.axis("off")
    tiles = [r for r in find_regions(_decode(_png(fig, bbox_inches="tight"))) if r.tile]
    assert len(tiles) == 6
    # Nearest-neighbour enlargement is sampled back: one pixel per pixel of the slice,
    # in the order of its values.
    assert all(t.pixels.shape == slices[0].shape for t in tiles)
    first = next(t for t in tiles if t.tile[:2] == (0, 0))
    values = np.clip(slices[0], -1000, 400)
    inside = (values > -1000) & (values < 400)
    assert np.corrcoef(first.pixels[inside].astype(float), values[inside])[0, 1] > 0.99


def test_plots_without_images_have_no_regions():
    rng = np.random.default_rng(5)
    flat = {"line", "roc", "histogram", "bars", "scatter", "confusion", "training", "boxplot"}
    seen = set()
    for i in range(24):
        data, kind = ordinary_figure(i, rng)
        if kind in flat:
            seen.add(kind)
            assert find_regions(_decode(data)) == [], kind
    assert seen == flat


def test_region_search_takes_any_array():
    assert find_regions(np.zeros((10, 10), np.uint8)) == []
    assert find_regions(np.full((300, 400), 255, np.uint8)) == []
    noise = np.random.default_rng(1).integers(0, 65535, (200, 300), dtype=np.uint16)
    assert isinstance(find_regions(noise), list)
    rgb = np.random.default_rng(2).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    assert isinstance(find_regions(rgb), list)


def test_figures_of_the_dataset_block_and_of_others_pass(figure_cases, indexes):
    leaky = [c for c in figure_cases if c.rule == "dataset-image"]
    clean = [c for c in figure_cases if c.rule is None]
    assert len(leaky) >= 14 and len(clean) >= 26
    missed, flagged = [], []
    for case in leaky:
        v = screen_bytes(case.name, case.data, indexes=indexes)
        if v.verdict != "block" or v.findings[0].rule != "dataset-image":
            missed.append(f"{case.label}: {v.verdict}")
    for case in clean:
        v = screen_bytes(case.name, case.data, indexes=indexes)
        if v.verdict != "pass":
            flagged.append(f"{case.label}: {[f.detail for f in v.findings]}")
    assert flagged == []
    # A sample of one figure per style: the evaluation script measures the recall of the
    # whole corpus (docs/screen.md). Known misses: an image whose border has the figure's
    # colour (gray_r with white air), small renderings of soft-tissue windows.
    assert len(missed) <= len(leaky) // 2, missed


def test_the_leeways_decide_block_and_review(figure_cases, indexes):
    case = next(c for c in figure_cases if c.rule and "colourbar" in c.name)
    assert screen_bytes(case.name, case.data, indexes=indexes).verdict == "block"
    strict = ScreenConfig(figure_block_leeway=-2.0, figure_review_leeway=2.0)
    assert screen_bytes(case.name, case.data, indexes=indexes, config=strict).verdict == "review"
    off = ScreenConfig(figure_block_leeway=-2.0, figure_review_leeway=-2.0)
    assert screen_bytes(case.name, case.data, indexes=indexes, config=off).verdict == "pass"


@pytest.mark.parametrize("cmap,fmt", [("jet", "png"), ("RdBu_r", "png"), ("coolwarm", "png"),
                                      ("jet", "jpeg")])
def test_rainbow_and_diverging_maps_are_mapped_back_to_their_values(slices, cmap, fmt):
    from PIL import Image

    from medzone_hub.screen.regions import recoloured

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    image = ax.imshow(slices[2], cmap=cmap, vmin=-1000, vmax=400)
    box = _box(fig, image)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    _plt().close(fig)
    data = buf.getvalue()
    grey = _decode(data)
    colour = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    region = next(r for r in find_regions(grey) if _near(r, box))
    mapped = recoloured(region, colour)
    assert mapped is not None
    # The values the map was given, in their order or reversed (``RdBu_r`` is ``RdBu``
    # reversed, and the index finds inverted copies); the luminance of these maps is not.
    values = np.clip(slices[2], -1000, 400)
    small = np.asarray(Image.fromarray(values.astype(np.float32)).resize(
        mapped.pixels.shape[::-1], Image.BILINEAR))
    assert abs(np.corrcoef(mapped.pixels.ravel().astype(float), small.ravel())[0, 1]) > 0.9
    # A grey figure and a map whose luminance follows the value keep their luminance.
    assert recoloured(region, np.repeat(grey[..., None], 3, axis=2)) is None


def test_a_slice_drawn_in_jet_blocks(indexes, zone):
    plt = _plt()
    kind, values = next(p for p in load_images(zone.home.dataset_dir("demo"), ct_step=5)
                        if p[0] == "CT")
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    fig.colorbar(ax.imshow(values, cmap="jet", vmin=-1000, vmax=400), ax=ax)
    ax.set_title("slice")
    data = _png(fig)
    assert screen_bytes("jet.png", data, indexes=indexes).verdict == "block"
    # Without its colours (grey pixels alone) the same figure is not a copy.
    from medzone_hub.screen.images import check_figure
    from medzone_hub.screen.model import Collector

    col = Collector(ScreenConfig(), indexes)
    check_figure(_decode(data), col, "jet.png", indexes)
    assert all(f.severity != "block" for f in col.findings)


def test_a_body_with_dark_air_inside_axes_is_found_by_the_frame(indexes, zone):
    # dark_background: the image's air is as black as the figure, so the body alone is ink;
    # a slice whose body fills too little of its box to be a region is found by the axes'
    # frame drawn around it.
    plt = _plt()
    found = None
    for kind, values in load_images(zone.home.dataset_dir("demo"), ct_step=4):
        if kind != "CT":
            continue
        with plt.style.context("dark_background"):
            fig, ax = plt.subplots(figsize=(4, 3.3), dpi=80)
            image = ax.imshow(values, cmap="magma", vmin=-160, vmax=240, origin="lower")
            fig.colorbar(image, ax=ax, fraction=0.05)
            ax.set_title("case 3")
            box = _box(fig, image)
            data = _png(fig)
        if not any(_near(r, box) for r in find_regions(_decode(data), framed_fill=1.0)):
            found = (box, data)
            break
    assert found is not None, "no slice whose body alone is too loose a region"
    box, data = found
    assert any(_near(r, box) for r in find_regions(_decode(data)))
    assert screen_bytes("dark.png", data, indexes=indexes).verdict == "block"


@pytest.mark.parametrize("cmap", ["jet", "magma"])
def test_contour_lines_over_a_map_are_filled_in(slices, cmap):
    from PIL import Image

    from medzone_hub.screen.regions import recoloured

    plt = _plt()
    values = np.clip(slices[2], -1000, 400)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    image = ax.imshow(values, cmap=cmap, vmin=-1000, vmax=400)
    ax.contour(values, levels=[float(np.percentile(values, 60))], colors="m", linewidths=1.5)
    box = _box(fig, image)
    data = _png(fig)
    grey = _decode(data)
    colour = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    region = next(r for r in find_regions(grey) if _near(r, box))
    filled = recoloured(region, colour, ScreenConfig().figure_overlay_tolerance)
    assert filled is not None
    as_drawn = recoloured(region, colour) or region

    def fit(r):
        small = np.asarray(Image.fromarray(values.astype(np.float32)).resize(
            r.pixels.shape[::-1], Image.BILINEAR))
        return abs(np.corrcoef(r.pixels.ravel().astype(float), small.ravel())[0, 1])

    # The line's magenta is not the map's colour for its luminance: it takes its
    # neighbours' values, and the region follows the slice more closely.
    assert fit(filled) > fit(as_drawn)
