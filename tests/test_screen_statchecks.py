"""ACRO's checks beyond frequency tables (regression DoF, survival risk sets, histogram
bins, dominance of sums and means) on outputs printed by the real libraries, from the
demo cohort (tests/screen_corpus_tables.py), plus the parsers' edges."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from medzone_hub.screen import ScreenConfig, screen_bytes

from .screen_corpus import demo_indexes, demo_zone  # noqa: F401 (fixtures)
from .screen_corpus_tables import CALIBRATION_SEEDS, EVALUATION_SEEDS, build_table_cases


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    return tmp_path_factory.mktemp("other")


def _check(cases, indexes):
    wrong, rates = [], defaultdict(lambda: [0, 0])
    clean = fired = 0
    for case in cases:
        v = screen_bytes(case.name, case.data, indexes=indexes, config=case.config)
        rules = {f.rule for f in v.findings}
        if v.verdict != case.verdict or (case.rule and case.rule not in rules):
            wrong.append(f"{case.name} ({case.label}): expected {case.verdict}/{case.rule}, "
                         f"got {v.verdict} {[(f.rule, f.location, f.detail) for f in v.findings]}")
        if case.rule:
            rates[case.rule][0] += 1
            rates[case.rule][1] += case.rule in rules
        else:
            clean += 1
            fired += bool(rules)
    return wrong, rates, clean, fired


@pytest.mark.parametrize("seed", CALIBRATION_SEEDS + EVALUATION_SEEDS[:1])
def test_statistical_outputs(zone, indexes, other, tmp_path, seed):
    cases = build_table_cases(zone.home.dataset_dir("demo"), other, tmp_path / "w", seed=seed)
    assert {c.rule for c in cases} >= {"degrees-of-freedom", "survival-risk-set",
                                       "histogram-bins", "small-counts", None}
    wrong, rates, clean, fired = _check(cases, indexes)
    print(json.dumps({"seed": seed, "rates": rates, "clean": clean, "clean_flagged": fired}))
    assert not wrong, "\n".join(wrong)


def test_dof_threshold_is_a_setting():
    text = b"                            OLS Regression Results\n" \
           b"Dep. Variable:      y   R-squared:   0.5\nModel:    OLS   Adj. R-squared: 0.4\n" \
           b"No. Observations:   25   AIC:  10\nDf Residuals:       22   BIC:  11\n"
    assert screen_bytes("r.txt", text).verdict == "pass"
    v = screen_bytes("r.txt", text, config=ScreenConfig(dof_threshold=30))
    assert v.verdict == "review" and v.findings[0].rule == "degrees-of-freedom"
    assert "22 residual degrees of freedom" in v.findings[0].detail


def test_histogram_densities_and_unsorted_edges_are_not_counts():
    dens = b"(array([0.01, 0.2, 0.03]), array([1., 2., 3., 4.]))"
    assert screen_bytes("h.txt", dens).verdict == "pass"
    odd = b"(array([1, 2, 3]), array([4., 2., 3., 1.]))"
    assert screen_bytes("h.txt", odd).verdict == "pass"
    small = b"(array([1, 20, 30]), array([1., 2., 3., 4.]))"
    v = screen_bytes("h.txt", small)
    assert v.verdict == "review" and v.findings[0].rule == "histogram-bins"
    assert screen_bytes("h.txt", small, config=ScreenConfig(threshold=1)).verdict == "pass"


def test_survival_threshold_is_a_setting():
    import pandas as pd

    table = pd.DataFrame({"Surv prob": [0.9, 0.8, 0.7], "num at risk": [400, 350, 300],
                          "num events": [40, 45, 44]}, index=pd.Index([12, 24, 36], name="Time"))
    text = table.to_string().encode()
    assert screen_bytes("s.txt", text).verdict == "pass"
    v = screen_bytes("s.txt", text, config=ScreenConfig(survival_threshold=60))
    assert v.verdict == "review" and v.findings[0].rule == "survival-risk-set"


def test_findings_never_raise_on_odd_tables():
    for data in (b"(array([1, 2]), array([", b"Df Residuals: 1e999999\n",
                 b"<table><thead><tr><th colspan='999999999'>count</th></tr></thead>"
                 b"<tr><td>1</td></tr></table>"):
        assert screen_bytes("x.html" if data.startswith(b"<") else "x.txt", data).verdict


def test_fixed_width_logs_and_reports_are_not_tables():
    """A training log laid out in columns has no header: nothing to count."""
    log = "".join(f"fold {f}  epoch {e:3d}  n_val {8 + f:4d}  loss {1 / (e + 1):.4f}\n"
                  for f in range(3) for e in range(40)).encode()
    assert screen_bytes("train.log", log).verdict == "pass"
    import pandas as pd

    report = pd.DataFrame({"n patients": [3, 250], "mean age": [61.2, 60.1]},
                          index=pd.Index(["site a", "site b"], name="site")).to_string()
    v = screen_bytes("report.txt", report.encode())
    assert v.verdict == "review" and v.findings[0].rule == "small-counts"


def test_value_counts_series_are_read():
    """``value_counts()`` prints a Series: its index name (if any) above, ``Name: count``
    below; with ``bins=`` the labels are intervals and it is a histogram."""
    import numpy as np
    import pandas as pd

    ages = pd.Series(np.arange(200) % 50 + 40, name="age")
    named = repr(pd.cut(ages, [0, 50, 60, 70, 120]).value_counts().sort_index())
    unnamed = repr(ages.value_counts(bins=4).sort_index())
    for text in (named, unnamed):
        assert screen_bytes("v.txt", text.encode()).verdict == "pass"
        v = screen_bytes("v.txt", text.encode(), config=ScreenConfig(threshold=100))
        assert v.verdict == "review" and v.findings[0].rule == "histogram-bins", text
    frame = pd.DataFrame({"age": [61, 70] * 20, "sex": ["F", "M"] * 20})
    assert screen_bytes("v.txt", repr(frame.isna().sum()).encode()).verdict == "pass"
    groups = repr(pd.Series(["F"] * 40 + ["M"] * 3, name="sex").value_counts())
    v = screen_bytes("v.txt", groups.encode())
    assert v.verdict == "review" and v.findings[0].rule == "small-counts"
