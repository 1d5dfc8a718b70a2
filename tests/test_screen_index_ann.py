"""A screening index that scales: memory-mapped arrays, an approximate nearest-neighbour
search above ``ScreenConfig.ann_min_images`` images whose candidates are checked exactly,
and indexes of the previous format still read."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest

from medzone_hub.screen import ScreenConfig, screen_bytes, screen_paths
from medzone_hub.screen.index import (ANN_FILE, FINGERPRINTS_DIR, FINGERPRINTS_FILE,
                                      INDEX_FILE, ScreeningIndex, ScreeningIndexBuilder)

from .screen_corpus import demo_corpus, demo_indexes, demo_zone  # noqa: F401 (fixtures)
from .test_screening_index import INDEX_KEY, phantom, resized, windowed

FORCED = ScreenConfig(ann_min_images=0)


def _screen(case, indexes, work, config):
    if case.data is None:
        return screen_paths([work / case.name], indexes=indexes, config=config, root=work)[0]
    return screen_bytes(case.name, case.data, indexes=indexes, config=config)


def _summary(verdict):
    return verdict.verdict, [(f.rule, f.severity, f.location, f.detail) for f in verdict.findings]


def test_corpus_verdicts_are_the_same_with_the_ann_forced_on(corpus, indexes):
    work, cases = corpus
    (index,) = indexes
    assert not index.uses_ann  # the test cohort is small: exact search by default
    forced = index.configured(FORCED)
    assert forced.uses_ann and forced is index.configured(FORCED)
    images = 0
    for case in cases:
        exact = _screen(case, indexes, work, case.config)
        approximate = _screen(case, indexes, work,
                              dataclasses.replace(case.config, ann_min_images=0))
        assert _summary(approximate) == _summary(exact), case.name
        images += any(f.rule == "dataset-image" for f in exact.findings)
    assert images >= 3  # the corpus has image leaks the search must find
    assert "ann" in index._lazy  # the search really ran (built in memory: no file)


def test_ann_finds_copies_among_many_images(tmp_path):
    """An index of 400 images with the ANN written: copies (re-windowed, resized, flipped)
    are found as exact search finds them, other images are not."""
    builder = ScreeningIndexBuilder(INDEX_KEY)
    for i in range(400):
        builder.add_image(phantom(1000 + i), f"image {i}")
    directory = builder.write(tmp_path / "index", ann_min_images=100)
    assert (directory / FINGERPRINTS_DIR / ANN_FILE).is_file()
    approximate = ScreeningIndex.load(directory, INDEX_KEY, ann_min_images=100)
    exact = ScreeningIndex.load(directory, INDEX_KEY, ann_min_images=10_000)
    assert approximate.uses_ann and not exact.uses_ann
    for i in (3, 150, 399):
        original = phantom(1000 + i)
        for copy in (windowed(original), resized(windowed(original, 40, 400), 384),
                     windowed(original)[::-1].T.copy()):
            found = approximate.image_candidates(copy)
            assert found and found[0].ref == f"image {i}"
            assert [(c.ref, round(c.detail_correlation, 6)) for c in found] == [
                (c.ref, round(c.detail_correlation, 6)) for c in exact.image_candidates(copy)]
    assert approximate.image_candidates(windowed(phantom(5))) == []
    size = approximate.disk_bytes()
    assert size["images"] == 400 and 0 < size["ann"] < size["total"]


def test_arrays_are_memory_mapped_and_workers_reopen_them(tmp_path):
    builder = ScreeningIndexBuilder(INDEX_KEY)
    for i in range(6):
        builder.add_image(phantom(i), f"image {i}")
    directory = builder.write(tmp_path / "index")
    index = ScreeningIndex.load(directory, INDEX_KEY)
    assert isinstance(index._coarse_cells, np.memmap) and isinstance(index._fine_flat, np.memmap)
    data = pickle.dumps(index.configured(FORCED))
    fingerprints = sum(p.stat().st_size for p in (directory / FINGERPRINTS_DIR).iterdir())
    assert len(data) < fingerprints / 4  # a path and a key, not the arrays
    copy = pickle.loads(data)
    assert isinstance(copy._coarse_cells, np.memmap) and copy.ann_min_images == 0
    query = windowed(phantom(4))
    assert copy.image_candidates(query) == index.image_candidates(query)
    assert copy.image_candidates(query)[0].ref == "image 4"


def _as_version_2(directory) -> None:
    """Rewrite a written index as the previous format wrote it (one compressed .npz)."""
    folder = directory / FINGERPRINTS_DIR
    arrays = {p.stem: np.load(p) for p in folder.glob("*.npy")}
    del arrays["fine_offset"]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(arrays["exact"]))  # unsorted, as version 2 kept them
    arrays["exact"], arrays["exact_image"] = arrays["exact"][order], arrays["exact_image"][order]
    np.savez_compressed(directory / FINGERPRINTS_FILE, **arrays)
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    document = json.loads((directory / INDEX_FILE).read_text())
    document["version"] = 2
    document["images"] = {k: v for k, v in document["images"].items()
                          if k not in ("ann", "ann_size", "directory")}
    document["images"]["file"] = FINGERPRINTS_FILE
    (directory / INDEX_FILE).write_text(json.dumps(document))


def test_indexes_of_the_previous_format_are_still_read(tmp_path):
    builder = ScreeningIndexBuilder(INDEX_KEY)
    for i in range(6):
        builder.add_image(phantom(i), f"image {i}")
    builder.add_identifier("patient_id", "MZP-OLDFORMAT-01")
    current = ScreeningIndex.load(builder.write(tmp_path / "v3"), INDEX_KEY)
    old_dir = builder.write(tmp_path / "v2")
    _as_version_2(old_dir)
    old = ScreeningIndex.load(old_dir, INDEX_KEY)
    assert old.contains("mzp oldformat 01") == "patient_id"
    for i in range(6):
        assert old.exact_matches(phantom(i)) == [f"image {i}"]
        for query in (windowed(phantom(i)), windowed(phantom(i))[:, ::-1].copy()):
            assert old.image_candidates(query) == current.image_candidates(query)
            assert old.configured(FORCED).image_candidates(query) == \
                current.image_candidates(query)
    (old_dir / INDEX_FILE).write_text(json.dumps({"format": "medzone-screening-index",
                                                  "version": 1}))
    from medzone_hub.screen.index import InvalidIndex

    with pytest.raises(InvalidIndex, match="add the dataset again"):
        ScreeningIndex.load(old_dir, INDEX_KEY)
