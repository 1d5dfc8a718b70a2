"""The datasets this kernel may read, and what is in them.

Inside a sandbox, ``/data/<id>`` holds the read-only copy of each dataset the user holds a
live grant for, and ``/run/medzone/manifests/<id>.json`` its manifest (written at ingest:
sha256 per file, each series' modality, patient, folder and geometry). Both locations come
from the environment (``MEDZONE_DATA``, ``MEDZONE_MANIFESTS``), so the same code runs in a
test against any stored copy.

>>> ds = open_dataset("demo")
>>> ct = ds.series("CT", patient=ds.patients()[0])[0]
>>> ds.table("clinical").head()
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .contract import DATA_INSIDE as DEFAULT_DATA
from .contract import ENV_DATA, ENV_MANIFESTS
from .contract import MANIFESTS_INSIDE as DEFAULT_MANIFESTS

#: Modalities that are projection radiographs (chest X-rays).
XRAY_MODALITIES = ("CR", "DX")


class DatasetError(LookupError):
    """A dataset, series, table or mask that is not there (or not granted)."""


def data_root() -> Path:
    return Path(os.environ.get(ENV_DATA) or DEFAULT_DATA)


def manifests_root() -> Path:
    return Path(os.environ.get(ENV_MANIFESTS) or DEFAULT_MANIFESTS)


def granted_datasets() -> list[str]:
    """Ids of the datasets mounted in this kernel (the live grants when it started)."""
    root = data_root()
    try:
        entries = sorted(os.listdir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [name for name in entries if not name.startswith(".") and (root / name).is_dir()]


@dataclass(frozen=True)
class SeriesRef:
    """One DICOM series of a dataset, as its manifest describes it (no file is read).

    ``folder`` is the folder holding the series' files; ``images`` the number of images
    (frames); ``pixel_spacing_mm`` (row spacing, column spacing) and ``slice_spacing_mm``
    (measured along the slice normal from the positions) are what ingest recorded.
    ``manifest_sha256`` ties a cached volume to this exact version of the dataset.
    """

    dataset: str
    series_uid: str
    patient: str
    modality: str
    folder: Path
    images: int
    pixel_spacing_mm: tuple[float, float] | None = None
    slice_spacing_mm: float | None = None
    manifest_sha256: str = ""
    files: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def as_dict(self) -> dict:
        """A small picklable reference (what MONAI items carry): dataset id + series uid."""
        return {"dataset": self.dataset, "series_uid": self.series_uid}


class Dataset:
    """A granted dataset: its stored copy (``root``) and its manifest."""

    def __init__(self, dataset_id: str, root: Path, manifest: dict, manifest_sha256: str):
        self.id = dataset_id
        self.root = Path(root)
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256

    def __repr__(self) -> str:
        totals = self.manifest.get("totals", {})
        return (f"Dataset({self.id!r}: {totals.get('patients', '?')} patients, "
                f"{totals.get('series', '?')} series, {totals.get('files', '?')} files)")

    # --- what is in it -------------------------------------------------------------------

    def patients(self) -> list[str]:
        """Patient ids (pseudonyms in a de-identified dataset), sorted."""
        return sorted({s.get("patient", "") for s in self.manifest.get("series", [])} - {""})

    def series(self, modality: str | None = None, patient: str | None = None) -> list[SeriesRef]:
        """The dataset's series, optionally of one modality and/or one patient."""
        files_by_series: dict[str, list[str]] = {}
        for entry in self.manifest.get("files", []):
            if entry.get("kind") == "dicom":
                files_by_series.setdefault(entry.get("series_uid", ""), []).append(entry["path"])
        out = []
        for s in self.manifest.get("series", []):
            if modality is not None and s.get("modality", "").upper() != modality.upper():
                continue
            if patient is not None and s.get("patient") != patient:
                continue
            folders = s.get("folders") or ["."]
            spacing = s.get("pixel_spacing_mm")
            out.append(SeriesRef(
                dataset=self.id, series_uid=s["series_uid"], patient=s.get("patient", ""),
                modality=s.get("modality", ""), folder=self.root / folders[0],
                images=int(s.get("images") or 0),
                pixel_spacing_mm=tuple(float(v) for v in spacing[:2]) if spacing else None,
                slice_spacing_mm=s.get("slice_spacing_mm"),
                manifest_sha256=self.manifest_sha256,
                files=tuple(sorted(files_by_series.get(s["series_uid"], []))),
            ))
        return out

    def series_by_uid(self, series_uid: str) -> SeriesRef:
        for ref in self.series():
            if ref.series_uid == series_uid:
                return ref
        raise DatasetError(f"dataset {self.id!r} has no series {series_uid!r}")

    def xrays(self) -> list[SeriesRef]:
        """The projection radiographs (CR and DX series)."""
        return [s for s in self.series() if s.modality.upper() in XRAY_MODALITIES]

    def tables(self) -> list[str]:
        """Names of the CSV tables (file stems: ``clinical``, ``nodules`` …)."""
        return sorted({PurePosixPath(f["path"]).stem for f in self._files("table")})

    def table(self, name: str = "clinical"):
        """A CSV table as a pandas DataFrame, by file stem (``clinical`` → clinical.csv)."""
        import pandas as pd

        matches = [f["path"] for f in self._files("table") if PurePosixPath(f["path"]).stem == name]
        if not matches:
            direct = self.root / f"{name}.csv"
            if not direct.is_file():
                raise DatasetError(f"dataset {self.id!r} has no table {name!r}; "
                                   f"tables: {', '.join(self.tables()) or 'none'}")
            matches = [f"{name}.csv"]
        if len(matches) > 1:
            raise DatasetError(f"dataset {self.id!r} has several tables named {name!r}: "
                               f"{', '.join(sorted(matches))}")
        path = self.root / matches[0]
        try:
            return pd.read_csv(path, encoding="utf-8")
        except UnicodeDecodeError:
            return pd.read_csv(path, encoding="cp949")

    def mask_path(self, patient: str, name: str = "ct_nodule_mask") -> Path | None:
        """``<patient>/<name>.nii.gz`` (or ``.nii``) if the dataset has it, else None."""
        for suffix in (".nii.gz", ".nii"):
            candidate = self.root / patient / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
        for entry in self._files("nifti"):
            rel = PurePosixPath(entry["path"])
            if rel.parts[:1] == (patient,) and rel.name in (f"{name}.nii.gz", f"{name}.nii"):
                return self.root / rel
        return None

    def _files(self, kind: str) -> list[dict]:
        return [f for f in self.manifest.get("files", []) if f.get("kind") == kind]


def read_manifest(path: Path) -> tuple[dict, str]:
    """A manifest and the sha256 of its exact bytes (what the hub records for the dataset)."""
    raw = Path(path).read_bytes()
    return json.loads(raw), hashlib.sha256(raw).hexdigest()


_OPEN: dict[tuple[str, str, str], tuple[float, Dataset]] = {}


def open_dataset(dataset_id: str) -> Dataset:
    """A granted dataset; :class:`DatasetError` naming the granted ids if it is not one."""
    granted = granted_datasets()
    if dataset_id not in granted:
        raise DatasetError(
            f"dataset {dataset_id!r} is not granted to this kernel; granted: "
            f"{', '.join(granted) or 'none'} (apply for access in the portal, then restart "
            "your server)")
    root = data_root() / dataset_id
    manifest_path = manifests_root() / f"{dataset_id}.json"
    try:
        mtime = manifest_path.stat().st_mtime
    except FileNotFoundError:
        raise DatasetError(
            f"dataset {dataset_id!r} has no manifest at {manifest_path} "
            f"(set {ENV_MANIFESTS} to the folder holding <id>.json)") from None
    key = (dataset_id, str(root), str(manifest_path))
    cached = _OPEN.get(key)
    if cached and cached[0] == mtime:
        return cached[1]
    manifest, sha = read_manifest(manifest_path)
    dataset = Dataset(dataset_id, root, manifest, sha)
    _OPEN[key] = (mtime, dataset)
    return dataset


def resolve_series(ref) -> SeriesRef | Path:
    """A :class:`SeriesRef`, a ``{"dataset", "series_uid"}`` dict, or a folder → what the
    loaders take (a SeriesRef or a Path)."""
    if isinstance(ref, SeriesRef):
        return ref
    if isinstance(ref, dict):
        try:
            return open_dataset(ref["dataset"]).series_by_uid(ref["series_uid"])
        except KeyError as err:
            raise DatasetError(f"a series reference needs 'dataset' and 'series_uid': {ref!r}") from err
    if isinstance(ref, (str, os.PathLike)):
        return Path(ref)
    raise TypeError(f"not a series reference: {ref!r}")


__all__ = [
    "Dataset", "DatasetError", "SeriesRef", "XRAY_MODALITIES", "data_root", "granted_datasets",
    "manifests_root", "open_dataset", "read_manifest", "resolve_series",
]
