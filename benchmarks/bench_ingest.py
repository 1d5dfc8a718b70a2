"""Ingest throughput on the demo cohort: files/s and MB/s, against a plain copy+sha256.

The baseline (copy every source file and hash it, the least any ingest must do) runs in the
same process on the same files, so the ratio says what validation, de-identification,
manifest and screening index cost on top of I/O.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from medzone_hub.config import MedZoneHome
from medzone_hub.db import connect
from medzone_hub.demodata import generate_cohort
from medzone_hub.ingest import ingest_dataset

PATIENTS = int(os.environ.get("MEDZONE_BENCH_PATIENTS", "20"))
REPEATS = int(os.environ.get("MEDZONE_BENCH_REPEATS", "2"))


def _copy_and_hash(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file():
            out = target / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
            hashlib.sha256(out.read_bytes()).hexdigest()


def _fingerprint_ms(slices: int = 150) -> float:
    """Screening-index fingerprints of 512x512 CT-like slices: milliseconds per slice (the
    index of 1,500 slices should take well under 15 s)."""
    import numpy as np

    from medzone_hub.screen.index import ScreeningIndexBuilder

    builder = ScreeningIndexBuilder(os.urandom(32))
    slice_ = np.random.default_rng(0).integers(0, 4095, (512, 512), dtype=np.int16)
    started = time.perf_counter()
    for i in range(slices):
        builder.add_image(slice_ + i, f"slice {i}")
    return round((time.perf_counter() - started) / slices * 1000, 2)


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="medzone-bench-") as tmp:
        tmp = Path(tmp)
        cohort = generate_cohort(tmp / "source", patients=PATIENTS, seed=1, progress=False)
        source_bytes = sum(p.stat().st_size for p in (tmp / "source").rglob("*") if p.is_file())
        key = os.urandom(32)
        copy_s, ingest_s = [], []
        for i in range(REPEATS):
            t0 = time.perf_counter()
            _copy_and_hash(tmp / "source", tmp / f"copy-{i}")
            copy_s.append(time.perf_counter() - t0)

            home = MedZoneHome(tmp / f"home-{i}").ensure()
            store = connect(home.db_url)
            t0 = time.perf_counter()
            report = ingest_dataset(home, store, "bench", tmp / "source", deidentify=True,
                                    pseudonym_key=key, actor="bench", progress=False)
            ingest_s.append(time.perf_counter() - t0)
            store.engine.dispose()
        best_copy, best_ingest = min(copy_s), min(ingest_s)
        files = report.files
        result = {
            "benchmark": "ingest --deidentify of the demo cohort",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "patients": cohort.patients,
            "files": files,
            "source_mb": round(source_bytes / 1e6, 2),
            "repeats": REPEATS,
            "ingest_s": round(best_ingest, 3),
            "ingest_files_per_s": round(files / best_ingest, 1),
            "ingest_mb_per_s": round(source_bytes / 1e6 / best_ingest, 2),
            "baseline_copy_sha256_s": round(best_copy, 3),
            "baseline_files_per_s": round(files / best_copy, 1),
            "baseline_mb_per_s": round(source_bytes / 1e6 / best_copy, 2),
            "ingest_over_baseline": round(best_ingest / best_copy, 1),
            "fingerprint_ms_per_512_slice": _fingerprint_ms(),
        }
    for k, v in result.items():
        print(f"{k:>26}: {v}")
    return result
