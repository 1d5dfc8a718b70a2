"""CSV tables (pandas): why a table is identifying (findings), and its de-identified copy.

Columns are judged by name (English and Korean: name/이름/성명, rrn/주민등록번호, phone/전화,
address/주소 …) and by content (recognizer hits in cells, columns of person names, UIDs,
dates, free text). De-identification keeps the table linked to the DICOM side: the same
keyed pseudonym for the patient id, the same dummy accession numbers, the same remapped
UIDs and the same per-patient date shift.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import IngestRefused
from ..lazyimport import lazy_import
from ..screen.recognizers import (COLUMN_ACCESSION, COLUMN_BIRTH_DATE, COLUMN_DATE,
                                  COLUMN_FREE_TEXT, COLUMN_NAME, COLUMN_PATIENT_ID,
                                  COLUMN_PHYSICIAN, COLUMN_UID, IDENTIFYING_COLUMN_KINDS,
                                  PERSON_NAME, classify_column_name, describe_kinds,
                                  find_identifiers, looks_like_person_name, looks_like_uid,
                                  parse_date)
from .pseudonym import (Pseudonymizer, identity_variants, is_dummy_accession,
                        is_patient_pseudonym)

MIN_CONFIDENCE = 0.5
#: Share of a column's cells that must look like dates / UIDs / names for the column to count.
DATE_SHARE, UID_SHARE, NAME_SHARE = 0.8, 0.9, 0.5
pd = lazy_import("pandas")
_SHORT_NUMBER_RE = re.compile(r"[-+]?\d{1,5}(?:\.\d+)?(?:e[-+]?\d+)?", re.I)


def _is_null(value) -> bool:
    if value is None:
        return True
    try:
        if pd.isna(value):
            return True
    except (TypeError, ValueError):
        return False
    return isinstance(value, str) and not value.strip()


def cell_text(value) -> str:
    """A cell as text: integral floats (an id column read with NaN gaps) lose their ``.0``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _cells(series: pd.Series) -> list[str]:
    """The distinct non-empty cells of a column, as text. Float columns count only when every
    value is integral (ids read with NaN gaps); measurements hold nothing to recognise."""
    if pd.api.types.is_bool_dtype(series.dtype):
        return []
    values = pd.unique(series.dropna())
    if pd.api.types.is_float_dtype(series.dtype) and not all(float(v).is_integer()
                                                              for v in values):
        return []
    return [cell_text(v) for v in values if not _is_null(v)]


@dataclass(frozen=True)
class ColumnAnalysis:
    """What one column is, by its name and by its content."""

    name: str
    name_kind: str | None
    is_uid: bool
    is_date: bool
    is_free_text: bool
    person_names: bool
    identifier_kinds: frozenset[str]
    all_pseudonyms: bool
    all_dummy_accessions: bool
    all_remapped_uids: bool


def _share(cells: list[str], test) -> float:
    return sum(1 for c in cells if test(c)) / len(cells) if cells else 0.0


def _looks_free_text(cells: list[str]) -> bool:
    if not cells:
        return False
    words = [len(c.split()) for c in cells]
    long_share = sum(1 for w in words if w >= 5) / len(cells)
    mean_length = sum(len(c) for c in cells) / len(cells)
    return long_share >= 0.3 or (mean_length >= 40 and sum(words) / len(cells) >= 3)


def _recognized_kinds(cells: list[str]) -> frozenset[str]:
    kinds: set[str] = set()
    for cell in cells:
        if _SHORT_NUMBER_RE.fullmatch(cell):
            continue  # counts and measurements: nothing to recognise, and many of them
        kinds |= {m.kind for m in find_identifiers(cell, min_confidence=MIN_CONFIDENCE)}
    return frozenset(kinds)


def analyse_column(name, series: pd.Series) -> ColumnAnalysis:
    name_kind = classify_column_name(name)
    cells = _cells(series)
    datetime_dtype = pd.api.types.is_datetime64_any_dtype(series.dtype)
    # A bare YYYYMMDD is a date only where the name says so (else: ids, counts).
    is_date = datetime_dtype or _share(cells, lambda c: parse_date(c) is not None and (
        not c.isdigit() or name_kind == COLUMN_DATE)) >= DATE_SHARE
    is_uid = name_kind == COLUMN_UID or _share(cells, looks_like_uid) >= UID_SHARE
    distinct_enough = len(cells) >= min(3, len(series.dropna()))
    person_names = (bool(cells) and distinct_enough
                    and _share(cells, looks_like_person_name) >= NAME_SHARE)
    return ColumnAnalysis(
        name=str(name), name_kind=name_kind, is_uid=bool(cells) and is_uid,
        is_date=bool(cells) and is_date and not is_uid,
        is_free_text=not is_date and not is_uid and _looks_free_text(cells),
        person_names=person_names, identifier_kinds=_recognized_kinds(cells),
        all_pseudonyms=bool(cells) and all(is_patient_pseudonym(c) for c in cells),
        all_dummy_accessions=bool(cells) and all(is_dummy_accession(c) for c in cells),
        all_remapped_uids=bool(cells) and all(c.startswith("2.25.") for c in cells))


def analyse_table(df: pd.DataFrame) -> list[ColumnAnalysis]:
    return [analyse_column(name, df[name]) for name in df.columns]


def _column_reasons(a: ColumnAnalysis, pseudonymized: bool, has_patient_column: bool) -> list[str]:
    reasons = []
    if a.name_kind in IDENTIFYING_COLUMN_KINDS:
        reasons.append(IDENTIFYING_COLUMN_KINDS[a.name_kind])
    elif a.name_kind == COLUMN_PATIENT_ID and not a.all_pseudonyms:
        reasons.append("patient identifiers, not pseudonymized")
    elif a.name_kind == COLUMN_ACCESSION and not a.all_dummy_accessions:
        reasons.append("accession numbers")
    if a.is_uid and not (pseudonymized or a.all_remapped_uids):
        reasons.append("DICOM UIDs, not remapped")
    if a.is_date and a.name_kind not in IDENTIFYING_COLUMN_KINDS and not pseudonymized:
        reasons.append("dates of identifiable patients" if has_patient_column
                       else "dates without a patient-id column (cannot be shifted per patient)")
    kinds = set(a.identifier_kinds)
    if a.person_names:
        kinds.add(PERSON_NAME)
    if kinds and a.name_kind not in IDENTIFYING_COLUMN_KINDS:
        reasons.append(describe_kinds(kinds))
    return reasons


def table_findings(df: pd.DataFrame, relpath) -> list[str]:
    """Why this table is identifying, as ``"<relpath>: column '<name>' (<reason>)"``.

    A table counts as de-identified when it has a patient-id column holding only MedZone
    pseudonyms: its UIDs and dates are then taken as remapped and shifted.
    """
    analyses = analyse_table(df)
    patient_columns = [a for a in analyses if a.name_kind == COLUMN_PATIENT_ID]
    pseudonymized = bool(patient_columns) and all(a.all_pseudonyms for a in patient_columns)
    findings = []
    for a in analyses:
        reasons = _column_reasons(a, pseudonymized, bool(patient_columns))
        if reasons:
            findings.append(f"{relpath}: column '{a.name}' ({'; '.join(reasons)})")
    return findings


# --- de-identification -----------------------------------------------------------------

@dataclass
class TableDeidResult:
    """The de-identified frame; ``patient_ids`` are the ORIGINAL ids (in memory only, e.g. to
    rename source folders), ``actions`` says per original column what was done."""

    frame: pd.DataFrame
    identity_values: set[str]
    dropped_columns: list[str]
    actions: dict[str, str]
    patient_ids: set[str] = field(default_factory=set)


def _identity_in_cells(cells: list[str], *, whole: bool, person_name: bool = False,
                       date: bool = False) -> set[str]:
    """Identity values of a column: whole cells (identifier columns) or, in free text, the
    recognised spans only (a whole note would be searched for verbatim, uselessly)."""
    found: set[str] = set()
    for cell in cells:
        if whole:
            found |= identity_variants(cell, person_name=person_name, date=date)
            continue
        if looks_like_person_name(cell):
            found |= identity_variants(cell, person_name=True)
        for m in find_identifiers(cell, min_confidence=MIN_CONFIDENCE):
            found |= identity_variants(cell[m.start:m.end], person_name=m.kind == PERSON_NAME)
    return found


def _map_cells(series: pd.Series, function) -> pd.Series:
    return series.map(lambda v: v if _is_null(v) else function(cell_text(v)))


class _TableDeidentifier:
    def __init__(self, df: pd.DataFrame, pz: Pseudonymizer, relpath: str):
        self.df, self.pz, self.relpath = df, pz, relpath
        self.out = df.copy()
        self.identity: set[str] = set()
        self.dropped: list[str] = []
        self.actions: dict[str, str] = {}
        self.patient_ids: set[str] = set()

    def drop(self, a: ColumnAnalysis, why: str, *, whole: bool, person_name: bool = False,
             date: bool = False) -> None:
        self.identity |= _identity_in_cells(_cells(self.df[a.name]), whole=whole,
                                            person_name=person_name, date=date)
        self.out = self.out.drop(columns=[a.name])
        self.dropped.append(a.name)
        self.actions[a.name] = f"dropped ({why})"

    def pseudonymize_patients(self, a: ColumnAnalysis) -> None:
        cells = _cells(self.df[a.name])
        self.patient_ids |= set(cells)
        self.identity |= _identity_in_cells(cells, whole=True)
        self.out[a.name] = _map_cells(self.df[a.name], self.pz.patient_pseudonym)
        self.actions[a.name] = "patient id replaced by its keyed pseudonym"

    def replace_accessions(self, a: ColumnAnalysis) -> None:
        self.identity |= _identity_in_cells(_cells(self.df[a.name]), whole=True)
        self.out[a.name] = _map_cells(self.df[a.name], self.pz.accession)
        self.actions[a.name] = "accession numbers replaced by keyed dummies"

    def remap_uids(self, a: ColumnAnalysis) -> None:
        self.identity |= {c for c in _cells(self.df[a.name]) if len(c) >= 12}
        self.out[a.name] = _map_cells(self.df[a.name], self.pz.remap_uid)
        self.actions[a.name] = "UIDs remapped (as in DICOM)"

    def shift_dates(self, a: ColumnAnalysis, patient_column: str) -> None:
        def shifted(value, patient):
            if _is_null(value):
                return value
            if _is_null(patient):
                return None  # no patient, no shift: the date cannot be kept
            try:
                if isinstance(value, pd.Timestamp):
                    return value + pd.Timedelta(days=self.pz.date_shift_days(cell_text(patient)))
                return self.pz.shift_date(cell_text(value), cell_text(patient))
            except Exception:  # an unreadable date is dropped, never kept as it is
                return None

        values = [shifted(v, p) for v, p in zip(self.df[a.name], self.df[patient_column])]
        self.out[a.name] = pd.Series(values, index=self.df.index, dtype=self.df[a.name].dtype
                                     if pd.api.types.is_datetime64_any_dtype(self.df[a.name])
                                     else object)
        self.actions[a.name] = f"dates shifted per patient (by '{patient_column}')"


def deidentify_table(df: pd.DataFrame, pz: Pseudonymizer, *, relpath: str = "") -> TableDeidResult:
    """The de-identified copy of ``df`` (see the module docstring); numeric and categorical
    columns are kept exactly. Refuses (``IngestRefused``) a table with dates but no
    patient-id column: dates are shifted per patient and nothing says whose they are."""
    analyses = analyse_table(df)
    patient_columns = [a.name for a in analyses if a.name_kind == COLUMN_PATIENT_ID]
    date_columns = [a.name for a in analyses
                    if a.is_date and a.name_kind not in IDENTIFYING_COLUMN_KINDS
                    and a.name_kind not in (COLUMN_FREE_TEXT, COLUMN_PATIENT_ID)]
    if date_columns and not patient_columns:
        where = f"{relpath}: " if relpath else ""
        raise IngestRefused(
            f"{where}the table has dates but no patient-id column (patient_id, mrn, 환자번호 …): "
            f"dates are shifted per patient, so they cannot be de-identified",
            [f"{relpath or 'table'}: column '{c}' (dates without a patient-id column)"
             for c in date_columns])
    worker = _TableDeidentifier(df, pz, relpath)
    for a in analyses:
        if a.name_kind == COLUMN_PATIENT_ID:
            worker.pseudonymize_patients(a)
        elif a.name_kind in IDENTIFYING_COLUMN_KINDS:
            worker.drop(a, IDENTIFYING_COLUMN_KINDS[a.name_kind], whole=True,
                        person_name=a.name_kind in (COLUMN_NAME, COLUMN_PHYSICIAN),
                        date=a.name_kind == COLUMN_BIRTH_DATE)
        elif a.name_kind == COLUMN_FREE_TEXT or a.is_free_text:
            worker.drop(a, "free text", whole=False)
        elif a.name_kind == COLUMN_ACCESSION:
            worker.replace_accessions(a)
        elif a.is_uid:
            worker.remap_uids(a)
        elif a.is_date:
            worker.shift_dates(a, patient_columns[0])
        elif a.identifier_kinds or a.person_names:
            worker.drop(a, "content looks identifying", whole=False)
        else:
            worker.actions[a.name] = "kept"
    # The rules above must leave nothing a finding would name; if content still trips a
    # recognizer (a categorical column of names, say), that column goes too.
    for finding in table_findings(worker.out, relpath):
        column = re.search(r"column '(.*)' \(", finding).group(1)
        if column in worker.out.columns:
            worker.drop(analyse_column(column, df[column]), "content looks identifying",
                        whole=False)
    return TableDeidResult(worker.out, worker.identity, worker.dropped, worker.actions,
                           worker.patient_ids)


def read_csv_table(path) -> pd.DataFrame:
    """A CSV as text cells (ids keep leading zeros), UTF-8 (with or without BOM) or CP949."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="cp949")
