"""Table findings and de-identification, and their consistency with the DICOM side."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from medzone_hub.deid.dicom import deidentify_dicom
from medzone_hub.deid.pseudonym import Pseudonymizer, is_patient_pseudonym
from medzone_hub.deid.tables import deidentify_table, read_csv_table, table_findings
from medzone_hub.errors import IngestRefused

from .test_deid_dicom import KEY, MRN, SERIES_UID, make_ct_slice

CLINICAL = pd.DataFrame({
    "patient_id": [MRN, "20481358", "00031337"],
    "name": ["김민준", "이서연", "박지호"],
    "name_en": ["Kim Minjun", "Lee Seoyeon", "Park Jiho"],
    "rrn": ["850312-2345678", "920101-2234567", "010505-3123456"],
    "birth_date": ["1985-03-12", "1992-01-01", "2001-05-05"],
    "phone": ["010-2345-6789", "010-9876-5432", "02-3410-1234"],
    "address": ["서울특별시 강남구 테헤란로 123", "부산광역시 해운대구 센텀로 45", "대전 유성구 대학로 99"],
    "institution": ["Seoul Demo University Hospital"] * 3,
    "accession_ct": ["CT2023011500042", "CT2023020100007", "CT2023030300311"],
    "age": ["37", "31", "22"],
    "sex": ["M", "F", "M"],
    "height_cm": ["172.5", "161.0", "180.2"],
    "smoking": ["former", "never", "current"],
    "cxr_label": ["nodule", "normal", "nodule"],
    "ct_nodule_count": ["2", "0", "1"],
    "visit_date": ["2023-01-15", "2023-02-01", "2023-03-03"],
    "notes": ["Patient Kim Minjun referred for follow-up CT of a small nodule",
              "이서연 환자 정기 검진, 특이 소견 없음", "No findings; follow up in one year"],
})
NODULES = pd.DataFrame({
    "patient_id": [MRN, MRN, "00031337"],
    "series_uid": [SERIES_UID, SERIES_UID, "1.2.410.200013.1.510.2.20230303111111999"],
    "nodule_id": ["1", "2", "1"],
    "diameter_mm": ["6.2", "4.1", "8.8"],
    "volume_mm3": ["124.8", "36.1", "356.8"],
})
IDENTITY_COLUMNS = ("patient_id", "name", "name_en", "rrn", "birth_date", "phone", "address",
                    "institution", "accession_ct")


@pytest.fixture(scope="module")
def pz() -> Pseudonymizer:
    return Pseudonymizer(KEY)


@pytest.fixture(scope="module")
def clinical(pz):
    return deidentify_table(CLINICAL, pz)


def test_findings_name_identifying_columns_and_never_values():
    findings = table_findings(CLINICAL, "clinical.csv")
    flagged = {f.split("'")[1] for f in findings}
    assert flagged == {"patient_id", "name", "name_en", "rrn", "birth_date", "phone", "address",
                       "institution", "accession_ct", "visit_date", "notes"}
    assert all(f.startswith("clinical.csv: column '") for f in findings)
    text = "\n".join(findings)
    for column in IDENTITY_COLUMNS:
        for value in CLINICAL[column]:
            assert value not in text
    assert "Minjun" not in text and "850312" not in text
    notes = next(f for f in findings if "'notes'" in f)
    assert "person name" in notes


def test_findings_from_content_under_innocent_column_names():
    frame = pd.DataFrame({"col_a": ["850312-2345678", "920101-2234567", "010505-3123456"],
                          "col_b": ["Kim^Minjun", "Lee^Seoyeon", "Park^Jiho"],
                          "col_c": ["010-2345-6789", "", "010 9876 5432"],
                          "col_d": ["김민준", "이서연", "박지호"],
                          "contact_mail": ["a.kim@example.com", "b@example.org", "c@example.net"]})
    findings = table_findings(frame, "t.csv")
    assert {f.split("'")[1] for f in findings} == set(frame.columns)


def test_harmless_columns_are_not_findings():
    frame = pd.DataFrame({
        "hu_mean": ["-812.5", "40.1", "1023.0"], "window": ["1500/-600", "400/40", "80/35"],
        "diameter_mm": ["6.2", "12.25", "3.0"], "count": ["1", "20", "300"],
        "label": ["정상", "이상", "정상"], "finding": ["nodule", "normal", "mass"],
        "sex": ["M", "F", "M"], "volume_mm3": ["1234.5678", "0.5", "20230115"],
        "series_number": ["2", "3", "4"],
    })
    frame["finding"] = frame["finding"]  # a categorical label, not free text
    assert table_findings(frame, "ok.csv") == []


def test_deidentified_table_has_no_findings_and_no_identity_left(clinical):
    assert table_findings(clinical.frame, "clinical.csv") == []
    data = clinical.frame.to_csv(index=False).encode()
    for column in IDENTITY_COLUMNS:
        for value in CLINICAL[column]:
            assert value.encode() not in data
    survivors = [v for v in clinical.identity_values if v.encode() in data]
    assert survivors == []
    assert "Kim Minjun" in clinical.identity_values and "850312-2345678" in clinical.identity_values
    assert all(len(v.encode()) >= 6 for v in clinical.identity_values)
    assert clinical.patient_ids == set(CLINICAL["patient_id"])


def test_columns_dropped_kept_and_replaced(clinical, pz):
    frame = clinical.frame
    for column in ("name", "name_en", "rrn", "birth_date", "phone", "address", "institution",
                   "notes"):
        assert column not in frame.columns and column in clinical.dropped_columns
    for column in ("age", "sex", "height_cm", "smoking", "cxr_label", "ct_nodule_count"):
        assert list(frame[column]) == list(CLINICAL[column])
        assert clinical.actions[column] == "kept"
    assert all(is_patient_pseudonym(p) for p in frame["patient_id"])
    assert list(frame["patient_id"]) == [pz.patient_pseudonym(p) for p in CLINICAL["patient_id"]]
    assert frame["patient_id"][2] != pz.patient_pseudonym("31337")  # leading zeros matter


def test_same_patient_same_pseudonym_accession_uid_and_date_shift_as_dicom(clinical, pz):
    dicom = deidentify_dicom(make_ct_slice(), pz).dataset
    row = clinical.frame.iloc[0]
    assert row["patient_id"] == dicom.PatientID
    assert row["accession_ct"] == dicom.AccessionNumber
    table_shift = (dt.date.fromisoformat(row["visit_date"]) - dt.date(2023, 1, 15)).days
    dicom_shift = (dt.datetime.strptime(dicom.StudyDate, "%Y%m%d").date()
                   - dt.date(2023, 1, 15)).days
    assert table_shift == dicom_shift == pz.date_shift_days(MRN)
    nodules = deidentify_table(NODULES, pz)
    assert set(nodules.frame.loc[nodules.frame["patient_id"] == dicom.PatientID, "series_uid"]) \
        == {dicom.SeriesInstanceUID}
    assert table_findings(nodules.frame, "nodules.csv") == []
    assert list(nodules.frame["diameter_mm"]) == list(NODULES["diameter_mm"])


def test_each_patient_has_its_own_shift(clinical, pz):
    shifts = {(dt.date.fromisoformat(after) - dt.date.fromisoformat(before)).days
              for before, after in zip(CLINICAL["visit_date"], clinical.frame["visit_date"])}
    assert len(shifts) == 3 and all(-730 <= s <= -30 for s in shifts)


def test_dates_without_a_patient_column_are_refused(pz):
    frame = pd.DataFrame({"scan_date": ["2023-01-15", "2023-02-01"], "hu": ["1", "2"]})
    with pytest.raises(IngestRefused, match="no patient-id column") as caught:
        deidentify_table(frame, pz, relpath="scans.csv")
    assert caught.value.findings == ["scans.csv: column 'scan_date' (dates without a "
                                     "patient-id column)"]


def test_empty_cells_stay_empty_and_datetime_columns_shift(pz):
    frame = pd.DataFrame({"mrn": [MRN, "", "20481358"],
                          "exam_date": ["2023-01-15", "2023-01-20", ""],
                          "when": pd.to_datetime(["2023-01-15", "2023-01-16", "2023-01-17"])})
    out = deidentify_table(frame, pz).frame
    assert out["mrn"][1] == "" and out["exam_date"][2] == ""
    assert out["exam_date"][1] in (None, "")  # a date without its patient cannot be kept
    assert (out["when"][0] - frame["when"][0]).days == pz.date_shift_days(MRN)
    assert table_findings(out, "t.csv") == []


def test_korean_headers(pz):
    frame = pd.DataFrame({"환자번호": [MRN, "20481358", "20481359"],
                          "성명": ["김민준", "이서연", "박지호"],
                          "주민등록번호": ["8503122345678", "9201012234567", "0105053123456"],
                          "연락처": ["01023456789", "01098765432", "0234101234"],
                          "검사일자": ["2023.01.15", "2023.02.01", "2023.03.03"],
                          "진단": ["폐결절", "정상", "폐결절"]})
    findings = table_findings(frame, "k.csv")
    assert {f.split("'")[1] for f in findings} == {"환자번호", "성명", "주민등록번호", "연락처", "검사일자"}
    result = deidentify_table(frame, pz)
    assert list(result.frame.columns) == ["환자번호", "검사일자", "진단"]
    assert result.frame["검사일자"][0].count(".") == 2  # spelling kept
    assert table_findings(result.frame, "k.csv") == []


def test_read_csv_table_keeps_leading_zeros(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("patient_id,이름\n00031337,김민준\n".encode("cp949"))
    frame = read_csv_table(path)
    assert frame["patient_id"][0] == "00031337" and frame["이름"][0] == "김민준"


def test_free_text_found_by_content_is_dropped(pz):
    frame = pd.DataFrame({
        "patient_id": [MRN, "20481358", "20481359"],
        "remark_kr": ["외래 방문 후 추가 검사 예정이며 결과는 다음 주에 설명함",
                      "특이 사항 없음 다음 방문 시 재평가 예정", "흉부 CT 추적 검사 권고 6개월 후 재촬영"],
        "grade": ["A", "B", "A"],
    })
    result = deidentify_table(frame, pz)
    assert list(result.frame.columns) == ["patient_id", "grade"]
    assert result.actions["remark_kr"] == "dropped (free text)"
