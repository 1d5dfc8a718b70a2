"""Text recognizers: identifiers they must find, and look-alikes they must leave alone."""

from __future__ import annotations

import pytest

from medzone_hub.screen.recognizers import (BIRTH_DATE, EMAIL, PERSON_NAME, PHONE, RRN,
                                            classify_column_name, find_identifiers,
                                            looks_like_person_name, looks_like_uid, parse_date,
                                            rrn_check_digit_valid)


def spans(text: str, kind: str | None = None, min_confidence: float = 0.5) -> list[str]:
    return [text[m.start:m.end] for m in find_identifiers(text, min_confidence=min_confidence)
            if kind is None or m.kind == kind]


def confidence(text: str, kind: str) -> float:
    return max(m.confidence for m in find_identifiers(text) if m.kind == kind)


# --- resident registration numbers -----------------------------------------------------

@pytest.mark.parametrize("text, rrn", [
    ("주민등록번호: 850312-2345678", "850312-2345678"),
    ("RRN 8503122345678 on file", "8503122345678"),
    ("８５０３１２－２３４５６７８", "８５０３１２－２３４５６７８"),  # full-width digits and dash
    ("850312 - 2345678", "850312 - 2345678"),
    ("masked 850312-2******", "850312-2******"),
    ("foreigner 010101-5123456", "010101-5123456"),
])
def test_rrn_found(text, rrn):
    assert spans(text, RRN) == [rrn]


def test_rrn_check_digit_raises_confidence_but_never_rejects():
    valid, invalid = "8501011234566", "8501011234561"
    assert rrn_check_digit_valid(valid) and not rrn_check_digit_valid(invalid)
    # numbers issued since October 2020 carry no valid check digit: still found
    assert spans(f"{invalid[:6]}-{invalid[6:]}", RRN)
    assert (confidence(f"{valid[:6]}-{valid[6:]}", RRN)
            > confidence(f"{invalid[:6]}-{invalid[6:]}", RRN))


@pytest.mark.parametrize("text", [
    "Order 1234567890123",                     # month 56: not a birth date
    "UID 1.2.410.200001.8503122345678.1",      # inside a dotted UID
    "volume 8503122345678.5 mm3",              # a decimal
    "850312-9345678",                          # sex digit 9 is not issued since 1900
    "85031223456789",                          # 14 digits
])
def test_rrn_look_alikes_ignored(text):
    assert spans(text, RRN, min_confidence=0) == []


# --- phone numbers ---------------------------------------------------------------------

@pytest.mark.parametrize("text, phone", [
    ("연락처 010-1234-5678", "010-1234-5678"),
    ("mobile 010 1234 5678", "010 1234 5678"),
    ("010.1234.5678", "010.1234.5678"),
    ("01012345678", "01012345678"),
    ("011-234-5678", "011-234-5678"),
    ("tel: 02-3410-1234", "02-3410-1234"),
    ("(02) 123-4567", "(02) 123-4567"),
    ("031-123-4567", "031-123-4567"),
    ("064.123.4567", "064.123.4567"),
    ("+82 10-1234-5678", "+82 10-1234-5678"),
    ("+82-2-3410-1234", "+82-2-3410-1234"),
    ("+82 (0)10 1234 5678", "+82 (0)10 1234 5678"),
    ("070-1234-5678", "070-1234-5678"),
    ("대표전화 1588-1234", "1588-1234"),
    ("휴대폰010-1234-5678로 연락", "010-1234-5678"),
])
def test_phone_found(text, phone):
    assert spans(text, PHONE) == [phone]


@pytest.mark.parametrize("text", [
    "HU -1000 to 400, window 1500/-600",
    "nodule 12.5 mm, volume 1023.4567 mm3",
    "window 1500-2000 HU",
    "study 2023-01-15 series 3",
    "slice 0001 of 0120",
    "pixel spacing 0.703125",
    "1234-5678",
    "accession CT2023011500042",
    "UID 1.2.410.200013.1.01012345678",
    "2.25.101234567812345678901234567890",
])
def test_phone_look_alikes_ignored(text):
    assert spans(text, PHONE) == []


def test_unseparated_landline_is_low_confidence():
    assert confidence("0234101234", PHONE) < confidence("02-3410-1234", PHONE)


# --- e-mail ----------------------------------------------------------------------------

def test_email():
    assert spans("mail kim.minjun+ct@hospital.example.co.kr now", EMAIL) == [
        "kim.minjun+ct@hospital.example.co.kr"]
    assert spans("ratio 3@5 and user@localhost", EMAIL) == []


# --- dates of birth --------------------------------------------------------------------

@pytest.mark.parametrize("text, date", [
    ("DOB 1985-03-12", "1985-03-12"),
    ("date of birth: 12/03/1985", "12/03/1985"),
    ("born March 12, 1985 in Seoul", "March 12, 1985"),
    ("생년월일: 1985년 3월 12일", "1985년 3월 12일"),
    ("생년월일 850312", "850312"),
    ("birth_date=19850312", "19850312"),
])
def test_birth_date_found_near_birth_words(text, date):
    assert spans(text, BIRTH_DATE) == [date]


@pytest.mark.parametrize("text", [
    "Study date 2023-01-15",
    "follow-up on 12/03/2024",
    "visit 20230115",
    "acquired 2023년 1월 15일",
    "850312",
])
def test_dates_outside_birth_context_ignored(text):
    assert spans(text, min_confidence=0) == []


def test_only_the_date_after_the_birth_word_is_a_birth_date():
    assert spans("DOB 1985-03-12, scanned 2023-01-15", BIRTH_DATE) == ["1985-03-12"]


def test_parse_date():
    assert str(parse_date("2023-01-15")) == str(parse_date("2023.1.15")) == "2023-01-15"
    assert str(parse_date("20230115")) == str(parse_date("2023-01-15T10:30:00")) == "2023-01-15"
    assert parse_date("2023년 1월 15일").isoformat() == "2023-01-15"
    assert parse_date("20231345") is None and parse_date("12.5") is None


# --- person names ----------------------------------------------------------------------

@pytest.mark.parametrize("text, name", [
    ("환자 김민준 (남/37)", "김민준"),
    ("김민준 님 CT 예약", "김민준"),
    ("성명: 남궁민수", "남궁민수"),
    ("보호자 이서연씨 연락", "이서연"),
    ("환자김민준 내원", "김민준"),
    ("김훈 님 내원", "김훈"),
    ("Patient Kim Minjun referred", "Kim Minjun"),
    ("Name: Minjun Kim", "Minjun Kim"),
    ("Dr. John Smith reviewed", "John Smith"),
    ("stored as Kim^Minjun=김^민준 here", "Kim^Minjun=김^민준"),
])
def test_names_found_in_identifying_context(text, name):
    assert spans(text, PERSON_NAME) == [name]


@pytest.mark.parametrize("text", [
    "정상 소견, 이상 없음",
    "우측 상엽 결절, 조영 증강",
    "김치 먹음",                     # a surname syllable starting an ordinary word
    "환자 안전 교육",                 # context word before an ordinary two-syllable word
    "Patient Positioning Supine",
    "No Findings",
    "Kim Minjun",                    # a romanised name with no context is not flagged in text
    "MZP-K7Q2Z9XH41",
])
def test_name_look_alikes_ignored(text):
    assert spans(text, PERSON_NAME) == []


@pytest.mark.parametrize("value", [
    "Kim^Minjun", "Kim^Minjun=김^민준", "김^민준", "김민준", "김 민준", "남궁민수", "Kim Minjun",
    "KIM MIN JUN", "Minjun Kim", "Park, Jisoo", "Seo-yeon Choi", "Doe^John",
])
def test_looks_like_person_name(value):
    assert looks_like_person_name(value)


@pytest.mark.parametrize("value", [
    "", "ANONYMOUS", "ANONYMOUS^", "MZP-K7Q2Z9XH41", "LIDC-IDRI-0001", "정상", "이상", "우측",
    "nodule", "former", "No Findings", "Lee Side", "SIEMENS", "CHEST PA", "12^34", "T-D3000",
])
def test_not_person_names(value):
    assert not looks_like_person_name(value)


def test_matches_are_spans_without_overlaps():
    text = "Patient Kim Minjun (RRN 850312-2345678), call 010-2345-6789, kim@example.com"
    matches = find_identifiers(text)
    assert [m.kind for m in matches] == [PERSON_NAME, RRN, PHONE, EMAIL]
    assert all(0 <= m.start < m.end <= len(text) and 0 < m.confidence < 1 for m in matches)
    assert all(a.end <= b.start for a, b in zip(matches, matches[1:]))


# --- column names and UIDs -------------------------------------------------------------

@pytest.mark.parametrize("column, kind", [
    ("patient_id", "patient_id"), ("PatientID", "patient_id"), ("MRN", "patient_id"),
    ("환자번호", "patient_id"), ("name", "name"), ("name_en", "name"), ("이름", "name"),
    ("성명", "name"), ("PatientName", "name"), ("rrn", "rrn"), ("주민등록번호", "rrn"),
    ("phone", "phone"), ("tel_no", "phone"), ("연락처", "phone"), ("휴대전화", "phone"),
    ("address", "address"), ("주소", "address"), ("zip_code", "address"), ("email", "email"),
    ("birth_date", "birth_date"), ("DOB", "birth_date"), ("생년월일", "birth_date"),
    ("institution", "institution"), ("병원명", "institution"),
    ("referring_physician", "physician"), ("accession_ct", "accession"),
    ("series_uid", "uid"), ("SeriesInstanceUID", "uid"), ("visit_date", "date"),
    ("StudyDate", "date"), ("검사일자", "date"), ("notes", "free_text"), ("비고", "free_text"),
])
def test_classify_column_name(column, kind):
    assert classify_column_name(column) == kind


@pytest.mark.parametrize("column", ["age", "sex", "height_cm", "smoking", "pack_years",
                                    "cxr_label", "nodule_id", "diameter_mm", "file_name",
                                    "series_name", "cell_count", "hu_mean"])
def test_innocent_columns(column):
    assert classify_column_name(column) is None


def test_looks_like_uid():
    assert looks_like_uid("1.2.840.10008.5.1.4.1.1.2")
    assert looks_like_uid("2.25.123456789012345678901234567890")
    assert not looks_like_uid("1.25") and not looks_like_uid("2023.01.15")
    assert not looks_like_uid("1.02.3.4.5") and not looks_like_uid("a.b.c.d")
