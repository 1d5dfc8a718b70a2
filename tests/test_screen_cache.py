"""Identical image bytes in one request are decoded and checked once; their findings are
still reported at every place they occur, exactly as when each copy is checked."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from medzone_hub.screen import ScreenConfig, images, screen_bytes, screen_paths

from .screen_corpus import (_code, _display, _figure, _nb, _png, _stream, _window,
                            dataset_facts)
from .screen_corpus import demo_indexes, demo_zone  # noqa: F401 - the same ingested zone (fixtures)


@pytest.fixture(scope="module")
def facts(zone):
    return dataset_facts(zone.home.dataset_dir("demo"))


@pytest.fixture
def decodes(monkeypatch):
    """How many times the screen decoded an image (in this process)."""
    count = [0]
    decode = images._decode

    def counted(data):
        count[0] += 1
        return decode(data)

    monkeypatch.setattr(images, "_decode", counted)
    return count


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _hu(facts) -> np.ndarray:
    ct = facts["ct"]
    return ct.pixel_array.astype(np.float64) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)


def _repeated_notebook(facts, copies: int) -> bytes:
    """A dataset slice shown ``copies`` times (re-run cells, and once more as a markdown
    attachment), a figure that draws it inside axes twice, a clean plot twice, a PNG cut
    short twice, one other slice once."""
    hu = _hu(facts)
    leak = _png(_window(hu, -1000, 400))
    in_axes = _figure(lambda ax: ax.imshow(hu, cmap="gray", vmin=-1000, vmax=400))
    clean = _figure(lambda ax: ax.plot([0, 1, 2], [3, 1, 2]))
    cut = leak[:200]
    other = _png(_window(hu, -160, 240))
    cells = []
    for i in range(copies):
        outputs = [_display({"image/png": _b64(leak), "text/plain": "<Figure>"})]
        if i < 2:
            outputs += [_display({"image/png": _b64(png), "text/plain": "<Figure>"})
                        for png in (in_axes, clean, cut)]
        outputs.append(_stream(f"run {i}\n"))
        cells.append(_code(f"show({i})", outputs))
    cells.append(_code("show(other)", [_display({"image/png": _b64(other)})]))
    cells.append({"cell_type": "markdown", "id": "md", "metadata": {},
                  "source": "![slice](attachment:slice.png)",
                  "attachments": {"slice.png": {"image/png": _b64(leak)}}})
    return _nb(cells)


def test_identical_images_are_decoded_once_with_the_same_findings(indexes, facts, decodes):
    copies = 6
    data = _repeated_notebook(facts, copies)
    off = ScreenConfig(workers=1, dedupe_images=False)
    checked_each = screen_bytes("rerun.ipynb", data, indexes=indexes, config=off)
    decoded_each = decodes[0]
    decodes[0] = 0
    once = screen_bytes("rerun.ipynb", data, indexes=indexes, config=ScreenConfig(workers=1))
    # the slice, the figure in axes, the clean plot, the PNG cut short, the other slice
    assert decodes[0] == 5
    assert decoded_each == copies + 1 + 3 * 2 + 1
    assert once.to_dict() == checked_each.to_dict()
    blocked = [f.location for f in once.findings
               if f.rule == "dataset-image" and f.severity == "block"]
    # every copy of the slice is reported where it is, the attachment too
    assert len(blocked) >= copies + 1
    assert len({loc.split(" output")[0] for loc in blocked}) >= copies + 1
    assert sum("attachment" in loc for loc in blocked) == 1
    undecodable = [f.location for f in once.findings if "cannot be decoded" in f.detail]
    assert [loc.split()[1] for loc in undecodable] == ["1", "2"]


def test_n_identical_copies_are_decoded_once(indexes, facts, decodes):
    leak = _b64(_png(_window(_hu(facts), -1000, 400)))
    n = 9
    data = _nb([_code(f"show({i})", [_display({"image/png": leak})]) for i in range(n)])
    verdict = screen_bytes("same.ipynb", data, indexes=indexes, config=ScreenConfig(workers=1))
    assert decodes[0] == 1
    cells = {f.location.split()[1] for f in verdict.findings if f.rule == "dataset-image"}
    assert cells == {str(i) for i in range(1, n + 1)}


def test_the_same_image_in_several_files_is_decoded_once(indexes, facts, decodes, tmp_path):
    leak = _png(_window(_hu(facts), -1000, 400))
    (tmp_path / "a.png").write_bytes(leak)
    (tmp_path / "b.png").write_bytes(leak)
    (tmp_path / "c.ipynb").write_bytes(_nb([_code("show()", [_display(
        {"image/png": _b64(leak)})])]))
    (tmp_path / "d.png").write_bytes(leak[:300])
    (tmp_path / "e.png").write_bytes(leak[:300])
    config = ScreenConfig(workers=1)
    shared = screen_paths([tmp_path], indexes=indexes, root=tmp_path, config=config)
    assert decodes[0] == 2  # the slice, the PNG cut short
    decodes[0] = 0
    alone = screen_paths([tmp_path], indexes=indexes, root=tmp_path,
                         config=ScreenConfig(workers=1, dedupe_images=False))
    assert decodes[0] == 5
    assert [v.to_dict() for v in shared] == [v.to_dict() for v in alone]
    assert [v.verdict for v in shared] == ["block"] * 5
    assert all("dataset-image" in {f.rule for f in v.findings} for v in shared[:3])


def test_copies_checked_in_a_pool_keep_their_findings_and_order(indexes, facts):
    data = _repeated_notebook(facts, 12)
    serial = screen_bytes("rerun.ipynb", data, indexes=indexes,
                          config=ScreenConfig(workers=1, dedupe_images=False))
    pooled = screen_bytes("rerun.ipynb", data, indexes=indexes,
                          config=ScreenConfig(workers=2, parallel_min_bytes=1))
    assert pooled.to_dict() == serial.to_dict()
