"""Tables in outputs and CSV files: small counts (ACRO defaults or the OpenSAFELY profile)
and row-level data (rows approaching the cohort size, ID-like columns)."""

from __future__ import annotations

import csv
import html as html_lib
import io
import re
from dataclasses import dataclass, field

from .model import BLOCK, REVIEW, RULE_FILE_SIZE, RULE_ROW_LEVEL, RULE_SMALL_COUNTS, Collector
from .recognizers import COLUMN_UID, IDENTIFYING_COLUMN_KINDS, classify_column_name

#: Column kinds that make a table row-level (one row per person, study or image).
_ID_COLUMN_KINDS = {"patient_id", "accession", COLUMN_UID, *IDENTIFYING_COLUMN_KINDS}
#: Integer columns whose name says they are not counts.
_NOT_COUNT_WORDS = re.compile(
    r"age|year|yr|month|day|date|time|epoch|step|iter|fold|seed|id\b|_id|index|idx|rank|size|"
    r"dim|width|height|depth|slice|pixel|px|kvp|mas|dose|score|grade|stage|class|label|code|"
    r"version|batch|lr|layer|unit|hu\b|mm\b|cm\b|kg\b|bmi|weight|pack|min|max|mean|median|std|"
    r"threshold|p25|p75|q1|q3|percent|pct|%|ratio|rate|auc|loss|acc|precision|recall|f1",
    re.I)
_SUPPRESSED_RE = re.compile(r"^(?:<\s*\d+|≤\s*\d+|suppressed|redacted|\[redacted\]|\*+|~|-|—|"
                            r"n/?a|nan|none|null|\.)$", re.I)
_INT_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+$|^[-+]?\d+$")
_ROWS_FOOTER_RE = re.compile(r"\[(\d[\d,]*) rows x (\d+) columns\]")


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]  # value cells only
    labels: list[list[str]] = field(default_factory=list)  # index (row label) cells per row
    declared_rows: int | None = None  # "[N rows x M columns]" of a truncated repr
    label_names: list[str] = field(default_factory=list)  # names of the index columns


def _as_int(cell: str) -> int | None:
    cell = cell.strip()
    if not _INT_RE.match(cell):
        return None
    return int(cell.replace(",", ""))


# --- parsing ---------------------------------------------------------------------------

_TABLE_RE = re.compile(r"<table\b.*?</table\s*>", re.I | re.S)
_TR_RE = re.compile(r"<tr\b[^>]*>(.*?)(?=<tr\b|</tbody|</thead|</table|$)", re.I | re.S)
_CELL_RE = re.compile(r"<(t[hd])\b[^>]*>(.*?)(?=<t[hd]\b|</tr|$)", re.I | re.S)
_TAG_RE = re.compile(r"<[^>]+>")
_THEAD_RE = re.compile(r"<thead\b.*?</thead\s*>", re.I | re.S)


def _cell_text(raw: str) -> str:
    return html_lib.unescape(_TAG_RE.sub("", raw)).strip()


def html_tables(text: str) -> list[Table]:
    out = []
    for tm in _TABLE_RE.finditer(text):
        body = tm.group()
        head_m = _THEAD_RE.search(body)
        header: list[str] = []
        if head_m:
            for tr in _TR_RE.finditer(head_m.group()):
                cells = [_cell_text(c) for _k, c in _CELL_RE.findall(tr.group(1))]
                # pandas writes the column names' row, then the index names' row
                if sum(map(bool, cells)) > sum(map(bool, header)):
                    header = cells
            body = body[:head_m.start()] + body[head_m.end():]
        rows, labels = [], []
        for tr in _TR_RE.finditer(body):
            cells = _CELL_RE.findall(tr.group(1))
            if not cells:
                continue
            if not header and all(k.lower() == "th" for k, _ in cells):
                header = [_cell_text(c) for _k, c in cells]
                continue
            labels.append([_cell_text(c) for k, c in cells if k.lower() == "th"])
            rows.append([_cell_text(c) for k, c in cells if k.lower() == "td"])
        width = max((len(r) for r in rows), default=0)
        header = header[-width:] if width and len(header) >= width else header
        declared = None
        m = _ROWS_FOOTER_RE.search(text, tm.end(), tm.end() + 400)
        if m:
            declared = int(m.group(1).replace(",", ""))
        out.append(Table(header, rows, labels, declared))
    return out


def text_tables(text: str) -> list[Table]:
    """pandas-style text tables: a header line, then lines of a label and the values."""
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        header = lines[i].split()
        if len(header) < 1:
            i += 1
            continue
        j = i + 1
        rows, labels = [], []
        while j < len(lines):
            tokens = lines[j].split()
            if len(tokens) == len(header) + 1 or (len(tokens) >= 2 and len(tokens) == len(header)
                                                   and rows and len(rows[-1]) == len(tokens) - 1):
                labels.append(tokens[:len(tokens) - len(header)] or tokens[:1])
                rows.append(tokens[-len(header):] if len(tokens) > len(header) else tokens[1:])
                j += 1
            elif not tokens or (j == i + 1 and len(tokens) < len(header)):
                j += 1  # the index name line of a DataFrame, or a blank line
                if not tokens:
                    break
            else:
                break
        if len(rows) >= 2:
            declared = None
            m = _ROWS_FOOTER_RE.search(text)
            if m:
                declared = int(m.group(1).replace(",", ""))
            out.append(Table(header, rows, labels, declared))
            i = j
        else:
            i += 1
    return out


def csv_table(text: str) -> Table | None:
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    try:
        rows = [r for r in reader if r]
    except csv.Error:
        return None
    if not rows:
        return None
    header, body = rows[0], rows[1:]
    labels = []
    # A first column without a numeric header and with text labels is the index.
    if header and body and not all(_as_int(r[0]) is not None for r in body if r):
        labels = [r[:1] for r in body]
        body = [r[1:] for r in body]
        return Table(header[1:], body, labels, label_names=header[:1])
    return Table(header, body, labels)


# --- checks ----------------------------------------------------------------------------

def _count_columns(table: Table) -> list[int]:
    width = max((len(r) for r in table.rows), default=0)
    out = []
    for c in range(width):
        name = table.header[c] if c < len(table.header) else ""
        if name and _NOT_COUNT_WORDS.search(name):
            continue
        cells = [r[c].strip() for r in table.rows if c < len(r) and r[c].strip()]
        values = [_as_int(x) for x in cells if not _SUPPRESSED_RE.match(x)]
        if not values or any(v is None or v < 0 for v in values):
            continue
        out.append(c)
    return out


def check_table(table: Table, col: Collector, location: str, *, is_csv: bool = False) -> None:
    cfg = col.config
    n_rows = max(len(table.rows), table.declared_rows or 0)
    if is_csv and n_rows > cfg.max_csv_rows:
        col.add(RULE_FILE_SIZE, BLOCK, location,
                f"{n_rows} rows, more than the limit of {cfg.max_csv_rows}")
    names = list(table.label_names) + list(table.header)
    id_cols = [c for c, name in enumerate(names)
               if name and classify_column_name(name) in _ID_COLUMN_KINDS]
    if id_cols and n_rows >= 2:
        col.add(RULE_ROW_LEVEL, BLOCK, f"{location} column {id_cols[0] + 1}",
                "a table with an identifier-like column (one row per person or record)")
    cohort = col.cohort_size
    if n_rows >= cfg.row_level_min_rows and (not cohort or
                                             n_rows >= cfg.row_level_cohort_fraction * cohort):
        if not _count_columns(table) or n_rows >= max(cohort, cfg.row_level_min_rows * 5):
            col.add(RULE_ROW_LEVEL, BLOCK, location,
                    f"{n_rows} rows: close to record-level data (cohort {cohort or 'unknown'})")
    _check_counts(table, col, location)
    _check_dominance(table, col, location)


def _check_counts(table: Table, col: Collector, location: str) -> None:
    cfg = col.config
    small = zeros = unrounded = 0
    first = None
    for c in _count_columns(table):
        for r, row in enumerate(table.rows):
            if c >= len(row) or _SUPPRESSED_RE.match(row[c].strip()):
                continue
            v = _as_int(row[c])
            if v is None:
                continue
            if cfg.profile == "opensafely":
                bad = 0 < v <= cfg.opensafely_redact_at_or_below
                if bad:
                    small += 1
                elif v and cfg.opensafely_rounding > 1 and v % cfg.opensafely_rounding:
                    unrounded += 1
                    bad = True
            else:
                bad = 0 < v < cfg.threshold
                if bad:
                    small += 1
                elif v == 0 and cfg.zeros_disclosive:
                    zeros += 1
                    bad = True
            if bad and first is None:
                first = (r + 1, c + 1 + len(table.labels[r]) if r < len(table.labels) else c + 1)
    if first is None:
        return
    parts = []
    if small:
        limit = (f"at or below {cfg.opensafely_redact_at_or_below}" if cfg.profile == "opensafely"
                 else f"below the threshold of {cfg.threshold}")
        parts.append(f"{small} count(s) {limit}")
    if zeros:
        parts.append(f"{zeros} zero count(s) (zeros are disclosive)")
    if unrounded:
        parts.append(f"{unrounded} count(s) not rounded to {cfg.opensafely_rounding}")
    col.add(RULE_SMALL_COUNTS, REVIEW, f"{location} row {first[0]} column {first[1]}",
            "; ".join(parts) + f" (profile {cfg.profile})")


_SUM_RE = re.compile(r"^(?:sum|total)$", re.I)
_TOP1_RE = re.compile(r"^(?:max|top ?1|largest|first)$", re.I)
_TOP2_RE = re.compile(r"^(?:top ?2|second|second largest)$", re.I)


def _check_dominance(table: Table, col: Collector, location: str) -> None:
    """NK dominance and p-ratio where a table carries a total and its largest contributions."""
    cfg = col.config
    names = [h.strip() for h in table.header]
    s = next((i for i, h in enumerate(names) if _SUM_RE.match(h)), None)
    t1 = next((i for i, h in enumerate(names) if _TOP1_RE.match(h)), None)
    if s is None or t1 is None:
        return
    t2 = next((i for i, h in enumerate(names) if _TOP2_RE.match(h)), None)
    for r, row in enumerate(table.rows):
        try:
            total = float(row[s].replace(",", ""))
            top1 = float(row[t1].replace(",", ""))
            top2 = float(row[t2].replace(",", "")) if t2 is not None else 0.0
        except (IndexError, ValueError):
            continue
        if total <= 0:
            continue
        dominated = (top1 + (top2 if cfg.dominance_n >= 2 else 0)) / total > cfg.dominance_k
        p_ratio = t2 is not None and top1 > 0 and (total - top1 - top2) / top1 < cfg.p_ratio
        if dominated or p_ratio:
            rule = (f"dominance (n={cfg.dominance_n}, k={cfg.dominance_k})" if dominated
                    else f"p-ratio below {cfg.p_ratio}")
            col.add(RULE_SMALL_COUNTS, REVIEW, f"{location} row {r + 1}",
                    f"a total dominated by its largest contributors: {rule}")
            return
