"""The screening indexes of the zone's datasets: the zone's key, and loading indexes for the
screen (which reads no zone layout and no key itself)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable

from .config import MedZoneHome
from .errors import InvalidInput
from .screen.index import InvalidIndex, ScreeningIndex


def screening_index_key(home: MedZoneHome) -> bytes:
    """The zone's own key for the screening index's hashes (created once, mode 0600)."""
    path = home.ensure().screening_index_key_path
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path.read_bytes()


def load_indexes(home: MedZoneHome, dataset_ids: Iterable[str]) -> list[ScreeningIndex]:
    """The screening indexes of these datasets, ready to pass to the screen."""
    key = screening_index_key(home)
    out = []
    for dataset_id in dataset_ids:
        directory = home.dataset_index_dir(dataset_id)
        if not directory.is_dir():
            raise InvalidInput(f"dataset {dataset_id!r} has no screening index")
        try:
            out.append(ScreeningIndex.load(directory, key))
        except InvalidIndex as err:
            raise InvalidInput(str(err)) from None
    return out
