"""The screening index at scale: time to screen one figure against indexes of 1k, 10k and
100k images, the index's size on disk per image, and the corpus verdicts with the
approximate nearest-neighbour search forced on against exact search.

* The 1k index holds real fingerprints: a synthetic demo cohort of ``REAL_PATIENTS``
  patients (about 65 images each), ingested de-identified into a temporary zone, its
  published DICOM files fingerprinted again with the zone's key. The 10k and 100k indexes
  are the same real images plus synthetic fingerprints: real coarse thumbnails moved by a
  few cells and noised (so that they look like CT slices to the search), fine thumbnails
  of noise (32², so the 100k index stays small in memory).
* ``per_figure_ms``: median wall time of :func:`screen_bytes` (one process, ``workers=1``)
  per figure over ``FIGURES`` figures that draw a dataset slice (the figure corpus's first
  leaks), the median of ``MEDZONE_BENCH_REPEATS`` rounds over every size in turn, with the default
  ``ann_min_images`` (5000: exact search at 1k, the ANN at 10k and 100k), with the ANN
  forced on at every size (``per_figure_ms_ann``) and, for contrast, with exact search at every size (one run each); the growth 1k → 100k is their ratio.
* ``corpus``: ``tests/screen_corpus.py`` (the 1k index) and ``tests/screen_corpus_figures.py``
  on evaluation pair ``EVAL_PAIR`` (indexed cohort 31, other cohort 53, as
  ``benchmarks/eval_screen.py`` builds it), each case screened with exact search and with
  the ANN forced on (``ann_min_images=0``): caught leaks, flagged clean cases, and the
  cases whose verdict or findings differ.

``MEDZONE_BENCH_INDEX_SIZES`` (default ``1000,10000,100000``) sets the sizes;
``MEDZONE_BENCH_INDEX_CORPUS=0`` leaves out the corpus comparison.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = [int(n) for n in os.environ.get("MEDZONE_BENCH_INDEX_SIZES",
                                        "1000,10000,100000").split(",")]
REPEATS = int(os.environ.get("MEDZONE_BENCH_REPEATS", "3"))
REAL_PATIENTS = 16
FIGURES = 6
EVAL_PAIR = (31, 53)


def _zone(base: Path, seed: int, patients: int):
    from medzone_hub.config import MedZoneHome
    from medzone_hub.db import connect
    from medzone_hub.demodata import generate_cohort
    from medzone_hub.ingest import ingest_dataset

    generate_cohort(base / "source", patients=patients, seed=seed, progress=False)
    home = MedZoneHome(base / "home").ensure()
    store = connect(home.db_url)
    ingest_dataset(home, store, "demo", base / "source", deidentify=True,
                   pseudonym_key=b"bench-index-provider-key".ljust(32, b"0"), actor="bench",
                   progress=False)
    store.engine.dispose()
    return home


def _real_builder(home, key):
    import pydicom

    from medzone_hub.screen.index import ScreeningIndexBuilder

    builder = ScreeningIndexBuilder(key)
    for path in sorted(home.dataset_dir("demo").rglob("*.dcm")):
        builder.add_dicom(pydicom.dcmread(path))
    return builder


def _sized(real, key, n: int, rng):
    """A builder with ``real``'s fingerprints and synthetic ones up to ``n`` images."""
    from medzone_hub.screen.index import ScreeningIndexBuilder

    builder = ScreeningIndexBuilder(key)
    builder.merge(real)
    coarse = np.stack(real._coarse).astype(np.float32)
    for j in range(n - len(builder._refs)):
        base = coarse[j % len(coarse)]
        moved = np.roll(base, tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
        noisy = moved + rng.normal(0, 3000, moved.shape)
        builder._coarse.append(np.clip(noisy, 0, 65535).astype(np.uint16))
        builder._fine.append(rng.integers(0, 65535, (32, 32), dtype=np.uint16))
        builder._refs.append(f"synthetic image {j + 1}")
    return builder


def _figures(home, other: Path, work: Path) -> list[tuple[str, bytes]]:
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.screen_corpus_figures import build_figure_cases

    cases = build_figure_cases(home.dataset_dir("demo"), other, work, seed=1, per_style=1,
                               ordinary=0)
    return [(c.name, c.data) for c in cases if c.rule][:FIGURES]


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _per_figure(figures, index, config, repeats: int = REPEATS) -> float:
    from medzone_hub.screen import screen_bytes

    per = [_median_ms(lambda: screen_bytes(name, data, indexes=[index], config=config), repeats)
           for name, data in figures]
    return round(statistics.median(per), 1)


def _compare(cases, indexes, work: Path) -> dict:
    """Screen every case with exact search and with the ANN forced on."""
    from medzone_hub.screen import screen_bytes, screen_paths

    def screen(case, config):
        if case.data is None:
            return screen_paths([work / case.name], indexes=indexes, config=config,
                                root=work)[0]
        return screen_bytes(case.name, case.data, indexes=indexes, config=config)

    out = {"cases": len(cases), "differ": []}
    for mode in ("exact", "ann"):
        out[mode] = {"leaks": 0, "caught": 0, "clean": 0, "clean_flagged": 0}
    for case in cases:
        verdicts = {}
        for mode, config in (("exact", case.config),
                             ("ann", dataclasses.replace(case.config, ann_min_images=0))):
            v = screen(case, config)
            verdicts[mode] = (v.verdict, [(f.rule, f.detail) for f in v.findings])
            tally = out[mode]
            if case.rule:
                tally["leaks"] += 1
                tally["caught"] += (case.rule in {f.rule for f in v.findings}
                                    and v.verdict == case.verdict)
            else:
                tally["clean"] += 1
                tally["clean_flagged"] += v.verdict != "pass"
        if verdicts["exact"] != verdicts["ann"]:
            out["differ"].append(case.name)
    return out


def run() -> dict:
    from medzone_hub.demodata import generate_cohort
    from medzone_hub.indexes import load_indexes, screening_index_key
    from medzone_hub.screen import ScreenConfig
    from medzone_hub.screen.index import ScreeningIndex

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    result: dict = {"sizes": SIZES, "repeats": REPEATS, "sizes_detail": {}}
    default, exact = ScreenConfig(workers=1), ScreenConfig(workers=1, ann_min_images=10**9)
    with tempfile.TemporaryDirectory(prefix="medzone-bench-index-") as tmp:
        tmp = Path(tmp)
        home = _zone(tmp / "real", 11, REAL_PATIENTS)
        key = screening_index_key(home)
        real = _real_builder(home, key)
        other = tmp / "other"
        generate_cohort(other, patients=2, seed=23, progress=False)
        figures = _figures(home, other, tmp / "work")
        result["real_images"] = len(real._refs)
        result["figures"] = [name for name, _ in figures]
        opened = {}
        for n in SIZES:
            t0 = time.perf_counter()
            directory = _sized(real, key, n, rng).write(tmp / f"index-{n}")
            write_s = time.perf_counter() - t0
            opened[n] = ScreeningIndex.load(directory, key)
            result["sizes_detail"][str(n)] = {
                "images": n, "write_s": round(write_s, 1), "uses_ann": opened[n].uses_ann,
                "disk": opened[n].disk_bytes()}
        # Rounds over every size in turn, so that the load of the shared machine weighs on
        # each size alike.
        forced = ScreenConfig(workers=1, ann_min_images=0)
        times: dict = {n: [] for n in SIZES}
        times_ann: dict = {n: [] for n in SIZES}
        for _ in range(REPEATS):
            for n in SIZES:
                times[n].append(_per_figure(figures, opened[n], default, 1))
                times_ann[n].append(_per_figure(figures, opened[n], forced, 1))
        for n in SIZES:
            detail = result["sizes_detail"][str(n)]
            detail["per_figure_ms"] = round(statistics.median(times[n]), 1)
            detail["per_figure_ms_runs"] = times[n]
            detail["per_figure_ms_ann"] = round(statistics.median(times_ann[n]), 1)
            # one run each: at 100k images exact search takes seconds
            detail["per_figure_ms_exact"] = _per_figure(figures, opened[n], exact, 1)
            print(f"  {n:>7} images: {detail['per_figure_ms']:7.1f} ms per figure "
                  f"({'ANN' if detail['uses_ann'] else 'exact'}), ANN forced "
                  f"{detail['per_figure_ms_ann']:7.1f} ms, exact search "
                  f"{detail['per_figure_ms_exact']:7.1f} ms; {detail['disk']['total'] / 1e6:.1f} MB "
                  f"on disk (ANN {detail['disk']['ann'] / 1e6:.1f} MB, "
                  f"{detail['disk']['per_image']} B per image), written in {detail['write_s']:.0f} s")
            opened[n] = None  # drop exact search's float copies
        first, last = (result["sizes_detail"][str(n)] for n in (SIZES[0], SIZES[-1]))
        result["growth"] = round(last["per_figure_ms"] / first["per_figure_ms"], 2)
        result["growth_ann"] = round(last["per_figure_ms_ann"] / first["per_figure_ms_ann"], 2)
        result["growth_exact"] = round(last["per_figure_ms_exact"] / first["per_figure_ms_exact"], 2)
        print(f"  per figure, {SIZES[0]} → {SIZES[-1]} images: ×{result['growth']} "
              f"(ANN forced at every size: ×{result['growth_ann']}; exact search: "
              f"×{result['growth_exact']})")
        if os.environ.get("MEDZONE_BENCH_INDEX_CORPUS", "1") == "0":
            result["wall_s"] = round(time.perf_counter() - started, 1)
            return result
        # the corpus: exact search against the ANN forced on
        root = str(Path(__file__).resolve().parent.parent)
        if root not in sys.path:
            sys.path.insert(0, root)
        from tests.screen_corpus import build_cases
        from tests.screen_corpus_figures import build_figure_cases

        from .eval_screen import SIZES as FIGURE_SIZES
        from .eval_screen import _ingest, _other

        work = tmp / "corpus" / "home"
        work.mkdir(parents=True)
        cases = build_cases(home.dataset_dir("demo"), other, work)
        result["screen_corpus"] = _compare(cases, load_indexes(home, ["demo"]), work)
        indexed, other_seed = EVAL_PAIR
        dataset_root, indexes = _ingest(indexed, tmp / f"indexed-{indexed}")
        work = tmp / "figures" / "home"
        work.mkdir(parents=True)
        cases = build_figure_cases(dataset_root, _other(other_seed, tmp), work,
                                   seed=other_seed, **FIGURE_SIZES)
        result["figure_corpus"] = _compare(cases, indexes, work)
        result["figure_corpus"]["pair"] = EVAL_PAIR
        for name in ("screen_corpus", "figure_corpus"):
            r = result[name]
            print(f"  {name}: {r['cases']} cases; exact {r['exact']}; ANN {r['ann']}; "
                  f"differ: {len(r['differ'])}")
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                         "note": "shared machine; compare ratios from the same run"}
    return result


if __name__ == "__main__":
    import json

    out = Path(__file__).parent / "results" / "bench_index.json"
    out.parent.mkdir(exist_ok=True)
    print(json.dumps(run(), indent=2))
