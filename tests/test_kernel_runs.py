"""``medzone_kernel.runs``: the run folder and the dataset every template starts from."""

from __future__ import annotations

import re

import pytest

from medzone_kernel import runs


def test_run_folder_is_the_one_medzone_run_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDZONE_RUN_DIR", str(tmp_path / "run"))
    assert runs.run_folder() == tmp_path / "run"
    assert runs.figures_folder() == tmp_path / "run" / "figures"
    assert (tmp_path / "run" / "figures").is_dir()
    monkeypatch.delenv("MEDZONE_RUN_DIR")
    assert str(runs.run_folder()) == "."


@pytest.mark.parametrize("granted, named, expected", [
    (["demo"], "", "demo"),
    (["demo", "other"], "other", "other"),
    ([], "named", "named"),
])
def test_chosen_dataset(monkeypatch, granted, named, expected):
    monkeypatch.setattr(runs, "granted_datasets", lambda: granted)
    assert runs.chosen_dataset(named) == expected


@pytest.mark.parametrize("granted, listed", [([], "none"), (["a", "b"], "['a', 'b']")])
def test_chosen_dataset_needs_the_parameter_unless_one_is_granted(monkeypatch, granted, listed):
    monkeypatch.setattr(runs, "granted_datasets", lambda: granted)
    with pytest.raises(ValueError, match=re.escape(f"the granted datasets are {listed}")):
        runs.chosen_dataset("")


def test_start_run_is_the_templates_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDZONE_RUN_DIR", str(tmp_path))
    monkeypatch.setattr(runs, "granted_datasets", lambda: ["demo"])
    monkeypatch.setattr(runs, "open_dataset", lambda name: f"<dataset {name}>")
    out, figures, dataset, ds = runs.start_run("")
    assert (out, figures, dataset, ds) == (tmp_path, tmp_path / "figures", "demo", "<dataset demo>")
    assert figures.is_dir()
