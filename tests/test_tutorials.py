"""Every student tutorial in ``notebooks/`` runs, with small settings, through ``medzone run``
(papermill inside a real sandbox) against the ingested synthetic cohort."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest

from medzone_hub.runner import template_parameters

from .analysis_zone import ROOT, assert_clean_notebook, make_zone, pseudonyms

NOTEBOOKS = ROOT / "notebooks"
TUTORIALS = ["01_getting_started", "02_viewing_dicom", "03_first_model",
             "04_preparing_results_for_export"]
SMALL = {"03_first_model": [("image_size", 64), ("epochs", 5)]}


@pytest.fixture(scope="module")
def zone(cohort_dir):
    z = make_zone(cohort_dir)
    yield z
    print(f"\ntutorial run times (s): {z.timings}")
    z.close()


def _run(zone, name):
    run = zone.run(str(NOTEBOOKS / f"{name}.ipynb"), *SMALL.get(name, []))
    assert_clean_notebook(run)
    return run


def test_every_tutorial_is_tested():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == TUTORIALS


@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_shape(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert nb.cells[1].metadata.get("tags") == ["parameters"]
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    assert "dataset" in template_parameters(NOTEBOOKS / f"{name}.ipynb")


def test_getting_started(zone):
    run = _run(zone, "01_getting_started")
    text = run.notebook.read_text()
    assert "granted to me: ['demo']" in text
    assert "spacing (mm) (2.5, 2.5, 2.5)" in text


def test_viewing_dicom(zone):
    run = _run(zone, "02_viewing_dicom")
    for figure in ("ct_viewer.png", "xray_gallery.png"):
        assert (run.dir / figure).stat().st_size > 5000


def test_first_model(zone):
    run = _run(zone, "03_first_model")
    side = json.loads((run.dir / "first_model.json").read_text())
    assert side["template"] == "tutorial:first_model"
    assert side["dataset_manifest_sha256"] == {"demo": zone.manifest_sha256}
    auc = side["metrics"]["roc_auc"]
    assert auc is None or 0.0 <= auc <= 1.0
    assert (run.dir / "first_model.pt").is_file() and (run.dir / "first_model_loss.png").is_file()


def test_preparing_results_for_export(zone):
    run = _run(zone, "04_preparing_results_for_export")
    export = run.dir / "export"
    assert sorted(p.name for p in export.iterdir()) == [
        "age_by_sex.csv", "age_histogram.png", "label_by_sex.csv", "metrics.json"]
    for table in ("age_by_sex.csv", "label_by_sex.csv"):
        cells = pd.read_csv(export / table, dtype=str).iloc[:, 1:].to_numpy().ravel()
        assert all(not str(c).isdigit() or int(c) >= 10 for c in cells), table
    ids = pseudonyms(zone)
    for path in export.iterdir():
        assert not any(pid.encode() in path.read_bytes() for pid in ids), path.name
