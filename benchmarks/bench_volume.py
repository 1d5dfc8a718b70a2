"""CT volume loading of one series: ``medzone_kernel`` cold and cached vs MONAI's
``LoadImage(reader="PydicomReader")``, and cached read MB/s vs a plain memory copy.

One synthetic chest CT series (the demo generator's phantom on a larger grid, default
512×512×100) is loaded in the same process by each method; each figure is the median of
``MEDZONE_BENCH_REPEATS`` runs. The DICOM files were just written, so every method reads
them from the page cache: the comparison is decode cost, not disk speed.

* ``decode``: :func:`medzone_kernel.load_ct_volume` with ``cache=None`` (pydicom, HU, RAS).
* ``cold``: the same into an empty :class:`~medzone_kernel.VolumeCache` (decode + write
  the ``.npy``).
* ``cached``: a warm cache load *and* a read of every voxel into memory (``np.array`` of the
  memmap) — what a training step pays; ``cached_open`` is the map alone.
* ``monai``: ``LoadImage(reader="PydicomReader", image_only=True)`` on the folder, the
  array materialised.
* ``memcpy``: ``np.copyto`` of the same float32 array in memory (the ceiling for any read).
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from medzone_hub.demodata import CtGrid, _generate

SHAPE = os.environ.get("MEDZONE_BENCH_CT", "512x512x100")  # cols x rows x slices
REPEATS = int(os.environ.get("MEDZONE_BENCH_REPEATS", "3"))


def _median_time(fn, repeats: int = REPEATS, setup=None) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        if setup:
            setup()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run() -> dict:
    from monai.transforms import LoadImage

    from medzone_kernel import SeriesRef, VolumeCache, load_ct_volume

    cols, rows, slices = (int(v) for v in SHAPE.lower().split("x"))
    pixel_mm = round(320.0 / max(cols, rows), 4)
    grid = CtGrid(cols=cols, rows=rows, slices=slices, pixel_mm=pixel_mm, slice_mm=2.0)
    with tempfile.TemporaryDirectory(prefix="medzone-bench-volume-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        _generate(tmp / "source", patients=1, seed=1, progress=False, ct_grid=grid)
        generate_s = time.perf_counter() - t0
        folder = next((tmp / "source").glob("*/CT"))
        files = sorted(folder.glob("*.dcm"))
        dicom_bytes = sum(p.stat().st_size for p in files)
        # A reference as a granted dataset hands it out (keyed by its manifest's sha256).
        import pydicom

        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        ref = SeriesRef(dataset="bench", series_uid=uid, patient="", modality="CT",
                        folder=folder, images=len(files),
                        manifest_sha256=hashlib.sha256(b"bench").hexdigest())

        for path in files:  # the same page-cache state for every method
            path.read_bytes()

        decode_s, vol = _median_time(lambda: load_ct_volume(ref, cache=None))
        nbytes = vol.hu.nbytes

        caches = iter(range(REPEATS + 1))

        def fresh_cache():
            fresh_cache.cache = VolumeCache(tmp / f"cache-{next(caches)}")

        cold_s, _ = _median_time(lambda: fresh_cache.cache.load(ref), setup=fresh_cache)
        cache = fresh_cache.cache
        cached_open_s, warm = _median_time(lambda: cache.load(ref))
        assert isinstance(warm.hu, np.memmap)
        cached_s, cached_hu = _median_time(lambda: np.array(cache.load(ref).hu))
        assert np.array_equal(cached_hu, np.asarray(vol.hu))

        loader = LoadImage(reader="PydicomReader", image_only=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monai_s, monai_img = _median_time(lambda: np.asarray(loader(str(folder))))
        same_voxels = bool(monai_img.size == vol.hu.size and np.isclose(
            float(monai_img.astype(np.float64).sum()), float(np.asarray(vol.hu, np.float64).sum()),
            rtol=1e-6))

        src = np.asarray(vol.hu)
        dst = np.empty_like(src)
        memcpy_s, _ = _median_time(lambda: np.copyto(dst, src), repeats=max(REPEATS, 5))

    mb = nbytes / 1e6
    result = {
        "benchmark": "CT volume loading of one series: medzone_kernel vs MONAI LoadImage",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "series": f"{cols}x{rows}x{slices} ({len(files)} files, {dicom_bytes / 1e6:.1f} MB DICOM,"
                  f" {mb:.1f} MB float32)",
        "repeats": REPEATS,
        "generate_s": round(generate_s, 2),
        "decode_s": round(decode_s, 4),
        "cold_s": round(cold_s, 4),
        "cached_s": round(cached_s, 4),
        "cached_open_s": round(cached_open_s, 5),
        "monai_loadimage_s": round(monai_s, 4),
        "memcpy_s": round(memcpy_s, 4),
        "decode_slices_per_s": round(slices / decode_s, 1),
        "monai_slices_per_s": round(slices / monai_s, 1),
        "speedup_decode_vs_monai": round(monai_s / decode_s, 2),
        "speedup_cold_vs_monai": round(monai_s / cold_s, 2),
        "speedup_cached_vs_monai": round(monai_s / cached_s, 1),
        "cached_read_mb_per_s": round(mb / cached_s, 1),
        "memcpy_mb_per_s": round(mb / memcpy_s, 1),
        "cached_over_memcpy": round(cached_s / memcpy_s, 2),
        "monai_same_voxel_sum": same_voxels,
        "goal_cached_5x_monai": monai_s / cached_s >= 5,
    }
    for k, v in result.items():
        print(f"{k:>26}: {v}")
    return result


if __name__ == "__main__":
    run()
