"""medzone_kernel's loaders against the ingested synthetic cohort: what the demo data
generator drew (geometry, HU, nodules, X-ray photometrics) must come back out, the volume
cache must serve warm loads without touching DICOM, and MONAI pipelines must run on it."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medzone_hub.demodata import CT_RESCALE_INTERCEPT, CtGrid
from medzone_kernel import (
    WINDOW_PRESETS,
    Dataset,
    DatasetError,
    ImagingError,
    VolumeCache,
    granted_datasets,
    load_ct_volume,
    load_mask,
    load_xray,
    open_dataset,
    window_hu,
)
from medzone_kernel.datasets import read_manifest

DATASET = "demo"
GRID = CtGrid()  # what generate_cohort draws


@pytest.fixture(scope="module")
def stored(cohort_dir, module_env, tmp_path_factory):
    """The cohort ingested de-identified; MEDZONE_DATA / MEDZONE_MANIFESTS laid out the way a
    sandbox sees them (``<data>/<id>`` and ``<manifests>/<id>.json``)."""
    from medzone_hub.ingest import ingest_dataset

    ingest_dataset(module_env.home, module_env.store, DATASET, cohort_dir, deidentify=True,
                   pseudonym_key=b"x" * 32, actor="t", progress=False)
    base = tmp_path_factory.mktemp("kernel-view")
    (base / "data").mkdir()
    (base / "manifests").mkdir()
    stored_dir = module_env.home.dataset_dir(DATASET)
    os.symlink(stored_dir / "data", base / "data" / DATASET)
    shutil.copyfile(stored_dir / "manifest.json", base / "manifests" / f"{DATASET}.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDZONE_DATA", str(base / "data"))
        mp.setenv("MEDZONE_MANIFESTS", str(base / "manifests"))
        mp.setenv("MEDZONE_CACHE", str(base / "cache"))
        yield base


@pytest.fixture(scope="module")
def ds(stored) -> Dataset:
    return open_dataset(DATASET)


@pytest.fixture(scope="module")
def nodules(ds):
    return ds.table("nodules")


@pytest.fixture(scope="module")
def ct_with_nodules(ds, nodules):
    """(SeriesRef, volume decoded without cache) of a patient with at least one nodule."""
    patient = nodules["patient_id"].value_counts().index[0]
    ref = ds.series("CT", patient=patient)[0]
    return ref, load_ct_volume(ref, cache=None)


# --- datasets ----------------------------------------------------------------------------

def test_granted_datasets_and_contents(ds):
    assert granted_datasets() == [DATASET]
    assert ds.manifest_sha256 == read_manifest(
        Path(os.environ["MEDZONE_MANIFESTS"]) / f"{DATASET}.json")[1]
    patients = ds.patients()
    assert len(patients) == 7 and all(p.startswith("MZP-") for p in patients)
    assert len(ds.series("CT")) == 7 and len(ds.xrays()) == 7
    assert {s.modality for s in ds.xrays()} <= {"CR", "DX"}
    assert ds.tables() == ["clinical", "nodules"]
    clinical = ds.table("clinical")
    assert sorted(clinical["patient_id"]) == patients
    ref = ds.series("CT", patient=patients[0])[0]
    assert ref.folder == ds.root / patients[0] / "CT" and ref.images == GRID.slices
    assert ref.pixel_spacing_mm == (GRID.pixel_mm, GRID.pixel_mm)
    assert ref.slice_spacing_mm == GRID.slice_mm
    assert ds.mask_path(patients[0]) == ds.root / patients[0] / "ct_nodule_mask.nii.gz"
    assert ds.mask_path(patients[0], "no_such_mask") is None
    with pytest.raises(DatasetError, match="no table 'labs'.*clinical, nodules"):
        ds.table("labs")


def test_an_ungranted_dataset_is_a_clear_error_naming_the_granted_ones(stored):
    with pytest.raises(DatasetError, match=r"'other' is not granted.*granted: demo"):
        open_dataset("other")


# --- CT volumes --------------------------------------------------------------------------

def _source_hu(folder: Path, lps: np.ndarray) -> float:
    """HU at an LPS point, read independently from the DICOM file of that slice."""
    for path in sorted(folder.iterdir()):
        f = pydicom.dcmread(path)
        x0, y0, z0 = (float(v) for v in f.ImagePositionPatient)
        if abs(z0 - lps[2]) < 1e-3:
            row_mm, col_mm = (float(v) for v in f.PixelSpacing)
            col, row = round((lps[0] - x0) / col_mm), round((lps[1] - y0) / row_mm)
            return float(f.pixel_array[row, col]) * float(f.RescaleSlope) + float(f.RescaleIntercept)
    raise AssertionError(f"no slice at z={lps[2]}")


def test_geometry_and_hu_match_the_source_dicom(ct_with_nodules):
    ref, vol = ct_with_nodules
    assert vol.hu.dtype == np.float32
    assert vol.hu.shape == (GRID.cols, GRID.rows, GRID.slices)
    assert vol.spacing_mm == (GRID.pixel_mm, GRID.pixel_mm, GRID.slice_mm)
    # RAS: a positive diagonal (i → Right, j → Anterior, k → Superior).
    assert np.allclose(np.diag(vol.affine_ras)[:3], vol.spacing_mm)
    assert np.allclose(vol.affine_ras[:3, :3], np.diag(vol.spacing_mm))
    assert vol.series_uid == ref.series_uid and vol.patient == ref.patient
    first = pydicom.dcmread(ref.folder / "0001.dcm")
    x0, y0, z0 = (float(v) for v in first.ImagePositionPatient)
    # Voxel (0, 0, 0) is the patient's rightmost, most anterior, lowest corner: in LPS the
    # last column, last row of the first slice.
    corner_lps = (x0 + (GRID.cols - 1) * GRID.pixel_mm, y0 + (GRID.rows - 1) * GRID.pixel_mm, z0)
    assert np.allclose(vol.affine_ras[:3, 3], (-corner_lps[0], -corner_lps[1], corner_lps[2]))
    rng = np.random.default_rng(0)
    for i, j, k in zip(rng.integers(0, GRID.cols, 12), rng.integers(0, GRID.rows, 12),
                       rng.integers(0, GRID.slices, 12)):
        ras = vol.affine_ras @ np.array([i, j, k, 1.0])
        lps = np.array([-ras[0], -ras[1], ras[2]])
        assert vol.hu[i, j, k] == _source_hu(ref.folder, lps), (i, j, k)
    assert first.RescaleIntercept == CT_RESCALE_INTERCEPT


def test_hu_of_air_lung_and_nodules(ct_with_nodules, ds, nodules):
    ref, vol = ct_with_nodules
    hu = np.asarray(vol.hu)
    corner = hu[:6, :6, :]  # outside the body, in front of it
    assert abs(float(corner.mean()) + 1000) < 15
    # Lung parenchyma (~ -860 HU) is the peak of the histogram between fat and air.
    counts, edges = np.histogram(hu, bins=np.arange(-950, -690, 10))
    peak = edges[np.argmax(counts)] + 5
    assert abs(peak + 860) <= 30, peak
    assert counts.sum() > 0.05 * hu.size
    mask = load_mask(ds.mask_path(ref.patient), like=vol)
    assert mask.shape == vol.hu.shape and mask.dtype == np.uint8
    rows = nodules[nodules["patient_id"] == ref.patient]
    assert len(rows) >= 1 and set(rows["series_uid"]) == {ref.series_uid}
    for _, n in rows.iterrows():
        ijk = vol.voxel_of_lps((n.center_x_mm, n.center_y_mm, n.center_z_mm))
        # The table's voxel indices are DICOM (col, row, slice): x and y flip in RAS.
        assert ijk == (GRID.cols - 1 - n.center_col, GRID.rows - 1 - n.center_row,
                       n.center_slice)
        assert mask[ijk] == 1
        assert -110 <= hu[ijk] <= 120, hu[ijk]  # solid nodule, not lung
    # Every mask voxel is nodule-dense, and the mask's volume is the table's.
    assert np.median(hu[mask == 1]) > -150
    assert mask.sum() * np.prod(vol.spacing_mm) == pytest.approx(rows["volume_mm3"].sum(), rel=1e-3)


def test_mask_on_another_grid_is_refused(ct_with_nodules, ds, tmp_path):
    import nibabel as nib

    ref, vol = ct_with_nodules
    img = nib.load(ds.mask_path(ref.patient))
    shifted = img.affine.copy()
    shifted[2, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), tmp_path / "m.nii.gz")
    with pytest.raises(ImagingError, match="affine"):
        load_mask(tmp_path / "m.nii.gz", like=vol)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), tmp_path / "s.nii.gz")
    with pytest.raises(ImagingError, match="shape"):
        load_mask(tmp_path / "s.nii.gz", like=vol)


def test_slices_are_ordered_by_position_not_name_or_instance_number(ct_with_nodules, tmp_path):
    ref, vol = ct_with_nodules
    files = sorted(ref.folder.iterdir())
    order = np.random.default_rng(1).permutation(len(files))
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for new_index, src in zip(order, files):
        f = pydicom.dcmread(src)
        f.InstanceNumber = int(len(files) - new_index)  # misleading on purpose
        f.save_as(shuffled / f"img{new_index:03d}_{src.stem[::-1]}.dcm", enforce_file_format=True)
    again = load_ct_volume(shuffled, cache=None)
    assert np.array_equal(np.asarray(again.hu), np.asarray(vol.hu))
    assert np.allclose(again.affine_ras, vol.affine_ras)


def test_a_folder_with_two_series_is_refused(ds, tmp_path):
    a, b = ds.series("CT")[:2]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for prefix, ref in (("a", a), ("b", b)):
        for path in list(sorted(ref.folder.iterdir()))[:3]:
            shutil.copyfile(path, mixed / f"{prefix}{path.name}")
    with pytest.raises(ImagingError, match=r"holds 2 series .*one series per folder"):
        load_ct_volume(mixed, cache=None)


def test_window_presets():
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0])
    level, width = WINDOW_PRESETS["lung"]
    assert np.allclose(window_hu(hu, level, width), [0, 0, 0.5, 1, 1])
    assert window_hu(hu, *WINDOW_PRESETS["bone"]).dtype == np.float32


# --- X-rays ------------------------------------------------------------------------------

def test_xrays_have_bones_bright_whatever_the_photometric(ds):
    seen = set()
    for ref in ds.xrays():
        xr = load_xray(ref)
        raw = pydicom.dcmread(next(ref.folder.iterdir())).pixel_array.astype(float)
        assert xr.pixels.dtype == np.float32 and xr.pixels.shape == (256, 256)
        assert 0.0 <= xr.pixels.min() and xr.pixels.max() <= 1.0
        assert xr.pixel_spacing_mm == pytest.approx((1.4, 1.4))
        assert xr.patient == ref.patient
        spine = np.s_[60:120, 124:132]  # mediastinum and spine, upper chest
        lungs = np.s_[60:120, 70:78], np.s_[60:120, 178:186]
        lung = np.mean([xr.pixels[s].mean() for s in lungs])
        assert xr.pixels[spine].mean() > lung + 0.15, (xr.photometric, ref.patient)
        raw_lung = np.mean([raw[s].mean() for s in lungs])
        # The stored values are the other way round in MONOCHROME1: the inversion mattered.
        assert (raw[spine].mean() > raw_lung) == (xr.photometric == "MONOCHROME2")
        seen.add(xr.photometric)
    assert seen == {"MONOCHROME1", "MONOCHROME2"}


# --- the volume cache --------------------------------------------------------------------

def _private_copy(ds: Dataset, ref, tmp_path: Path, manifest_sha256: str | None = None) -> Dataset:
    """The same dataset (same manifest) whose files for *ref*'s patient we may delete."""
    root = tmp_path / "copy"
    if not root.exists():
        shutil.copytree(ref.folder, root / ref.patient / "CT")
    return Dataset(ds.id, root, ds.manifest, manifest_sha256 or ds.manifest_sha256)


def test_cache_serves_warm_loads_without_touching_dicom(ds, ct_with_nodules, tmp_path):
    ref, decoded = ct_with_nodules
    cache = VolumeCache(tmp_path / "cache")
    copy = _private_copy(ds, ref, tmp_path)
    cref = copy.series("CT", patient=ref.patient)[0]
    assert cache.get(cref) is None
    cold = load_ct_volume(cref, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1)
    assert np.array_equal(np.asarray(cold.hu), np.asarray(decoded.hu))
    assert len(list(cache.root.rglob("*.npy"))) == 1 and len(list(cache.root.rglob("*.json"))) == 1

    # Remove a slice: the manifest hash is unchanged, so the cache still answers (mapped).
    os.chmod(cref.folder, 0o755)
    (cref.folder / f"{GRID.slices:04d}.dcm").unlink()
    warm = load_ct_volume(cref, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    assert isinstance(warm.hu, np.memmap) and not warm.hu.flags.writeable
    assert np.array_equal(np.asarray(warm.hu), np.asarray(decoded.hu))
    assert np.array_equal(warm.affine_ras, decoded.affine_ras)
    assert (warm.spacing_mm, warm.series_uid, warm.patient) == (
        decoded.spacing_mm, decoded.series_uid, decoded.patient)

    # A new manifest (re-ingest): stale, decoded again — now from the files that are left.
    newer = _private_copy(ds, ref, tmp_path, manifest_sha256="f" * 64)
    nref = newer.series("CT", patient=ref.patient)[0]
    assert cache.get(nref) is None
    rebuilt = load_ct_volume(nref, cache=cache)
    assert cache.misses == 2 and rebuilt.hu.shape == (GRID.cols, GRID.rows, GRID.slices - 1)
    assert cache.get(nref).hu.shape[2] == GRID.slices - 1
    assert len(list(cache.root.rglob("*.npy"))) == 1  # the stale array was removed


def test_cache_of_a_bare_folder_notices_changed_files(ct_with_nodules, tmp_path):
    ref, _ = ct_with_nodules
    folder = tmp_path / "series"
    shutil.copytree(ref.folder, folder)
    cache = VolumeCache(tmp_path / "cache")
    load_ct_volume(folder, cache=cache)
    load_ct_volume(folder, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    (folder / "0001.dcm").unlink()
    assert load_ct_volume(folder, cache=cache).hu.shape[2] == GRID.slices - 1
    assert cache.misses == 2


def test_concurrent_writers_leave_a_complete_entry(ct_with_nodules, tmp_path):
    ref, vol = ct_with_nodules
    cache = VolumeCache(tmp_path / "cache")
    errors = []

    def write():
        try:
            for _ in range(3):
                cache.put(ref, vol)
                got = cache.get(ref)  # a miss is allowed mid-race, a wrong array is not
                assert got is None or np.array_equal(np.asarray(got.hu), np.asarray(vol.hu))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert np.array_equal(np.asarray(cache.get(ref).hu), np.asarray(vol.hu))
    assert not list(cache.root.rglob("*.tmp"))
    # Arrays of writers that lost a race are swept once they are old.
    for path in cache.root.rglob("*.npy"):
        os.utime(path, (1, 1))
    cache.put(ref, vol)
    assert len(list(cache.root.rglob("*.npy"))) == 1


# --- MONAI -------------------------------------------------------------------------------

def test_monai_pipeline_on_cached_volumes(ds, tmp_path):
    from monai.data import DataLoader, Dataset as MonaiDataset
    from monai.transforms import Compose, RandSpatialCropd, ScaleIntensityRanged

    from medzone_kernel import LoadCTVolumed, ct_items

    items = ct_items(ds)
    assert len(items) == 7 and ct_items(DATASET) == items
    assert set(items[0]) == {"image", "label", "patient", "series_uid", "labels"}
    assert items[0]["image"] == {"dataset": DATASET, "series_uid": items[0]["series_uid"]}
    assert "cxr_label" in items[0]["labels"]
    cache = VolumeCache(tmp_path / "cache")
    pipeline = Compose([
        LoadCTVolumed(keys="image", mask_keys="label", cache=cache),
        ScaleIntensityRanged("image", a_min=-1000, a_max=400, b_min=0.0, b_max=1.0, clip=True),
        RandSpatialCropd(["image", "label"], roi_size=(64, 64, 32), random_size=False),
    ])
    data = MonaiDataset(items[:4], transform=pipeline)
    first = data[0]
    assert first["image_meta"]["spacing_mm"] == (2.5, 2.5, 2.5)
    assert np.allclose(first["image"].affine[:3, :3].numpy(), np.diag([2.5, 2.5, 2.5]))
    batch = next(iter(DataLoader(data, batch_size=2, num_workers=0)))
    assert tuple(batch["image"].shape) == (2, 1, 64, 64, 32)
    assert tuple(batch["label"].shape) == (2, 1, 64, 64, 32)
    assert batch["image"].dtype.is_floating_point
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert (cache.misses, cache.hits) == (2, 1)  # data[0], then items 0 (warm) and 1
    for _ in DataLoader(data, batch_size=2):
        pass
    assert (cache.misses, cache.hits) == (4, 3)
    for _ in DataLoader(data, batch_size=2):  # a second epoch decodes nothing
        pass
    assert (cache.misses, cache.hits) == (4, 7)


def test_monai_xray_items(ds):
    from monai.data import Dataset as MonaiDataset
    from monai.transforms import Compose, Resized

    from medzone_kernel import LoadXRayd
    from medzone_kernel.transforms import xray_items

    items = xray_items(ds)
    assert len(items) == 7 and {i["label"] for i in items} <= {
        "normal", "nodule", "cardiomegaly", "effusion"}
    data = MonaiDataset(items, Compose([LoadXRayd("image"), Resized("image", (128, 128))]))
    assert tuple(data[0]["image"].shape) == (1, 128, 128)
    assert data[0]["image_meta"]["photometric"] in ("MONOCHROME1", "MONOCHROME2")
