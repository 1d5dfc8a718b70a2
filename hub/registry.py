"""The dataset registry: which datasets exist, and what their stored copies hold.

Ingest stores the files and writes the manifest; registering records that a dataset with
this manifest hash is now in the zone (and audits it). The id is also a directory name
under ``MEDZONE_HOME/datasets`` and a mount point ``/data/<id>`` in sandboxes, which is why
it is so restricted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import audit
from .db import add_unique
from .errors import Conflict, InvalidInput, NotFound
from .models import Dataset

_DATASET_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def validate_dataset_id(dataset_id: str) -> str:
    """Return *dataset_id* if valid, else raise :class:`InvalidInput`.

    Valid: 1-64 lowercase letters, digits and hyphens, starting with a letter or digit.
    """
    if not isinstance(dataset_id, str) or not _DATASET_ID.fullmatch(dataset_id):
        raise InvalidInput(
            f"invalid dataset id {dataset_id!r}: use 1-64 lowercase letters, digits and "
            "hyphens, starting with a letter or digit"
        )
    return dataset_id


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{name} must be a whole number >= 0, not {value!r}")
    return value


def _modalities(values: Iterable[str]) -> list[str]:
    if isinstance(values, str):  # a lone "CT" would otherwise become ["C", "T"]
        values = [values]
    cleaned = set()
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise InvalidInput(f"invalid modality {value!r}")
        cleaned.add(value.strip())
    return sorted(cleaned)


def register_dataset(
    session: Session,
    *,
    dataset_id: str,
    title: str,
    manifest_sha256: str,
    deidentified: bool,
    n_files: int,
    n_bytes: int,
    n_patients: int,
    modalities: list[str],
    actor: str,
) -> Dataset:
    """Record a stored dataset; :class:`Conflict` if *dataset_id* is taken.

    An empty *title* defaults to the id.
    """
    validate_dataset_id(dataset_id)
    if not isinstance(manifest_sha256, str) or not _SHA256.fullmatch(manifest_sha256):
        raise InvalidInput(
            f"manifest_sha256 must be 64 lowercase hex digits, not {manifest_sha256!r}"
        )
    title = (title or "").strip() or dataset_id
    dataset = Dataset(
        id=dataset_id,
        title=title,
        manifest_sha256=manifest_sha256,
        deidentified=bool(deidentified),
        n_files=_count("n_files", n_files),
        n_bytes=_count("n_bytes", n_bytes),
        n_patients=_count("n_patients", n_patients),
        modalities=_modalities(modalities),
        registered_by=actor,
    )
    exists = f"dataset {dataset_id!r} is already registered"
    if dataset_exists(session, dataset_id):
        raise Conflict(exists)
    add_unique(session, dataset, exists)
    audit.append(
        session,
        actor=actor,
        action="dataset.register",
        subject=f"dataset:{dataset_id}",
        detail={
            "title": dataset.title,
            "manifest_sha256": dataset.manifest_sha256,
            "deidentified": dataset.deidentified,
            "n_files": dataset.n_files,
            "n_bytes": dataset.n_bytes,
            "n_patients": dataset.n_patients,
            "modalities": dataset.modalities,
        },
    )
    return dataset


def get_dataset(session: Session, dataset_id: str) -> Dataset:
    """The dataset *dataset_id*; :class:`NotFound` if it is not registered."""
    dataset = session.get(Dataset, dataset_id) if isinstance(dataset_id, str) else None
    if dataset is None:
        raise NotFound(f"dataset {dataset_id!r} does not exist")
    return dataset


def list_datasets(session: Session) -> list[Dataset]:
    """All registered datasets, by id."""
    return list(session.scalars(select(Dataset).order_by(Dataset.id)))


def dataset_exists(session: Session, dataset_id: str) -> bool:
    """Whether *dataset_id* is registered (an invalid id never is)."""
    if not isinstance(dataset_id, str) or not _DATASET_ID.fullmatch(dataset_id):
        return False
    return session.scalar(select(Dataset.id).where(Dataset.id == dataset_id)) is not None
