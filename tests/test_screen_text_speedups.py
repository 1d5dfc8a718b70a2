"""The text rules' shortcuts (runs found by array operations, runs known to be clean, the
year tests before the date scan, the recognizers' byte-class tests) change no finding: a
generated notebook of the bench's kind, with values of the dataset and direct identifiers
leaked into long logs and tables, is screened with and without them."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest

from benchmarks.bench_screen import _describe, _html_table, _log, _text_table
from medzone_hub.screen import ScreenConfig, notebook, recognizers, screen_bytes, text
from medzone_hub.screen.model import Collector

from .screen_corpus import dataset_facts, demo_indexes, demo_zone  # noqa: F401 (fixtures)


def _without_shortcuts(monkeypatch) -> None:
    monkeypatch.setattr(notebook, "prescreen", lambda *_args: None)
    monkeypatch.setattr(text, "_any_run_hits", lambda *_args: True)
    monkeypatch.setattr(text, "_may_hold_date", lambda _text: True)
    monkeypatch.setattr(recognizers, "_cheap_tests", lambda _text: (True, True))


def _notebook(seed: int, leaks: list[str]) -> bytes:
    """Cells like the bench notebook's (logs, text and HTML tables, describe() tables,
    progress bars), with ``leaks`` written into some of them."""
    rng = np.random.default_rng(seed)
    cells = []
    for i in range(48):
        outputs = []
        kind = i % 4
        if kind == 0:
            log = _log(rng, i)
            if leaks and i % 8 == 0:
                lines = log.splitlines(keepends=True)
                lines.insert(len(lines) // 2, leaks[(i // 8) % len(leaks)] + "\n")
                log = "".join(lines)
            outputs.append({"output_type": "stream", "name": "stdout", "text": log})
        elif kind == 1:
            r, c = int(rng.integers(5, 30)), int(rng.integers(3, 9))
            table = _text_table(rng, r, c)
            if leaks and i % 8 == 1:
                table += "\n" + leaks[(i // 8 + 1) % len(leaks)]
            outputs.append({"output_type": "execute_result", "execution_count": i,
                            "metadata": {}, "data": {"text/html": _html_table(rng, r, c),
                                                     "text/plain": table}})
        elif kind == 2:
            outputs.append({"output_type": "execute_result", "execution_count": i,
                            "metadata": {}, "data": {"text/plain": _describe(rng)}})
        else:
            outputs.append({"output_type": "stream", "name": "stderr",
                            "text": f"100%|██████████| {int(rng.integers(50, 500))}/… "
                                    f"[00:{int(rng.integers(10, 59))}<00:00, 7.1it/s]\n"})
        cells.append({"cell_type": "code", "execution_count": i, "id": f"c{i}", "metadata": {},
                      "source": f"train(fold={i % 5})\ndf.groupby('label').size()",
                      "outputs": outputs})
    return json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {},
                       "cells": cells}).encode()


def _leaks(zone) -> list[str]:
    facts = dataset_facts(zone.home.dataset_dir("demo"))
    rows = facts["rows"]
    y, m, d = rows[2]["visit_date"].split("-")
    return [f"checkpoint for {rows[0]['patient_id']} saved",
            f"accession: {rows[1]['accession_ct'].lower()}",
            f"study uid {facts['ct'].StudyInstanceUID}",
            f"visit {d}.{m}.{y} reviewed",
            "contact 010-2345-6789 or kim.minjun@example.com",
            "patient: Kim Minjun, RRN 850312-1234567",
            "환자 김민준 님, 생년월일 1985년 3월 12일",
            "DOB 1985-03-12 per chart"]


@pytest.mark.parametrize("seed", [3, 4])
def test_findings_are_identical_without_the_shortcuts(zone, indexes, monkeypatch, seed):
    config = ScreenConfig(workers=1)
    leaky = _notebook(seed, _leaks(zone))
    clean = _notebook(seed, [])
    fast = [screen_bytes("a.ipynb", nb, indexes=indexes, config=config).to_dict()
            for nb in (leaky, clean)]
    _without_shortcuts(monkeypatch)
    slow = [screen_bytes("a.ipynb", nb, indexes=indexes, config=config).to_dict()
            for nb in (leaky, clean)]
    assert fast == slow
    rules = {f["rule"] for f in fast[0]["findings"]}
    assert {"dataset-identifier", "direct-identifier"} <= rules
    kinds = " ".join(f["detail"] for f in fast[0]["findings"])
    for word in ("a patient identifier", "an accession number", "a DICOM UID", "a date",
                 "a phone number", "an e-mail address", "a resident registration number",
                 "a person name", "a date of birth"):
        assert word in kinds, word
    assert not {f["rule"] for f in fast[1]["findings"]} & {"dataset-identifier",
                                                            "direct-identifier"}


def test_long_runs_are_the_runs_the_regex_finds():
    rng = np.random.default_rng(0)
    samples = [_log(rng, 1), _text_table(rng, 12, 5), _describe(rng), _html_table(rng, 6, 4),
               "a  b   c, dd; eeee\tf_g-h.i/j:k ,l ;m , n", "x" * 7, "  ab-cd-ef  ", "",
               "Epoch 1/40 - 55s - val_loss: 0.1 lr: 1.00e-03", "__abc__def__", "a,b ;c"]
    alphabet = list("ab01 -._/:\t,;\n!")
    samples += ["".join(rng.choice(alphabet, 300)) for _ in range(200)]
    for sample in samples:
        expected = [r for r in text._RUN_RE.findall(sample)
                    if len(r.translate(text._NO_GAPS)) >= text.MIN_VALUE_CHARS]
        assert text._long_runs(sample) == expected, sample


def test_cheap_tests_rule_out_only_texts_without_matches():
    rng = np.random.default_rng(1)
    alphabet = list("0123456789 -.\tKkMm,:")
    samples = ["".join(rng.choice(alphabet, 200)) for _ in range(400)]
    samples += ["tel 02-123-4567", "010 1234 5678", "8503121234567", "1588-1234 phone",
                "Patient: Kim Minjun", "dr. LEE, JI HOON", "name=Park Seoyeon"]
    for sample in samples:
        digits, names = recognizers._cheap_tests(sample)
        if not digits:
            assert not recognizers._find_rrns(sample) and not recognizers._find_phones(sample)
        if not names:
            assert not recognizers._find_romanised_names(sample)
    assert recognizers._cheap_tests("tel 02-123-4567") == (True, False)
    assert recognizers._cheap_tests("Patient: Kim Minjun") == (False, True)


def test_the_year_tests_rule_out_only_texts_without_dates():
    rng = np.random.default_rng(2)
    alphabet = list("0112299 -./,Mar Jan년월일\n")
    samples = ["".join(rng.choice(alphabet, 120)) for _ in range(600)]
    samples += ["".join(rng.choice(list("0112299 -./,:x\n"), 60)) for _ in range(3000)]
    samples += ["on 2023-01-15", "15.01.2023", "1/15/2023", "March 3, 1985", "3 Mar 1985",
                "2023년 1월 15일", "20230115", "loss 0.1942 at 1.2.1942", "x.2019", "v1.2019"]
    fired = 0
    for sample in samples:
        if not text._may_hold_date(sample):
            assert not list(text._dates_in(sample)), sample
        else:
            fired += 1
    assert fired and not text._may_hold_date("loss: 0.1942 - dice: 0.2013")
    assert all(text._may_hold_date(s) for s in ("on 2023-01-15", "15.01.2023", "3 Mar 1985"))


@pytest.mark.parametrize("batch", [None, 300])
def test_the_prescreen_leaves_every_text_with_a_finding_to_the_rules(zone, indexes,
                                                                    monkeypatch, batch):
    """Texts pre-screened together (all at once, and a few at a time): none that the rules
    find something in is marked clean (leaks in ASCII text and in progress-bar text with
    block elements and an ellipsis), and the clean texts of a notebook are (so that the
    screen skips them)."""
    if batch:
        monkeypatch.setattr(text, "_PRESCREEN_BATCH", batch)
    rng = np.random.default_rng(5)
    leaks = _leaks(zone)
    clean = [_log(rng, 1), _text_table(rng, 9, 4), _describe(rng), _html_table(rng, 5, 3),
             "100%|██████████| 450/… [00:41<00:00, 7.1it/s]\n", "<Figure size 600x400>"]
    leaky = [f"{c[:40]}{leak} {c[40:]}" for c in clean for leak in leaks]
    leaky += [f"epoch 3 |███▌      | {leak} …" for leak in leaks if leak.isascii()]
    config = ScreenConfig()
    probe = text.IndexProbe(indexes)
    text.prescreen(leaky + clean, probe, config)
    marked = probe.clean_texts[config.max_window_words]
    assert set(clean) <= marked
    for sample in leaky:
        col = Collector(config, indexes)
        text.scan_text(sample, text.IndexProbe(indexes), col, "x")
        if col.findings:
            assert sample not in marked, sample
    assert sum(sample not in marked for sample in leaky) >= len(leaky) - len(clean)


def test_texts_spelt_in_ascii_for_the_prescreen_hold_the_same_runs():
    for sample in ("100%|██████████| 450/… [00:41<00:00, 7.1it/s]", "a…b c…2019-01-05",
                   "x ▏▎▍▌▋▊▉█ ab12cd…ef34", "…20190105…", "▕ab-cd-ef▏"):
        assert not text._NOT_PLAIN_RE.search(sample)
        spelt = sample.replace("\u2026", "...").encode("ascii", "replace").decode()
        nfkc = unicodedata.normalize("NFKC", sample)
        assert text._RUN_RE.findall(spelt) == text._RUN_RE.findall(nfkc)
        assert text._may_hold_date(spelt) == text._may_hold_date(nfkc)
    for ch in map(chr, [0x2026, *range(0x2500, 0x25A0)]):
        assert not (ch.isalnum() or ch.isspace() or ch in recognizers._ONE_TO_ONE), ch
