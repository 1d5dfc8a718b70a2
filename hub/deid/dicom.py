"""DICOM: why a file is identifying (findings), and its de-identified copy.

De-identification applies the PS3.15 Annex E basic profile from :mod:`.profile` with the
Retain Longitudinal Temporal Information (Modified Dates) and Retain Patient Characteristics
options: patient id and name become the keyed pseudonym, UIDs are remapped consistently,
dates move by the patient's shift, private and free-text attributes go, and geometry,
pixels and acquisition parameters stay. Findings never contain a value, only where it is.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Iterator

from ..errors import IngestRefused, InvalidInput
from ..lazyimport import lazy_import
from ..screen.recognizers import (PERSON_NAME, describe_kinds, find_identifiers,
                                  looks_like_person_name)
from .profile import BASIC_PROFILE_CODE, OPTION_CODES, basic_profile
from .pseudonym import Pseudonymizer, identity_variants, shift_date_by

if TYPE_CHECKING:
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

pydicom = lazy_import("pydicom")

#: String VRs whose values are scanned by the recognizers.
TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_FREE_TEXT_KEYWORD_RE = re.compile(r"(Description|Comments?|Notes|Narrative|Remarks|TextValue)$")
DATE_VRS = frozenset({"DA", "DT"})
#: Kept under the Retain Patient Characteristics Option (clinical covariates, not identities).
RETAINED_CHARACTERISTICS = frozenset({"PatientSex", "PatientAge", "PatientSize", "PatientWeight"})
#: Replaced (not removed) by de-identification; acceptable when PatientIdentityRemoved is YES.
REPLACED_BY_DEIDENTIFICATION = frozenset({"PatientName", "PatientID", "AccessionNumber"})
#: What a "D" (dummy) action writes into a text attribute.
DUMMY_TEXT = "REMOVED"
#: File meta attributes that name the sending system.
_FILE_META_REMOVED = frozenset({0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102})
#: Standard UIDs (SOP classes, transfer syntaxes, coding schemes) are not about the patient.
_STANDARD_UID_ROOT = "1.2.840.10008."
_CLASS_UID_KEYWORD_RE = re.compile(r"(ClassUID|TransferSyntaxUID|CodingSchemeUID)$")
#: Attributes whose original value is an identity to prove absent from the output.
IDENTITY_KEYWORDS = frozenset({
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "PatientAddress",
    "PatientTelephoneNumbers", "PatientTelecomInformation", "PatientBirthDate",
    "PatientBirthName", "PatientMotherBirthName", "OtherPatientNames", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "AccessionNumber", "StudyID", "MedicalRecordLocator",
    "RegionOfResidence", "MilitaryRank", "BranchOfService", "ResponsibleOrganization",
    "ResponsiblePerson", "DeviceSerialNumber", "StationName", "AdmissionID", "ServiceEpisodeID",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID",
    "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "PatientInstitutionResidence",
    "CurrentPatientLocation"})
MIN_UID_IDENTITY_CHARS = 12
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_MIN_CONFIDENCE = 0.5


# --- reading elements ------------------------------------------------------------------

def _label(elem: DataElement) -> str:
    return elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"


def _values(elem: DataElement) -> list:
    value = elem.value
    if value is None:
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [v for v in value if v not in (None, "")]
    return [] if value in ("", b"") else [value]


def _is_empty(elem: DataElement) -> bool:
    if elem.VR == "SQ":
        return len(elem.value or []) == 0
    return not _values(elem)


def _strings(elem: DataElement) -> list[str]:
    """Text values of an element; short byte values (private, UN) decoded leniently."""
    out = []
    for value in _values(elem):
        if isinstance(value, bytes):
            if len(value) > 4096:
                continue  # binary blobs, not text
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                text = value.decode("latin-1")
            text = text.strip("\x00 ")
            if text and sum(ch.isprintable() for ch in text) >= 0.9 * len(text):
                out.extend(part for part in text.split("\\") if part.strip())
        elif elem.VR in TEXT_VRS or elem.VR == "UN":
            out.append(str(value))
    return out


def _identity_removed(ds: Dataset) -> bool:
    return str(ds.get("PatientIdentityRemoved", "")).strip().upper() == "YES"


def _burned_in_reason(ds: Dataset) -> str | None:
    burned = str(ds.get("BurnedInAnnotation", "")).strip().upper()
    if burned == "YES":
        return "BurnedInAnnotation (burned-in annotation in the pixel data)"
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "")).upper()
    if burned != "NO" and (sop_class.startswith(_SECONDARY_CAPTURE_PREFIX) or modality == "US"):
        return ("BurnedInAnnotation (secondary capture or ultrasound image that does not state "
                "BurnedInAnnotation NO: it may carry burned-in text)")
    return None


# --- findings --------------------------------------------------------------------------

def _kept_by_deidentification(elem: DataElement, action: str) -> bool:
    """Annex E attributes that a proper de-identification leaves present with new values."""
    keyword = elem.keyword
    if keyword in REPLACED_BY_DEIDENTIFICATION or keyword in RETAINED_CHARACTERISTICS:
        return True
    if elem.VR == "UI" or "U" in action:
        return True
    if elem.VR in ("DA", "DT", "TM"):
        return keyword != "PatientBirthDate"
    return all(str(v) == DUMMY_TEXT for v in _values(elem))


@lru_cache(maxsize=1 << 16)
def _text_kinds(vr: str, text: str) -> frozenset[str]:
    """Identifier kinds in one text value (cached: every slice of a series repeats them)."""
    kinds = {m.kind for m in find_identifiers(text, min_confidence=_MIN_CONFIDENCE)}
    if vr == "PN" and looks_like_person_name(text):
        kinds.add(PERSON_NAME)
    return frozenset(kinds)


def _value_reasons(elem: DataElement) -> list[str]:
    kinds: set[str] = set()
    for text in _strings(elem):
        kinds |= _text_kinds(elem.VR, text)
    return [describe_kinds(kinds)] if kinds else []


def _private_block(elem: DataElement) -> str:
    tag = elem.tag
    block = tag.element & 0xFF if tag.is_private_creator else tag.element >> 8
    return f"({tag.group:04X},{block:02X}xx)"


def _dataset_findings(ds: Dataset, prefix: str, deidentified: bool,
                      private_blocks: dict[str, None]) -> Iterator[str]:
    profile = basic_profile()
    for elem in ds:
        if elem.tag.is_private:
            private_blocks[prefix + _private_block(elem)] = None
            continue
        path = prefix + _label(elem)
        reasons = []
        action = profile.action_for(elem.tag)
        if action and not _is_empty(elem) and not (
                deidentified and _kept_by_deidentification(elem, action)):
            reasons.append(f"PS3.15 basic profile action {action}")
        if elem.VR == "SQ":
            if reasons:
                yield f"{path} ({'; '.join(reasons)})"
                continue
            for i, item in enumerate(elem.value or []):
                yield from _dataset_findings(item, f"{path}[{i}].", deidentified, private_blocks)
            continue
        reasons += _value_reasons(elem)
        if reasons:
            yield f"{path} ({'; '.join(reasons)})"


def _masked_path(relpath: str, ds: Dataset) -> str:
    """The path with any folder or file name that carries the patient's id or name masked:
    sources are often laid out per patient (``<MRN>/CT/0001.dcm``)."""
    patient_id = str(ds.get("PatientID", "") or "").strip()
    names = {p for group in str(ds.get("PatientName", "") or "").split("=")
             for p in group.split("^") if len(p.strip().encode()) >= 4}
    parts = relpath.split("/")
    for i, part in enumerate(parts):
        if (len(patient_id) >= 3 and patient_id in part) or any(n in part for n in names):
            parts[i] = "<PatientID>" if patient_id and patient_id in part else "<PatientName>"
    return "/".join(parts)


def dicom_findings(ds: Dataset, relpath) -> list[str]:
    """Why this file is identifying, as ``"<relpath>: <Keyword or (gggg,eeee)> (<reason>)"``
    (folder names in ``relpath`` that carry the patient's id or name are masked).

    Reported: burned-in annotation; private attributes (once per private block); non-empty
    Annex E attributes, except those a de-identification leaves with replaced values
    (pseudonymous patient id and name, remapped UIDs, shifted dates, dummy accession,
    retained patient characteristics), accepted only when PatientIdentityRemoved is YES;
    person names in any PN element; recognizer hits in any text element; sequences too.
    """
    relpath = _masked_path(str(relpath), ds)
    deidentified = _identity_removed(ds)
    found = []
    burned = _burned_in_reason(ds)
    if burned:
        found.append(burned)
    private_blocks: dict[str, None] = {}
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        found += _dataset_findings(meta, "", deidentified, private_blocks)
    found += _dataset_findings(ds, "", deidentified, private_blocks)
    found += [f"{block} (private attributes)" for block in private_blocks]
    return [f"{relpath}: {item}" for item in found]


# --- identity values -------------------------------------------------------------------

@lru_cache(maxsize=1 << 16)
def _identity_in_text(vr: str, identity_attribute: bool, text: str) -> frozenset[str]:
    found: set[str] = set()
    if vr == "PN" or looks_like_person_name(text):
        found |= identity_variants(text, person_name=True)
    if identity_attribute:
        found |= identity_variants(text)
    for match in find_identifiers(text, min_confidence=_MIN_CONFIDENCE):
        found |= identity_variants(text[match.start:match.end],
                                   person_name=match.kind == PERSON_NAME)
    return frozenset(found)


def clear_caches() -> None:
    """Forget the per-value caches (they hold original header text): call after an ingest
    in a long-running process."""
    _text_kinds.cache_clear()
    _identity_in_text.cache_clear()


def _identity_of(elem: DataElement) -> set[str]:
    """Original identifying strings carried by one (non-sequence) element."""
    found: set[str] = set()
    uid_remapped = elem.VR == "UI"
    for text in _strings(elem) if not uid_remapped else [str(v) for v in _values(elem)]:
        if uid_remapped:
            if len(text) >= MIN_UID_IDENTITY_CHARS and not text.startswith(_STANDARD_UID_ROOT):
                found.add(text)
            continue
        found |= _identity_in_text(elem.VR, elem.keyword in IDENTITY_KEYWORDS, text)
    if elem.VR == "DA" and elem.keyword in IDENTITY_KEYWORDS:
        for value in _values(elem):
            found |= identity_variants(str(value), date=True)
    return found


def _identity_of_tree(elem: DataElement) -> set[str]:
    if elem.VR != "SQ":
        return _identity_of(elem)
    found: set[str] = set()
    for item in elem.value or []:
        for child in item:
            found |= _identity_of_tree(child)
    return found


# --- de-identification -----------------------------------------------------------------

@dataclass
class DicomDeidResult:
    """The de-identified copy; ``patient_id`` is the ORIGINAL PatientID (kept in memory only,
    e.g. to rename a source folder after its patient), ``pseudonym`` what replaced it."""

    dataset: Dataset
    patient_id: str
    identity_values: set[str]
    pseudonym: str = ""
    removed: list[str] = field(default_factory=list)


def _dummy(vr: str):
    if vr in ("DS", "IS"):
        return "0"
    if vr in ("FL", "FD", "SL", "SS", "UL", "US", "SV", "UV"):
        return 0
    if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        return b""
    return DUMMY_TEXT


def _empty(elem: DataElement) -> None:
    elem.value = [] if elem.VR == "SQ" else ("" if elem.VR in TEXT_VRS or elem.VR in (
        "DA", "DT", "TM", "AS", "UI", "DS", "IS") else None)


def _is_free_text(elem: DataElement) -> bool:
    return elem.VR in FREE_TEXT_VRS or bool(_FREE_TEXT_KEYWORD_RE.search(elem.keyword or ""))


class _Deidentifier:
    def __init__(self, pz: Pseudonymizer, patient_id: str):
        self.pz = pz
        self.pseudonym = pz.patient_pseudonym(patient_id)
        self.shift = pz.date_shift_days(patient_id)
        self.identity: set[str] = set()
        self.removed: list[str] = []
        self.profile = basic_profile()

    def dataset(self, ds: Dataset, prefix: str = "") -> None:
        for elem in list(ds):
            self.element(ds, elem, prefix)

    def _delete(self, ds: Dataset, elem: DataElement, prefix: str) -> None:
        self.removed.append(prefix + _label(elem))
        del ds[elem.tag]

    def element(self, ds: Dataset, elem: DataElement, prefix: str) -> None:
        self.identity |= _identity_of_tree(elem)
        keyword, vr = elem.keyword, elem.VR
        if elem.tag.is_private:
            self._delete(ds, elem, prefix)
            return
        action = self.profile.action_for(elem.tag)
        if keyword == "PatientID":
            values = _values(elem)  # nested ones (other sequences) get their own pseudonym
            elem.value = self.pz.patient_pseudonym(str(values[0])) if values else ""
        elif keyword == "PatientName":
            elem.value = self.pseudonym
        elif keyword == "AccessionNumber":
            if not _is_empty(elem):
                elem.value = self.pz.accession(str(_values(elem)[0]))
        elif keyword == "PatientBirthDate":
            elem.value = ""  # the age is kept instead; a birth date identifies
        elif keyword in RETAINED_CHARACTERISTICS:
            pass
        elif vr == "SQ":
            self._sequence(ds, elem, action, prefix)
        elif vr == "UI":
            self._uid(ds, elem, action, prefix)
        elif vr in DATE_VRS:
            self._date(ds, elem, action, prefix)
        elif vr == "TM":
            # Whole-day shifts keep times meaningful and harmless; removed only where X.
            if action == "X":
                self._delete(ds, elem, prefix)
        elif action is not None:
            self._apply(ds, elem, action, prefix)
        elif _is_free_text(elem) or (vr == "PN" and not _is_empty(elem)):
            self._delete(ds, elem, prefix)
        elif (vr in TEXT_VRS or vr == "UN") and _value_reasons(elem):
            self._delete(ds, elem, prefix)  # an identifier where none was expected

    def _apply(self, ds: Dataset, elem: DataElement, action: str, prefix: str) -> None:
        # Of a combined action ("X/Z/D") the most removing choice is taken.
        if "X" in action:
            self._delete(ds, elem, prefix)
        elif "Z" in action:
            _empty(elem)
        elif "D" in action:
            if not _is_empty(elem):
                elem.value = _dummy(elem.VR)
        elif "U" in action and not _is_empty(elem):
            elem.value = [self.pz.remap_uid(v) for v in _values(elem)]

    def _sequence(self, ds: Dataset, elem: DataElement, action: str | None, prefix: str) -> None:
        if action is None or "U" in action:
            path = prefix + _label(elem)
            for i, item in enumerate(elem.value or []):
                self.dataset(item, f"{path}[{i}].")
        elif "X" in action:
            self._delete(ds, elem, prefix)
        else:
            elem.value = pydicom.sequence.Sequence()

    def _uid(self, ds: Dataset, elem: DataElement, action: str | None, prefix: str) -> None:
        if action == "X":
            self._delete(ds, elem, prefix)
            return
        if action is None and _CLASS_UID_KEYWORD_RE.search(elem.keyword or ""):
            return
        remapped = [v if str(v).startswith(_STANDARD_UID_ROOT) or str(v) in pydicom.uid.UID_dictionary
                    or not str(v).strip("\x00 ") else self.pz.remap_uid(str(v))
                    for v in _values(elem)]
        if remapped:
            elem.value = remapped if len(remapped) > 1 else remapped[0]

    def _date(self, ds: Dataset, elem: DataElement, action: str | None, prefix: str) -> None:
        if action == "X":
            self._delete(ds, elem, prefix)
            return
        try:
            shifted = [shift_date_by(str(v), self.shift) for v in _values(elem)]
        except InvalidInput:
            self._delete(ds, elem, prefix)  # an unreadable date cannot be kept as it is
            return
        if shifted:
            elem.value = shifted if len(shifted) > 1 else shifted[0]


def _mark_deidentified(ds: Dataset, profile_version: str) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [f"PS3.15 E basic profile {profile_version}"[:64],
                                 "MedZone keyed pseudonyms, per-patient date shift"]
    codes = []
    for value, meaning in (BASIC_PROFILE_CODE, *OPTION_CODES):
        item = pydicom.dataset.Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    ds.LongitudinalTemporalInformationModified = "MODIFIED"


def _deidentify_file_meta(ds: Dataset, worker: _Deidentifier) -> None:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for elem in list(meta):
        if elem.tag in _FILE_META_REMOVED:
            worker.identity |= _identity_of(elem)
            del meta[elem.tag]
    original = str(meta.get("MediaStorageSOPInstanceUID", "") or "").strip("\x00 ")
    if original:
        worker.identity |= _identity_of(meta["MediaStorageSOPInstanceUID"])
        meta.MediaStorageSOPInstanceUID = (ds.SOPInstanceUID if "SOPInstanceUID" in ds
                                           else worker.pz.remap_uid(original))


def deidentify_dicom(ds: Dataset, pz: Pseudonymizer, *, relpath: str = "",
                     in_place: bool = False) -> DicomDeidResult:
    """A de-identified copy of ``ds`` (the input is not modified); with ``in_place``, ``ds``
    itself is de-identified and returned (no deep copy: what an ingest does with a dataset
    it has just read and will not use otherwise).

    Refuses (``IngestRefused``) images with burned-in annotation and datasets without a
    PatientID (the pseudonym and date shift are keyed on it).
    """
    where = f"{relpath}: " if relpath else ""
    burned = _burned_in_reason(ds)
    if burned:
        why = ("it has burned-in annotation (BurnedInAnnotation YES)" if burned.startswith(
            "BurnedInAnnotation (burned-in") else "it may have burned-in text (a secondary "
            "capture or ultrasound image that does not state BurnedInAnnotation NO)")
        raise IngestRefused(
            f"{where}image refused: {why}; text in the pixels cannot be removed by header "
            f"de-identification", [f"{relpath or 'DICOM'}: {burned}"])
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if not patient_id:
        raise IngestRefused(f"{where}PatientID is empty: pseudonyms and date shifts are keyed "
                            f"on it", [f"{relpath or 'DICOM'}: PatientID (empty)"])
    out = ds if in_place else copy.deepcopy(ds)
    worker = _Deidentifier(pz, patient_id)
    worker.dataset(out)
    _deidentify_file_meta(out, worker)
    _mark_deidentified(out, basic_profile().version)
    # A removed value that a kept, non-identifying attribute also holds (an InstitutionName
    # equal to the Manufacturer) is not an identity: searching for it would refuse clean output.
    kept = _kept_texts(out)
    identity = {v for v in worker.identity if not any(v in text for text in kept)}
    return DicomDeidResult(out, patient_id, identity, worker.pseudonym, worker.removed)


def _kept_texts(ds: Dataset) -> set[str]:
    """Text and UIDs the de-identified copy keeps as they were (its own values excluded)."""
    texts: set[str] = set()
    meta = getattr(ds, "file_meta", None)
    for elem in [*(meta.iterall() if meta is not None else ()), *ds.iterall()]:
        if elem.keyword in REPLACED_BY_DEIDENTIFICATION:
            continue
        if elem.VR in TEXT_VRS:
            texts.update(_strings(elem))
        elif elem.VR == "UI":
            texts.update(str(v) for v in _values(elem) if not str(v).startswith("2.25."))
    return texts
