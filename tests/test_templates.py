"""Every template in ``templates/`` runs with tiny parameters through ``medzone run`` — papermill
inside a real sandbox — against the ingested synthetic cohort, and its outputs are checked:
files where ``docs/templates.md`` says, metrics that mean something, nothing per patient.

One zone per module; the templates run in the order a researcher would (the inference
template applies the models the training templates saved).
"""

from __future__ import annotations

import ast
import json

import nbformat
import pandas as pd
import pytest

from medzone_hub.runner import TEMPLATES_DIR, list_templates, template_parameters

from .analysis_zone import assert_clean_notebook, assert_no_identifiers, make_zone

TEMPLATES = ["ct_nodule_analysis", "cxr_classifier_training", "ct_nodule_segmentation_training",
             "model_inference"]

#: Small enough for 2 CPU cores in well under 2 minutes each.
TINY = {
    "ct_nodule_analysis": [("figure_patients", 2)],
    "cxr_classifier_training": [("image_size", 64), ("epochs", 3), ("batch_size", 8)],
    "ct_nodule_segmentation_training": [("patch", 32), ("channels", [8, 16, 32]),
                                        ("epochs", 150), ("patches_per_volume", 4)],
}


@pytest.fixture(scope="module")
def zone(cohort_dir):
    z = make_zone(cohort_dir)
    yield z
    print(f"\ntemplate run times (s): {z.timings}")
    z.close()


@pytest.fixture(scope="module")
def runs(zone):
    return {}


def _run(zone, runs, name, *extra):
    if name not in runs:
        runs[name] = zone.run(name, *TINY.get(name, []), *extra)
    return runs[name]


# --- the templates as files -------------------------------------------------------------------

def test_every_template_is_listed():
    assert list_templates() == sorted(TEMPLATES)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_shape(name):
    path = TEMPLATES_DIR / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first, params = nb.cells[0], nb.cells[1]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert len(first.source.splitlines()) > 3  # a description, not just a title
    assert params.cell_type == "code" and params.metadata.get("tags") == ["parameters"]
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    # No outputs are stored in the repository.
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code")
    # papermill reads every assignment of the parameters cell (a comment holding "=" or
    # quotes makes it skip the line, and the parameter would be refused as unknown).
    assigned = [t.id for node in ast.parse(params.source).body if isinstance(node, ast.Assign)
                for t in node.targets]
    assert sorted(template_parameters(path)) == sorted(assigned)
    assert "dataset" in assigned


# --- runs -----------------------------------------------------------------------------------

def test_ct_nodule_analysis(zone, runs, cohort_dir):
    run = _run(zone, runs, "ct_nodule_analysis")
    assert_clean_notebook(run)
    m = run.metrics()
    truth = pd.read_csv(cohort_dir / "nodules.csv")
    assert m["scans"] == 7 and m["true_nodules"] == len(truth)
    assert m["dataset_manifest_sha256"] == zone.manifest_sha256
    assert 0.5 <= m["sensitivity"] <= 1.0
    assert m["diameter_error_mm_mean_abs"] < 3.0
    assert 1000 < m["lung_volume_ml_mean"] < 8000
    for figure in ("nodule_slices.png", "measurements.png"):
        assert (run.dir / "figures" / figure).stat().st_size > 5000
    # The cohort tables hold no count below the disclosure threshold.
    for table in ("cohort_summary.csv", "lung_volume_summary.csv"):
        cells = pd.read_csv(run.dir / table, dtype=str).iloc[:, 1:].to_numpy().ravel()
        for cell in cells:
            assert not cell.isdigit() or int(cell) >= 10, (table, cell)
    assert_no_identifiers(zone, run)


def test_cxr_classifier_training_then_inference(zone, runs):
    # One test: under pytest-xdist, the inference must run where the model was trained.
    run = _run(zone, runs, "cxr_classifier_training")
    assert_clean_notebook(run)
    m = run.metrics()
    print(f"\ncxr ROC AUC {m['roc_auc']} on {m['val_images']} held-out images")
    assert m["roc_auc"] is not None and 0.0 <= m["roc_auc"] <= 1.0
    assert m["train_images"] + m["val_images"] == 7 and m["val_images"] >= 2
    side = json.loads((run.dir / "model.json").read_text())
    assert (run.dir / "model.pt").stat().st_size > 1_000_000
    assert side["template"] == "cxr_classifier_training"
    assert side["dataset_manifest_sha256"] == {"demo": zone.manifest_sha256}
    assert side["parameters"]["image_size"] == 64 and side["metrics"]["roc_auc"] == m["roc_auc"]
    assert (run.dir / "confusion_matrix.csv").is_file()
    assert (run.dir / "figures" / "training_roc_confusion.png").stat().st_size > 5000
    assert_no_identifiers(zone, run)
    _inference(zone, run, "cxr_classifier_training", "roc_auc")


def test_ct_nodule_segmentation_training_beats_trivial_baselines_then_inference(zone, runs):
    run = _run(zone, runs, "ct_nodule_segmentation_training")
    assert_clean_notebook(run)
    m = run.metrics()
    print(f"\nsegmentation Dice {m['dice']:.4f} vs baselines {m['baseline_dice']}")
    assert set(m["baseline_dice"]) == {"empty", "everything", "soft_tissue"}
    assert m["dice"] > m["best_baseline_dice"] and m["beats_baseline"]
    assert m["val_volumes"] >= 2
    side = json.loads((run.dir / "model.json").read_text())
    assert side["template"] == "ct_nodule_segmentation_training"
    assert side["parameters"]["channels"] == [8, 16, 32]
    assert (run.dir / "figures" / "segmentation.png").stat().st_size > 5000
    assert_no_identifiers(zone, run)
    _inference(zone, run, "ct_nodule_segmentation_training", "dice")


def _inference(zone, trained_run, trained, metric):
    run = zone.run("model_inference", ("model_path", zone.inside(trained_run.dir / "model.pt")))
    zone.timings[f"model_inference({trained})"] = zone.timings.pop("model_inference")
    assert_clean_notebook(run)
    m = run.metrics()
    assert m["model_template"] == trained
    assert m[metric] is not None and 0.0 <= m[metric] <= 1.0
    assert (run.dir / "figures" / "inference.png").is_file()
    assert_no_identifiers(zone, run)
