"""Every notebook the project ships (templates, tutorials, the runner's probe) is written from
its paired percent-format ``.py`` file: the committed ``.ipynb`` is exactly what
``jupytext --sync`` (``make notebooks``) makes of it, tags and notebook metadata included."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest
from jupytext.combine import combine_inputs_with_outputs

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = [ROOT / "templates", ROOT / "notebooks"]
SOURCES = sorted([p for folder in FOLDERS for p in folder.glob("*.py") if p.name != "__init__.py"]
                 + [ROOT / "tests" / "runner_probe.py"])
NOTEBOOKS = sorted([p for folder in FOLDERS for p in folder.glob("*.ipynb")]
                   + [ROOT / "tests" / "runner_probe.ipynb"])


def _made_from(source: Path) -> nbformat.NotebookNode:
    """What ``jupytext --sync`` writes for *source*: its cells, with the ids and notebook
    metadata the committed ``.ipynb`` already has."""
    committed = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    made = jupytext.read(source, fmt="py:percent")
    return combine_inputs_with_outputs(made, committed, fmt="py:percent")


def test_every_notebook_has_its_source():
    assert [p.with_suffix(".py") for p in NOTEBOOKS] == SOURCES


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_committed_notebook_is_what_its_source_makes(source, tmp_path):
    committed = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    made = _made_from(source)
    assert ([(c.cell_type, c.source, c.metadata) for c in made.cells]
            == [(c.cell_type, c.source, c.metadata) for c in committed.cells]), \
        f"{source.relative_to(ROOT)} changed: run `make notebooks`"
    assert made.metadata == committed.metadata
    jupytext.write(made, tmp_path / "made.ipynb", fmt="ipynb")
    assert (tmp_path / "made.ipynb").read_text() == source.with_suffix(".ipynb").read_text(), \
        f"{source.relative_to(ROOT)}: run `make notebooks`"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_papermill_finds_the_parameters_cell(source):
    cells = nbformat.read(source.with_suffix(".ipynb"), as_version=4).cells
    assert [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])] == [1]
    assert nbformat.read(source.with_suffix(".ipynb"), as_version=4).metadata["kernelspec"][
        "name"] == "python3"
