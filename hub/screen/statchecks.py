"""ACRO's checks beyond frequency tables, on outputs as a notebook prints them: residual
degrees of freedom of regressions, survival tables with small risk sets, histograms whose
bins hold small counts. Finders return :class:`Facts`; ``tables.check_table`` reports them."""

from __future__ import annotations

import html as html_lib
import re
from dataclasses import dataclass

# --- regressions ------------------------------------------------------------------------

_TAG_RE = re.compile(r"<[^>]+>")
#: statsmodels ``summary()`` / ``summary2()`` (text and HTML): "Df Residuals:  5".
_DF_RESID_RE = re.compile(r"\bDf[ \t]+Resid(?:uals|\.)?:?[ \t]+(-?\d+(?:\.\d*)?)(?![\d.])", re.I)
#: R-style summaries: "Residual standard error: 1.2 on 5 degrees of freedom",
#: "Residual deviance: 3.1 on 5 degrees of freedom".
_R_DOF_RE = re.compile(r"\bResidual[ \w]{0,20}:[^\n]{0,60}?\bon[ \t]+(\d+)[ \t]+degrees[ \t]+of[ \t]+"
                       r"freedom", re.I)
_MODEL_RE = re.compile(r"\bModel:[ \t]+([A-Za-z][\w.]{0,30})")


@dataclass
class Facts:
    """What a finder read from an output: ``kind`` is ``regression`` (``dof``, ``model``),
    ``histogram`` (``counts``: the bins) or ``survival`` (``counts``: numbers at risk)."""

    kind: str
    dof: float | None = None
    model: str = ""
    counts: tuple[int, ...] = ()  # bin counts, or the numbers at risk of a survival curve


def _plain(text: str) -> str:
    if "<" in text and ">" in text:
        text = html_lib.unescape(_TAG_RE.sub(" ", text))
    return text


def regressions(text: str) -> list[Facts]:
    """Every regression summary in ``text`` (plain or HTML) with its residual DoF."""
    if "esid" not in text and "degrees of freedom" not in text:
        return []
    plain = _plain(text)
    out = []
    for m in _DF_RESID_RE.finditer(plain):
        model = _MODEL_RE.search(plain, max(0, m.start() - 2000), m.start())
        out.append(Facts("regression", dof=float(m.group(1)),
                         model=model.group(1) if model else ""))
    for m in _R_DOF_RE.finditer(plain):
        out.append(Facts("regression", dof=float(m.group(1)), model="R-style summary"))
    return out


# --- histograms printed as arrays ---------------------------------------------------------

#: ``np.histogram(x)`` and ``plt.hist(x)`` (whose return value a cell without ``;`` shows):
#: ``(array([ 3, 12, …]), array([40. , 45.5, …]))`` with one more edge than counts.
_HIST_RE = re.compile(r"\(\s*array\(\s*\[([^\]\[]*)\](?:\s*,\s*dtype=\w+)?\s*\)\s*,\s*"
                      r"array\(\s*\[([^\]\[]*)\](?:\s*,\s*dtype=\w+)?\s*\)")
_NUM_RE = re.compile(r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf)")


def _numbers(body: str) -> list[float] | None:
    tokens = body.replace(",", " ").split()
    if not tokens or any(not _NUM_RE.fullmatch(t) for t in tokens):
        return None
    return [float(t) for t in tokens]


def histograms(text: str) -> list[Facts]:
    """Histogram counts printed as NumPy arrays (``np.histogram``, ``plt.hist``)."""
    if "array(" not in text:
        return []
    out = []
    for m in _HIST_RE.finditer(text):
        counts, edges = _numbers(m.group(1)), _numbers(m.group(2))
        if not counts or not edges or len(edges) != len(counts) + 1:
            continue
        if any(c < 0 or c != int(c) for c in counts):
            continue  # densities or weights: not counts of people
        if any(b < a for a, b in zip(edges, edges[1:])):
            continue
        out.append(Facts("histogram", counts=tuple(int(c) for c in counts)))
    return out


# --- numbers at risk printed under a survival curve ----------------------------------------

#: "At risk   120  80  41  9" (lifelines' ``add_at_risk_counts`` layout, or a row printed
#: beside a curve); the row label may be "Number at risk", "No. at risk", "n.risk".
_AT_RISK_LINE_RE = re.compile(r"^[ \t]*(?:num(?:ber)?\.?|no\.|n\.?)?[ \t]*at[ \t_]*risk:?"
                              r"((?:[ \t]+\d[\d,]*(?:\.0+)?){2,})[ \t]*$", re.I | re.M)


def at_risk_rows(text: str) -> list[Facts]:
    if "risk" not in text.lower():
        return []
    out = []
    for m in _AT_RISK_LINE_RE.finditer(text):
        out.append(Facts("survival", counts=tuple(int(float(x.replace(",", "")))
                                                  for x in m.group(1).split())))
    return out


# --- tables: which kind, by their names ---------------------------------------------------

_AT_RISK_RE = re.compile(r"^(?:num(?:ber)?\s*)?(?:at\s*risk|n\s*risk|risk\s*set)$", re.I)
_INTERVAL_RE = re.compile(r"^[\(\[]\s*[-+]?[\d.eE+-]+\s*,\s*[-+]?[\d.eE+-]+\s*[\)\]]$")
_BIN_EDGE_RE = re.compile(r"^(?:bin[\s_]*)?(?:left|right|lower|upper|start|end|from|to|edge|"
                          r"edges|lo|hi|low|high)(?:[\s_]*edge)?$|^bins?$", re.I)


def norm_name(name: str) -> str:
    return re.sub(r"[\s_.]+", " ", name.strip()).strip()


def is_at_risk(name: str) -> bool:
    return bool(_AT_RISK_RE.match(norm_name(name)))


def is_interval(label: str) -> bool:
    return bool(_INTERVAL_RE.match(label.strip()))


def is_bin_edge(name: str) -> bool:
    return bool(_BIN_EDGE_RE.match(norm_name(name)))
