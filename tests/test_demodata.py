"""The synthetic demo cohort: its layout is a contract that ingest and the other tests rely on."""

from __future__ import annotations

import csv
import hashlib
import math
import re
from datetime import date
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)
from scipy import ndimage

from medzone_hub import demodata
from medzone_hub.demodata import CtGrid, generate_cohort
from medzone_hub.errors import InvalidInput

CLINICAL_COLUMNS = ["patient_id", "name", "name_en", "rrn", "birth_date", "phone", "address",
                    "institution", "accession_ct", "accession_cxr", "age", "sex", "height_cm",
                    "weight_kg", "smoking", "pack_years", "cxr_label", "ct_nodule_count",
                    "visit_date", "notes"]
NODULE_COLUMNS = ["patient_id", "series_uid", "nodule_id", "center_x_mm", "center_y_mm",
                  "center_z_mm", "center_col", "center_row", "center_slice", "diameter_mm",
                  "volume_mm3"]
HANGUL_NAME = re.compile(r"^[가-힣]{2,4}$")
RRN = re.compile(r"^(\d{6})-(\d)(\d{6})$")
# An anisotropic, non-square grid: any swap of rows/columns or x/z shows up.
SMALL_GRID = CtGrid(cols=64, rows=56, slices=24, pixel_mm=4.0, slice_mm=3.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four patients on the default grid (one of each CXR class)."""
    out = tmp_path_factory.mktemp("demo") / "cohort"
    summary = generate_cohort(out, patients=4, seed=7, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def tables(cohort):
    out, _ = cohort
    clinical = pd.read_csv(out / "clinical.csv", dtype=str, keep_default_na=False)
    nodules = pd.read_csv(out / "nodules.csv", dtype=str, keep_default_na=False)
    return clinical, nodules


def _small(out: Path, patients=2, seed=3, progress=False):
    return demodata._generate(out, patients=patients, seed=seed, progress=progress,
                              ct_grid=SMALL_GRID, cxr_size=96)


def _ct_series(patient_dir: Path):
    return [pydicom.dcmread(p) for p in sorted((patient_dir / "CT").glob("*.dcm"))]


def _hu_volume(series) -> np.ndarray:
    """(slice, row, col) in HU."""
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                     for ds in series])


def _mask(patient_dir: Path) -> nib.Nifti1Image:
    return nib.load(patient_dir / "ct_nodule_mask.nii.gz")


def _rrn_check_digit(first12: str) -> int:
    # Written out independently of the module: weights 2..9,2..5, check = (11 - sum mod 11) mod 10.
    total = sum(int(d) * w for d, w in zip(first12, [2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5]))
    return (11 - total % 11) % 10


# --- layout and tables ------------------------------------------------------------------

def test_layout_is_exactly_the_contract(cohort, tables):
    out, summary = cohort
    clinical, nodules = tables
    ids = list(clinical["patient_id"])
    assert sorted(p.name for p in out.iterdir()) == sorted(["clinical.csv", "nodules.csv", *ids])
    for pid in ids:
        patient = out / pid
        assert sorted(p.name for p in patient.iterdir()) == ["CT", "CXR", "ct_nodule_mask.nii.gz"]
        ct_files = sorted(p.name for p in (patient / "CT").iterdir())
        assert ct_files == [f"{i:04d}.dcm" for i in range(1, 65)]
        assert [p.name for p in (patient / "CXR").iterdir()] == ["0001.dcm"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert summary.patients == 4 and summary.files == len(files) == 2 + 4 * 66
    assert summary.bytes == sum(p.stat().st_size for p in files)
    assert summary.seconds > 0 and summary.out_dir == out
    assert summary.nodules == len(nodules)
    assert str(summary.patients) in summary.summary_line()


def test_tables_have_exactly_the_contract_columns(cohort):
    out, _ = cohort
    for name, columns in (("clinical.csv", CLINICAL_COLUMNS), ("nodules.csv", NODULE_COLUMNS)):
        raw = (out / name).read_bytes()
        assert not raw.startswith(b"\xef\xbb\xbf")  # UTF-8 without a byte-order mark
        with open(out / name, encoding="utf-8", newline="") as fh:
            assert next(csv.reader(fh)) == columns


def test_nodules_csv_has_its_header_even_when_empty(tmp_path, monkeypatch):
    monkeypatch.setattr(demodata, "_nodule_diameters", lambda rng, label: [])
    out = tmp_path / "c"
    _small(out, patients=1)
    assert (out / "nodules.csv").read_text(encoding="utf-8") == ",".join(NODULE_COLUMNS) + "\n"
    assert pd.read_csv(out / "clinical.csv", dtype=str)["ct_nodule_count"].tolist() == ["0"]


def test_clinical_values_are_consistent(tables):
    clinical, nodules = tables
    assert sorted(clinical["cxr_label"]) == ["cardiomegaly", "effusion", "nodule", "normal"]
    for _, row in clinical.iterrows():
        assert re.fullmatch(r"\d{8}", row["patient_id"])
        birth, visit = date.fromisoformat(row["birth_date"]), date.fromisoformat(row["visit_date"])
        age = visit.year - birth.year - ((visit.month, visit.day) < (birth.month, birth.day))
        assert int(row["age"]) == age and 30 <= age <= 85
        assert row["sex"] in ("M", "F")
        assert row["smoking"] in ("never", "former", "current")
        assert (int(row["pack_years"]) == 0) == (row["smoking"] == "never")
        assert 130 < float(row["height_cm"]) < 210 and 35 < float(row["weight_kg"]) < 150
        count = int(row["ct_nodule_count"])
        assert 0 <= count <= 3
        assert count == (nodules["patient_id"] == row["patient_id"]).sum()
        if row["cxr_label"] == "nodule":
            assert count >= 1
        assert re.fullmatch(r"010-\d{4}-\d{4}", row["phone"])
        assert re.fullmatch(r"CT\d{10}", row["accession_ct"])
        assert re.fullmatch(r"XR\d{10}", row["accession_cxr"])
        assert row["institution"] in {i[0] for i in demodata._INSTITUTIONS}
        assert re.search(r"[가-힣]", row["address"]) and re.search(r"\d+동 \d+호", row["address"])
        assert row["notes"].strip()
    assert set(nodules["patient_id"]) <= set(clinical["patient_id"])


def test_rrn_matches_birth_date_sex_and_nationality(tables):
    clinical, _ = tables
    for _, row in clinical.iterrows():
        m = RRN.fullmatch(row["rrn"])
        assert m, row["rrn"]
        birth = date.fromisoformat(row["birth_date"])
        assert m.group(1) == birth.strftime("%y%m%d")
        digits = m.group(1) + m.group(2) + m.group(3)
        assert int(digits[12]) == _rrn_check_digit(digits[:12])
        gender = int(m.group(2))
        foreign = not HANGUL_NAME.fullmatch(row["name"])
        century = 0 if birth.year < 2000 else 2
        assert gender == 1 + century + 4 * foreign + (row["sex"] == "F")


def test_rrn_check_digit_rule():
    # 12 digits whose weighted sum is 0 mod 11 get check digit 1 (11 - 0 = 11 → 1).
    assert demodata.rrn_check_digit("000000000000") == 1
    assert demodata.rrn_check_digit("900101100000") == _rrn_check_digit("900101100000")
    rng = np.random.default_rng(5)
    for _ in range(200):
        first12 = "".join(str(d) for d in rng.integers(0, 10, 12))
        assert demodata.rrn_check_digit(first12) == _rrn_check_digit(first12)


def test_identities_are_unique_and_shaped_like_real_ones():
    people = demodata.make_identities(np.random.default_rng(0), 1000)
    for attr in ("patient_id", "rrn", "phone", "accession_ct", "accession_cxr"):
        values = [getattr(p, attr) for p in people]
        assert len(set(values)) == len(values), attr
    assert len({p.accession_ct for p in people} | {p.accession_cxr for p in people}) == 2000
    foreign = [p for p in people if p.foreign]
    assert len(foreign) == 150  # an exact 15 % quota
    for p in foreign:
        assert p.name == p.name_en and re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", p.name)
        assert p.rrn[7] in "5678"
        assert p.dicom_name == f"{p.family_en}^{p.given_en}"
    korean = [p for p in people if not p.foreign]
    for p in korean:
        assert HANGUL_NAME.fullmatch(p.name) and p.rrn[7] in "1234"
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", p.name_en)
        assert p.dicom_name == f"{p.family_en}^{p.given_en}={p.family_ko}^{p.given_ko}"
    assert all(30 <= p.age <= 85 for p in people)
    assert {p.sex for p in people} == {"M", "F"}
    assert len({p.name for p in korean}) > 100  # varied, not a handful of names


def test_notes_often_carry_the_patients_name_or_phone():
    rng = np.random.default_rng(1)
    people = demodata.make_identities(rng, 200)
    notes = [demodata.make_clinical_facts(rng, p, "normal").notes for p in people]
    identifying = [n for n, p in zip(notes, people)
                   if p.name in n or p.name_en in n or p.phone in n]
    assert 0.35 < len(identifying) / len(notes) < 0.8
    assert any(re.search(r"[가-힣]", n) for n in notes) and any(n.isascii() for n in notes)


# --- DICOM headers ----------------------------------------------------------------------

def test_dicom_headers_carry_the_fake_identity(cohort, tables):
    out, _ = cohort
    clinical, _ = tables
    comments = []
    for _, row in clinical.iterrows():
        ct = pydicom.dcmread(out / row["patient_id"] / "CT" / "0001.dcm")
        cxr = pydicom.dcmread(out / row["patient_id"] / "CXR" / "0001.dcm")
        for ds, accession in ((ct, row["accession_ct"]), (cxr, row["accession_cxr"])):
            assert ds.SpecificCharacterSet == "ISO_IR 192"
            assert ds.PatientID == row["patient_id"]
            assert ds.OtherPatientIDs == row["rrn"]
            assert ds.AccessionNumber == accession
            assert ds.PatientBirthDate == row["birth_date"].replace("-", "")
            assert ds.PatientSex == row["sex"]
            assert ds.PatientAge == f"{int(row['age']):03d}Y"
            assert ds.StudyDate == ds.SeriesDate == ds.AcquisitionDate == ds.ContentDate \
                == row["visit_date"].replace("-", "")
            assert ds.PatientTelephoneNumbers == row["phone"]
            assert ds.PatientAddress == row["address"]
            assert ds.InstitutionName == row["institution"]
            assert ds.InstitutionAddress and ds.StationName and ds.StudyID
            for person in ("ReferringPhysicianName", "OperatorsName", "PerformingPhysicianName"):
                assert "^" in str(ds[person].value)
            assert ds.StudyTime and ds.SeriesTime and ds.StudyDescription and ds.SeriesDescription
            assert ds.BurnedInAnnotation == "NO"
            given, family = row["name_en"].split(" ")
            assert ds.PatientName.family_name == family and ds.PatientName.given_name == given
            if HANGUL_NAME.fullmatch(row["name"]):
                ideographic = str(ds.PatientName).split("=")[1]
                assert ideographic.replace("^", "") == row["name"]
            block = ds.private_block(0x0009, "MEDZONE DEMO PRIVATE")
            assert block[0x10].value == row["name"]
            assert block[0x11].value == row["rrn"]
            assert row["phone"] in block[0x12].value
            if "ImageComments" in ds:
                comments.append((ds.ImageComments, row))
        raw = (out / row["patient_id"] / "CT" / "0001.dcm").read_bytes()
        assert row["name"].encode("utf-8") in raw  # the Korean or English name, as UTF-8
        assert row["rrn"].encode() in raw
    assert comments, "some images should carry a free-text comment"
    for text, row in comments:
        assert row["phone"] in text and (row["name"] in text or row["name_en"] in text)


def test_ct_series_is_one_valid_axial_series(cohort, tables):
    out, _ = cohort
    clinical, _ = tables
    pid = clinical["patient_id"][0]
    series = _ct_series(out / pid)
    first = series[0]
    assert first.preamble == b"\x00" * 128
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.SOPClassUID == first.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert first.Modality == "CT" and first.BodyPartExamined == "CHEST"
    assert (first.Rows, first.Columns) == (128, 128)
    assert [float(v) for v in first.PixelSpacing] == [2.5, 2.5]
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == 2.5
    assert (first.BitsAllocated, first.BitsStored, first.HighBit, first.PixelRepresentation) \
        == (16, 12, 11, 0)
    assert float(first.RescaleIntercept) == -1024 and float(first.RescaleSlope) == 1
    assert first.PhotometricInterpretation == "MONOCHROME2"
    assert first.WindowCenter and first.WindowWidth
    for number, ds in enumerate(series, start=1):
        assert ds.InstanceNumber == number
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert ds.ImagePositionPatient[:2] == first.ImagePositionPatient[:2]
        z = float(ds.ImagePositionPatient[2])
        assert z == pytest.approx(float(first.ImagePositionPatient[2]) + 2.5 * (number - 1))
        assert float(ds.SliceLocation) == pytest.approx(z)
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.pixel_array.max() <= 4095
    assert len({ds.SeriesInstanceUID for ds in series}) == 1
    assert len({ds.StudyInstanceUID for ds in series}) == 1
    assert len({ds.FrameOfReferenceUID for ds in series}) == 1
    assert len({ds.SOPInstanceUID for ds in series}) == 64
    cxr = pydicom.dcmread(out / pid / "CXR" / "0001.dcm")
    assert cxr.StudyInstanceUID != first.StudyInstanceUID
    assert cxr.SeriesInstanceUID != first.SeriesInstanceUID
    uids = [first.StudyInstanceUID, first.SeriesInstanceUID, cxr.StudyInstanceUID]
    assert all(pydicom.uid.UID(u).is_valid for u in uids)


def test_chest_xrays_are_valid_and_some_are_monochrome1(cohort, tables):
    out, _ = cohort
    clinical, _ = tables
    photometric = []
    for pid in clinical["patient_id"]:
        ds = pydicom.dcmread(out / pid / "CXR" / "0001.dcm")
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        expected = {"CR": ComputedRadiographyImageStorage,
                    "DX": DigitalXRayImageStorageForPresentation}[ds.Modality]
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == expected
        assert ds.ViewPosition == "PA" and ds.BodyPartExamined == "CHEST"
        assert (ds.Rows, ds.Columns) == (256, 256) and ds.BitsStored == 12
        assert [float(v) for v in ds.PixelSpacing] == [1.4, 1.4]
        assert [float(v) for v in ds.ImagerPixelSpacing] == [1.4, 1.4]
        pixels = ds.pixel_array
        assert pixels.shape == (256, 256) and pixels.max() <= 4095
        photometric.append(ds.PhotometricInterpretation)
        # Displayed the way the header says, the mediastinum is brighter than both lungs.
        shown = 4095 - pixels if ds.PhotometricInterpretation == "MONOCHROME1" else pixels
        mediastinum = shown[100:140, 124:132].mean()
        right_lung, left_lung = shown[90:130, 50:80].mean(), shown[90:130, 176:206].mean()
        assert mediastinum > right_lung + 600 and mediastinum > left_lung + 600
        # Outside the body (top corners) is dark.
        assert shown[:15, :15].mean() < 300 and shown[:15, -15:].mean() < 300
    assert set(photometric) == {"MONOCHROME1", "MONOCHROME2"}


# --- images: geometry, HU, nodules ------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*nvImageCodec.*:UserWarning")
def test_monai_reads_the_ct_with_its_spacing_and_matches_the_mask(cohort, tables, tmp_path):
    from monai.transforms import LoadImage, Orientation

    out, _ = cohort
    clinical, _ = tables
    load = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)
    pid = clinical["patient_id"][clinical["ct_nodule_count"].astype(int).idxmax()]
    ct = load(str(out / pid / "CT"))
    assert tuple(ct.shape) == (1, 128, 128, 64)
    assert np.allclose(ct.pixdim.numpy(), [2.5, 2.5, 2.5])
    mask = LoadImage(image_only=True, ensure_channel_first=True)(
        str(out / pid / "ct_nodule_mask.nii.gz"))
    ras = Orientation("RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
    ct_ras, mask_ras = ras(ct), ras(mask)
    assert tuple(ct_ras.shape) == tuple(mask_ras.shape)
    assert np.allclose(ct_ras.affine.numpy(), mask_ras.affine.numpy())
    inside = ct_ras[mask_ras > 0]
    assert inside.numel() > 0 and -80 < float(inside.mean()) < 90

    # A smaller anisotropic grid: spacing and shape follow the grid asked for.
    _small(tmp_path / "small", patients=1)
    small_pid = next(p for p in (tmp_path / "small").iterdir() if p.is_dir())
    small = load(str(small_pid / "CT"))
    assert tuple(small.shape) == (1, 64, 56, 24)
    assert np.allclose(small.pixdim.numpy(), [4.0, 4.0, 3.0])
    small_mask = nib.load(small_pid / "ct_nodule_mask.nii.gz")
    assert small_mask.shape == (64, 56, 24)
    assert np.allclose(np.abs(np.diag(small_mask.affine)[:3]), [4.0, 4.0, 3.0])


def _outside_air(low: np.ndarray) -> np.ndarray:
    """Low-density components that touch the in-plane border (room air around the body)."""
    labels, _ = ndimage.label(low)
    edge = np.unique(np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                                     labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    return np.isin(labels, edge[edge > 0])


def test_hu_values_are_anatomically_plausible(cohort, tables):
    out, _ = cohort
    clinical, _ = tables
    for pid in clinical["patient_id"]:
        series = _ct_series(out / pid)
        hu = _hu_volume(series)
        low = hu < -400
        air = _outside_air(low)
        # HU thresholding inside the body segments the lungs (plus the central airways).
        lungs = low & ~air
        voxel_ml = 2.5 ** 3 / 1000
        assert 600 < lungs.sum() * voxel_ml < 4000
        assert -900 < hu[lungs].mean() < -760
        x0 = float(series[0].ImagePositionPatient[0])
        x_mm = x0 + 2.5 * np.arange(hu.shape[2])
        right, left = lungs[:, :, x_mm < -30].sum(), lungs[:, :, x_mm > 30].sum()
        assert right > 0.25 * lungs.sum() and left > 0.25 * lungs.sum()
        assert hu[air].mean() < -950  # room air
        assert 5 < hu[air].std() < 30  # with scanner noise, not a flat painting
        body = ~low
        soft = (hu > 0) & (hu < 100)
        fat = (hu > -150) & (hu < -50)
        bone = hu > 300
        assert soft.sum() > 0.25 * body.sum() and fat.sum() > 0.03 * body.sum()
        # Spine and ribs: bone in every slice, denser than soft tissue, cortical rims ~700+.
        assert all(bone[k].sum() > 20 for k in range(hu.shape[0]))
        assert np.percentile(hu[bone], 95) > 600
        # Heart with contrast-filled chambers above 120 HU.
        assert ((hu > 120) & (hu < 300)).sum() * voxel_ml > 50


def test_nodules_csv_matches_mask_and_dicom_geometry(cohort, tables):
    out, _ = cohort
    clinical, nodules = tables
    assert len(nodules) >= 2
    for pid in clinical["patient_id"]:
        rows = nodules[nodules["patient_id"] == pid]
        series = _ct_series(out / pid)
        img = _mask(out / pid)
        mask = np.asarray(img.dataobj)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert mask.shape == (128, 128, 64)
        labels, count = ndimage.label(mask)
        assert count == len(rows)
        hu = _hu_volume(series)
        origin = np.array([float(v) for v in series[0].ImagePositionPatient])
        row_mm, col_mm = (float(v) for v in series[0].PixelSpacing)
        slice_mm = float(series[1].ImagePositionPatient[2]) - origin[2]
        inverse = np.linalg.inv(img.affine)
        for _, r in rows.iterrows():
            assert r["series_uid"] == series[0].SeriesInstanceUID
            col, row, sl = int(r["center_col"]), int(r["center_row"]), int(r["center_slice"])
            x, y, z = float(r["center_x_mm"]), float(r["center_y_mm"]), float(r["center_z_mm"])
            assert mask[col, row, sl] == 1
            # mm → voxel through the DICOM geometry of the series
            assert round((x - origin[0]) / col_mm) == col
            assert round((y - origin[1]) / row_mm) == row
            assert round((z - origin[2]) / slice_mm) == sl
            assert float(series[sl].ImagePositionPatient[2]) == pytest.approx(z)
            # mm → voxel through the NIfTI affine (RAS: x and y negated)
            ijk = inverse @ np.array([-x, -y, z, 1.0])
            assert np.allclose(ijk[:3], [col, row, sl], atol=1e-6)
            # the mask's voxel count is the sphere's volume
            component = labels == labels[col, row, sl]
            voxels = int(component.sum())
            volume = voxels * row_mm * col_mm * slice_mm
            assert float(r["volume_mm3"]) == pytest.approx(volume, abs=0.06)
            diameter = float(r["diameter_mm"])
            assert math.pi / 6 * diameter ** 3 == pytest.approx(volume, rel=0.03)
            assert 5.5 <= diameter <= 26
            # solid in the image, surrounded by lung
            nodule_hu = hu.transpose(2, 1, 0)[component]
            assert -80 < nodule_hu.mean() < 90
            shell = ndimage.binary_dilation(component, iterations=2) & ~component
            assert np.median(hu.transpose(2, 1, 0)[shell]) < -500


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_xray_shows_its_class(seed):
    """Same patient (same random stream), different finding: the finding changes the image
    where a radiologist would look for it."""
    def render(label):
        return demodata.render_chest_xray(np.random.default_rng(seed), 256, label).astype(float)

    normal = render("normal")
    cardiomegaly, effusion, nodule = render("cardiomegaly"), render("effusion"), render("nodule")
    ps = demodata.CXR_FOV_MM / 256

    def region(img, x_mm, v_mm, half=6):
        """Mean value around a point given in mm (x towards the patient's left, v down)."""
        c, r = int(128 + x_mm / ps), int(v_mm / ps)
        return img[r - half:r + half, c - half:c + half].mean()

    # Enlarged heart: the left heart border moves out into the left lung field.
    assert region(cardiomegaly, 75, 215) - region(normal, 75, 215) > 300
    # Effusion: a basal opacity in at least one lower lung field.
    basal = max(region(effusion, side * 100, 240) - region(normal, side * 100, 240)
                for side in (-1, 1))
    assert basal > 400
    # Nodule: a small round bright spot, not a global change.
    diff = ndimage.uniform_filter(nodule - normal, 5)
    assert diff.max() > 200 and (diff > 100).mean() < 0.01
    assert np.abs(np.median(nodule - normal)) < 20


# --- behaviour --------------------------------------------------------------------------

def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_other_seed_other_people(tmp_path):
    (tmp_path / "b").mkdir()  # an existing empty folder is fine
    _small(tmp_path / "a", seed=3)
    _small(tmp_path / "b", seed=3)
    _small(tmp_path / "c", seed=4)
    a, b, c = (_digests(tmp_path / n) for n in "abc")
    assert len(a) == 2 + 2 * (24 + 2)
    assert a == b
    people = {n: pd.read_csv(tmp_path / n / "clinical.csv", dtype=str) for n in "ac"}
    for column in ("patient_id", "rrn", "phone", "name_en", "accession_ct"):
        assert set(people["a"][column]).isdisjoint(people["c"][column]), column
    assert not set(a.values()) & set(c.values())
    uid_a = pydicom.dcmread(next((tmp_path / "a").glob("*/CT/0001.dcm"))).StudyInstanceUID
    uid_c = pydicom.dcmread(next((tmp_path / "c").glob("*/CT/0001.dcm"))).StudyInstanceUID
    assert uid_a != uid_c


def test_nifti_mask_bytes_do_not_depend_on_the_clock(tmp_path):
    out = tmp_path / "c"
    _small(out, patients=1)
    raw = next(out.glob("*/ct_nodule_mask.nii.gz")).read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\x00\x00\x00\x00"  # gzip mtime 0


@pytest.mark.parametrize("patients", [0, -1, 1001, 2.5, "3", True])
def test_bad_patient_counts_are_refused(tmp_path, patients):
    with pytest.raises(InvalidInput) as err:
        generate_cohort(tmp_path / "out", patients=patients, seed=0, progress=False)
    assert "\n" not in str(err.value) and "patients" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_seed_is_refused(tmp_path):
    with pytest.raises(InvalidInput, match="seed"):
        generate_cohort(tmp_path / "out", patients=1, seed=-1, progress=False)


def test_non_empty_or_file_destination_is_refused(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="not empty") as err:
        generate_cohort(full, patients=1, progress=False)
    assert "\n" not in str(err.value)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InvalidInput, match="not a folder"):
        generate_cohort(a_file, patients=1, progress=False)


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    _small(tmp_path / "c", patients=1, progress=True)
    captured = capsys.readouterr()
    assert "demo patients" in captured.err and captured.out == ""
    _small(tmp_path / "d", patients=1, progress=False)
    assert capsys.readouterr().err == ""
