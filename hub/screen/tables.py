"""Tables in outputs and CSV files: small counts (ACRO defaults or the OpenSAFELY profile)
and row-level data (rows approaching the cohort size, ID-like columns)."""

from __future__ import annotations

import csv
import html as html_lib
import io
import re
from dataclasses import dataclass, field

from . import statchecks
from .model import (BLOCK, REVIEW, RULE_DOF, RULE_FILE_SIZE, RULE_HISTOGRAM, RULE_ROW_LEVEL,
                    RULE_SMALL_COUNTS, RULE_SURVIVAL, Collector)
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
    # per value column: the aggregation its header names (``count``, ``sum``, ``mean``, ``max``
    # … of a pivot table or ``agg([...])``), and the rest of its header (the group it is of)
    col_aggs: list[str | None] = field(default_factory=list)
    col_keys: list[tuple[str, ...]] = field(default_factory=list)
    facts: statchecks.Facts | None = None  # not a table: a regression or histogram output


#: Header names of aggregations (pandas ``agg``/``pivot_table(aggfunc=[...])``).
_AGG_NAMES = {"count": "count", "size": "count", "n": "count", "sum": "sum", "total": "sum",
              "mean": "mean", "average": "mean", "avg": "mean", "max": "max", "amax": "max",
              "top1": "max", "top 1": "max", "largest": "max", "first": "max", "top2": "top2",
              "top 2": "top2", "second": "top2", "second largest": "top2", "min": "min",
              "amin": "min", "median": "median", "std": "std", "var": "var"}


def _set_aggs(table: Table, header_rows: list[list[str]]) -> None:
    """``col_aggs``/``col_keys`` from the header rows (each already aligned to the values)."""
    width = max((len(r) for r in table.rows), default=0)
    aggs: list[str | None] = []
    keys: list[tuple[str, ...]] = []
    for c in range(width):
        names = [r[c].strip() for r in header_rows if c < len(r)]
        agg = next((_AGG_NAMES[n.lower()] for n in names if n.lower() in _AGG_NAMES), None)
        aggs.append(agg)
        keys.append(tuple(n for n in names if n.lower() not in _AGG_NAMES))
    if any(aggs):
        table.col_aggs, table.col_keys = aggs, keys


def _as_int(cell: str) -> int | None:
    cell = cell.strip()
    if not _INT_RE.match(cell):
        return None
    return int(cell.replace(",", ""))


# --- parsing ---------------------------------------------------------------------------

_TABLE_RE = re.compile(r"<table\b.*?</table\s*>", re.I | re.S)
_TR_RE = re.compile(r"<tr\b[^>]*>(.*?)(?=<tr\b|</tbody|</thead|</table|$)", re.I | re.S)
_CELL_RE = re.compile(r"<(t[hd])\b([^>]*)>(.*?)(?=<t[hd]\b|</tr|$)", re.I | re.S)
_COLSPAN_RE = re.compile(r"colspan\s*=\s*[\"']?(\d{1,3})", re.I)
_TAG_RE = re.compile(r"<[^>]+>")
_THEAD_RE = re.compile(r"<thead\b.*?</thead\s*>", re.I | re.S)


def _cell_text(raw: str) -> str:
    return html_lib.unescape(_TAG_RE.sub("", raw)).strip()


def _expand(cells) -> list[str]:
    """Header cells with each ``colspan`` repeated."""
    out = []
    for _k, attrs, raw in cells:
        m = _COLSPAN_RE.search(attrs)
        out += [_cell_text(raw)] * min(int(m.group(1)), 1000) if m else [_cell_text(raw)]
    return out


def html_tables(text: str) -> list[Table]:
    out = []
    for tm in _TABLE_RE.finditer(text):
        body = tm.group()
        head_m = _THEAD_RE.search(body)
        header: list[str] = []
        header_rows: list[list[str]] = []
        if head_m:
            for tr in _TR_RE.finditer(head_m.group()):
                cells = _expand(_CELL_RE.findall(tr.group(1)))
                header_rows.append(cells)
                # pandas writes the column names' row, then the index names' row
                if sum(map(bool, cells)) > sum(map(bool, header)):
                    header = cells
            body = body[:head_m.start()] + body[head_m.end():]
        rows, labels = [], []
        for tr in _TR_RE.finditer(body):
            cells = _CELL_RE.findall(tr.group(1))
            if not cells:
                continue
            if not header and all(k.lower() == "th" for k, _a, _c in cells):
                header = _expand(cells)
                header_rows.append(header)
                continue
            labels.append([_cell_text(c) for k, _a, c in cells if k.lower() == "th"])
            rows.append([_cell_text(c) for k, _a, c in cells if k.lower() == "td"])
        width = max((len(r) for r in rows), default=0)
        header = header[-width:] if width and len(header) >= width else header
        header_rows = [r[-width:] for r in header_rows if width and len(r) >= width]
        declared = None
        m = _ROWS_FOOTER_RE.search(text, tm.end(), tm.end() + 400)
        if m:
            declared = int(m.group(1).replace(",", ""))
        table = Table(header, rows, labels, declared)
        _set_aggs(table, header_rows)
        out.append(table)
    return out + stat_outputs(text)


def stat_outputs(text: str) -> list[Table]:
    """Regression summaries and printed histograms in ``text``, as tables with facts."""
    return [Table([], [], facts=f) for f in statchecks.regressions(text) +
            statchecks.histograms(text) + statchecks.at_risk_rows(text)]


_INTERVAL_SPACE_RE = re.compile(r"([\(\[]\s*[-+]?[\d.eE+-]+),\s+(?=[-+]?[\d.eE+-]+\s*[\)\]])")
_SERIES_FOOTER_RE = re.compile(r"^(?:Name:\s*(.*?),\s*)?(?:Length:\s*\d+,\s*)?dtype:\s*\w+\s*$")


def _tokens(line: str) -> list[str]:
    """The cells of a line of a text table; an interval label ``(40.0, 45.0]`` is one."""
    if ", " in line:
        line = _INTERVAL_SPACE_RE.sub(r"\1,", line)
    return line.split()


def _aligned_table(lines: list[str], i: int) -> tuple[Table | None, int]:
    """A pandas text table the token count cannot read: column names with spaces
    (``num at risk``), row labels with spaces. pandas indents the header line past the
    row labels and right-aligns each name with its values, so a column ends where a name
    and every row's value end."""
    header_line = lines[i]
    start = len(header_line) - len(header_line.lstrip())
    if not start or not header_line.strip():
        return None, i + 1
    names = {m.end() for m in re.finditer(r"\S+", header_line)}
    j = i + 1
    if j < len(lines) and lines[j].strip() and not lines[j][start:].strip():
        j += 1  # the index name line
    rows, labels, ends = [], [], names
    first = j
    while j < len(lines) and lines[j].strip() and lines[j][:start].strip():
        row_ends = {m.end() for m in re.finditer(r"\S+", lines[j]) if m.end() > start}
        if not ends & row_ends:
            break
        ends = ends & row_ends
        j += 1
    if j - first < 2:
        return None, i + 1
    cuts = sorted(ends)
    for line in lines[first:j]:
        if line[cuts[-1]:].strip():
            return None, i + 1  # something right of the last column: not this layout
        labels.append([line[:start].strip()])
        rows.append([line[a:b].strip() for a, b in zip([start] + cuts, cuts)])
    header = [header_line[a:b].strip() for a, b in zip([start] + cuts, cuts)]
    if not all(header) or any(_number(h) is not None for h in header):
        return None, i + 1
    return Table(header, rows, labels), j


def text_tables(text: str) -> list[Table]:
    """pandas-style text tables: a header line, then lines of a label and the values."""
    out = []
    lines = text.splitlines()
    footer_rows: int | None | bool = False
    i = 0
    while i < len(lines):
        header = _tokens(lines[i])
        if len(header) < 1:
            i += 1
            continue
        j = i + 1
        rows, labels = [], []
        while j < len(lines):
            tokens = _tokens(lines[j])
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
            if footer_rows is False:  # the text's first "[N rows x M columns]", found once
                m = _ROWS_FOOTER_RE.search(text) if " rows x " in text else None
                footer_rows = int(m.group(1).replace(",", "")) if m else None
            table = Table(header, rows, labels, footer_rows)
            footer = _SERIES_FOOTER_RE.match(lines[j].strip()) if j < len(lines) else None
            if footer and len(header) == 1:
                # a Series: the header line is the index name; the values' name is below
                table.label_names, table.header = header, [footer.group(1) or ""]
            _set_aggs(table, [table.header])
            out.append(table)
            i = j
        else:
            aligned, after = _aligned_table(lines, i) if len(header) >= 2 else (None, i + 1)
            if aligned is not None:
                _set_aggs(aligned, [aligned.header])
                out.append(aligned)
            i = after
    if "dtype:" in text:
        out += _unnamed_series(lines)
    return out + stat_outputs(text)


def _unnamed_series(lines: list[str]) -> list[Table]:
    """A Series whose index has no name (``value_counts(bins=…)``): no header line, only
    lines of a label and a value above its ``Name: …, dtype: …`` footer."""
    out = []
    for f, line in enumerate(lines):
        footer = _SERIES_FOOTER_RE.match(line.strip()) if "dtype:" in line else None
        if not footer:
            continue
        k = f - 1
        while k >= 0 and len(_tokens(lines[k])) == 2:
            k -= 1
        if f - k - 1 >= 2 and (k < 0 or len(_tokens(lines[k])) != 1):
            rows = [_tokens(x) for x in lines[k + 1:f]]
            if (_AGG_NAMES.get((footer.group(1) or "").lower()) != "count" and not all(
                    statchecks.is_interval(r[0]) for r in rows)):
                continue  # ``df.isna().sum()``, ``df.loc[3]``: values, not counts of people
            table = Table([footer.group(1) or ""], [r[1:] for r in rows], [r[:1] for r in rows])
            _set_aggs(table, [table.header])
            out.append(table)
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
    header_rows = [header]
    # pandas writes a column MultiIndex (``pivot_table(aggfunc=[...])``) as one row per level,
    # then a row of the index names: rows of no numbers under a header with an empty corner
    while (header and not header[0].strip() and len(header_rows) < 4 and body
           and all(_number(x) is None for x in body[0][1:])):
        header_rows.append(body.pop(0))
    labels = []
    # A first column without a numeric header and with text labels is the index.
    if header and body and not all(_as_int(r[0]) is not None for r in body if r):
        labels = [r[:1] for r in body]
        body = [r[1:] for r in body]
        table = Table(header[1:], body, labels, label_names=header[:1])
        _set_aggs(table, [r[1:] for r in header_rows])
        return table
    table = Table(header, body, labels)
    _set_aggs(table, header_rows)
    return table


# --- checks ----------------------------------------------------------------------------

def _count_columns(table: Table) -> list[int]:
    width = max((len(r) for r in table.rows), default=0)
    out = []
    for c in range(width):
        if table.col_aggs and (table.col_aggs[c] if c < len(table.col_aggs) else None) != "count":
            continue  # a table of aggregations: only its counts are counts
        name = table.header[c] if c < len(table.header) else ""
        if name and _NOT_COUNT_WORDS.search(name) and not table.col_aggs:
            continue
        cells = [r[c].strip() for r in table.rows if c < len(r) and r[c].strip()]
        values = [_cell_count(table, x) for x in cells
                  if table.col_aggs or not _SUPPRESSED_RE.match(x)]
        if not values or any(v is None or v < 0 for v in values):
            continue
        out.append(c)
    return out


def _cell_count(table: Table, cell: str) -> int | None:
    """A count cell's value. In a ``count`` column of a pivot table an empty cell (``NaN``,
    which also turns the column's counts into floats, ``3.0``) is a count of zero."""
    if not table.col_aggs:
        return _as_int(cell)
    cell = cell.strip()
    if cell.lower() in ("nan", ""):
        return 0
    v = _as_int(cell)
    if v is None:
        f = _number(cell)
        v = int(f) if f is not None and f == int(f) else None
    return v


def check_table(table: Table, col: Collector, location: str, *, is_csv: bool = False) -> None:
    cfg = col.config
    if table.facts is not None:
        _check_facts(table.facts, col, location)
        return
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
    if _check_survival(table, col, location) or _check_histogram_table(table, col, location):
        return
    _check_counts(table, col, location)
    _check_dominance(table, col, location)


def _disclosive_count(v: int, cfg) -> str | None:
    """Why a count is disclosive under the profile (``small``/``zero``/``unrounded``)."""
    if cfg.profile == "opensafely":
        if 0 < v <= cfg.opensafely_redact_at_or_below:
            return "small"
        if v and cfg.opensafely_rounding > 1 and v % cfg.opensafely_rounding:
            return "unrounded"
        return None
    if 0 < v < cfg.threshold:
        return "small"
    if v == 0 and cfg.zeros_disclosive:
        return "zero"
    return None


def _check_facts(facts: statchecks.Facts, col: Collector, location: str) -> None:
    cfg = col.config
    if facts.kind == "regression" and facts.dof is not None and facts.dof < cfg.dof_threshold:
        model = f"{facts.model} " if facts.model else ""
        col.add(RULE_DOF, REVIEW, location,
                f"a {model}regression with {facts.dof:g} residual degrees of freedom, fewer "
                f"than {cfg.dof_threshold}")
    elif facts.kind == "histogram":
        _report_bins(facts.counts, col, location)
    elif facts.kind == "survival":
        _report_risk_sets([float(v) for v in facts.counts], col, location)


def _report_bins(counts, col: Collector, location: str) -> bool:
    reasons = [_disclosive_count(v, col.config) for v in counts]
    bad = [r for r in reasons if r]
    if not bad:
        return False
    first = next(i for i, r in enumerate(reasons) if r)
    parts = [f"{bad.count(k)} {what}" for k, what in
             (("small", "bin(s) with a count " + (f"at or below {col.config.opensafely_redact_at_or_below}"
                                                  if col.config.profile == "opensafely"
                                                  else f"below {col.config.threshold}")),
              ("zero", "empty bin(s) (zeros are disclosive)"),
              ("unrounded", f"count(s) not rounded to {col.config.opensafely_rounding}"))
             if bad.count(k)]
    col.add(RULE_HISTOGRAM, REVIEW, f"{location} bin {first + 1}",
            f"a histogram with {'; '.join(parts)} of {len(counts)} (profile {col.config.profile})")
    return True


def _number(cell: str) -> float | None:
    try:
        v = float(cell.strip().replace(",", ""))
    except ValueError:
        return None
    return v if v == v else None  # NaN is no number


def _check_survival(table: Table, col: Collector, location: str) -> bool:
    """A survival table (a column or a row of numbers at risk): every risk set, and every
    step by which it shrinks between two rows, must hold at least ``survival_threshold``
    people (what ACRO's own mitigation of survival tables rounds to). True if it is one."""
    series = None
    c = next((k for k, h in enumerate(table.header) if statchecks.is_at_risk(h)), None)
    if c is not None:
        series = [row[c] if c < len(row) else "" for row in table.rows]
    else:
        r = next((k for k, lab in enumerate(table.labels)
                  if lab and statchecks.is_at_risk(" ".join(lab))), None)
        if r is None:
            return False
        series = table.rows[r]
    values = [v for v in (_number(x) for x in series if not _SUPPRESSED_RE.match(x.strip()))
              if v is not None]
    _report_risk_sets(values, col, location)
    return True


def _report_risk_sets(values: list[float], col: Collector, location: str) -> None:
    limit = col.config.survival_threshold
    small = [v for v in values if 0 < v < limit]
    steps = [a - b for a, b in zip(values, values[1:]) if 0 < a - b < limit]
    if small or steps:
        parts = []
        if small:
            parts.append(f"{len(small)} risk set(s) smaller than {limit}")
        if steps:
            parts.append(f"{len(steps)} step(s) where fewer than {limit} leave the risk set "
                         "(single events or censorings)")
        col.add(RULE_SURVIVAL, REVIEW, location, "a survival table with " + "; ".join(parts))


def _check_histogram_table(table: Table, col: Collector, location: str) -> bool:
    """A table of bins (interval labels such as ``(40.0, 45.0]`` of ``pd.cut``, or bin edge
    columns) and their counts. True if it is one."""
    intervals = sum(1 for lab in table.labels if lab and statchecks.is_interval(lab[-1]))
    edges = [k for k, h in enumerate(table.header) if statchecks.is_bin_edge(h)]
    if not (len(table.rows) >= 2 and (intervals * 2 > len(table.rows) or edges)):
        return False
    counts = [k for k in _count_columns(table) if k not in edges]
    if not counts:
        return False
    values = []
    for row in table.rows:
        for k in counts:
            v = _as_int(row[k]) if k < len(row) else None
            if v is not None:
                values.append(v)
    _report_bins(values, col, location)
    return True

def _check_counts(table: Table, col: Collector, location: str) -> None:
    cfg = col.config
    small = zeros = unrounded = 0
    first = None
    for c in _count_columns(table):
        for r, row in enumerate(table.rows):
            if c >= len(row) or (not table.col_aggs and _SUPPRESSED_RE.match(row[c].strip())):
                continue
            v = _cell_count(table, row[c])
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


def _check_dominance(table: Table, col: Collector, location: str) -> None:
    """ACRO's NK dominance (the largest ``dominance_n`` contributions hold ≥ ``dominance_k``
    of a cell's total) and p-ratio ((total − largest two) / largest < ``p_ratio``), where a
    table shows a cell's total (``sum``, or ``mean`` and ``count``) beside its largest
    contribution (``max``/``top1``, ``top2``). Without the second largest, only what is
    certain is reported: the largest alone, or with the least the second can be."""
    if not table.col_aggs:
        return
    cfg = col.config
    groups: dict[tuple, dict[str, int]] = {}
    for c, (agg, key) in enumerate(zip(table.col_aggs, table.col_keys)):
        if agg:
            groups.setdefault(key, {}).setdefault(agg, c)
    for key, cols in groups.items():
        if "max" not in cols or not ("sum" in cols or {"mean", "count"} <= cols.keys()):
            continue
        for r, row in enumerate(table.rows):
            def value(agg):
                c = cols.get(agg)
                return _number(row[c]) if c is not None and c < len(row) else None
            top1, count, low = value("max"), value("count"), value("min")
            total = value("sum")
            if total is None and value("mean") is not None and count is not None:
                total = value("mean") * count
            if top1 is None or total is None or total <= 0 or top1 <= 0:
                continue
            if low is not None and low < 0:
                continue  # ACRO: dominance is not defined with negative values
            top2 = value("top2")
            if top2 is None and count is not None:
                rest = total - top1
                top2 = 0.0 if count <= 1 else rest if count <= 2 else rest / (count - 1)
            second = top2 or 0.0
            dominated = (top1 + (second if cfg.dominance_n >= 2 else 0)) / total >= cfg.dominance_k
            p_ratio = (total - top1 - second) / top1 < cfg.p_ratio
            if dominated or p_ratio:
                rule = (f"dominance (n={cfg.dominance_n}, k={cfg.dominance_k})" if dominated
                        else f"p-ratio below {cfg.p_ratio}")
                col.add(RULE_SMALL_COUNTS, REVIEW, f"{location} row {r + 1}",
                        f"a total dominated by its largest contributors: {rule}")
                return
