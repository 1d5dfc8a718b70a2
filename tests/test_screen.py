"""The export screen against its labelled corpus (tests/screen_corpus.py), plus the API
edges and the ``medzone export screen`` command."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from medzone_hub.screen import (RULES, FileVerdict, ScreenConfig, screen_bytes,
                                screen_paths)
from medzone_hub.screen.recognizers import find_identifiers

from .screen_corpus import (dataset_facts, demo_corpus,  # noqa: F401 (fixtures)
                            demo_indexes, demo_zone)


def _run(case, indexes, work: Path) -> FileVerdict:
    if case.data is None:
        return screen_paths([work / case.name], indexes=indexes, config=case.config,
                            root=work)[0]
    return screen_bytes(case.name, case.data, indexes=indexes, config=case.config)


def test_corpus_verdicts_and_rates(corpus, indexes, tmp_path):
    work, cases = corpus
    wrong = []
    positives = defaultdict(lambda: [0, 0])  # rule -> [leaky cases, caught]
    clean_fired = defaultdict(int)
    n_clean = sum(1 for c in cases if c.rule is None)
    for case in cases:
        verdict = _run(case, indexes, work)
        rules = {f.rule for f in verdict.findings}
        if verdict.verdict != case.verdict or (case.rule and case.rule not in rules):
            wrong.append(f"{case.name} ({case.label}): expected {case.verdict}/{case.rule}, got "
                         f"{verdict.verdict} {[(f.rule, f.location, f.detail) for f in verdict.findings]}")
        if case.rule:
            positives[case.rule][0] += 1
            positives[case.rule][1] += case.rule in rules and verdict.verdict == case.verdict
        else:
            for rule in rules:
                clean_fired[rule] += 1
    rates = {rule: {"leaky": positives[rule][0],
                    "recall": positives[rule][1] / positives[rule][0] if positives[rule][0] else None,
                    "clean": n_clean,
                    "false_positive_rate": clean_fired[rule] / n_clean if n_clean else None}
             for rule in RULES if positives[rule][0] or clean_fired[rule]}
    out = tmp_path / "screen_rates.json"
    out.write_text(json.dumps(rates, indent=1))
    print(f"\nper-rule recall / false-positive rate ({len(cases)} cases, {n_clean} clean): {out}")
    for rule, r in rates.items():
        print(f"  {rule:20s} recall {r['recall']!s:5.5} ({r['leaky']} leaky)  "
              f"FPR {r['false_positive_rate']:.2f}")
    assert not wrong, "\n".join(wrong)
    assert len(positives) >= 9 and n_clean >= 8


def test_findings_never_echo_identifiers(corpus, indexes):
    work, cases = corpus
    secrets_ = ["９００１０１", "010-2345-6789", "kim.minsu@example.com", "1985-03-12"]
    for case in cases:
        verdict = _run(case, indexes, work)
        text = json.dumps(verdict.__dict__, default=lambda o: o.__dict__)
        for s in secrets_:
            assert s not in text
        if case.data is not None and case.rule == "dataset-identifier":
            for f in verdict.findings:
                assert not any(tok in f.detail + f.location
                               for tok in ("MZP-", "MZA-", "mzp", "mza", "1.2.826", "2.25."))


def test_path_traversal_and_missing_files_block(tmp_path):
    root = tmp_path / "home"
    root.mkdir()
    (root / "ok.txt").write_text("AUC 0.91\n")
    verdicts = screen_paths([root / "ok.txt", root / "nope.txt", root / ".." / "x"], root=root)
    assert [v.verdict for v in verdicts] == ["pass", "block", "block"]


def test_hostile_inputs_never_crash():
    for data in (b"", b"\x00" * 10, b"{" * 100_000, b'{"cells": 5}', b'{"cells": [1, {"outputs": 3}]}',
                 b"PK\x03\x04broken", b"\x1f\x8bbroken", b"\x80\x04."):
        v = screen_bytes("x.ipynb", data)
        assert v.verdict in ("pass", "review", "block")
    assert screen_bytes("x.ipynb", b'{"cells": 5}').verdict == "block"
    assert screen_bytes("empty.txt", b"").verdict == "pass"


def test_profile_is_validated():
    with pytest.raises(ValueError):
        ScreenConfig(profile="nope")


def test_recognizer_spans_are_used_not_values():
    text = "연락처 010-2345-6789"
    assert find_identifiers(text)
    v = screen_bytes("a.txt", text.encode())
    assert v.verdict == "block" and "2345" not in v.findings[0].detail


def test_cli_export_screen_json(cli, cohort_dir, tmp_path):
    from medzone_hub.config import MedZoneHome
    from medzone_hub.db import connect
    from medzone_hub.ingest import ingest_dataset

    home = MedZoneHome(cli.home).ensure()
    store = connect(home.db_url)
    ingest_dataset(home, store, "demo", cohort_dir, deidentify=True, pseudonym_key=b"k" * 32,
                   actor="t", progress=False)
    store.engine.dispose()
    pid = dataset_facts(home.dataset_dir("demo"))["rows"][0]["patient_id"]
    leak = tmp_path / "leak.txt"
    leak.write_text(f"case {pid.lower()}\n")
    ok = tmp_path / "ok.txt"
    ok.write_text("AUC 0.91\n")
    r = cli.run("export", "screen", leak, ok, "--dataset", "demo", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [f["verdict"] for f in doc["files"]] == ["block", "pass"]
    assert set(doc["files"][0]["findings"][0]) == {"rule", "severity", "location", "detail"}
    assert pid.lower() not in r.stdout and pid not in r.stdout
    r = cli.run("export", "screen", ok)
    assert r.returncode == 0 and "pass" in r.stdout
    r = cli.run("export", "screen", ok, "--dataset", "no-such")
    assert r.returncode != 0 and r.stderr.count("\n") == 1
