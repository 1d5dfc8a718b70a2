"""Summary tables that pass the export screen's small-count rules by design.

The export screen checks every table in an output with ACRO's default rules: a count below
the threshold (10) is disclosive, **zeros are disclosive**, and statistics of a group are
disclosive when the group is small or dominated by a few contributors (NK rule n=2, k=0.9:
the two largest contributions make up more than 90% of the total; p-ratio 0.1: the rest of
the group sums to less than 10% of the largest contribution). These helpers build tables
that never contain such a cell:

* :func:`safe_counts` — group counts (one key: a list with a total; two or more keys: a
  cross-table with row/column totals). Counts below the threshold and zeros are shown as
  ``"<10"`` (primary suppression); further cells are shown as ``"suppressed"`` so that no
  hidden cell can be worked out from the totals (secondary suppression: every row and column
  holds none or at least two hidden cells, then an exact linear-algebra check that no hidden
  cell is determined by the published totals). Shown counts are rounded to a multiple of 5.
* :func:`safe_summary` — n, mean, median and quartiles of a value per group, only for
  groups that pass the threshold, dominance and p-ratio rules.
* :func:`disclosure_report` — why cells were hidden, in words that never state a hidden
  value (not even whether it was zero).

Protection covers one table against its own totals. Several overlapping tables of the
same cohort (e.g. counts by sex, then by sex and site) can still be differenced against
each other: publish the most detailed table you need, not a series of them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

DISCLOSURE_THRESHOLD = 10
DOMINANCE_N = 2
DOMINANCE_K = 0.9
P_RATIO = 0.1
DEFAULT_ROUNDING = 5
TOTAL = "Total"

_ATTR = "medzone_disclosure"


def _hidden_label(threshold: int) -> str:
    return f"<{threshold}"


SECONDARY = "suppressed"


def _round(value: int, base: int | None) -> int:
    if not base or base <= 1:
        return int(value)
    return int(base * np.floor(value / base + 0.5))


# --- secondary suppression ------------------------------------------------------------------


def _protect(values: np.ndarray, lines: list[tuple[list[int], int]], hidden: np.ndarray,
             interior: np.ndarray) -> np.ndarray:
    """Grow *hidden* until no hidden cell can be derived from the line equations.

    ``values``: every cell (interior cells and totals) as a flat array; ``lines``: (members,
    total cell) with ``sum(values[members]) == values[total]``; ``interior``: which cells are
    not totals (preferred for secondary suppression, smallest first).
    """
    hidden = hidden.copy()

    def pick(candidates: list[int]) -> int | None:
        visible = [c for c in candidates if not hidden[c]]
        if not visible:
            return None
        inner = [c for c in visible if interior[c]]
        pool = inner or visible
        return min(pool, key=lambda c: (values[c], c))

    while True:
        changed = False
        # 1) no line may hold exactly one hidden cell
        for members, total in lines:
            cells = [*members, total]
            if sum(bool(hidden[c]) for c in cells) == 1:
                c = pick(cells)
                if c is not None:
                    hidden[c] = True
                    changed = True
        if changed:
            continue
        # 2) exact check: no hidden cell is determined by the published equations
        determined = _determined(lines, hidden, values.size)
        if not determined:
            return hidden
        h = determined[0]
        for members, total in lines:
            cells = [*members, total]
            if h in cells:
                c = pick(cells)
                if c is not None:
                    hidden[c] = True
                    changed = True
                    break
        if not changed:  # pragma: no cover - every line of h already fully hidden
            return hidden


def _determined(lines, hidden: np.ndarray, n_cells: int) -> list[int]:
    """Hidden cells whose value follows from the line equations (given the visible cells)."""
    hid = np.flatnonzero(hidden)
    if hid.size == 0:
        return []
    col = {c: n for n, c in enumerate(hid)}
    rows = []
    for members, total in lines:
        coef = np.zeros(hid.size)
        for c in members:
            if hidden[c]:
                coef[col[c]] += 1.0
        if hidden[total]:
            coef[col[total]] -= 1.0
        if coef.any():
            rows.append(coef)
    if not rows:
        return []
    m = np.array(rows)
    rank = np.linalg.matrix_rank(m)
    out = []
    for c in hid:
        j = col[c]
        if np.linalg.matrix_rank(np.delete(m, j, axis=1)) < rank:
            out.append(int(c))
    return out


def _grid_cells(counts: np.ndarray):
    """Flat cells, lines and interior flags for an R×C grid plus its totals row/column."""
    r, c = counts.shape
    ext = np.zeros((r + 1, c + 1), dtype=np.int64)
    ext[:r, :c] = counts
    ext[:r, c] = counts.sum(axis=1)
    ext[r, :c] = counts.sum(axis=0)
    ext[r, c] = counts.sum()
    idx = np.arange(ext.size).reshape(ext.shape)
    lines = []
    if c > 1:  # with one column the row totals repeat the cells
        for i in range(r + 1):
            lines.append((list(idx[i, :c]), int(idx[i, c])))
    for j in range(c + 1 if c > 1 else 1):
        lines.append((list(idx[:r, j]), int(idx[r, j])))
    interior = np.zeros(ext.shape, dtype=bool)
    interior[:r, :c] = True
    return ext, lines, interior.ravel()


def suppress_grid(counts: pd.DataFrame, *, threshold: int = DISCLOSURE_THRESHOLD,
                  rounding: int | None = DEFAULT_ROUNDING, margins: bool = True,
                  total_label: str = TOTAL) -> pd.DataFrame:
    """Suppress a table of counts (rows × columns, non-negative integers) for export.

    Returns an object-typed frame: shown counts (rounded to *rounding*), ``"<threshold"``
    for counts below the threshold or zero, ``"suppressed"`` for secondary suppression; with
    *margins*, a totals column (when there are two or more columns) and a totals row.
    """
    values = counts.to_numpy()
    if values.ndim != 2:
        raise ValueError("counts must be two-dimensional")
    if not np.issubdtype(values.dtype, np.number) or (values < 0).any() or (
            values != np.round(values)).any():
        raise ValueError("counts must be non-negative integers")
    values = values.astype(np.int64)
    r, c = values.shape
    ext, lines, interior = _grid_cells(values)
    flat = ext.ravel()
    primary = flat < threshold  # zeros included
    hidden = _protect(flat, lines, primary, interior).reshape(ext.shape)
    primary = primary.reshape(ext.shape)

    label = _hidden_label(threshold)
    shown = np.empty(ext.shape, dtype=object)
    for (i, j), v in np.ndenumerate(ext):
        shown[i, j] = label if primary[i, j] else SECONDARY if hidden[i, j] else _round(v, rounding)

    row_labels = list(counts.index)
    col_labels = list(counts.columns)
    index = counts.index
    columns = counts.columns
    keep_rows, keep_cols = list(range(r)), list(range(c))
    if margins:
        keep_rows.append(r)
        index = _append_label(counts.index, total_label)
        if c > 1:
            keep_cols.append(c)
            columns = _append_label(counts.columns, total_label)
    out = pd.DataFrame(shown[np.ix_(keep_rows, keep_cols)], index=index, columns=columns)

    notes = []
    names_r = [_describe(counts.index, x) for x in row_labels] + [total_label]
    names_c = [_describe(counts.columns, x) for x in col_labels] + [total_label]
    for (i, j), is_hidden in np.ndenumerate(hidden):
        if not is_hidden or (not margins and (i == r or j == c)) or (c == 1 and j == c):
            continue
        where = names_r[i] if c == 1 else f"{names_r[i]}, {names_c[j]}"
        if primary[i, j]:
            notes.append(f"{where}: count below {threshold} or zero (primary suppression)")
        else:
            notes.append(f"{where}: suppressed so that hidden counts in the same row or "
                         "column cannot be derived from the totals (secondary suppression)")
    if rounding and rounding > 1:
        notes.append(f"shown counts are rounded to the nearest multiple of {rounding}")
    cells = out.to_numpy().ravel()
    out.attrs[_ATTR] = {
        "notes": notes,
        "threshold": threshold,
        "rounding": rounding,
        "primary": int(sum(1 for v in cells if v == label)),
        "secondary": int(sum(1 for v in cells if v == SECONDARY)),
    }
    return out


def _append_label(index: pd.Index, label: str) -> pd.Index:
    if isinstance(index, pd.MultiIndex):
        extra = pd.MultiIndex.from_tuples([(label,) + ("",) * (index.nlevels - 1)],
                                          names=index.names)
        return index.append(extra)
    return pd.Index([*map(_plain, index), label], name=index.name, dtype=object)


def _plain(x):
    return x.item() if isinstance(x, np.generic) else x


def _describe(index: pd.Index, label) -> str:
    names = list(index.names)
    values = label if isinstance(label, tuple) else (label,)
    return ", ".join(f"{n}={v}" if n is not None else str(v) for n, v in zip(names, values))


# --- public helpers -------------------------------------------------------------------------


#: Column names that hold one value per person: grouping by them lists identifiers.
_ID_LIKE = re.compile(r"(?:^|_)(?:id|uid|patient|patient_?id|subject|accession|mrn|pseudonym)$",
                      re.IGNORECASE)


def _as_list(by) -> list[str]:
    by = [by] if isinstance(by, str) else list(by)
    for b in by:
        if isinstance(b, str) and _ID_LIKE.search(b):
            raise ValueError(f"refusing to group by {b!r}: it looks like a per-person "
                             "identifier, and its values would appear in the table")
    return by


def safe_counts(frame: pd.DataFrame, by: Sequence[str] | str, *,
                threshold: int = DISCLOSURE_THRESHOLD, rounding: int | None = DEFAULT_ROUNDING,
                margins: bool = True) -> pd.DataFrame:
    """Counts of rows of *frame* per group of the *by* columns, safe for export.

    One key: a ``count`` column with a ``Total`` row. Two or more keys: a cross-table with
    the last key as columns and ``Total`` margins. All combinations of the observed values
    (and all categories of categorical columns) are listed, so an empty combination shows
    as suppressed rather than vanishing. See :func:`suppress_grid` for the rules.
    """
    by = _as_list(by)
    if not by:
        raise ValueError("safe_counts needs at least one column in 'by'")
    missing = [b for b in by if b not in frame.columns]
    if missing:
        raise KeyError(f"no such column(s): {missing}")
    sizes = frame.groupby(by, observed=False, dropna=False).size()
    if len(by) == 1:
        grid = sizes.to_frame("count")
    else:
        grid = sizes.unstack(by[-1], fill_value=0)
        levels = [_levels(frame[b]) for b in by[:-1]]
        full = pd.MultiIndex.from_product(levels, names=by[:-1]) if len(by) > 2 else \
            pd.Index(levels[0], name=by[0])
        grid = grid.reindex(index=full, columns=_levels(frame[by[-1]]), fill_value=0)
        grid.columns.name = by[-1]
    grid = grid.fillna(0).astype(np.int64)
    return suppress_grid(grid, threshold=threshold, rounding=rounding, margins=margins)


def _levels(series: pd.Series) -> list:
    if isinstance(series.dtype, pd.CategoricalDtype):
        return list(series.cat.categories)
    values = list(pd.unique(series))
    try:
        return sorted(values)
    except TypeError:
        return values


def dominance_check(values, *, n: int = DOMINANCE_N, k: float = DOMINANCE_K,
                    p: float = P_RATIO) -> list[str]:
    """Which of the NK and p-ratio rules a group's contributions fail (empty: it passes).

    Contributions are taken as magnitudes (absolute values), so the rules also apply to
    negative quantities such as HU; a group whose magnitudes sum to zero fails (a mean of
    zero would give every value away).
    """
    x = np.sort(np.abs(np.asarray(values, dtype=np.float64)))[::-1]
    total = float(x.sum())
    if x.size == 0 or total <= 0:
        return ["all contributions are zero"]
    failed = []
    if x[:n].sum() / total > k:
        failed.append(f"dominance: the {n} largest contributions exceed {k:.0%} of the total")
    if x.size < 2 or (total - x[0] - x[1]) / x[0] < p:
        failed.append(f"p-ratio: the others sum to less than {p:.0%} of the largest")
    return failed


def safe_summary(frame: pd.DataFrame, value: str, by: Sequence[str] | str = (), *,
                 threshold: int = DISCLOSURE_THRESHOLD, rounding: int | None = DEFAULT_ROUNDING,
                 decimals: int = 2, dominance_n: int = DOMINANCE_N,
                 dominance_k: float = DOMINANCE_K, p_ratio: float = P_RATIO) -> pd.DataFrame:
    """n, mean, median and quartiles (q1, q3) of *value* per group of *by*, safe for export.

    A group's statistics are shown only when it has at least *threshold* non-missing values
    and passes the dominance (NK) and p-ratio rules; otherwise they read ``"suppressed"``.
    ``n`` is rounded to *rounding* and shown as ``"<threshold"`` for small groups (when
    exactly one group's n is hidden, the next smallest is hidden too, so it cannot be
    recovered from the cohort size). Minimum and maximum are never given: they are single
    people's values.
    """
    by = _as_list(by)
    if value not in frame.columns:
        raise KeyError(f"no such column: {value!r}")
    if not pd.api.types.is_numeric_dtype(frame[value]):
        raise TypeError(f"column {value!r} is not numeric")
    if by:
        groups = [(key if isinstance(key, tuple) else (key,), part[value].dropna())
                  for key, part in frame.groupby(by, observed=False, dropna=False)]
    else:
        groups = [((), frame[value].dropna())]
    label = _hidden_label(threshold)
    rows, notes, n_hidden = [], [], []
    for key, vals in groups:
        where = ", ".join(f"{b}={k}" for b, k in zip(by, key)) or "all"
        n = int(vals.size)
        reasons = []
        if n < threshold:
            reasons.append(f"fewer than {threshold} values (or none)")
            n_hidden.append(len(rows))
        else:
            reasons += dominance_check(vals, n=dominance_n, k=dominance_k, p=p_ratio)
        row = dict(zip(by, key))
        row["n"] = label if n < threshold else _round(n, rounding)
        if reasons:
            row.update(mean=SECONDARY, median=SECONDARY, q1=SECONDARY, q3=SECONDARY)
            notes.append(f"{where}: statistics suppressed ({'; '.join(reasons)})")
        else:
            q1, med, q3 = np.percentile(vals.to_numpy(dtype=np.float64), [25, 50, 75])
            row.update(mean=round(float(vals.mean()), decimals), median=round(float(med), decimals),
                       q1=round(float(q1), decimals), q3=round(float(q3), decimals))
        rows.append((n, row, where))
    if len(n_hidden) == 1 and len(rows) > 1:
        others = [i for i in range(len(rows)) if i not in n_hidden]
        j = min(others, key=lambda i: rows[i][0])
        rows[j][1]["n"] = SECONDARY
        notes.append(f"{rows[j][2]}: n suppressed so that a hidden group size cannot be "
                     "derived from the total (secondary suppression)")
    out = pd.DataFrame([r for _, r, _ in rows], columns=[*by, "n", "mean", "median", "q1", "q3"])
    if by:
        out = out.set_index(by)
    out = out.astype(object)
    if rounding and rounding > 1:
        notes.append(f"n is rounded to the nearest multiple of {rounding}")
    out.attrs[_ATTR] = {"notes": notes, "threshold": threshold, "rounding": rounding}
    return out


def check_counts(table: pd.DataFrame, *, threshold: int = DISCLOSURE_THRESHOLD,
                 columns: Sequence[str] | None = None) -> list[str]:
    """Cells of an (already aggregated) table that the small-count rule would flag:
    integer-valued numbers below *threshold* or zero, outside the index. *columns* limits
    the check (e.g. to count columns of a mixed table)."""
    found = []
    cols = list(table.columns) if columns is None else list(columns)
    for col in cols:
        for idx, v in table[col].items():
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
                continue
            if not np.isfinite(v) or float(v) != round(float(v)):
                continue
            if v < threshold:
                found.append(f"row {idx!r}, column {col!r}: a count below {threshold} or zero")
    return found


def disclosure_report(table: pd.DataFrame) -> list[str]:
    """Why cells of a table from :func:`safe_counts`/:func:`safe_summary` were suppressed.

    For any other table, the cells that the small-count rule would flag
    (:func:`check_counts`). The lines never state a hidden value.
    """
    info = table.attrs.get(_ATTR)
    if info is not None:
        return list(info["notes"])
    return check_counts(table)
