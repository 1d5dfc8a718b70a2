"""What a template run starts from: the run folder its outputs go to (``MEDZONE_RUN_DIR``,
which ``medzone run`` sets; the notebook's own folder when opened interactively) and the
dataset it reads (the only one granted when none is named)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from .contract import ENV_RUN_DIR
from .datasets import Dataset, granted_datasets, open_dataset


def run_folder() -> Path:
    """Where the run writes ``metrics.json``, tables and models."""
    return Path(os.environ.get(ENV_RUN_DIR, "."))


def figures_folder() -> Path:
    """``figures/`` in the run folder, created."""
    figures = run_folder() / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    return figures


def chosen_dataset(dataset: str = "") -> str:
    """*dataset*, or when it is empty the one dataset granted to the user; more than one
    granted (or none) and the parameter must be set."""
    if dataset:
        return dataset
    granted = granted_datasets()
    if len(granted) != 1:
        raise ValueError(f"set the dataset parameter: the granted datasets are {granted or 'none'}")
    return granted[0]


class RunStart(NamedTuple):
    out: Path           #: the run folder
    figures: Path       #: its figures/ folder, created
    dataset: str        #: the dataset's id (the granted one when none was named)
    ds: Dataset         #: the dataset, opened


def start_run(dataset: str = "") -> RunStart:
    """What every template's setup cell does: ``out, figures, dataset, ds = start_run(dataset)``."""
    chosen = chosen_dataset(dataset)
    return RunStart(run_folder(), figures_folder(), chosen, open_dataset(chosen))
