"""A dataset's manifest: sha256 per stored file, what each file is, and each series' geometry."""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

MANIFEST_VERSION = 1
_HASH_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in chunks (manifests, quarantine, template runs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _floats(value) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value]
    except TypeError:
        return [float(value)]


@dataclass
class _SeriesAccumulator:
    modality: str
    patient: str
    folders: set[str] = field(default_factory=set)
    rows: int | None = None
    columns: int | None = None
    pixel_spacing_mm: list[float] | None = None
    slice_thickness_mm: float | None = None
    orientation: list[float] | None = None
    positions: list[tuple[int, list[float]]] = field(default_factory=list)
    frames: int = 0


def dicom_facts(ds) -> dict:
    """What the manifest records of one DICOM dataset, as plain values (small enough to pass
    between processes)."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    rows, columns = ds.get("Rows"), ds.get("Columns")
    return {
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "modality": str(ds.get("Modality", "")),
        "patient": str(ds.get("PatientID", "")),
        "rows": None if rows is None else int(rows),
        "columns": None if columns is None else int(columns),
        "pixel_spacing_mm": _floats(spacing),
        "slice_thickness_mm": float(ds.SliceThickness) if ds.get("SliceThickness") else None,
        "orientation": _floats(ds.get("ImageOrientationPatient")),
        "frames": int(ds.get("NumberOfFrames", 1) or 1),
        "position": _floats(ds.get("ImagePositionPatient")),
        "instance": int(ds.get("InstanceNumber", 0) or 0),
    }


@dataclass
class ManifestBuilder:
    """Collects entries while files are staged; ``write`` produces ``manifest.json``."""

    dataset_id: str
    title: str
    deidentified: bool
    profile: dict | None = None
    files: list[dict] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    _series: dict[str, _SeriesAccumulator] = field(default_factory=dict)

    def add_file(self, stored: Path, rel: PurePosixPath, kind: str, **extra) -> dict:
        return self.add_entry(rel, kind, stored.stat().st_size, sha256_file(stored), **extra)

    def add_entry(self, rel: PurePosixPath, kind: str, size: int, sha256: str, **extra) -> dict:
        """A stored file whose size and sha256 are known already (hashed as it was written)."""
        entry = {"path": rel.as_posix(), "kind": kind, "bytes": int(size), "sha256": sha256,
                 **extra}
        self.files.append(entry)
        return entry

    def add_dicom(self, stored: Path, rel: PurePosixPath, ds) -> None:
        self.add_dicom_facts(rel, stored.stat().st_size, sha256_file(stored), dicom_facts(ds))

    def add_dicom_facts(self, rel: PurePosixPath, size: int, sha256: str, facts: dict) -> None:
        """A stored DICOM file described by :func:`dicom_facts` of its (stored) dataset."""
        series_uid, modality = facts["series_uid"], facts["modality"]
        self.add_entry(rel, "dicom", size, sha256, modality=modality, series_uid=series_uid)
        acc = self._series.get(series_uid)
        if acc is None:
            acc = self._series[series_uid] = _SeriesAccumulator(modality=modality,
                                                                patient=facts["patient"])
            acc.rows, acc.columns = facts["rows"], facts["columns"]
            acc.pixel_spacing_mm = facts["pixel_spacing_mm"]
            acc.slice_thickness_mm = facts["slice_thickness_mm"]
            acc.orientation = facts["orientation"]
        acc.folders.add(rel.parent.as_posix())
        acc.frames += facts["frames"]
        if facts["position"] is not None:
            acc.positions.append((facts["instance"], facts["position"]))

    def add_table(self, stored: Path, rel: PurePosixPath, frame) -> None:
        self.add_file(stored, rel, "table", rows=int(len(frame)), columns=list(map(str, frame.columns)))

    def series(self) -> list[dict]:
        import numpy as np  # only an ingest computes slice spacing; readers of manifests do not

        out = []
        for uid, acc in sorted(self._series.items(), key=lambda kv: (kv[1].patient, sorted(kv[1].folders))):
            entry = {
                "series_uid": uid, "modality": acc.modality, "patient": acc.patient,
                "folders": sorted(acc.folders), "images": acc.frames,
                "rows": acc.rows, "columns": acc.columns,
                "pixel_spacing_mm": acc.pixel_spacing_mm,
                "slice_thickness_mm": acc.slice_thickness_mm,
                "image_orientation_patient": acc.orientation,
            }
            if len(acc.positions) > 1 and acc.orientation and len(acc.orientation) == 6:
                # Slice spacing is measured along the slice normal from the positions, because
                # SliceThickness is not the spacing (overlapping or gapped reconstructions).
                normal = np.cross(acc.orientation[:3], acc.orientation[3:])
                along = np.sort([float(np.dot(normal, p)) for _, p in acc.positions])
                gaps = np.diff(along)
                entry["slice_spacing_mm"] = round(float(np.median(gaps)), 4)
                entry["uniform_spacing"] = bool(np.allclose(gaps, gaps[0], atol=1e-3)) if len(gaps) else True
            out.append(entry)
        return out

    def warnings(self) -> list[str]:
        folders: dict[str, set[str]] = defaultdict(set)
        for uid, acc in self._series.items():
            for folder in acc.folders:
                folders[folder].add(uid)
        return [f"{folder}: holds {len(uids)} series (one series per folder is expected)"
                for folder, uids in sorted(folders.items()) if len(uids) > 1]

    def as_dict(self) -> dict:
        patients = {acc.patient for acc in self._series.values() if acc.patient}
        return {
            "format": MANIFEST_VERSION,
            "dataset": self.dataset_id,
            "title": self.title,
            "deidentified": self.deidentified,
            "deidentification_profile": self.profile,
            "totals": {
                "files": len(self.files),
                "bytes": sum(f["bytes"] for f in self.files),
                "patients": len(patients),
                "series": len(self._series),
                "modalities": sorted({acc.modality for acc in self._series.values() if acc.modality}),
            },
            "series": self.series(),
            "files": sorted(self.files, key=lambda f: f["path"]),
            "warnings": self.warnings(),
        }

    def write(self, path: Path) -> tuple[dict, str]:
        """Write the manifest; returns it and the sha256 of the exact bytes written."""
        data = self.as_dict()
        raw = json.dumps(data, indent=1, ensure_ascii=False, sort_keys=True).encode() + b"\n"
        path.write_bytes(raw)
        return data, hashlib.sha256(raw).hexdigest()


def dataset_stats(home, dataset) -> dict:
    """What the catalog shows of *dataset* (a registry row): patients, files and bytes
    from the registry; series and images from its stored manifest, if any (read each
    time: it is small and written once, at ingest)."""
    stats = {"patients": dataset.n_patients, "series": None, "images": None,
             "files": dataset.n_files, "bytes": dataset.n_bytes}
    try:
        manifest = json.loads(home.dataset_manifest_path(dataset.id).read_text())
    except (OSError, ValueError):
        return stats
    series = manifest.get("series") if isinstance(manifest, dict) else None
    if isinstance(series, list):
        stats["series"] = len(series)
        stats["images"] = sum(int(s.get("images") or 0) for s in series if isinstance(s, dict))
    return stats
