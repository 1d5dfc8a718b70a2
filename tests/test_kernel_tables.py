"""Safe tables: every cell passes ACRO-style small-count rules as the export screen applies
them, and no hidden cell can be worked out from the published totals."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from medzone_kernel import tables as T

THRESHOLD = 10


def _cohort(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "sex": rng.choice(["F", "M"], n),
        "site": rng.choice(["A", "B", "C", "D", "E"], n, p=[0.4, 0.35, 0.15, 0.07, 0.03]),
        "finding": rng.choice(["none", "nodule", "mass"], n, p=[0.6, 0.35, 0.05]),
        "age": rng.normal(60, 12, n),
    })


def _acro_count_findings(table: pd.DataFrame, threshold=THRESHOLD) -> list:
    """Independent re-implementation of the screen's count rule on a rendered table:
    any number outside the index below the threshold, or zero, is disclosive."""
    bad = []
    for col in table.columns:
        for idx, v in table[col].items():
            if isinstance(v, str):
                assert v in (f"<{threshold}", "suppressed"), v
                continue
            if float(v) < threshold:      # zeros included
                bad.append((idx, col, v))
    return bad


def _grid_with_margins(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(values, hidden) of a safe_counts cross-table including its Total row/column."""
    vals = np.zeros(table.shape)
    hidden = np.zeros(table.shape, bool)
    for (i, j), v in np.ndenumerate(table.to_numpy()):
        if isinstance(v, str):
            hidden[i, j] = True
        else:
            vals[i, j] = v
    return vals, hidden


def _derivable(vals: np.ndarray, hidden: np.ndarray) -> list:
    """Hidden cells whose value is fixed by the row and column equations of the published
    table (last row/column are the totals): e_h lies in the row space of the system."""
    r, c = vals.shape
    cells = [tuple(x) for x in np.argwhere(hidden)]
    pos = {cell: n for n, cell in enumerate(cells)}
    eqs = []
    for i in range(r):      # sum of row i's cells == its total
        coef = np.zeros(len(cells))
        for j in range(c - 1):
            if (i, j) in pos:
                coef[pos[(i, j)]] += 1
        if (i, c - 1) in pos:
            coef[pos[(i, c - 1)]] -= 1
        eqs.append(coef)
    for j in range(c):
        coef = np.zeros(len(cells))
        for i in range(r - 1):
            if (i, j) in pos:
                coef[pos[(i, j)]] += 1
        if (r - 1, j) in pos:
            coef[pos[(r - 1, j)]] -= 1
        eqs.append(coef)
    m = np.array(eqs)
    rank = np.linalg.matrix_rank(m)
    out = []
    for cell, n in pos.items():
        e = np.zeros(len(cells))
        e[n] = 1
        if np.linalg.matrix_rank(np.vstack([m, e])) == rank:
            out.append(cell)
    return out


def test_safe_counts_cross_table_passes_the_screen():
    df = _cohort()
    table = T.safe_counts(df, ["sex", "site"], rounding=None)
    truth = pd.crosstab(df["sex"], df["site"], margins=True, margins_name="Total")
    assert list(table.columns) == ["A", "B", "C", "D", "E", "Total"]
    assert list(table.index) == ["F", "M", "Total"]
    assert _acro_count_findings(table) == []
    vals, hidden = _grid_with_margins(table)
    for (i, j), h in np.ndenumerate(hidden):
        true = truth.iloc[i, j]
        if true < THRESHOLD:
            assert table.iloc[i, j] == "<10"          # every small count (and zero) hidden
        elif not h:
            assert vals[i, j] == true                 # shown counts are the true ones
    assert hidden.any()
    # secondary suppression: no row or column holds exactly one hidden cell …
    assert all(hidden[i].sum() != 1 for i in range(hidden.shape[0]))
    assert all(hidden[:, j].sum() != 1 for j in range(hidden.shape[1]))
    # … and no hidden cell follows from the totals
    assert _derivable(vals, hidden) == []
    assert T.disclosure_report(table)


@pytest.mark.parametrize("seed", range(40))
def test_secondary_suppression_random_tables(seed):
    rng = np.random.default_rng(seed)
    r, c = int(rng.integers(2, 6)), int(rng.integers(2, 7))
    counts = rng.choice([0, 1, 3, 8, 12, 25, 40, 90], size=(r, c))
    rows = [(f"r{i}", f"c{j}") for (i, j), n in np.ndenumerate(counts) for _ in range(n)]
    df = pd.DataFrame(rows, columns=["row", "col"])
    df["row"] = pd.Categorical(df["row"], [f"r{i}" for i in range(r)])
    df["col"] = pd.Categorical(df["col"], [f"c{j}" for j in range(c)])
    table = T.safe_counts(df, ["row", "col"], rounding=None)
    assert table.shape == (r + 1, c + 1)
    assert _acro_count_findings(table) == []
    vals, hidden = _grid_with_margins(table)
    assert _derivable(vals, hidden) == []
    full = np.zeros((r + 1, c + 1), int)
    full[:r, :c] = counts
    full[:r, c] = counts.sum(1)
    full[r, :c] = counts.sum(0)
    full[r, c] = counts.sum()
    assert np.array_equal(vals[~hidden], full[~hidden])
    assert hidden[full < THRESHOLD].all()


def test_one_key_counts_total_and_rounding():
    df = pd.DataFrame({"site": ["A"] * 43 + ["B"] * 27 + ["C"] * 4 + ["D"] * 12})
    table = T.safe_counts(df, "site")
    assert list(table.index) == ["A", "B", "C", "D", "Total"]
    shown = table["count"].to_dict()
    # C is small; with the total shown, one more cell (the smallest other: D) is hidden
    assert shown == {"A": 45, "B": 25, "C": "<10", "D": "suppressed", "Total": 85}
    assert all(v % 5 == 0 for v in shown.values() if isinstance(v, int))
    assert _acro_count_findings(table) == []
    exact = T.safe_counts(df, "site", rounding=None)["count"].to_dict()
    assert exact == {"A": 43, "B": 27, "C": "<10", "D": "suppressed", "Total": 86}


def test_rounding_never_shows_a_small_number():
    df = _cohort(500, seed=3)
    table = T.safe_counts(df, ["sex", "finding"], rounding=5)
    assert _acro_count_findings(table) == []
    for v in table.to_numpy().ravel():
        if not isinstance(v, str):
            assert v % 5 == 0 and v >= THRESHOLD


def test_zeros_are_suppressed_and_listed():
    df = pd.DataFrame({"finding": pd.Categorical(["none"] * 30 + ["nodule"] * 20,
                                                 categories=["none", "nodule", "mass"])})
    table = T.safe_counts(df, ["finding"], rounding=None)
    assert table.loc["mass", "count"] == "<10"
    # the zero is primary, so another cell must go too (else total - shown = 0 gives it away)
    assert table.loc["nodule", "count"] == "suppressed"
    assert table.loc["Total", "count"] == 50
    df2 = pd.DataFrame({"a": ["x"] * 20 + ["y"] * 20, "b": ["p"] * 20 + ["q"] * 20})
    cross = T.safe_counts(df2, ["a", "b"], rounding=None)
    assert cross.loc["x", "q"] == "<10" and cross.loc["y", "p"] == "<10"   # zero cells
    assert _acro_count_findings(cross) == []
    assert _derivable(*_grid_with_margins(cross)) == []


def test_three_keys():
    df = _cohort(600, seed=1)
    table = T.safe_counts(df, ["sex", "finding", "site"], rounding=None)
    assert table.index.nlevels == 2 and table.columns[-1] == "Total"
    assert len(table) == 2 * 3 + 1
    assert _acro_count_findings(table) == []
    assert _derivable(*_grid_with_margins(table)) == []


def test_disclosure_report_never_states_a_hidden_value():
    df = pd.DataFrame({"site": ["A"] * 40 + ["B"] * 3 + ["C"] * 15,
                       "sex": ["F", "M"] * 29})
    table = T.safe_counts(df, ["site", "sex"], rounding=None)
    report = T.disclosure_report(table)
    assert any("site=B" in line and "primary" in line for line in report)
    assert any("secondary" in line for line in report)
    for line in report:
        assert not re.search(r"(?<![<\d])\d(?!\d)", line), line   # no single-digit count


def test_check_counts_flags_a_raw_table():
    df = _cohort()
    raw = pd.crosstab(df["sex"], df["site"])
    flagged = T.disclosure_report(raw)        # a table not built here: checked instead
    assert len(flagged) == int((raw.to_numpy() < THRESHOLD).sum()) > 0
    assert T.check_counts(T.safe_counts(df, ["sex", "site"])) == []


# --- summaries ------------------------------------------------------------------------------


def _nk_fails(values, n=2, k=0.9):
    x = sorted(np.abs(values), reverse=True)
    return sum(x[:n]) / sum(x) > k


def _p_fails(values, p=0.1):
    x = sorted(np.abs(values), reverse=True)
    return (sum(x) - x[0] - x[1]) / x[0] < p


def test_safe_summary_rules():
    rng = np.random.default_rng(2)
    parts = [
        pd.DataFrame({"group": "ok", "value": rng.normal(50, 5, 40)}),
        pd.DataFrame({"group": "small", "value": rng.normal(50, 5, 6)}),
        # n ≥ 10 but two contributors dominate
        pd.DataFrame({"group": "dominated", "value": [5000.0, 4000.0] + [10.0] * 10}),
        pd.DataFrame({"group": "also_ok", "value": rng.normal(-700, 50, 25)}),  # HU: negative
    ]
    df = pd.concat(parts, ignore_index=True)
    s = T.safe_summary(df, "value", ["group"], rounding=None)
    ok = df[df.group == "ok"]["value"]
    assert s.loc["ok", "n"] == 40
    assert s.loc["ok", "mean"] == pytest.approx(ok.mean(), abs=0.005)
    assert s.loc["ok", "median"] == pytest.approx(ok.median(), abs=0.005)
    assert s.loc["ok", "q1"] == pytest.approx(ok.quantile(0.25), abs=0.005)
    assert s.loc["ok", "q3"] == pytest.approx(ok.quantile(0.75), abs=0.005)
    assert s.loc["also_ok", "mean"] == pytest.approx(
        df[df.group == "also_ok"]["value"].mean(), abs=0.005)
    assert s.loc["small", "n"] == "<10" and s.loc["small", "mean"] == "suppressed"
    dom = df[df.group == "dominated"]["value"]
    assert _nk_fails(dom) and _p_fails(dom)
    assert s.loc["dominated", "n"] == 12 or s.loc["dominated", "n"] == "suppressed"
    assert (s.loc["dominated", ["mean", "median", "q1", "q3"]] == "suppressed").all()
    # only one n hidden: the smallest other group's n is hidden too (cohort size is known)
    assert s.loc["dominated", "n"] == "suppressed"
    for g in ("ok", "also_ok"):
        vals = df[df.group == g]["value"]
        assert not _nk_fails(vals) and not _p_fails(vals)
    report = T.disclosure_report(s)
    assert any("group=dominated" in x and "dominance" in x for x in report)
    assert any("group=small" in x for x in report)


def test_dominance_rules_match_the_formulas():
    rng = np.random.default_rng(4)
    for _ in range(200):
        vals = rng.pareto(1.0, int(rng.integers(2, 30))) + 1e-3
        got = T.dominance_check(vals)
        assert any("dominance" in x for x in got) == _nk_fails(vals)
        assert any("p-ratio" in x for x in got) == _p_fails(vals)
    # the p-ratio rule alone (with a looser k): two large, the rest tiny
    vals = [100.0, 50.0] + [0.8] * 10
    got = T.dominance_check(vals, k=0.99)
    assert [x.split(":")[0] for x in got] == ["p-ratio"]
    s = T.safe_summary(pd.DataFrame({"v": vals}), "v", dominance_k=0.99)
    assert s.loc[0, "mean"] == "suppressed"
    assert T.dominance_check(np.zeros(12)) == ["all contributions are zero"]


def test_safe_summary_whole_cohort_and_errors():
    df = _cohort()
    s = T.safe_summary(df, "age")
    assert s.loc[0, "n"] == 300 and s.loc[0, "mean"] == pytest.approx(df["age"].mean(), abs=0.01)
    with pytest.raises(KeyError):
        T.safe_summary(df, "weight", ["sex"])
    with pytest.raises(TypeError):
        T.safe_summary(df, "sex", ["site"])
    with pytest.raises(KeyError):
        T.safe_counts(df, ["nope"])


def _frame_from_counts(counts) -> pd.DataFrame:
    counts = np.asarray(counts)
    r, c = counts.shape
    rows = [(f"r{i}", f"c{j}") for (i, j), n in np.ndenumerate(counts) for _ in range(n)]
    df = pd.DataFrame(rows, columns=["row", "col"])
    df["row"] = pd.Categorical(df["row"], [f"r{i}" for i in range(r)])
    df["col"] = pd.Categorical(df["col"], [f"c{j}" for j in range(c)])
    return df


def test_two_per_line_is_not_enough_a_bridge_cell_is_also_hidden():
    # Two hidden-cell cycles joined by one cell: every row and column holds 0 or ≥ 2 hidden
    # cells, yet the joining cell (r1, c1: a zero) follows from the totals. The exact
    # check must hide more.
    counts = [[3, 25, 40, 40, 90, 40], [90, 0, 12, 12, 0, 0],
              [40, 90, 40, 12, 40, 3], [40, 3, 40, 90, 90, 40]]
    lines_only = np.zeros((5, 7), bool)
    lines_only[[0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3], [0, 1, 1, 3, 4, 5, 3, 4, 5, 0, 1]] = True
    ext = np.zeros((5, 7))
    ext[:4, :6] = counts
    ext[:4, 6] = ext[:4, :6].sum(1)
    ext[4] = ext[:4].sum(0)
    assert all(lines_only[i].sum() != 1 for i in range(5))
    assert all(lines_only[:, j].sum() != 1 for j in range(7))
    assert (1, 1) in _derivable(ext, lines_only)          # the leak the line rule leaves
    table = T.safe_counts(_frame_from_counts(counts), ["row", "col"], rounding=None)
    vals, hidden = _grid_with_margins(table)
    assert _derivable(vals, hidden) == []
    assert hidden[lines_only].all()


def test_counts_are_reported_and_identifier_columns_refused():
    df = _cohort()
    table = T.safe_counts(df, "site", rounding=None)
    info = table.attrs["medzone_disclosure"]
    shown = table["count"].tolist()
    assert info["primary"] == shown.count("<10") and info["secondary"] == shown.count("suppressed")
    df["patient_id"] = [f"P{n}" for n in range(len(df))]
    for col in ("patient_id", "patient", "PatientID"):
        df[col] = df["patient_id"]
        with pytest.raises(ValueError):
            T.safe_counts(df, ["sex", col])
        with pytest.raises(ValueError):
            T.safe_summary(df, "age", col)
    assert len(T.safe_counts(df, "sex")) == 3      # 'sex' is fine
