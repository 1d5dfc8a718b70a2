"""Ingest end to end on the synthetic cohort: de-identification, refusal, validation, atomicity."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from medzone_hub.errors import Conflict, IngestRefused, InvalidInput
from medzone_hub.ingest import ingest_dataset, read_pseudonym_key
from medzone_hub.manifest import sha256_file

from .cohort import identity_values_of, original_uids_of, stored_bytes
from .fixtures import COHORT_PATIENTS

KEY = b"provider-secret-key-for-tests-0123456789"


def _ingest(env, dataset_id, source, **kw):
    kw.setdefault("actor", "steward")
    kw.setdefault("progress", False)
    return ingest_dataset(env.home, env.store, dataset_id, source, **kw)


def _assert_no_trace(env, dataset_id):
    from medzone_hub.registry import dataset_exists

    assert not env.home.dataset_dir(dataset_id).exists()
    staging = env.home.staging_dir
    assert not staging.exists() or not any(staging.iterdir())
    with env.store.session() as session:
        assert not dataset_exists(session, dataset_id)
    rows = env.audit_actions()
    assert "dataset.register" not in rows


# --- de-identified ingest -------------------------------------------------------------------

@pytest.fixture(scope="module")
def deid_dataset(module_env, cohort_dir):
    report = _ingest(module_env, "chest", cohort_dir, deidentify=True, pseudonym_key=KEY,
                     title="Chest demo")
    return module_env, report, module_env.home.dataset_dir("chest")


def test_every_fake_identity_is_absent_from_every_stored_byte(deid_dataset, cohort_dir):
    env, _, root = deid_dataset
    values = identity_values_of(cohort_dir)
    assert len(values) > 50  # names, RRNs, phones, addresses, MRNs, accession numbers …
    haystack = stored_bytes(root)
    survivors = [v for v in values if v.encode() in haystack]
    assert survivors == []


def test_original_uids_are_remapped_everywhere(deid_dataset, cohort_dir):
    _, _, root = deid_dataset
    uids = original_uids_of(cohort_dir)
    haystack = stored_bytes(root)
    assert uids and not [u for u in uids if u.encode() in haystack]


def test_pseudonyms_link_dicom_and_tables_consistently(deid_dataset, cohort_dir):
    _, _, root = deid_dataset
    data = root / "data"
    clinical = pd.read_csv(data / "clinical.csv", dtype=str)
    nodules = pd.read_csv(data / "nodules.csv", dtype=str)
    original = pd.read_csv(cohort_dir / "clinical.csv", dtype=str)
    assert len(clinical) == len(original)
    # direct identifiers and free text are gone, clinical variables kept
    for column in ("name", "name_en", "rrn", "phone", "address", "notes", "birth_date"):
        assert column not in clinical.columns
    for column in ("age", "sex", "smoking", "cxr_label", "ct_nodule_count"):
        assert list(clinical[column]) == list(original[column])
    patient_folders = sorted(p.name for p in data.iterdir() if p.is_dir())
    assert sorted(clinical["patient_id"]) == patient_folders
    assert not set(original["patient_id"]) & set(patient_folders)
    for pseudo in clinical["patient_id"]:
        ct = [pydicom.dcmread(p) for p in sorted((data / pseudo / "CT").glob("*.dcm"))]
        cxr = pydicom.dcmread(next((data / pseudo / "CXR").glob("*.dcm")))
        assert {str(d.PatientID) for d in ct} | {str(cxr.PatientID)} == {pseudo}
        assert {str(d.PatientName) for d in ct} == {pseudo}
        assert len({d.SeriesInstanceUID for d in ct}) == 1
        assert len({d.SOPInstanceUID for d in ct}) == len(ct)
        assert ct[0].StudyInstanceUID != cxr.StudyInstanceUID
        assert ct[0].PatientIdentityRemoved == "YES"
        assert not any(elem.tag.is_private for d in ct + [cxr] for elem in d.iterall())
        rows = nodules[nodules["patient_id"] == pseudo]
        assert set(rows["series_uid"]) <= {ct[0].SeriesInstanceUID}
        assert (data / pseudo / "ct_nodule_mask.nii.gz").exists()


def test_dates_shift_by_one_offset_per_patient(deid_dataset, cohort_dir):
    _, _, root = deid_dataset
    data = root / "data"
    original = pd.read_csv(cohort_dir / "clinical.csv", dtype=str)
    stored = pd.read_csv(data / "clinical.csv", dtype=str)
    offsets = set()
    for (_, before), (_, after) in zip(original.iterrows(), stored.iterrows()):
        visit_before = pd.Timestamp(before["visit_date"])
        visit_after = pd.Timestamp(after["visit_date"])
        shift = (visit_after - visit_before).days
        assert shift != 0
        ct_before = pydicom.dcmread(next((cohort_dir / before["patient_id"] / "CT").glob("*.dcm")))
        ct_after = pydicom.dcmread(next((data / after["patient_id"] / "CT").glob("*.dcm")))
        dicom_shift = (pd.Timestamp(ct_after.StudyDate) - pd.Timestamp(ct_before.StudyDate)).days
        assert dicom_shift == shift
        offsets.add(shift)
    assert len(offsets) > 1  # per patient, not one global shift


def test_stored_copy_is_read_only_and_matches_its_manifest(deid_dataset):
    env, report, root = deid_dataset
    manifest_raw = (root / "manifest.json").read_bytes()
    manifest = json.loads(manifest_raw)
    assert report.manifest_sha256 == __import__("hashlib").sha256(manifest_raw).hexdigest()
    from medzone_hub.registry import get_dataset

    with env.store.session() as session:
        ds = get_dataset(session, "chest")
        assert ds.manifest_sha256 == report.manifest_sha256
        assert ds.deidentified and ds.n_patients == COHORT_PATIENTS
    for entry in manifest["files"]:
        path = root / "data" / entry["path"]
        assert sha256_file(path) == entry["sha256"]
        assert path.stat().st_mode & 0o222 == 0
    for dirpath, _, _ in os.walk(root):
        assert os.stat(dirpath).st_mode & 0o222 == 0
    ct = [s for s in manifest["series"] if s["modality"] == "CT"]
    assert len(ct) == COHORT_PATIENTS
    assert ct[0]["pixel_spacing_mm"] == [2.5, 2.5] and ct[0]["slice_spacing_mm"] == 2.5
    assert {s["modality"] for s in manifest["series"]} >= {"CT"}
    assert manifest["deidentification_profile"]["attributes"] >= 600
    assert (root / "index" / "index.json").exists()


def test_screening_index_knows_the_stored_pseudonyms(deid_dataset):
    from medzone_hub.ingest import screening_index_key
    from medzone_hub.screen.index import ScreeningIndex

    env, _, root = deid_dataset
    index = ScreeningIndex.load(root / "index", screening_index_key(env.home))
    pseudo = pd.read_csv(root / "data" / "clinical.csv", dtype=str)["patient_id"][0]
    assert index.contains(pseudo) is not None
    assert index.contains(pseudo.lower().replace("-", " ")) is not None
    assert index.contains("MZP-NOT-A-PATIENT") is None
    # every stored CT slice is fingerprinted: a copy of one is recognised, an unrelated one not
    ct_slice = pydicom.dcmread(sorted((root / "data" / pseudo / "CT").glob("*.dcm"))[30])
    pixels = ct_slice.pixel_array
    assert index.exact_matches(pixels)
    assert index.image_candidates(pixels[:, ::-1])
    noise = np.random.default_rng(0).integers(0, 2000, pixels.shape).astype(pixels.dtype)
    assert not index.image_candidates(noise)


def test_duplicate_id_is_refused(deid_dataset, cohort_dir):
    env, _, root = deid_dataset
    before = sha256_file(root / "manifest.json")
    with pytest.raises(Conflict, match="exists already"):
        _ingest(env, "chest", cohort_dir, deidentify=True, pseudonym_key=KEY)
    assert sha256_file(root / "manifest.json") == before


# --- refusals and bad input leave no trace --------------------------------------------------

def test_identifying_source_is_refused_listing_files_and_attributes(env, cohort_dir):
    with pytest.raises(IngestRefused) as caught:
        _ingest(env, "raw", cohort_dir)
    findings = caught.value.findings
    text = "\n".join(findings) + str(caught.value)
    assert any("clinical.csv" in f and "'name'" in f for f in findings)
    assert any("clinical.csv" in f and "'rrn'" in f for f in findings)
    assert any("/CT/0001.dcm" in f and "PatientName" in f for f in findings)
    assert any("OtherPatientIDs" in f for f in findings)
    assert any("private" in f.lower() for f in findings)
    # File paths are named (the steward must find the file); attribute values never are.
    paths = " ".join(p.relative_to(cohort_dir).as_posix() for p in cohort_dir.rglob("*"))
    for value in identity_values_of(cohort_dir):
        if value not in paths:
            assert value not in text
    _assert_no_trace(env, "raw")


def _broken_copy(cohort_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "source"
    shutil.copytree(cohort_dir, copy)
    return copy


def _first_ct(source: Path) -> Path:
    return sorted(source.glob("*/CT/0001.dcm"))[0]


@pytest.mark.parametrize("breakage", ["truncated-dicom", "not-dicom", "bad-csv", "unsupported"])
def test_a_bad_file_is_named_and_nothing_is_stored(env, cohort_dir, tmp_path, breakage):
    source = _broken_copy(cohort_dir, tmp_path)
    if breakage == "truncated-dicom":
        bad = _first_ct(source)
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    elif breakage == "not-dicom":
        bad = _first_ct(source)
        bad.write_text("this is a text file with a .dcm name\n")
    elif breakage == "bad-csv":
        bad = source / "clinical.csv"
        bad.write_bytes(b"\xff\xfe\x00garbage\x00\x81\x82\n")
    else:
        bad = source / "notes.docx"
        bad.write_bytes(b"PK\x03\x04 not data")
    rel = bad.relative_to(source).as_posix()
    with pytest.raises(InvalidInput) as caught:
        _ingest(env, "broken", source, deidentify=True, pseudonym_key=KEY)
    message = str(caught.value)
    assert rel in message and "\n" not in message
    _assert_no_trace(env, "broken")


def test_missing_source_and_bad_id_are_clear_errors(env, tmp_path):
    with pytest.raises(InvalidInput, match="source not found"):
        _ingest(env, "nothing", tmp_path / "does-not-exist")
    with pytest.raises(InvalidInput):
        _ingest(env, "Bad_ID", tmp_path)
    _assert_no_trace(env, "nothing")


def test_burned_in_annotation_is_refused(env, cohort_dir, tmp_path):
    source = _broken_copy(cohort_dir, tmp_path)
    xray = sorted(source.glob("*/CXR/0001.dcm"))[0]
    ds = pydicom.dcmread(xray)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(xray)
    with pytest.raises(IngestRefused) as caught:
        _ingest(env, "burned", source, deidentify=True, pseudonym_key=KEY)
    assert "urned" in str(caught.value) + " ".join(caught.value.findings)
    _assert_no_trace(env, "burned")


def test_key_file_inside_the_zone_is_refused(env, tmp_path):
    inside = env.home.root / "provider.key"
    inside.write_bytes(KEY)
    with pytest.raises(InvalidInput, match="outside MEDZONE_HOME"):
        read_pseudonym_key(env.home, inside)
    outside = tmp_path / "provider.key"
    outside.write_bytes(KEY)
    assert read_pseudonym_key(env.home, outside) == KEY


def test_killed_ingest_leaves_nothing_and_the_next_one_succeeds(cli, cohort_dir, tmp_path):
    key = tmp_path / "provider.key"
    key.write_bytes(KEY)
    args = ["dataset", "add", "killed", str(cohort_dir), "--deidentify", "--key-file", str(key)]
    proc = cli.popen(*args)
    staging = cli.home / "datasets" / ".staging"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if staging.exists() and any(p.is_file() for p in staging.rglob("*.dcm")):
            break
        time.sleep(0.02)
    else:
        pytest.fail("ingest never started staging files")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = json.loads(cli.run("dataset", "list", "--json").stdout)
    assert [d["id"] for d in listed] == []
    assert not (cli.home / "datasets" / "killed").exists()

    done = cli.run(*args)
    assert done.returncode == 0, done.stderr
    assert "files/s" in done.stdout
    assert [d["id"] for d in json.loads(cli.run("dataset", "list", "--json").stdout)] == ["killed"]
    assert not any(staging.iterdir())  # the dead ingest's staging folder was cleaned up


def test_cli_refusal_is_one_line_per_finding_and_exit_1(cli, cohort_dir):
    result = cli.run("dataset", "add", "raw", str(cohort_dir))
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("medzone: error:")]
    assert len(errors) == 1 and "source holds identifying data" in errors[0]
    assert "Traceback" not in result.stderr
    missing = cli.run("dataset", "add", "raw", str(cohort_dir / "nope"))
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and "source not found" in missing.stderr
