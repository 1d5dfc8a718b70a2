"""What the tests know about a synthetic cohort: its fake identities and original UIDs."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pydicom

IDENTITY_COLUMNS = ("patient_id", "name", "name_en", "rrn", "birth_date", "phone", "address",
                    "institution", "accession_ct", "accession_cxr")
PERSON_ATTRIBUTES = ("PatientName", "ReferringPhysicianName", "OperatorsName",
                     "PerformingPhysicianName")
TEXT_ATTRIBUTES = ("PatientID", "OtherPatientIDs", "PatientAddress", "PatientTelephoneNumbers",
                   "InstitutionName", "InstitutionAddress", "AccessionNumber", "PatientBirthDate")


def _spellings(value: str) -> set[str]:
    """A value and the separator-free spelling a header or a date may use."""
    value = value.strip()
    out = {value}
    if any(sep in value for sep in "-. "):
        out.add(value.replace("-", "").replace(".", "").replace(" ", ""))
    return {v for v in out if len(v.encode()) >= 6}


def _items(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return list(value)
    return [value]


def identity_values_of(cohort_dir: Path) -> set[str]:
    """Every fake identity value in the cohort's CSV and DICOM headers (≥ 6 bytes)."""
    values: set[str] = set()
    clinical = pd.read_csv(cohort_dir / "clinical.csv", dtype=str, keep_default_na=False)
    for column in IDENTITY_COLUMNS:
        for value in clinical[column]:
            values |= _spellings(value)
    for path in cohort_dir.glob("*/*/0001.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in PERSON_ATTRIBUTES:
            for name in _items(ds.get(keyword)):
                text = str(name)
                values |= _spellings(text)
                for group in text.split("="):
                    values |= _spellings(group) | _spellings(group.replace("^", " "))
        for keyword in TEXT_ATTRIBUTES:
            for item in _items(ds.get(keyword)):
                values |= _spellings(str(item))
    return values


def original_uids_of(cohort_dir: Path) -> set[str]:
    uids = set()
    for path in cohort_dir.glob("*/*/*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    return uids


def stored_bytes(root: Path) -> bytes:
    """Every byte under root (data, manifest and screening index), concatenated."""
    chunks = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            chunks.append(Path(dirpath, name).read_bytes())
            chunks.append(os.path.join(dirpath, name).encode())
    return b"\x00".join(chunks)
