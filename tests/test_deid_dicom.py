"""DICOM findings and de-identification on CT-like datasets built here with fake identities."""

from __future__ import annotations

import copy
import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from medzone_hub.deid.dicom import deidentify_dicom, dicom_findings
from medzone_hub.deid.profile import basic_profile, profile_description
from medzone_hub.deid.pseudonym import Pseudonymizer, is_patient_pseudonym
from medzone_hub.errors import IngestRefused

KEY = b"test-provider-key-0123456789abcdef"
MRN = "20481357"
RRN = "850312-2345678"
STUDY_UID = "1.2.410.200013.1.510.1.20230115093000123"
SERIES_UID = "1.2.410.200013.1.510.2.20230115093000456"
FRAME_UID = "1.2.410.200013.1.510.3.20230115093000789"

#: Every identity the builder writes (what must never reach the output).
IDENTITIES = {
    "Kim^Minjun=김^민준", "Kim^Minjun", "김^민준", "Kim Minjun", "김민준", "Minjun",
    MRN, RRN, "8503122345678", "19850312", "1985-03-12", "010-2345-6789", "01023456789",
    "서울특별시 강남구 테헤란로 123", "Seoul Demo University Hospital", "Park^Jisoo",
    "Choi^Yuna", "Lee^Hyunwoo", "CT2023011500042", "kim.minjun@example.com",
    "Jung^Seoyeon", "02-3410-1234",
}


def make_ct_slice(index: int = 1, *, mrn: str = MRN, series_uid: str = SERIES_UID,
                  study_uid: str = STUDY_UID, accession: str = "CT2023011500042",
                  pixels: np.ndarray | None = None) -> Dataset:
    """One CT slice with every kind of identifying attribute a hospital export carries."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = f"{series_uid}.{index}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "PACS_SEOUL"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{series_uid}.{index}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = FRAME_UID
    ds.Modality = "CT"
    ds.PatientName = "Kim^Minjun=김^민준"
    ds.PatientID = mrn
    ds.OtherPatientIDs = RRN
    ds.PatientBirthDate = "19850312"
    ds.PatientSex = "M"
    ds.PatientAge = "037Y"
    ds.PatientWeight = "71.5"
    ds.PatientAddress = "서울특별시 강남구 테헤란로 123"
    ds.PatientTelephoneNumbers = "010-2345-6789"
    ds.InstitutionName = "Seoul Demo University Hospital"
    ds.InstitutionAddress = "Seoul, phone 02-3410-1234"
    ds.ReferringPhysicianName = "Park^Jisoo"
    ds.PerformingPhysicianName = "Choi^Yuna"
    ds.OperatorsName = "Lee^Hyunwoo"
    ds.AccessionNumber = accession
    ds.StudyID = "CT42"
    ds.StudyDate = "20230115"
    ds.SeriesDate = "20230115"
    ds.AcquisitionDateTime = "20230115093512.250000"
    ds.ContentDate = "20230115"
    ds.StudyTime = "093000"
    ds.StudyDescription = "CT CHEST for Kim Minjun"
    ds.SeriesDescription = "Lung 1.0 B60f"
    ds.ImageComments = "Patient Kim Minjun (RRN 850312-2345678), call 010-2345-6789"
    ds.Manufacturer = "MedZone Phantom Co"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = "1.0"
    ds.ImagePositionPatient = [-120.0, -120.0, -100.0 + index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.InstanceNumber = index
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if pixels is None:
        pixels = (np.arange(64 * 64, dtype=np.int16).reshape(64, 64) + index) % 2000
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.astype(np.int16).tobytes()
    request = Dataset()
    request.RequestedProcedureDescription = "Chest CT"
    request.ScheduledPerformingPhysicianName = "Jung^Seoyeon"
    ds.RequestAttributesSequence = Sequence([request])
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = CTImageStorage
    referenced.ReferencedSOPInstanceUID = f"{series_uid}.{index + 1}"
    ds.ReferencedImageSequence = Sequence([referenced])
    observer = Dataset()
    observer.VerifyingObserverName = "Jung^Seoyeon"
    observer.VerificationDateTime = "20230116101500"
    ds.VerifyingObserverSequence = Sequence([observer])
    code = Dataset()  # a sequence the profile does not list, with a person name inside
    code.CodeValue = "T-D3000"
    code.CodingSchemeDesignator = "SRT"
    code.CodeMeaning = "Chest"
    code.PersonName = "Jung^Seoyeon"  # listed by the profile (D)
    code.EvaluatorName = "Jung^Seoyeon"  # not listed: removed as a person name
    ds.AnatomicRegionSequence = Sequence([code])
    block = ds.private_block(0x0009, "HOSPITAL PRIVATE", create=True)
    block.add_new(0x01, "LO", "Kim Minjun")
    block.add_new(0x02, "LO", RRN)
    block.add_new(0x03, "LO", "kim.minjun@example.com")
    return ds


def serialized(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pz() -> Pseudonymizer:
    return Pseudonymizer(KEY)


@pytest.fixture(scope="module")
def deidentified(pz):
    return [deidentify_dicom(make_ct_slice(i), pz) for i in (1, 2)]


# --- the profile -----------------------------------------------------------------------

def test_profile_is_loaded_from_dicom_anonymizers_newest_table():
    profile = basic_profile()
    assert len(profile) >= 600
    assert profile.action_for(0x00100010) == "Z"      # PatientName
    assert profile.action_for(0x00101000) == "X"      # OtherPatientIDs
    assert profile.action_for(0x0020000D) == "U"      # StudyInstanceUID
    assert profile.action_for(0x00080080) == "X/Z/D"  # InstitutionName
    assert profile.action_for(0x60024000) == "X"      # Overlay Comments, repeating group 60xx
    assert profile.action_for(0x00280010) is None     # Rows: not identifying
    description = profile_description()
    assert description["attributes"] == len(profile)
    assert description["version"] == profile.version and "dicom-anonymizer" in description["source"]


# --- findings --------------------------------------------------------------------------

def test_findings_name_attributes_and_never_values():
    findings = dicom_findings(make_ct_slice(), "P1/CT/0001.dcm")
    text = "\n".join(findings)
    assert all(f.startswith("P1/CT/0001.dcm: ") for f in findings)
    for attribute in ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate",
                      "PatientAddress", "InstitutionName", "ReferringPhysicianName",
                      "AccessionNumber", "ImageComments", "StudyInstanceUID", "StudyDate",
                      "RequestAttributesSequence", "(0009,10xx) (private attributes)",
                      "AnatomicRegionSequence[0].PersonName",
                      "AnatomicRegionSequence[0].EvaluatorName (looks like a person name)",
                      "VerifyingObserverSequence"):
        assert attribute in text, attribute
    for value in IDENTITIES | {"850312", "Minjun", "Jisoo"}:
        assert value not in text
    assert "person name" in text and "resident registration number" in text


def test_a_clean_non_identifying_image_has_no_findings():
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 8
    ds.Manufacturer = "MedZone Phantom Co"
    ds.ConvolutionKernel = "B60f"
    ds.WindowCenter = "-600"
    assert dicom_findings(ds, "x.dcm") == []


def test_pseudonymous_values_are_accepted_only_when_identity_removed_is_yes(deidentified):
    ds = deidentified[0].dataset
    assert dicom_findings(ds, "out.dcm") == []
    unmarked = copy.deepcopy(ds)
    del unmarked.PatientIdentityRemoved
    text = "\n".join(dicom_findings(unmarked, "out.dcm"))
    assert "PatientName" in text and "StudyInstanceUID" in text and "StudyDate" in text


def test_a_real_name_is_found_even_when_identity_removed_says_yes():
    ds = make_ct_slice()
    ds.PatientIdentityRemoved = "YES"
    text = "\n".join(dicom_findings(ds, "x.dcm"))
    assert "PatientName (" in text and "person name" in text


# --- de-identification -----------------------------------------------------------------

def test_deidentified_output_has_no_findings_and_no_identity_bytes(deidentified):
    for result in deidentified:
        assert dicom_findings(result.dataset, "out.dcm") == []
        data = serialized(result.dataset)
        survivors = [v for v in IDENTITIES | result.identity_values if v.encode() in data]
        assert survivors == []
        # and the written file reads back the same way
        again = pydicom.dcmread(io.BytesIO(data))
        assert dicom_findings(again, "out.dcm") == []


def test_identity_values_cover_every_identity_written(deidentified):
    values = deidentified[0].identity_values
    assert IDENTITIES <= values
    assert all(len(v.encode()) >= 6 for v in values)
    assert {STUDY_UID, SERIES_UID, FRAME_UID} <= values


def test_patient_gets_the_keyed_pseudonym_and_the_input_is_untouched(pz, deidentified):
    result = deidentified[0]
    ds = result.dataset
    assert result.patient_id == MRN
    assert str(ds.PatientID) == str(ds.PatientName) == pz.patient_pseudonym(MRN)
    assert is_patient_pseudonym(ds.PatientID) and "^" not in str(ds.PatientName)
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
    assert {"113100", "113107", "113108"} <= codes
    assert make_ct_slice().PatientID == MRN  # builders are fresh; deepcopy keeps input intact
    original = make_ct_slice()
    deidentify_dicom(original, pz)
    assert original.PatientID == MRN and "PatientIdentityRemoved" not in original


def test_uids_are_remapped_consistently(pz, deidentified):
    first, second = (r.dataset for r in deidentified)
    assert first.SeriesInstanceUID == second.SeriesInstanceUID != SERIES_UID
    assert first.StudyInstanceUID == pz.remap_uid(STUDY_UID)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    # slice 1 refers to slice 2: the reference follows the remapping
    assert first.ReferencedImageSequence[0].ReferencedSOPInstanceUID == second.SOPInstanceUID
    assert first.ReferencedImageSequence[0].ReferencedSOPClassUID == CTImageStorage
    assert first.SOPClassUID == CTImageStorage
    for uid in (first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID):
        assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid


def test_dates_shift_by_the_patients_offset_and_birth_date_goes(pz, deidentified):
    ds = deidentified[0].dataset
    shift = pz.date_shift_days(MRN)
    assert -730 <= shift <= -30
    import datetime as dt

    expected = (dt.date(2023, 1, 15) + dt.timedelta(days=shift)).strftime("%Y%m%d")
    assert ds.StudyDate == ds.SeriesDate == ds.ContentDate == expected
    assert ds.AcquisitionDateTime == expected + "093512.250000"
    assert ds.StudyTime == "093000"
    assert ds.PatientBirthDate == ""


def test_what_is_removed_and_what_is_kept(deidentified):
    ds = deidentified[0].dataset
    for gone in ("OtherPatientIDs", "PatientAddress", "PatientTelephoneNumbers",
                 "InstitutionAddress", "PerformingPhysicianName", "StudyDescription",
                 "SeriesDescription", "ImageComments", "RequestAttributesSequence"):
        assert gone not in ds, gone
    assert not any(elem.tag.is_private for elem in ds.iterall())
    assert "SourceApplicationEntityTitle" not in ds.file_meta
    for emptied in ("ReferringPhysicianName", "StudyID"):
        assert ds[emptied].value in ("", None)
    assert "InstitutionName" not in ds and "OperatorsName" not in ds
    assert ds.AnatomicRegionSequence[0].PersonName == "REMOVED"
    assert "EvaluatorName" not in ds.AnatomicRegionSequence[0]
    assert ds.AnatomicRegionSequence[0].CodeMeaning == "Chest"
    original = make_ct_slice(1)
    for kept in ("Modality", "PixelSpacing", "SliceThickness", "ImagePositionPatient",
                 "ImageOrientationPatient", "RescaleIntercept", "RescaleSlope", "WindowCenter",
                 "WindowWidth", "Rows", "Columns", "Manufacturer", "BodyPartExamined",
                 "PatientSex", "PatientAge", "PatientWeight", "PixelData", "ImageType"):
        assert ds[kept].value == original[kept].value, kept
    assert np.array_equal(ds.pixel_array, original.pixel_array)


def test_accession_becomes_the_keyed_dummy(pz, deidentified):
    assert deidentified[0].dataset.AccessionNumber == pz.accession("CT2023011500042")


def test_burned_in_annotation_is_refused(pz):
    ds = make_ct_slice()
    ds.BurnedInAnnotation = "YES"
    assert any("BurnedInAnnotation" in f for f in dicom_findings(ds, "cxr.dcm"))
    with pytest.raises(IngestRefused, match="burned-in annotation") as caught:
        deidentify_dicom(ds, pz, relpath="P1/CXR/0001.dcm")
    assert caught.value.findings == ["P1/CXR/0001.dcm: BurnedInAnnotation "
                                     "(burned-in annotation in the pixel data)"]


def test_secondary_capture_without_burned_in_no_is_refused(pz):
    ds = make_ct_slice()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    with pytest.raises(IngestRefused):
        deidentify_dicom(ds, pz)
    ds.BurnedInAnnotation = "NO"
    assert dicom_findings(deidentify_dicom(ds, pz).dataset, "sc.dcm") == []


def test_missing_patient_id_is_refused(pz):
    ds = make_ct_slice()
    ds.PatientID = ""
    with pytest.raises(IngestRefused, match="PatientID"):
        deidentify_dicom(ds, pz)


def test_identity_values_skip_what_would_match_by_chance():
    from medzone_hub.deid.pseudonym import identity_variants

    assert identity_variants("738875") == set()          # 6 digits: inside 2.25 UIDs by chance
    assert identity_variants("20481357") == {"20481357"}
    assert identity_variants("000-0000-0000") == set()   # placeholder
    assert identity_variants("ANONYMOUS") == set()
    assert "하나" not in identity_variants("서^하나")     # a given name that is also a word
    assert {"서하나", "서 하나"} <= identity_variants("서^하나")
    assert identity_variants("1985-03-12", date=True) >= {"19850312", "1985.03.12"}


# --- NIfTI masks stored beside the series ----------------------------------------------

def _mask_image():
    import nibabel as nib

    affine = np.array([[-0.7, 0.01, 0, 120], [0, 0.7, 0, -100], [0, 0, 2.5, -300], [0, 0, 0, 1]])
    data = (np.random.default_rng(0).random((16, 16, 4)) * 1000).astype(np.int16)
    img = nib.Nifti1Image(data, affine)
    img.header.set_slope_inter(0.5, -10)
    img.header.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    img.header["descrip"] = "Kim^Minjun 850312-2345678".encode()
    img.header["aux_file"] = b"seg by Park"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"patient Kim Minjun"))
    return img


def test_nifti_findings_and_deidentification_keep_voxels_and_affine(tmp_path):
    import nibabel as nib

    from medzone_hub.deid.nifti import deidentify_nifti, nifti_findings

    nib.save(_mask_image(), tmp_path / "in.nii.gz")
    source = nib.load(tmp_path / "in.nii.gz")
    findings = nifti_findings(source, "P1/ct_nodule_mask.nii.gz")
    text = "\n".join(findings)
    assert "descrip (" in text and "extension" in text and "850312" not in text
    assert "Minjun" not in text
    strict = nifti_findings(source, "m.nii.gz", strict=True)
    assert any("aux_file" in f for f in strict)

    nib.save(deidentify_nifti(source), tmp_path / "out.nii.gz")
    out = nib.load(tmp_path / "out.nii.gz")
    assert nifti_findings(out, "m.nii.gz", strict=True) == []
    assert np.array_equal(out.dataobj.get_unscaled(), source.dataobj.get_unscaled())
    assert np.array_equal(np.asanyarray(out.dataobj), np.asanyarray(source.dataobj))
    assert (out.dataobj.slope, out.dataobj.inter) == (0.5, -10)
    for get in ("get_qform", "get_sform"):
        assert np.array_equal(getattr(out, get)(), getattr(source, get)())
    assert np.array_equal(out.affine, source.affine)
    import gzip

    assert b"Minjun" in gzip.decompress((tmp_path / "in.nii.gz").read_bytes())
    assert b"Minjun" not in gzip.decompress((tmp_path / "out.nii.gz").read_bytes())
