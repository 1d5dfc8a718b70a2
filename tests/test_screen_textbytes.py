"""Bytes written as text (hub/screen/textbytes.py): base64, hex strings and dumps, bytes
reprs, data: URIs and numeric dumps of pixel arrays, decoded and screened as the files or
images they are; thresholds chosen on the calibration seeds, recall and false positives
measured on the evaluation seeds (tests/screen_corpus_textbytes.py)."""

from __future__ import annotations

import base64
import json
from collections import defaultdict

import numpy as np
import pytest

from medzone_hub.screen import ScreenConfig, screen_bytes
from medzone_hub.screen.model import Collector
from medzone_hub.screen.textbytes import TextBytes, numeric_matrices, raw_images

from .screen_corpus import demo_indexes, demo_zone  # noqa: F401 (fixtures)
from .screen_corpus_textbytes import (CALIBRATION_SEEDS, EVALUATION_SEEDS, _cell_nb, _np_print,
                                      _printed, _savetxt, _stream, build_textbytes_cases,
                                      clean_outputs, textbytes_cases)

#: What the issue asks on outputs the screen was never tuned on.
MIN_RECALL, MAX_FALSE_POSITIVES = 0.99, 0.02


@pytest.fixture(scope="module")
def roots(zone, tmp_path_factory):
    from medzone_hub.demodata import generate_cohort

    other = tmp_path_factory.mktemp("other") / "cohort"
    generate_cohort(other, patients=1, seed=99, progress=False)
    return zone.home.dataset_dir("demo"), other


#: The rules this class of leak is about; other rules' findings on the same outputs (e.g.
#: small counts read in a printed array) are counted apart.
TEXT_BYTES_RULES = {"embedded-data", "dataset-image"}


def _rates(cases, indexes):
    """Leaks: caught when a finding of the case's rule has the case's severity. Clean
    outputs: a false positive when any finding of these rules is made."""
    wrong, caught, leaky, fired, clean = [], 0, 0, 0, 0
    others = defaultdict(int)
    for case in cases:
        v = screen_bytes(case.name, case.data, indexes=indexes, config=case.config)
        mine = [f for f in v.findings if f.rule in TEXT_BYTES_RULES]
        if case.rule:
            ok = any(f.rule == case.rule and f.severity == case.verdict for f in mine)
            leaky += 1
            caught += ok
        else:
            ok = not mine
            clean += 1
            fired += not ok
            for rule in {f.rule for f in v.findings} - TEXT_BYTES_RULES:
                others[rule] += 1
        if not ok:
            wrong.append(f"{case.name} ({case.label}): expected {case.verdict}/{case.rule}, got "
                         f"{[(f.rule, f.severity, f.location, f.detail) for f in mine]}")
    return wrong, caught / leaky, fired / clean, dict(others), leaky, clean


def test_evaluation_seeds_recall_and_false_positives(roots, indexes, tmp_path):
    cases = build_textbytes_cases(*roots, tmp_path)
    wrong, recall, fp, others, leaky, clean = _rates(cases, indexes)
    (tmp_path / "textbytes_rates.json").write_text(json.dumps(
        {"seeds": EVALUATION_SEEDS, "leaky": leaky, "clean": clean, "recall": recall,
         "false_positive_rate": fp, "clean_flagged_by_other_rules": others}))
    assert recall >= MIN_RECALL and fp <= MAX_FALSE_POSITIVES, "\n".join(wrong)
    assert not wrong, "\n".join(wrong)


def test_calibration_seeds_all_right(roots, indexes):
    """The thresholds were chosen on these seeds: every case is right there too."""
    wrong, *_ = _rates(textbytes_cases(*roots, CALIBRATION_SEEDS), indexes)
    assert not wrong, "\n".join(wrong)


def test_review_thresholds_sit_above_clean_calibration_runs(roots):
    """The longest undecodable run and numeric dump of the clean calibration outputs stay
    below the defaults (with a margin of 2x), so these settings are what the calibration
    chose, not numbers fitted to the evaluation seeds."""
    cfg = ScreenConfig()
    longest_random, most_values = 0, 0
    for seed in CALIBRATION_SEEDS:
        for _name, data in clean_outputs(roots[0], seed):
            text = data.decode()
            probe = ScreenConfig(text_bytes_review_chars=16,
                                 numeric_dump_review_values=64)
            col = Collector(probe, [])
            TextBytes(col, lambda d, loc: False, lambda t, loc: None).scan(text, "t")
            for f in col.findings:
                n = int(f.detail.split()[0 if "characters" in f.detail else 3])
                if "characters" in f.detail:
                    longest_random = max(longest_random, n)
                else:
                    most_values = max(most_values, n)
    assert 2 * longest_random <= cfg.text_bytes_review_chars or longest_random == 0
    assert 2 * most_values <= cfg.numeric_dump_review_values


def test_each_form_decodes_to_the_file(roots, indexes):
    """A DICOM file in each written form is found as a DICOM file (not merely reviewed)."""
    dcm = sorted(roots[0].glob("data/*/CT/*.dcm"))[3].read_bytes()
    forms = {"base64": base64.b64encode(dcm).decode(), "hex": dcm.hex(),
             "spaced hex": dcm[:600].hex(" "), "repr": repr(dcm[:600]),
             "wrapped": base64.encodebytes(dcm).decode()}
    for form, text in forms.items():
        v = screen_bytes("out.txt", f"result:\n{text}\nend\n".encode(), indexes=indexes)
        assert any(f.detail == "a DICOM file (by content)" for f in v.findings), (form, v)
        assert all(len(f.detail) < 200 and text[:40] not in f.detail for f in v.findings)


def test_numeric_shapes():
    arr = np.arange(40 * 24).reshape(40, 24) % 251 - 100
    for text in (str(arr.tolist()), _np_print(arr), _savetxt(arr, fmt="%d"),
                 _savetxt(arr.astype(float), delimiter=",")):
        n, mats = numeric_matrices(text.encode(), 16)
        assert n == arr.size and len(mats) == 1 and np.array_equal(mats[0], arr)
    import pandas as pd
    n, mats = numeric_matrices(pd.DataFrame(arr).to_csv().encode(), 16)
    assert np.array_equal(mats[0], arr)
    n, mats = numeric_matrices(_np_print(np.stack([arr, arr + 1])).encode(), 16)
    assert len(mats) == 2 and np.array_equal(mats[1], arr + 1)
    n, mats = numeric_matrices(str(np.arange(400).tolist()).encode(), 16)
    assert mats[0].shape == (20, 20)
    assert numeric_matrices(str(np.arange(300).reshape(100, 3).tolist()).encode(), 16)[1] == []
    assert [d for d, _ in raw_images(np.zeros((32, 32), np.int16).tobytes(), 16)][:2] == \
        ["<i2", "<u2"]


def test_dumps_of_other_images_are_reviewed_and_can_be_allowed(roots, indexes):
    import pydicom

    o = pydicom.dcmread(sorted(roots[1].glob("*/CT/*.dcm"))[10]).pixel_array.astype(int)
    nb = _cell_nb([_stream(_printed(lambda: print(o.tolist())))])
    v = screen_bytes("o.ipynb", nb, indexes=indexes)
    assert v.verdict == "review" and {f.rule for f in v.findings} == {"embedded-data"}
    loose = ScreenConfig(numeric_dump_review_values=o.size + 1)
    assert screen_bytes("o.ipynb", nb, indexes=indexes, config=loose).verdict == "pass"


def test_random_bytes_review_threshold(indexes):
    blob = np.random.default_rng(0).bytes(1500)
    text = base64.b64encode(blob)
    assert screen_bytes("k.txt", text, indexes=indexes).verdict == "review"
    assert screen_bytes("k.txt", text, indexes=indexes,
                        config=ScreenConfig(text_bytes_review_chars=10_000)).verdict == "pass"


@pytest.mark.parametrize("text", [
    "00000000: 0000 zzzz\n00000010: 12\n*\n*\n",
    "b'\\x00\\x01\\x02\\x03\\x04\\x05\\x06\\x07\\x08\\x09\\x0a\\x0b\n\n\n",
    "[" * 5000 + "1, 2" + "]" * 5000,
    "data:application/octet-stream," + "%zz%00" * 100,
    ("[[" + ", ".join(["nan"] * 40) + "]]") * 3,
    "1e999 " * 2000,
    "-" * 10_000 + "\n" + "=" * 5000,
])
def test_hostile_text_never_raises(indexes, text):
    v = screen_bytes("x.txt", text.encode(), indexes=indexes)
    assert v.verdict in ("pass", "review", "block")
    assert not any(f.rule == "malformed" and "could not read" in f.detail for f in v.findings)
