"""Keyed, deterministic pseudonyms: the same input gives the same output in every file, so
DICOM headers and CSV tables stay linked, yet nothing maps back without the provider's key.

Every value is derived from HMAC-SHA256 under the data provider's key, with a separate
purpose label per kind of value, so a patient pseudonym cannot be compared with a UID. No
table of real identities is kept: re-identification, if ever needed, recomputes pseudonyms
from the source with the key, outside the zone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re

from ..errors import InvalidInput
from ..screen.recognizers import HANGUL_COMPOUND_SURNAMES, parse_date

PATIENT_PREFIX = "MZP"
ACCESSION_PREFIX = "MZA"
MIN_KEY_BYTES = 16
#: Identity values shorter than this are not searched for in output bytes (a 3-byte Hangul
#: surname would match random pixel data by chance).
MIN_IDENTITY_BYTES = 6
#: A digits-only value needs this many digits: a 6-digit study id turns up by chance inside
#: the 39-digit 2.25 UIDs of a large dataset (about one position in a million matches).
MIN_IDENTITY_DIGITS = 8
#: A two-syllable Hangul given name alone is also an everyday word (하나, 태양 …).
MIN_HANGUL_PART_SYLLABLES = 3
_PLACEHOLDERS = frozenset({"unknown", "anonymous", "anonymized", "none", "n/a", "removed",
                           "patient", "redacted", "deidentified"})
#: Dates move back by 30–730 days: never zero (a zero shift would keep the real date) and
#: per patient (one global shift is undone by a single known date).
SHIFT_DAYS_MIN, SHIFT_DAYS_MAX = 30, 730

# Crockford base 32: no I, L, O or U, so codes are unambiguous when read aloud or retyped.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_LETTERS = _CROCKFORD[10:]
_CODE_RE = re.compile(r"^(MZP|MZA)-([A-HJKMNP-TV-Z][0-9A-HJKMNP-TV-Z]{8})([0-9])$")


def _check_digit(body: str) -> str:
    return str(sum((i + 1) * _CROCKFORD.index(c) for i, c in enumerate(body)) % 10)


def _is_code(value, prefix: str) -> bool:
    m = _CODE_RE.match(str(value).strip())
    return bool(m) and m.group(1) == prefix and _check_digit(m.group(2)) == m.group(3)


def is_patient_pseudonym(value) -> bool:
    """Whether ``value`` is shaped like a MedZone patient pseudonym (``MZP-…``, check digit ok)."""
    return _is_code(value, PATIENT_PREFIX)


def is_dummy_accession(value) -> bool:
    """Whether ``value`` is shaped like a MedZone dummy accession number (``MZA-…``)."""
    return _is_code(value, ACCESSION_PREFIX)


def _text(value, what: str) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a numeric id column read as float (NaN elsewhere in the column)
    text = str(value).strip().rstrip("\x00").strip()
    if not text:
        raise InvalidInput(f"empty {what}: cannot derive a pseudonym")
    return text


class Pseudonymizer:
    """Pseudonyms, date shifts, UIDs and accession numbers derived from one provider key."""

    def __init__(self, key: bytes):
        if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_BYTES:
            raise InvalidInput(f"the pseudonymization key must be at least {MIN_KEY_BYTES} bytes")
        self._key = bytes(key)

    def _mac(self, purpose: str, value: str) -> bytes:
        message = purpose.encode() + b"\x00" + value.encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _code(self, prefix: str, purpose: str, value: str) -> str:
        n = int.from_bytes(self._mac(purpose, value)[:16], "big")
        # A letter first, so the code never reads as a number (a phone, a date) to a screen.
        body = _CROCKFORD_LETTERS[n % len(_CROCKFORD_LETTERS)]
        n //= len(_CROCKFORD_LETTERS)
        for _ in range(8):
            body += _CROCKFORD[n % 32]
            n //= 32
        return f"{prefix}-{body}{_check_digit(body)}"

    def patient_pseudonym(self, patient_id) -> str:
        """``MZP-`` + 10 characters (letters and digits, the last a check digit)."""
        return self._code(PATIENT_PREFIX, "patient", _text(patient_id, "patient id"))

    def accession(self, value) -> str:
        """A dummy accession number (``MZA-…``, 14 characters, fits DICOM SH) keyed on ``value``."""
        return self._code(ACCESSION_PREFIX, "accession", _text(value, "accession number"))

    def date_shift_days(self, patient_id) -> int:
        """The patient's date shift: negative, between −730 and −30 days, the same everywhere."""
        mac = self._mac("date-shift", _text(patient_id, "patient id"))
        span = SHIFT_DAYS_MAX - SHIFT_DAYS_MIN + 1
        return -(SHIFT_DAYS_MIN + int.from_bytes(mac[:8], "big") % span)

    def shift_date(self, value, patient_id):
        """``value`` moved by the patient's shift, spelled as it was (:func:`shift_date_by`)."""
        return shift_date_by(value, self.date_shift_days(patient_id))

    def remap_uid(self, uid) -> str:
        """``2.25.<128-bit int>`` (≤ 44 characters): one input UID always gives one output UID."""
        n = int.from_bytes(self._mac("uid", _text(uid, "UID"))[:16], "big")
        return f"2.25.{n}"


# --- moving dates, keeping their spelling ----------------------------------------------

_COMPACT_RE = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?"
                         r"([+-]\d{4})?$")
_SEPARATED_RE = re.compile(r"^(\d{4})([-./])(\d{1,2})(?:\2(\d{1,2}))?([T ].*)?$")
_KOREAN_RE = re.compile(r"^(\d{4})\s*년\s*(\d{1,2})\s*월\s*(\d{1,2})\s*일(.*)$")


def _moved(year: int, month: int, day: int, days: int) -> dt.date:
    return dt.date(year, month, day) + dt.timedelta(days=days)


def _pad(number: int, like: str) -> str:
    return f"{number:0{len(like)}d}" if len(like) == 2 else str(number)


def shift_date_by(value, days: int):
    """Move a date by ``days``, keeping its spelling.

    Accepts DICOM DA (``YYYYMMDD``) and DT (``YYYYMMDDHHMMSS.FFFFFF+ZZZZ``, partial ones too),
    ISO-like ``YYYY-MM-DD`` / ``YYYY.MM.DD`` / ``YYYY/MM/DD`` with an optional time after
    ``T`` or a space, ``YYYY년 M월 D일``, and ``datetime.date``/``datetime``/pandas Timestamp
    objects. A year or year-month alone is moved through its middle day. Raises
    ``InvalidInput`` (without the value) for anything else.
    """
    if isinstance(value, dt.date):  # date, datetime and pandas.Timestamp
        return value + dt.timedelta(days=days)
    text = str(value).strip()
    try:
        m = _COMPACT_RE.match(text)
        if m:
            year, month, day, time, zone = m.groups()
            if month is None:
                return f"{_moved(int(year), 7, 1, days).year:04d}"
            if day is None:
                moved = _moved(int(year), int(month), 15, days)
                return f"{moved.year:04d}{moved.month:02d}"
            moved = _moved(int(year), int(month), int(day), days)
            return f"{moved:%Y%m%d}{time or ''}{zone or ''}"
        m = _SEPARATED_RE.match(text)
        if m:
            year, sep, month, day, rest = m.groups()
            if day is None:
                moved = _moved(int(year), int(month), 15, days)
                return f"{moved.year:04d}{sep}{_pad(moved.month, month)}"
            moved = _moved(int(year), int(month), int(day), days)
            return (f"{moved.year:04d}{sep}{_pad(moved.month, month)}{sep}"
                    f"{_pad(moved.day, day)}{rest or ''}")
        m = _KOREAN_RE.match(text)
        if m:
            moved = _moved(int(m.group(1)), int(m.group(2)), int(m.group(3)), days)
            return f"{moved.year}년 {moved.month}월 {moved.day}일{m.group(4)}"
    except ValueError:
        pass  # month 13, February 30 …
    raise InvalidInput("unrecognised date (expected YYYYMMDD, YYYY-MM-DD or a DICOM DT)")


# --- spellings of real identities, to prove they are gone -----------------------------

def _worth_searching(value: str) -> bool:
    """Whether a byte search for ``value`` in de-identified output can only hit a leak."""
    if len(value.encode("utf-8")) < MIN_IDENTITY_BYTES or value.lower() in _PLACEHOLDERS:
        return False
    if value.isdigit() and len(value) < MIN_IDENTITY_DIGITS:
        return False
    digits = re.sub(r"[\s./-]", "", value)
    # "000000" or "1111-1111" would match unrelated numbers in the output (DS strings …).
    return not (digits.isdigit() and len(set(digits)) < 3)


def _name_parts(group: str) -> list[str]:
    """Family and given parts of one PN group or one written name ("Kim Minjun", "김민준")."""
    if "^" in group:
        return [p.strip() for p in group.split("^") if p.strip()]
    parts = [p for p in re.split(r"[\s,]+", group) if p]
    if len(parts) == 1 and re.fullmatch(r"[가-힣]{2,5}", parts[0]):
        word = parts[0]
        cut = 2 if word[:2] in HANGUL_COMPOUND_SURNAMES and len(word) >= 4 else 1
        parts = [word[:cut], word[cut:]]
    return parts


def identity_variants(value: str, *, person_name: bool = False, date: bool = False) -> set[str]:
    """A value and the spellings it may take elsewhere (separator-free numbers, PN groups and
    name parts, the usual spellings of a date); only those long enough to search for."""
    value = str(value).strip().strip("\x00").strip()
    out = {value}
    if re.fullmatch(r"[\d\s().+-]+|[\d./-]+", value):
        out.add(re.sub(r"[\s().+/.-]", "", value))
    day = parse_date(value) if date else None
    if day is not None:
        out |= {f"{day:%Y%m%d}", f"{day:%Y-%m-%d}", f"{day:%Y.%m.%d}", f"{day:%Y/%m/%d}"}
    if person_name or "^" in value:
        for group in value.split("="):
            parts = _name_parts(group)
            if not parts:
                continue
            out |= {group.strip(), " ".join(parts), "".join(parts), ", ".join(parts)}
            if len(parts) >= 2:
                out |= {f"{parts[1]} {parts[0]}", f"{parts[1]}{parts[0]}"}
            out |= {p for p in parts
                    if not re.fullmatch(r"[가-힣]{1,%d}" % (MIN_HANGUL_PART_SYLLABLES - 1), p)}
    return {v for v in out if _worth_searching(v)}
