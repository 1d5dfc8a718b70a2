"""The export screen on cohorts it was never tuned on: recall of leaks and false positives of
clean outputs, per rule, for calibration seeds and evaluation seeds apart.

A *cohort pair* is an indexed cohort (the dataset: generated with the demo cohort's
generator, ingested de-identified into a temporary zone, screened with its real screening
index) and an other cohort (patients who are not in the dataset: their images and values
must pass). Thresholds were chosen on the calibration pairs; the evaluation pairs use seeds
no threshold was chosen on:

* calibration: indexed cohort seed 11 (the tests' cohort) with other-cohort seeds 1, 2, 3;
* evaluation: indexed cohort seed 31 with other-cohort seed 53, and 47 with 59.

Every corpus the screen has is built for every pair: ``tests/screen_corpus.py``
``build_cases`` and, when present, ``tests/screen_corpus_figures.py``
``build_figure_cases``, ``tests/screen_corpus_textbytes.py`` ``build_textbytes_cases`` and
``tests/screen_corpus_tables.py`` ``build_table_cases`` (a module that does not exist yet is
skipped with a note). A builder that takes a ``seed`` gets the other cohort's seed, so its
variants change with the pair; the figure corpus is built smaller than its default
(``SIZES``) to keep the whole run to a few minutes on two CPUs. Each case is screened as the airlock screens a file; a leak
is *caught* when its rule fires and the verdict is the expected one; a clean case is a
false positive of every rule that fires on it.

The figure corpus is also counted per style and per colour map (leaks blocked + reviewed
of all, clean cases flagged): ``figures`` in each split's summary.

``python -m benchmarks eval_screen`` prints the tables and writes
``benchmarks/results/eval_screen.json``. ``MEDZONE_EVAL_QUICK=1`` keeps one pair per split.
"""

from __future__ import annotations

import importlib
import inspect
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

#: (indexed cohort seed, other cohort seed) pairs.
CALIBRATION = ((11, 1), (11, 2), (11, 3))
EVALUATION = ((31, 53), (47, 59))
#: Keyword arguments for builders that take them (fewer figures than the default).
SIZES = {"per_style": 6, "ordinary": 30}
#: Patients of an indexed cohort (as the tests' cohort) and of an other cohort.
INDEXED_PATIENTS = 7
OTHER_PATIENTS = 2

CORPORA = (("screen_corpus", "build_cases"),
           ("screen_corpus_figures", "build_figure_cases"),
           ("screen_corpus_textbytes", "build_textbytes_cases"),
           ("screen_corpus_tables", "build_table_cases"))


def _builders() -> tuple[dict, dict]:
    """The corpus builders that exist now, and a note for each corpus."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    found, notes = {}, {}
    for module, function in CORPORA:
        try:
            mod = importlib.import_module(f"tests.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"tests.{module}":
                raise
            notes[module] = "missing"
            print(f"  note: tests/{module}.py does not exist yet: skipped")
            continue
        builder = getattr(mod, function, None)
        if builder is None:
            notes[module] = f"no {function}()"
            print(f"  note: tests/{module}.py has no {function}(): skipped")
            continue
        found[module] = builder
        notes[module] = "built"
    return found, notes


def _ingest(seed: int, base: Path):
    """A zone with the cohort of ``seed`` ingested (de-identified) as ``demo``."""
    from medzone_hub.config import MedZoneHome
    from medzone_hub.db import connect
    from medzone_hub.demodata import generate_cohort
    from medzone_hub.indexes import load_indexes
    from medzone_hub.ingest import ingest_dataset

    generate_cohort(base / "source", patients=INDEXED_PATIENTS, seed=seed, progress=False)
    home = MedZoneHome(base / "home").ensure()
    store = connect(home.db_url)
    ingest_dataset(home, store, "demo", base / "source", deidentify=True,
                   pseudonym_key=f"eval-provider-key-{seed:08d}".encode().ljust(32, b"0"),
                   actor="eval", progress=False)
    store.engine.dispose()
    return home.dataset_dir("demo"), load_indexes(home, ["demo"])


def _other(seed: int, base: Path) -> Path:
    from medzone_hub.demodata import generate_cohort

    out = base / f"other-{seed}"
    generate_cohort(out, patients=OTHER_PATIENTS, seed=seed, progress=False)
    return out


def _screen(case, indexes, work: Path):
    from medzone_hub.screen import screen_bytes, screen_paths

    if case.data is None:
        return screen_paths([work / case.name], indexes=indexes, config=case.config,
                            root=work)[0]
    return screen_bytes(case.name, case.data, indexes=indexes, config=case.config)


class _Tally:
    def __init__(self):
        self.leaks = defaultdict(lambda: [0, 0])  # rule -> [leaks, caught]
        self.clean = 0
        self.fired = defaultdict(int)  # rule -> clean cases it fired on
        self.clean_flagged = 0  # clean cases whose verdict was not pass
        self.missed: list[str] = []
        self.flagged: list[str] = []

    def add(self, case, verdict, where: str) -> None:
        rules = {f.rule for f in verdict.findings}
        if case.rule:
            caught = case.rule in rules and verdict.verdict == case.verdict
            self.leaks[case.rule][0] += 1
            self.leaks[case.rule][1] += caught
            if not caught:
                self.missed.append(f"{where} {case.name} ({case.label}): {verdict.verdict} "
                                   f"{sorted(rules)}")
        else:
            self.clean += 1
            for rule in rules:
                self.fired[rule] += 1
            if verdict.verdict != "pass":
                self.clean_flagged += 1
                self.flagged.append(f"{where} {case.name} ({case.label}): {verdict.verdict} "
                                    f"{sorted(rules)}")

    def summary(self) -> dict:
        rules = sorted(set(self.leaks) | set(self.fired))
        per_rule = {r: {"leaks": self.leaks[r][0], "caught": self.leaks[r][1],
                        "recall": (self.leaks[r][1] / self.leaks[r][0]
                                   if self.leaks[r][0] else None),
                        "clean_cases_flagged": self.fired[r],
                        "false_positive_rate": (self.fired[r] / self.clean
                                                if self.clean else None)}
                    for r in rules}
        leaks = sum(n for n, _ in self.leaks.values())
        caught = sum(c for _, c in self.leaks.values())
        return {"leaks": leaks, "caught": caught,
                "recall": caught / leaks if leaks else None,
                "clean": self.clean, "clean_flagged": self.clean_flagged,
                "false_positive_rate": self.clean_flagged / self.clean if self.clean else None,
                "per_rule": per_rule, "missed": self.missed[:40],
                "false_positives": self.flagged[:40]}


def _figure_keys(label: str) -> tuple[str, str | None]:
    """(style, colour map) of a figure case's label ("dataset: axes, CT, gray_r, ...",
    "plot: roc"); the map is None for ordinary plots."""
    source, _, what = label.partition(": ")
    parts = what.split(", ")
    if source == "plot" or len(parts) < 3:
        return f"plot {parts[0]}", None
    return parts[0].split()[0], parts[2]


def _figure_table(tallies: dict) -> dict:
    """Per style (or colour map): leaks, blocked, reviewed; clean cases, flagged."""
    return {key: dict(t) for key, t in sorted(tallies.items())}


def _pairs(split, quick: bool) -> list[tuple[int, int]]:
    return list(split[:1] if quick else split)


def _fmt(x) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def _print(name: str, s: dict) -> None:
    print(f"\n{name}: {s['leaks']} leaks, recall {_fmt(s['recall'])}; {s['clean']} clean, "
          f"flagged {_fmt(s['false_positive_rate'])}")
    print(f"  {'rule':22s} {'leaks':>6s} {'recall':>7s} {'clean FP':>9s}")
    for rule, r in s["per_rule"].items():
        print(f"  {rule:22s} {r['leaks']:6d} {_fmt(r['recall']):>7s} "
              f"{_fmt(r['false_positive_rate']):>9s}")


def run() -> dict:
    quick = os.environ.get("MEDZONE_EVAL_QUICK") == "1"
    started = time.perf_counter()
    cpu0 = time.process_time()
    builders, notes = _builders()
    result: dict = {"corpora": notes, "splits": {}, "cohorts": {
        "calibration": CALIBRATION, "evaluation": EVALUATION,
        "indexed_patients": INDEXED_PATIENTS, "other_patients": OTHER_PATIENTS}}
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="medzone-eval-") as tmp:
        tmp = Path(tmp)
        for split_name, split in (("calibration", CALIBRATION), ("evaluation", EVALUATION)):
            total, by_corpus = _Tally(), defaultdict(_Tally)
            figure_counts = {"style": defaultdict(lambda: defaultdict(int)),
                             "colour_map": defaultdict(lambda: defaultdict(int))}
            seconds: dict[str, float] = defaultdict(float)
            indexed: dict[int, tuple] = {}
            for indexed_seed, other_seed in _pairs(split, quick):
                if indexed_seed not in indexed:
                    indexed[indexed_seed] = _ingest(indexed_seed, tmp / f"indexed-{indexed_seed}")
                dataset_root, indexes = indexed[indexed_seed]
                other = _other(other_seed, tmp)
                for module, builder in builders.items():
                    work = tmp / f"work-{indexed_seed}-{other_seed}-{module}" / "home"
                    work.mkdir(parents=True)
                    accepts = inspect.signature(builder).parameters
                    kwargs = {k: v for k, v in {"seed": other_seed, **SIZES}.items()
                              if k in accepts}
                    result.setdefault("builder_kwargs", {})[module] = {
                        k: v for k, v in kwargs.items() if k != "seed"}
                    t0 = time.perf_counter()
                    try:
                        cases = builder(dataset_root, other, work, **kwargs)
                    except Exception as err:  # noqa: BLE001 - one corpus, one line
                        errors.append(f"{module} (cohorts {indexed_seed}/{other_seed}): "
                                      f"{type(err).__name__}: {err}".splitlines()[0])
                        print(f"  note: {errors[-1]}")
                        continue
                    where = f"[{indexed_seed}/{other_seed} {module}]"
                    for case in cases:
                        verdict = _screen(case, indexes, work)
                        total.add(case, verdict, where)
                        by_corpus[module].add(case, verdict, where)
                        if module == "screen_corpus_figures":
                            style, cmap = _figure_keys(case.label)
                            for kind, key in (("style", style), ("colour_map", cmap)):
                                if key is None:
                                    continue
                                t = figure_counts[kind][key]
                                if case.rule:
                                    t["leaks"] += 1
                                    t["blocked"] += verdict.verdict == "block"
                                    t["reviewed"] += verdict.verdict == "review"
                                else:
                                    t["clean"] += 1
                                    t["flagged"] += verdict.verdict != "pass"
                    seconds[module] += time.perf_counter() - t0
                print(f"  {split_name}: cohorts {indexed_seed}/{other_seed} screened "
                      f"({time.perf_counter() - started:.0f} s)")
            summary = total.summary()
            summary["by_corpus"] = {m: {k: v for k, v in t.summary().items()
                                        if k not in ("missed", "false_positives")}
                                    for m, t in by_corpus.items()}
            for m, sec in seconds.items():
                summary["by_corpus"].setdefault(m, {})["wall_s"] = round(sec, 1)
            summary["pairs"] = _pairs(split, quick)
            summary["figures"] = {kind: _figure_table(t) for kind, t in figure_counts.items()}
            result["splits"][split_name] = summary
            _print(split_name, summary)
            for kind, table in summary["figures"].items():
                if table:
                    print(f"  figures by {kind}: " + "; ".join(
                        f"{k} {t['blocked']}+{t['reviewed']}/{t['leaks']} "
                        f"({t['flagged']}/{t['clean']} clean flagged)"
                        for k, t in table.items() if t["leaks"]))
    result["errors"] = errors
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["cpu_s"] = round(time.process_time() - cpu0, 1)
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                         "note": "shared machine; times are indicative only"}
    print(f"\n{result['wall_s']} s wall, {result['cpu_s']} s CPU (this process)")
    return result


if __name__ == "__main__":
    import json

    out = Path(__file__).parent / "results" / "eval_screen.json"
    out.parent.mkdir(exist_ok=True)
    data = run()
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")
