"""Image checks in a pool of processes: the same findings, in the same order, as checked in
one process; small files never start a pool; data URI payloads are screened as files."""

from __future__ import annotations

import base64
import os

import numpy as np
import pytest

from medzone_hub.screen import ScreenConfig, screen_bytes

from .screen_corpus import (_code, _display, _figure, _html_table, _nb, _png, _result, _stream,
                            _window, dataset_facts)
from .screen_corpus import demo_indexes, demo_zone  # noqa: F401 - the same ingested zone (fixtures)

_forks = [0]
os.register_at_fork(after_in_parent=lambda: _forks.__setitem__(0, _forks[0] + 1))


@pytest.fixture(scope="module")
def facts(zone):
    return dataset_facts(zone.home.dataset_dir("demo"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _mixed_notebook(facts, n_cells: int) -> bytes:
    """Figures of every verdict (a dataset slice, one drawn in axes, a clean plot, an image
    that cannot be decoded) between outputs that the text and table rules flag."""
    ct = facts["ct"]
    hu = ct.pixel_array.astype(np.float64) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    pid = facts["rows"][0]["patient_id"]
    rng = np.random.default_rng(3)
    in_axes = _figure(lambda ax: ax.imshow(hu, cmap="gray", vmin=-1000, vmax=400))
    cells = []
    for i in range(n_cells):
        kind = i % 4
        if kind == 0:
            png = _png(_window(hu, -1000 + i, 400))
        elif kind == 1:
            png = in_axes
        elif kind == 2:
            png = _png((rng.random((96, 128)) * 255).astype(np.uint8))
        else:
            png = _png(_window(hu, -1000, 400))[:200]  # a PNG cut short
        outputs = [_display({"image/png": _b64(png), "text/plain": "<Figure>"})]
        if i % 3 == 0:
            outputs.append(_stream(f"contact 010-2345-{6000 + i}\n"))
        if i % 5 == 0:
            outputs.append(_result({"text/html": _html_table(["n"], [("a", [3]), ("b", [40])])}))
        if i % 7 == 0:
            outputs.append(_stream(f"{pid}\n"))
        cells.append(_code(f"show({i})", outputs))
    return _nb(cells)


def test_pool_and_one_process_give_the_same_findings_in_order(indexes, facts):
    data = _mixed_notebook(facts, 24)
    serial = screen_bytes("mixed.ipynb", data, indexes=indexes, config=ScreenConfig(workers=1))
    before = _forks[0]
    parallel = screen_bytes("mixed.ipynb", data, indexes=indexes,
                            config=ScreenConfig(workers=2, parallel_min_bytes=1))
    assert _forks[0] > before, "the images were not checked in a pool"
    assert parallel.to_dict() == serial.to_dict()
    rules = {f.rule for f in parallel.findings}
    assert {"dataset-image", "malformed", "direct-identifier", "dataset-identifier",
            "small-counts"} <= rules
    # Image findings sit between the text findings of their cells, not after all of them.
    cells = [int(f.location.split()[1]) for f in parallel.findings]
    assert cells == sorted(cells)
    assert parallel.findings[-1].rule != "dataset-image"


def test_small_files_do_not_start_a_pool(indexes, facts):
    data = _mixed_notebook(facts, 4)  # four small images: far below parallel_min_bytes
    before = _forks[0]
    verdict = screen_bytes("small.ipynb", data, indexes=indexes, config=ScreenConfig(workers=4))
    assert _forks[0] == before
    assert verdict.to_dict() == screen_bytes("small.ipynb", data, indexes=indexes,
                                             config=ScreenConfig(workers=1)).to_dict()
    assert "dataset-image" in {f.rule for f in verdict.findings}


def test_a_screen_called_from_a_thread_never_forks(indexes, facts):
    # The hub and the portal screen in executor threads: forking a multi-threaded process
    # could copy a lock another thread holds.
    from concurrent.futures import ThreadPoolExecutor

    data = _mixed_notebook(facts, 24)
    config = ScreenConfig(workers=2, parallel_min_bytes=1)
    before = _forks[0]
    with ThreadPoolExecutor(1) as executor:
        verdict = executor.submit(screen_bytes, "mixed.ipynb", data, indexes=indexes,
                                  config=config).result()
    assert _forks[0] == before
    assert verdict.to_dict() == screen_bytes("mixed.ipynb", data, indexes=indexes,
                                             config=ScreenConfig(workers=1)).to_dict()


def test_workers_must_not_be_negative():
    with pytest.raises(ValueError, match="workers"):
        ScreenConfig(workers=-1)


def test_data_uri_images_are_checked_as_images_and_text_after_them_is_still_read(indexes, facts):
    ct = facts["ct"]
    hu = ct.pixel_array.astype(np.float64) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    payload = _b64(_png(_window(hu, -1000, 400)))
    pid = facts["rows"][0]["patient_id"]
    html = f'<p>slice</p><img src="data:image/png;base64,{payload}">\n<p>{pid}</p>'
    verdict = screen_bytes("uri.ipynb", _nb([_code("show()", [_display({"text/html": html})])]),
                           indexes=indexes)
    rules = {(f.rule, f.location) for f in verdict.findings}
    assert ("dataset-image", "cell 1 output 1 text/html data URI 1") in rules
    assert ("dataset-identifier", "cell 1 output 1 text/html line 2") in rules
    # Digits glued after an image's base64 are not part of the image: still read as text.
    glued = f"data:image/png;base64,{payload}=9001011234568\n"
    verdict = screen_bytes("glued.md", glued.encode(), indexes=indexes)
    assert "direct-identifier" in {f.rule for f in verdict.findings}
