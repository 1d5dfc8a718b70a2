"""The screen's corpus of statistical outputs (ACRO's checks beyond frequency tables),
built by code with the libraries a student uses (pandas, NumPy, statsmodels, matplotlib)
from the synthetic demo cohort.

Leaky cases: regressions with too few residual degrees of freedom, survival tables with
small risk sets (printed, as HTML, and as the "number at risk" table printed beside a
curve), histograms whose bins hold small counts (``np.histogram``, the value of a bare
``plt.hist(...)``, ``pd.cut(...).value_counts()``, a CSV of bin edges and counts), sums and
means dominated by one contributor. Clean cases: the same outputs on a cohort large enough
to be safe. The clean cohort and the survival times are drawn with ``seed``: thresholds
were chosen on seed 101 (calibration); other seeds are evaluation.
"""

from __future__ import annotations

import base64
import csv
import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from medzone_hub.screen import ScreenConfig

from .screen_corpus import Case, _code, _display, _nb, _result, _stream

CALIBRATION_SEEDS = (101,)
EVALUATION_SEEDS = (202, 303, 404)


def clinical_frame(seed: int, patients: int) -> pd.DataFrame:
    """The demo cohort's clinical table (what ``generate_cohort`` writes, no images)."""
    from medzone_hub import demodata as dd

    rng = np.random.default_rng([seed, 0])
    identities = dd.make_identities(rng, patients)
    labels = dd._assign_quota(rng, patients, dd._LABEL_CYCLE)
    rows = []
    for index in range(patients):
        ident = identities[index]
        facts = dd.make_clinical_facts(np.random.default_rng([seed, 1, index]), ident,
                                       labels[index])
        rows.append({"age": ident.age, "sex": ident.sex, "height_cm": facts.height_cm,
                     "weight_kg": facts.weight_kg, "smoking": facts.smoking,
                     "pack_years": facts.pack_years, "cxr_label": facts.cxr_label})
    return _derived(pd.DataFrame(rows), seed)


def dataset_frame(dataset_root: Path, seed: int = 0) -> pd.DataFrame:
    """The stored dataset's clinical table, read as a notebook reads it."""
    df = pd.read_csv(dataset_root / "data" / "clinical.csv")
    return _derived(df[["age", "sex", "height_cm", "weight_kg", "smoking", "pack_years",
                        "cxr_label"]].copy(), seed)


def _derived(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Columns an analysis adds: BMI, age group, and follow-up (months to an event or to
    censoring; the cohort has no outcome, so it is drawn with ``seed``)."""
    rng = np.random.default_rng([seed, 7])
    df["bmi"] = (df.weight_kg / (df.height_cm / 100) ** 2).round(1)
    df["age_group"] = pd.cut(df.age, [0, 50, 60, 70, 120], labels=["<50", "50-59", "60-69", "70+"])
    df["months"] = np.ceil(rng.exponential(30, len(df))).clip(1, 60).astype(int)
    df["event"] = (rng.random(len(df)) < 0.6).astype(int)
    return df


def _html_and_text(obj) -> dict:
    return {"text/html": obj.to_html() if hasattr(obj, "to_html") else obj._repr_html_(),
            "text/plain": repr(obj)}


def _fig_png(draw) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=60)
    out = draw(ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue(), out


def _csv_bytes(df: pd.DataFrame, index=True) -> bytes:
    return df.to_csv(index=index).encode()


def _ols(df: pd.DataFrame):
    import statsmodels.api as sm

    X = sm.add_constant(df[["height_cm", "age"]].astype(float))
    return sm.OLS(df.weight_kg.astype(float), X).fit()


def _logit(df: pd.DataFrame):
    import statsmodels.api as sm

    X = sm.add_constant(df[["age", "pack_years"]].astype(float))
    y = (df.sex == "M").astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sm.Logit(y, X).fit(disp=0, maxiter=200, method="bfgs")


def _survival(df: pd.DataFrame) -> pd.DataFrame:
    import statsmodels.api as sm

    return sm.SurvfuncRight(df.months.to_numpy(), df.event.to_numpy()).summary()


def _at_risk_row(df: pd.DataFrame, times) -> pd.DataFrame:
    """The "number at risk" table printed beside a Kaplan–Meier curve."""
    return pd.DataFrame([[int((df.months >= t).sum()) for t in times]],
                        index=["At risk"], columns=[str(t) for t in times])


def _grouped_survival(df: pd.DataFrame, width: int) -> pd.DataFrame:
    """A survival table by intervals of ``width`` months (as a careful analyst reports it)."""
    edges = list(range(0, 61, width))
    rows = []
    for lo in edges[:-1]:
        at_risk = int((df.months > lo).sum())
        events = int(((df.months > lo) & (df.months <= lo + width) & (df.event == 1)).sum())
        rows.append({"interval": f"{lo}-{lo + width}", "num at risk": at_risk,
                     "num events": events})
    return pd.DataFrame(rows).set_index("interval")


def build_table_cases(dataset_root: Path, other_cohort_root: Path, work: Path, *,
                      seed: int = CALIBRATION_SEEDS[0], patients: int = 600) -> list[Case]:
    """The statistical-output cases; ``seed`` draws the large (clean) cohort and the
    follow-up times; ``other_cohort_root`` and ``work`` are unused (same call as
    ``build_cases``)."""
    _ = other_cohort_root, work
    small = dataset_frame(dataset_root, seed)  # the ingested dataset: a handful of patients
    big = clinical_frame(seed, patients)
    cases: list[Case] = []

    def add(name, data, verdict, rule, label):
        cases.append(Case(name, data, verdict, rule, ScreenConfig(), label))

    # --- regressions: residual degrees of freedom ---------------------------------------
    DOF = "degrees-of-freedom"
    ols_small = _ols(small)
    add("ols-print.ipynb", _nb([_code("print(model.summary())", [_stream(
        str(ols_small.summary()) + "\n")])]), "review", DOF,
        f"print(OLS summary) on the dataset ({int(ols_small.df_resid)} residual DoF)")
    add("ols-html.ipynb", _nb([_code("model.summary()", [_result({
        "text/html": ols_small.summary().as_html(),
        "text/plain": str(ols_small.summary())})])]), "review", DOF,
        "an OLS summary as a notebook shows it (HTML and text)")
    add("ols-summary2.txt", str(ols_small.summary2()).encode(), "review", DOF,
        "summary2() of an OLS fit saved as text")
    few = big.sample(12, random_state=seed)
    logit_few = _logit(few)
    add("logit.ipynb", _nb([_code("print(logit.summary())", [_stream(
        str(logit_few.summary()))])]), "review", DOF,
        f"a Logit on a 12-patient subgroup ({int(logit_few.df_resid)} residual DoF)")
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probit = sm.Probit((few.smoking != "never").astype(int),
                           sm.add_constant(few[["age", "bmi"]].astype(float))).fit(
            disp=0, method="bfgs", maxiter=200)
        glm = smf.glm("pack_years ~ age + C(sex)", data=small,
                      family=sm.families.Poisson()).fit()
    add("probit.txt", str(probit.summary()).encode(), "review", DOF,
        "a Probit summary of a 12-patient subgroup saved as text")
    add("glm.ipynb", _nb([_code("glm.summary()", [_result({
        "text/html": glm.summary().as_html(), "text/plain": str(glm.summary())})])]),
        "review", DOF, "a Poisson GLM (formula API) on the dataset")
    formula_big = smf.ols("weight_kg ~ height_cm + C(sex) + age", data=big).fit()
    add("formula-ok.ipynb", _nb([_code("smf.ols(...).fit().summary()", [_result({
        "text/html": formula_big.summary().as_html(),
        "text/plain": str(formula_big.summary())})])]), "pass", None,
        "a formula-API OLS on the whole cohort")
    ols_big, logit_big = _ols(big), _logit(big)
    add("ols-ok.ipynb", _nb([_code("model.summary()", [_result({
        "text/html": ols_big.summary().as_html(), "text/plain": str(ols_big.summary())})]),
        _code("print(logit.summary2())", [_stream(str(logit_big.summary2()))])]),
        "pass", None, "OLS and Logit summaries on the whole cohort")

    # --- survival -----------------------------------------------------------------------
    SV = "survival-risk-set"
    surv_small = _survival(small)
    add("km-table.ipynb", _nb([_code("sf.summary()", [_result(_html_and_text(surv_small))])]),
        "review", SV, "a Kaplan–Meier table of the dataset (statsmodels SurvfuncRight)")
    surv_big = _survival(big)
    add("km-big-print.ipynb", _nb([_code("print(sf.summary())", [_stream(
        surv_big.to_string() + "\n")])]), "review", SV,
        "a Kaplan–Meier table of the whole cohort, one row per event time (printed)")
    add("km-big.csv", _csv_bytes(surv_big), "review", SV, "the same table saved as CSV")
    png, _ = _fig_png(lambda ax: ax.step(surv_big.index, surv_big["Surv prob"], where="post"))
    times = [0, 12, 24, 36, 48, 60]
    add("km-curve.ipynb", _nb([_code("sf.plot(); print(at_risk)", [
        _display({"image/png": base64.b64encode(png).decode(), "text/plain": "<Figure>"}),
        _stream(_at_risk_row(small, times).to_string() + "\n")])]), "review", SV,
        "a Kaplan–Meier curve of the dataset with its number-at-risk table printed beside it")
    grouped = _grouped_survival(big, 12)
    add("km-grouped.ipynb", _nb([_code("table", [_result(_html_and_text(grouped))])]),
        "pass" if grouped["num at risk"].min() >= 10 and
        (-grouped["num at risk"].diff().dropna()).min() >= 10 else "review",
        None if grouped["num at risk"].min() >= 10 else SV,
        "a survival table by 12-month intervals of the whole cohort")
    add("km-curve-ok.ipynb", _nb([_code("sf.plot(); print(at_risk)", [
        _display({"image/png": base64.b64encode(png).decode(), "text/plain": "<Figure>"}),
        _stream(_at_risk_row(big, [0, 6, 12, 18]).to_string() + "\n")])]), "pass", None,
        "a curve with a number-at-risk table of large risk sets")

    # --- histograms ---------------------------------------------------------------------
    HI = "histogram-bins"
    add("np-hist.ipynb", _nb([_code("np.histogram(df.age)", [_result({
        "text/plain": repr(np.histogram(small.age.to_numpy()))})])]), "review", HI,
        "np.histogram of the dataset's ages")
    def leaky(counts) -> tuple[str, str | None]:
        """The label from the data: a histogram leaks when a bin holds 0 … 9."""
        return ("review", HI) if min(int(c) for c in counts) < 10 else ("pass", None)

    png, out = _fig_png(lambda ax: ax.hist(big.pack_years.to_numpy(), bins=20))
    add("plt-hist.ipynb", _nb([_code("plt.hist(df.pack_years, bins=20)", [
        _result({"text/plain": repr(out)}),
        _display({"image/png": base64.b64encode(png).decode(), "text/plain": "<Figure>"})])]),
        *leaky(out[0]), "the value of a bare plt.hist(...) (20 bins of a skewed variable)")
    vc = pd.cut(big.bmi, 16).value_counts().sort_index()
    add("cut-counts.ipynb", _nb([_code("pd.cut(df.bmi, 16).value_counts()", [_result({
        "text/plain": repr(vc)})])]), *leaky(vc), "pd.cut(bmi, 16).value_counts()")
    counts, edges = np.histogram(big.weight_kg.to_numpy(), bins=15)
    bins = pd.DataFrame({"bin_left": edges[:-1].round(1), "bin_right": edges[1:].round(1),
                         "count": counts})
    add("weight-bins.csv", _csv_bytes(bins, index=False), *leaky(counts),
        "a CSV of 15 weight bins and their counts")
    ok = np.histogram(big.height_cm.to_numpy(), bins=[0, 155, 160, 165, 170, 175, 300])
    add("np-hist-ok.ipynb", _nb([_code("np.histogram(df.height_cm, bins=edges)", [_result({
        "text/plain": repr(ok)})])]), *leaky(ok[0]), "np.histogram of heights in 6 wide bins")
    vc_ok = pd.cut(big.age, [0, 50, 60, 70, 120]).value_counts().sort_index()
    add("cut-ok.ipynb", _nb([_code("pd.cut(df.age, edges).value_counts()", [_result({
        "text/plain": repr(vc_ok)})])]), *leaky(vc_ok), "age groups of the whole cohort")

    vb = big.pack_years.value_counts(bins=30).sort_index()
    add("vc-bins.ipynb", _nb([_code("df.pack_years.value_counts(bins=30)", [_result({
        "text/plain": repr(vb)})])]), *leaky(vb), "value_counts(bins=30) of pack-years")
    dens = np.histogram(big.bmi.to_numpy(), bins=12, density=True)
    add("density-ok.ipynb", _nb([_code("np.histogram(df.bmi, 12, density=True)", [_result({
        "text/plain": repr(dens)})])]), "pass", None, "a density histogram (no counts)")

    # --- magnitude: sums and means with their contributions ------------------------------
    SC = "small-counts"
    dom = big.copy()
    dom["pack_years"] = dom.pack_years.astype(float)
    dom.loc[dom.index[dom.smoking == "current"][0], "pack_years"] = 50_000.0
    agg = dom.groupby("smoking")["pack_years"].agg(["count", "sum", "max"])
    add("dominance.ipynb", _nb([_code("df.groupby('smoking').pack_years.agg(...)", [_result(
        _html_and_text(agg))])]), "review", SC,
        "pack-years summed by smoking status, one patient dominating")
    piv = dom.pivot_table(values="pack_years", index="smoking", columns="sex",
                          aggfunc=["mean", "max", "count"])
    add("dominance.csv", _csv_bytes(piv), "review", SC,
        "pivot_table(aggfunc=[mean, max, count]) with a dominated cell, saved as CSV")
    clean = big.pivot_table(values="height_cm", index="cxr_label", columns="sex",
                            aggfunc=["mean", "max", "count"])
    verdict = "pass" if clean.xs("count", axis=1, level=0).min().min() >= 10 else "review"
    add("means-ok.ipynb", _nb([_code("df.pivot_table(..., aggfunc=['mean','max','count'])",
                                     [_result(_html_and_text(clean))])]), verdict,
        None if verdict == "pass" else SC, "mean heights by label and sex with counts")
    return cases


def _csv_rows(rows) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()
