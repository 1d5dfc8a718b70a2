"""Ingest throughput, against a plain copy+sha256 of the same files in the same run.

Two sources:

* **realistic**: CT series of 512×512 16-bit slices, hundreds of slices per series, several
  series (one patient each), with the demo cohort's fake identities spread through the
  headers the way hospital systems spread them (names, MRN, RRN, phone, institution,
  physicians, a private block); ~0.5 MB per file. Size it with
  ``MEDZONE_BENCH_CT_SERIES`` (default 3) and ``MEDZONE_BENCH_CT_SLICES`` (default 200 per
  series: ~315 MB in all);
* **demo**: the 20-patient demo cohort (small files: 128² CT slices, X-rays, CSV tables,
  NIfTI masks), as ``make demo`` ingests it (``MEDZONE_BENCH_PATIENTS``).

The baseline (copy every source file and hash it, the least any ingest must do) runs in the
same process on the same files, so the ratio says what validation, de-identification,
manifest, screening index and checks cost on top of I/O. ``MEDZONE_BENCH_WORKERS`` sets the
ingest's worker processes (default: one per core).
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
CT_SERIES = int(os.environ.get("MEDZONE_BENCH_CT_SERIES", "3"))
CT_SLICES = int(os.environ.get("MEDZONE_BENCH_CT_SLICES", "200"))
WORKERS = int(os.environ["MEDZONE_BENCH_WORKERS"]) if os.environ.get("MEDZONE_BENCH_WORKERS") else None


def make_realistic_source(out: Path, *, series: int = CT_SERIES, slices: int = CT_SLICES,
                          seed: int = 7) -> int:
    """Write ``series`` CT series of ``slices`` 512×512 slices (16-bit, 12 bits stored) into
    ``out/<MRN>/CT/NNNN.dcm``, one fake patient each; the bytes written."""
    import numpy as np
    import pydicom
    from pydicom.uid import CTImageStorage

    from medzone_hub import demodata as dd

    rng = np.random.default_rng(seed)
    identities = dd.make_identities(rng, series)
    y, x = np.mgrid[-256:256, -256:256].astype(np.float32)
    total = 0
    for index, ident in enumerate(identities):
        facts = dd.make_clinical_facts(rng, ident, "normal")
        uids = dd._StudyUids(seed, index)
        ds = dd._base_dataset(rng, ident, facts, sop_class=CTImageStorage, modality="CT",
                              study_uid=uids.ct_study, series_uid=uids.ct_series,
                              accession=ident.accession_ct, study_time="101500",
                              study_description="CT CHEST", series_description="AXIAL 1mm",
                              station=f"{ident.institution_code}-CT01")
        ds.FrameOfReferenceUID = uids.ct_frame
        ds.PatientPosition = "HFS"
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
        ds.SliceThickness = ds.SpacingBetweenSlices = "1"
        ds.PixelSpacing = ["0.7", "0.7"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = str(dd.CT_RESCALE_INTERCEPT), "1"
        folder = out / ident.patient_id / "CT"
        folder.mkdir(parents=True, exist_ok=True)
        body = (x / 230) ** 2 + (y / 170) ** 2 <= 1
        spine = (x / 22) ** 2 + ((y - 110) / 22) ** 2 <= 1
        for k in range(slices):
            phase = k / max(slices - 1, 1)
            lung_r = 1 + 0.25 * np.sin(np.pi * phase)
            lungs = ((((x - 95) / (70 * lung_r)) ** 2 + (y / (110 * lung_r)) ** 2 <= 1)
                     | (((x + 95) / (70 * lung_r)) ** 2 + (y / (110 * lung_r)) ** 2 <= 1))
            hu = np.full(x.shape, -1000, dtype=np.float32)
            hu[body] = 40
            hu[body & lungs] = -850
            hu[spine] = 700
            hu += rng.normal(0, 25, x.shape).astype(np.float32)
            stored = np.clip(np.rint(hu) - dd.CT_RESCALE_INTERCEPT, 0, 4095).astype(np.uint16)
            dd._with_file_meta(ds, uids.ct_instance(k + 1))
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = ["-179.2", "-179.2", f"{-k:.1f}"]
            ds.SliceLocation = f"{-k:.1f}"
            ds.PixelData = stored.tobytes()
            path = folder / f"{k + 1:04d}.dcm"
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            total += path.stat().st_size
    return total


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


def _measure(tmp: Path, name: str, source: Path) -> dict:
    """Best of REPEATS for the copy+sha256 baseline and the de-identifying ingest, run
    alternately so that both see the same machine load."""
    files = [p for p in source.rglob("*") if p.is_file()]
    source_bytes = sum(p.stat().st_size for p in files)
    key = os.urandom(32)
    copy_s, ingest_s = [], []
    for i in range(REPEATS):
        t0 = time.perf_counter()
        _copy_and_hash(source, tmp / f"{name}-copy-{i}")
        copy_s.append(time.perf_counter() - t0)
        shutil.rmtree(tmp / f"{name}-copy-{i}")

        home = MedZoneHome(tmp / f"{name}-home-{i}").ensure()
        store = connect(home.db_url)
        t0 = time.perf_counter()
        ingest_dataset(home, store, "bench", source, deidentify=True, pseudonym_key=key,
                       actor="bench", progress=False, workers=WORKERS)
        ingest_s.append(time.perf_counter() - t0)
        store.engine.dispose()
        from medzone_hub.staging import remove_tree
        remove_tree(home.root)
    best_copy, best_ingest = min(copy_s), min(ingest_s)
    return {
        "files": len(files),
        "source_mb": round(source_bytes / 1e6, 1),
        "mb_per_file": round(source_bytes / 1e6 / len(files), 3),
        "ingest_s": round(best_ingest, 2),
        "ingest_files_per_s": round(len(files) / best_ingest, 1),
        "ingest_mb_per_s": round(source_bytes / 1e6 / best_ingest, 1),
        "baseline_copy_sha256_s": round(best_copy, 2),
        "baseline_mb_per_s": round(source_bytes / 1e6 / best_copy, 1),
        # The goal: the de-identifying ingest at >= 25 % of the baseline's MB/s.
        "ingest_share_of_baseline": round(best_copy / best_ingest, 3),
    }


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="medzone-bench-") as tmp:
        tmp = Path(tmp)
        make_realistic_source(tmp / "realistic")
        realistic = _measure(tmp, "realistic", tmp / "realistic")
        shutil.rmtree(tmp / "realistic")
        cohort = generate_cohort(tmp / "demo", patients=PATIENTS, seed=1, progress=False)
        demo = _measure(tmp, "demo", tmp / "demo")
    result = {
        "benchmark": "ingest --deidentify against copy+sha256 of the same files, same run",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "workers": WORKERS or os.cpu_count(),
        "repeats": REPEATS,
        "realistic": {"series": CT_SERIES, "slices_per_series": CT_SLICES,
                      "slice": "512x512 16-bit", **realistic},
        "demo": {"patients": cohort.patients, **demo},
        "fingerprint_ms_per_512_slice": _fingerprint_ms(),
    }
    for k, v in result.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"{kk:>28}: {vv}")
        else:
            print(f"{k:>30}: {v}")
    return result
