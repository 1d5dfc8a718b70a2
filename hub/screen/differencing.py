"""Differencing across releases: two tables of counts on the same dataset, each safe alone,
whose difference is a small count (a total and the same total minus a subgroup, a table
with one patient excluded, a crosstab released with and without a filter, a margin).

Pure, like the rest of the screen: the caller gives the tables of the new request and those
of earlier released requests (parsed from their files with :func:`file_tables`, which uses
the screen's own table parsers) and gets findings for the new request's files.

How two tables are compared: each table of counts becomes a map from a *key* (the set of its
row labels and, in a table of several count columns, the column's name) to a count; its
margins are keys too (a row's labels alone, a column's name alone, and the grand total),
taken from its ``All``/``Total`` row or column when it has one, else summed. Two tables are
compared on the keys they share, when they share at least one key other than the grand
total (so two unrelated tables are never compared on their totals alone), when one lies
within the other (no shared count larger in one and smaller in the other: a population and
the same population with some left out) and when their shared counts differ in all by at
most ``differencing_max_fraction`` (0.1) of the larger (the tables of two groups of similar
size are not one within the other). A shared key whose counts differ by 1 …
``threshold``−1 (ACRO; at or below 7 with the OpenSAFELY profile) is then a finding on the
new table, naming the earlier release.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .model import REVIEW, Finding, ScreenConfig
from .tables import (_SUPPRESSED_RE, Table, _as_int, _count_columns, csv_table, html_tables,
                     text_tables)

RULE_DIFFERENCING = "differencing"

_DEFAULT = ScreenConfig()
_TOTAL_RE = re.compile(r"^(?:all|total|totals|sum|overall|grand total)$", re.I)
_GRAND: frozenset = frozenset()


@dataclass(frozen=True)
class LocatedTable:
    """A table of a file, located as the screen locates its findings."""

    location: str
    table: Table


# --- tables of a file ----------------------------------------------------------------------

def _text(value) -> str:
    if isinstance(value, list):
        return "".join(v if isinstance(v, str) else "" for v in value)
    return value if isinstance(value, str) else ""


def _notebook_tables(nb) -> list[LocatedTable]:
    out: list[LocatedTable] = []

    def add(found, where):
        out.extend(LocatedTable(f"{where} table {t}", table) for t, table in enumerate(found, 1))

    for i, cell in enumerate(nb.get("cells") or [], 1):
        if not isinstance(cell, dict) or not isinstance(cell.get("outputs"), list):
            continue
        for k, output in enumerate(cell["outputs"], 1):
            if not isinstance(output, dict):
                continue
            where = f"cell {i} output {k}"
            if output.get("output_type") == "stream":
                add(text_tables(_text(output.get("text"))),
                    f"{where} {output.get('name', 'stream')}")
                continue
            data = output.get("data")
            if not isinstance(data, dict):
                continue
            if "text/html" in data:
                add(html_tables(_text(data["text/html"])), f"{where} text/html")
            if "text/plain" in data:
                add(text_tables(_text(data["text/plain"])), f"{where} text/plain")
    return out


def file_tables(name: str, data: bytes, *, config: ScreenConfig = _DEFAULT) -> list[LocatedTable]:
    """Every table a file shows: notebook outputs (HTML, text and stream tables), a CSV/TSV
    file, the tables of an HTML or text file. Never raises: a file it cannot read has none
    (the screen reports it on its own)."""
    if len(data) > config.max_file_bytes:
        return []
    try:
        text = data.decode("utf-8-sig")
        lower = name.lower()
        head = text.lstrip()[:1]
        if lower.endswith(".ipynb") or (head == "{" and '"cells"' in text[:4096]):
            nb = json.loads(text)
            return _notebook_tables(nb) if isinstance(nb, dict) else []
        if lower.endswith((".csv", ".tsv")):
            table = csv_table(text)
            return [LocatedTable("file", table)] if table is not None else []
        if head in ("{", "["):
            return []
        found = (html_tables(text) if "<table" in text.lower() or lower.endswith((".html", ".htm"))
                 else text_tables(text))
        return [LocatedTable(f"file table {t}", table) for t, table in enumerate(found, 1)]
    except Exception:  # noqa: BLE001 - never raise on content
        return []


# --- a table as counts by key --------------------------------------------------------------

def _norm(label: str) -> str:
    return " ".join(label.split()).casefold()


def _is_range(values: Sequence[str]) -> bool:
    return bool(values) and [v.strip() for v in values] == [str(i) for i in range(len(values))]


def counts_by_key(table: Table) -> dict[frozenset, int]:
    """The table's counts (cells, row and column margins, grand total) by key."""
    counts = _count_columns(table)
    width = max((len(r) for r in table.rows), default=0)
    names = [table.header[c] if c < len(table.header) else "" for c in range(width)]
    # A first column 0, 1, 2 … is a CSV's index, not a count.
    counts = [c for c in counts if not (_norm(names[c]) in ("", "index", "unnamed: 0")
                                        and _is_range([r[c] if c < len(r) else ""
                                                       for r in table.rows]))]
    if not counts:
        return {}
    total_cols = [c for c in counts if _TOTAL_RE.match(names[c].strip())]
    value_cols = [c for c in counts if c not in total_cols]
    if not value_cols:
        return {}
    labelled = [_norm(names[c]) for c in value_cols]
    unique = all(labelled) and len(set(labelled)) == len(labelled)
    col_key = {c: (labelled[n] if unique else f"#{n + 1}") for n, c in enumerate(value_cols)}
    # Row labels: the index (sparse MultiIndex labels filled in; a 0, 1, 2 … index dropped)
    # and the cells of the columns that are not counts.
    label_rows, previous = [], []
    for r, row in enumerate(table.rows):
        labels = list(table.labels[r]) if r < len(table.labels) else []
        if previous and len(labels) < len(previous):
            labels = previous[:len(previous) - len(labels)] + labels
        previous = labels
        label_rows.append(labels)
    index = [labels[-1] if labels else "" for labels in label_rows]
    drop_index = _is_range(index) and width > len(counts)
    out: dict[frozenset, int] = {}
    grand_rows: dict[int, int] = {}
    sums: dict[int, int] = {}
    for r, row in enumerate(table.rows):
        labels = [] if drop_index else label_rows[r]
        labels = labels + [row[c] for c in range(len(row)) if c not in counts]
        key = [_norm(x) for x in labels if x.strip()]
        is_total = any(_TOTAL_RE.match(x) for x in key)
        key = frozenset(x for x in key if not _TOTAL_RE.match(x))
        values = {}
        for c in value_cols + total_cols:
            if c < len(row) and not _SUPPRESSED_RE.match(row[c].strip()):
                v = _as_int(row[c])
                if v is not None:
                    values[c] = v
        if is_total:
            if key:  # a subtotal within a group: a margin of that group
                for c, v in values.items():
                    out.setdefault(key | ({col_key[c]} if c in col_key else set()), v)
                continue
            for c, v in values.items():
                if c in col_key:
                    grand_rows[c] = v
                else:
                    out[_GRAND] = v
            continue
        if not key:
            continue
        for c in value_cols:
            if c in values:
                cell = key | {col_key[c]} if len(value_cols) > 1 else key
                out.setdefault(cell, values[c])
                sums[c] = sums.get(c, 0) + values[c]
        if len(value_cols) > 1:
            row_total = next((values[c] for c in total_cols if c in values), None)
            if row_total is None and all(c in values for c in value_cols):
                row_total = sum(values[c] for c in value_cols)
            if row_total is not None:
                out.setdefault(key, row_total)
    if len(value_cols) > 1:
        for c in value_cols:
            margin = grand_rows.get(c, sums.get(c))
            if margin is not None:
                out.setdefault(frozenset({col_key[c]}), margin)
    if _GRAND not in out:
        if len(value_cols) == 1 and value_cols[0] in grand_rows:
            out[_GRAND] = grand_rows[value_cols[0]]
        elif sums:
            out[_GRAND] = sum(sums.values())
    return out


# --- comparing releases --------------------------------------------------------------------

def _small(d: int, config: ScreenConfig) -> bool:
    d = abs(d)
    if config.profile == "opensafely":
        return 0 < d <= config.opensafely_redact_at_or_below
    return 0 < d < config.threshold


def small_differences(new: Mapping[frozenset, int], old: Mapping[frozenset, int],
                      config: ScreenConfig = _DEFAULT) -> int:
    """How many shared keys of two tables differ by a small count (0 if they share no key
    but the grand total)."""
    shared = (new.keys() & old.keys()) - {_GRAND}
    if not shared:
        return 0
    if _GRAND in new and _GRAND in old:
        shared.add(_GRAND)
    diffs = [new[k] - old[k] for k in shared]
    if any(d > 0 for d in diffs) and any(d < 0 for d in diffs):
        return 0  # neither lies within the other: other people, not fewer of them
    larger = max(sum(new[k] for k in shared), sum(old[k] for k in shared))
    if abs(sum(diffs)) > config.differencing_max_fraction * larger:
        return 0  # a different population (men and women), not one with a few left out
    return sum(1 for d in diffs if _small(d, config))


def check_differencing(new: Mapping[str, Sequence[LocatedTable]],
                       earlier: Iterable[tuple[object, Mapping[str, Sequence[LocatedTable]]]],
                       config: ScreenConfig = _DEFAULT) -> dict[str, list[Finding]]:
    """Findings (rule ``differencing``, review) by path of the new request: each of its
    tables that differs from a table of an earlier release by a small count, naming that
    release (``earlier``: ``(request id, {path: tables})`` of released requests on the same
    datasets). Values and labels are never repeated, only where the tables are."""
    limit = (f"at or below {config.opensafely_redact_at_or_below}" if config.profile ==
             "opensafely" else f"below the threshold of {config.threshold}")
    released = []
    for request_id, files in earlier:
        for path, tables in files.items():
            for t in tables:
                keyed = counts_by_key(t.table)
                if keyed:
                    released.append((request_id, path, t.location, keyed))
    out: dict[str, list[Finding]] = {}
    if not released:
        return out
    for path, tables in new.items():
        for t in tables:
            keyed = counts_by_key(t.table)
            if not keyed:
                continue
            named = set()
            for request_id, old_path, old_location, old in released:
                if request_id in named:
                    continue
                n = small_differences(keyed, old, config)
                if n:
                    named.add(request_id)
                    out.setdefault(path, []).append(Finding(
                        RULE_DIFFERENCING, REVIEW, t.location,
                        f"differs from a table released in export request {request_id} "
                        f"({old_path}, {old_location}) by {n} count(s) {limit}: their "
                        "difference discloses a small group"))
    return out


__all__ = ["LocatedTable", "RULE_DIFFERENCING", "check_differencing", "counts_by_key",
           "file_tables", "small_differences"]
