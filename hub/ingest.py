"""Ingest: validate a source folder, (de-identify,) stage, index and publish a dataset atomically.

Nothing is visible until the very end: files are written to a staging folder beside the
datasets, the database row and audit entry are added in one transaction, and the staging
folder is renamed into place inside that transaction. A refusal, a bad file, a full disk or
an interrupt leaves neither a row nor a folder behind.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import ahocorasick

from . import staging
from .config import (DATASET_DATA, DATASET_GID_BASE, DATASET_GID_SPAN, DATASET_INDEX,
                     DATASET_MANIFEST, MedZoneHome)
from .errors import Conflict, IngestRefused, InvalidInput, MedZoneError
from .deid.dicom import clear_caches as clear_deid_caches
from .deid.dicom import deidentify_dicom, dicom_findings
from .deid.nifti import deidentify_nifti, nifti_findings
from .deid.profile import profile_description
from .deid.pseudonym import Pseudonymizer
from .deid.tables import deidentify_table, read_csv_table, table_findings
from .indexes import screening_index_key
from .manifest import ManifestBuilder
from .registry import dataset_exists, register_dataset, validate_dataset_id
from .screen.index import InvalidIndex, ScreeningIndexBuilder
from .screen.recognizers import find_identifiers

SUPPORTED = "DICOM files, CSV tables and NIfTI images"
ENV_KEY_FILE = "MEDZONE_PSEUDONYM_KEY_FILE"
MIN_KEY_BYTES = 16
#: Identity values shorter than this are not searched for in stored bytes: a 3-byte Hangul
#: surname would match random pixel data by chance.
MIN_SEARCHABLE_BYTES = 6

KIND_ORDER = {"table": 0, "dicom": 1, "nifti": 2}


@dataclass(frozen=True)
class SourceFile:
    path: Path
    rel: PurePosixPath
    kind: str  # "dicom" | "table" | "nifti"


@dataclass
class IngestReport:
    dataset_id: str
    path: Path
    deidentified: bool
    files: int
    source_bytes: int
    stored_bytes: int
    patients: int
    series: int
    seconds: float
    manifest_sha256: str
    one_off_key: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds else float("inf")

    @property
    def mb_per_s(self) -> float:
        return self.source_bytes / 1e6 / self.seconds if self.seconds else float("inf")

    def as_dict(self) -> dict:
        return {"id": self.dataset_id, "path": str(self.path), "deidentified": self.deidentified,
                "files": self.files, "source_bytes": self.source_bytes,
                "stored_bytes": self.stored_bytes, "patients": self.patients,
                "series": self.series, "seconds": round(self.seconds, 3),
                "files_per_s": round(self.files_per_s, 1), "mb_per_s": round(self.mb_per_s, 2),
                "manifest_sha256": self.manifest_sha256, "one_off_key": self.one_off_key,
                "warnings": self.warnings}

    def summary_line(self) -> str:
        how = "de-identified (DICOM PS3.15 basic profile)" if self.deidentified else "as provided"
        line = (f"dataset '{self.dataset_id}' stored {how}: {self.patients} patients, "
                f"{self.series} series, {self.files} files, {self.stored_bytes / 1e6:.1f} MB "
                f"in {self.seconds:.1f} s ({self.files_per_s:.0f} files/s, {self.mb_per_s:.1f} MB/s)")
        if self.one_off_key:
            line += "; no --key-file: pseudonyms used a one-off key and cannot be re-identified"
        for w in self.warnings:
            line += f"\nwarning: {w}"
        return line


# --- keys ------------------------------------------------------------------------------

def read_pseudonym_key(home: MedZoneHome, key_file: str | os.PathLike | None) -> bytes | None:
    """The data provider's key, or None (then a one-off key is used and forgotten)."""
    raw = key_file or os.environ.get(ENV_KEY_FILE)
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if path.is_relative_to(home.root):
        # Pseudonyms are re-identifiable with this key; the zone must never hold it.
        raise InvalidInput(f"{path}: the pseudonymization key must be kept outside MEDZONE_HOME")
    try:
        key = path.read_bytes()
    except OSError as err:
        raise InvalidInput(f"{path}: cannot read key file ({err.strerror})") from None
    if len(key.strip()) < MIN_KEY_BYTES:
        raise InvalidInput(f"{path}: key file holds fewer than {MIN_KEY_BYTES} bytes")
    return key.strip()


# --- reading sources -------------------------------------------------------------------

def _classify(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".csv"):
        return "table"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".dcm"):
        return "dicom"
    with open(path, "rb") as fh:
        head = fh.read(132)
    return "dicom" if head[128:132] == b"DICM" else None


def scan_source(source: Path) -> list[SourceFile]:
    """Every file of the source, tables first, then DICOM, then NIfTI; refuses what is not data."""
    if not source.exists():
        raise InvalidInput(f"source not found: {source}")
    if not source.is_dir():
        raise InvalidInput(f"source is not a folder: {source}")
    found = []
    for path in sorted(source.rglob("*")):
        rel = PurePosixPath(path.relative_to(source).as_posix())
        if path.is_symlink():
            raise InvalidInput(f"{rel}: symbolic links are not ingested (copy the file instead)")
        if path.is_dir():
            continue
        if not path.is_file():
            raise InvalidInput(f"{rel}: not a regular file")
        kind = _classify(path)
        if kind is None:
            raise InvalidInput(f"{rel}: unsupported file type (MedZone ingests {SUPPORTED})")
        found.append(SourceFile(path, rel, kind))
    if not found:
        raise InvalidInput(f"source holds no files: {source}")
    return sorted(found, key=lambda f: (KIND_ORDER[f.kind], f.rel.as_posix()))


def _why(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:160]


def read_dicom(src: SourceFile):
    import pydicom

    try:
        ds = pydicom.dcmread(src.path)
        if "PixelData" in ds:
            ds.pixel_array  # decodes the whole image: a truncated file fails here, not later
    except Exception as err:  # pydicom raises many types for bad input
        raise InvalidInput(f"{src.rel}: not a readable DICOM file ({_why(err)})") from None
    return ds


def read_table(src: SourceFile):
    try:
        return read_csv_table(src.path)
    except UnicodeDecodeError:
        raise InvalidInput(f"{src.rel}: unreadable CSV (neither UTF-8 nor CP949 text)") from None
    except Exception as err:
        raise InvalidInput(f"{src.rel}: unreadable CSV ({_why(err)})") from None


def read_nifti(src: SourceFile):
    import nibabel as nib
    import numpy as np

    try:
        img = nib.load(src.path)
        np.asanyarray(img.dataobj)  # reads every voxel: a truncated file fails here
    except Exception as err:
        raise InvalidInput(f"{src.rel}: not a readable NIfTI image ({_why(err)})") from None
    return img


# --- host permissions of a stored dataset ----------------------------------------------

#: Modes of a sealed dataset (owner root, group the dataset's own): the stored copy and its
#: manifest are readable by the dataset's group only; the screening index by root only.
DATA_DIR_MODE, DATA_FILE_MODE = 0o550, 0o440
INDEX_DIR_MODE, INDEX_FILE_MODE = 0o500, 0o400
GID_COUNTER = ".gid-counter"


def dataset_gid(home: MedZoneHome, dataset_id: str) -> int | None:
    """The host group of a sealed dataset (``DATASET_GID_BASE + n``); ``None`` if it has none."""
    try:
        gid = os.stat(home.dataset_dir(dataset_id)).st_gid
    except OSError:
        return None
    return gid if DATASET_GID_BASE <= gid < DATASET_GID_BASE + DATASET_GID_SPAN else None


def _allocate_gid(home: MedZoneHome) -> int:
    """The next dataset group: one more than any given so far (never reused, so a sandbox
    still holding a removed dataset's group cannot read a new one)."""
    counter = home.datasets_dir / GID_COUNTER
    fd = os.open(counter, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            last = int(f.read().strip() or 0)
        except ValueError:
            last = 0
        for entry in home.datasets_dir.iterdir():
            if not entry.name.startswith("."):
                gid = dataset_gid(home, entry.name)
                if gid is not None:
                    last = max(last, gid - DATASET_GID_BASE)
        f.seek(0)
        f.truncate()
        f.write(f"{last + 1}\n")
        return DATASET_GID_BASE + last + 1


def seal_dataset(home: MedZoneHome, dataset_id: str) -> int | None:
    """Set a stored dataset's host permissions; its group id (``None`` without root).

    As root: the tree is ``root:<the dataset's group>``, folders 0550 and files 0440, the
    manifest 0440, ``index/`` root-only (0500/0400); a sandbox gets the group only while its
    user holds a live grant (:func:`medzone_hub.sandbox.dataset_gids`). Not as root (every
    sandbox is the hub's own uid): owner-only, folders 0500 and files 0400. Either way no
    other local account reads any of it."""
    root = home.dataset_dir(dataset_id)
    if os.geteuid() == 0:
        gid = dataset_gid(home, dataset_id) or _allocate_gid(home)
        owner = (0, gid)
        data_dir, data_file = DATA_DIR_MODE, DATA_FILE_MODE
    else:
        gid, owner = None, None
        data_dir, data_file = 0o500, 0o400

    def apply(path: str, mode: int, ids) -> None:
        if ids is not None:
            os.lchown(path, *ids)
        os.chmod(path, mode)

    for dirpath, dirnames, filenames in os.walk(root):
        index_dir = home.dataset_index_dir(dataset_id)
        index = Path(dirpath) == index_dir or index_dir in Path(dirpath).parents
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            apply(path, INDEX_FILE_MODE if index else data_file,
                  (0, 0) if index and owner else owner)
        if Path(dirpath) != root:
            apply(dirpath, INDEX_DIR_MODE if index else data_dir,
                  (0, 0) if index and owner else owner)
    apply(str(root), data_dir, owner)
    return gid


def dataset_sealed(home: MedZoneHome, dataset_id: str) -> bool:
    """Whether a dataset's top folder has the sealed modes (the cheap check before
    :func:`seal_datasets` walks a tree)."""
    try:
        st = os.stat(home.dataset_dir(dataset_id))
    except OSError:
        return True
    if os.geteuid() == 0:
        return (dataset_gid(home, dataset_id) is not None and st.st_uid == 0
                and stat.S_IMODE(st.st_mode) == DATA_DIR_MODE)
    return stat.S_IMODE(st.st_mode) & 0o077 == 0


def seal_datasets(home: MedZoneHome) -> list[str]:
    """Seal every stored dataset that is not yet (e.g. one published before datasets had
    groups, when its files were world-readable); the ids repaired. The hub runs it at start."""
    repaired = []
    if not home.datasets_dir.is_dir():
        return repaired
    for entry in sorted(home.datasets_dir.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir() or entry.is_symlink():
            continue
        if not dataset_sealed(home, entry.name):
            seal_dataset(home, entry.name)
            repaired.append(entry.name)
    return repaired




# --- de-identification of paths and the final byte check -------------------------------

def _identity_automaton(values: set[str]) -> ahocorasick.Automaton | None:
    """Multi-pattern matcher over the UTF-8 bytes of identity values (as latin-1 text)."""
    auto = ahocorasick.Automaton()
    for value in values:
        for variant in {value, value.lower(), value.upper()}:
            raw = variant.encode("utf-8")
            if len(raw) >= MIN_SEARCHABLE_BYTES:
                word = raw.decode("latin-1")
                auto.add_word(word, word)
    if len(auto) == 0:
        return None
    auto.make_automaton()
    return auto


def _glued_to_digits(text: str, end: int, word: str) -> bool:
    """True when a hit is part of a longer digit run: an 8-digit MRN inside a 39-digit
    ``2.25.`` UID is chance, not a surviving identifier."""
    start = end - len(word) + 1
    before = text[start - 1] if start > 0 else ""
    after = text[end + 1] if end + 1 < len(text) else ""
    return (word[0].isdigit() and before.isdigit()) or (word[-1].isdigit() and after.isdigit())


def _carries_identity(auto: ahocorasick.Automaton | None, text: str) -> bool:
    return auto is not None and any(not _glued_to_digits(text, end, word)
                                    for end, word in auto.iter(text))


def identity_survivors(root: Path, values: set[str]) -> list[str]:
    """Stored files whose name or bytes still contain an original identity value."""
    auto = _identity_automaton(values)
    bad = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if find_identifiers(rel) or _carries_identity(auto, rel.encode().decode("latin-1")):
                bad.append(f"{rel}: the file or folder name carries an identifier")
            if _carries_identity(auto, path.read_bytes().decode("latin-1")):
                bad.append(f"{rel}: an original identifier survived de-identification")
    return bad


# --- the ingest itself -----------------------------------------------------------------

def ingest_dataset(home: MedZoneHome, store, dataset_id: str, source: Path, *,
                   title: str | None = None, deidentify: bool = False,
                   pseudonym_key: bytes | None = None, actor: str,
                   progress: bool = True) -> IngestReport:
    """Validate ``source`` and publish it as dataset ``dataset_id`` (see the module docstring)."""
    from tqdm import tqdm

    started = time.perf_counter()
    dataset_id = validate_dataset_id(dataset_id)
    home.ensure()
    with store.session() as session:
        if dataset_exists(session, dataset_id):
            raise Conflict(f"dataset '{dataset_id}' exists already")
    source = Path(source).expanduser().resolve()
    files = scan_source(source)
    if source.is_relative_to(home.root):
        raise InvalidInput(f"{source}: the source must be outside MEDZONE_HOME")
    one_off_key = deidentify and pseudonym_key is None
    if one_off_key:
        pseudonym_key = secrets.token_bytes(32)

    staging.sweep(home.staging_dir)  # what ingests killed (or a power loss) left
    stager = _Staging(home, dataset_id, title or dataset_id,
                      Pseudonymizer(pseudonym_key) if deidentify else None,
                      screening_index_key(home))
    published = None
    try:
        with tqdm(total=len(files), desc=f"ingest {dataset_id}", unit="file", file=sys.stderr,
                  disable=not progress, dynamic_ncols=True) as bar:
            for src in files:
                stager.add(src)
                bar.update(1)
        manifest, manifest_sha = stager.finish()
        final = home.dataset_dir(dataset_id)
        with store.session() as session:
            totals = manifest["totals"]
            register_dataset(session, dataset_id=dataset_id, title=title or dataset_id,
                             manifest_sha256=manifest_sha, deidentified=deidentify,
                             n_files=totals["files"], n_bytes=totals["bytes"],
                             n_patients=totals["patients"], modalities=totals["modalities"],
                             actor=actor)
            session.flush()
            # A folder already at *final* is what an interrupted publish left: no row
            # names it (checked above).
            published = stager.folder.publish(final)
            seal_dataset(home, dataset_id)
        published = None  # committed: nothing to undo
    except OSError as err:
        if err.errno == 28:
            raise MedZoneError("ingest stopped: no space left on the device; nothing was stored") from None
        raise
    finally:
        if published is not None:
            staging.remove_tree(published)
        stager.folder.close()
        clear_deid_caches()  # they hold original header text

    seconds = time.perf_counter() - started
    totals = manifest["totals"]
    return IngestReport(dataset_id=dataset_id, path=home.dataset_dir(dataset_id),
                        deidentified=deidentify, files=len(files),
                        source_bytes=sum(f.path.stat().st_size for f in files),
                        stored_bytes=totals["bytes"], patients=totals["patients"],
                        series=totals["series"], seconds=seconds, manifest_sha256=manifest_sha,
                        one_off_key=one_off_key, warnings=manifest["warnings"])


class _Staging:
    """One ingest's staging folder and what was learnt while filling it.

    Every file is checked as it will be stored: the source itself when it is kept as
    provided, the de-identified copy otherwise. ``finish`` refuses the whole dataset if any
    check found something.
    """

    def __init__(self, home: MedZoneHome, dataset_id: str, title: str, pz, index_key: bytes):
        self.folder = staging.stage(home.staging_dir, dataset_id)
        self.root = self.folder.path
        self.data = self.root / DATASET_DATA
        self.data.mkdir()
        self.pz = pz
        self.manifest = ManifestBuilder(dataset_id, title, pz is not None,
                                        profile=profile_description() if pz else None)
        self.index = ScreeningIndexBuilder(index_key)
        self.findings: list[str] = []
        self.identity_values: set[str] = set()  # original identifiers that must not be stored
        self.patient_ids: set[str] = set()      # original patient ids: folders get pseudonyms

    def add(self, src: SourceFile) -> None:
        try:
            {"table": self._add_table, "dicom": self._add_dicom,
             "nifti": self._add_nifti}[src.kind](src)
        except InvalidIndex as err:  # e.g. an image the fingerprints cannot take
            raise InvalidInput(str(err)) from None

    def _target(self, rel: PurePosixPath) -> Path:
        if self.pz is not None:
            rel = PurePosixPath(*(self.pz.patient_pseudonym(p) if p in self.patient_ids else p
                                  for p in rel.parts))
        out = self.data / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def _copy(self, src: SourceFile) -> Path:
        out = self._target(src.rel)
        shutil.copyfile(src.path, out)
        return out

    def _learn(self, identity_values, patient_ids) -> None:
        self.identity_values.update(identity_values)
        self.patient_ids.update(str(p) for p in patient_ids if p)

    def _add_table(self, src: SourceFile) -> None:
        frame = read_table(src)
        if self.pz is None:
            out = self._copy(src)
        else:
            result = deidentify_table(frame, self.pz, relpath=str(src.rel))
            frame = result.frame
            self._learn(result.identity_values, result.patient_ids)
            out = self._target(src.rel)
            frame.to_csv(out, index=False)
        self.findings += table_findings(frame, str(src.rel))
        self.index.add_table(frame)
        self.manifest.add_table(out, out.relative_to(self.data), frame)

    def _add_dicom(self, src: SourceFile) -> None:
        ds = read_dicom(src)
        if self.pz is None:
            out = self._copy(src)
        else:
            result = deidentify_dicom(ds, self.pz, relpath=str(src.rel))
            ds = result.dataset
            self._learn(result.identity_values, [result.patient_id])
            out = self._target(src.rel)
            ds.save_as(out, enforce_file_format=True)
        self.findings += dicom_findings(ds, str(src.rel))
        self.index.add_dicom(ds)
        self.manifest.add_dicom(out, out.relative_to(self.data), ds)

    def _add_nifti(self, src: SourceFile) -> None:
        import nibabel as nib

        img = read_nifti(src)
        if self.pz is None:
            out = self._copy(src)
        else:
            img = deidentify_nifti(img)
            out = self._target(src.rel)
            nib.save(img, out)
        self.findings += nifti_findings(img, str(src.rel), strict=self.pz is not None)
        self.manifest.add_file(out, out.relative_to(self.data), "nifti",
                               shape=[int(n) for n in img.shape])

    def finish(self) -> tuple[dict, str]:
        """Refuse on any finding; else write the index and manifest and seal the folder."""
        if self.pz is None:
            self.findings += [f"{e['path']}: file or folder name (looks like an identifier)"
                              for e in self.manifest.files if find_identifiers(e["path"])]
            if self.findings:
                raise IngestRefused(
                    f"source holds identifying data; nothing was stored (use --deidentify, or "
                    f"clean the source) — {len(self.findings)} findings", self.findings)
        else:
            self.findings += identity_survivors(self.data, self.identity_values)
            if self.findings:
                raise IngestRefused(
                    f"de-identification could not remove every identifier; nothing was stored "
                    f"({len(self.findings)} findings)", self.findings)
        self.index.write(self.root / DATASET_INDEX)
        result = self.manifest.write(self.root / DATASET_MANIFEST)
        # Owner only while staged; seal_dataset gives the dataset's group access on publish.
        staging.seal(self.data, dir_mode=0o500, file_mode=0o400)
        staging.seal(self.root / DATASET_INDEX, dir_mode=0o500, file_mode=0o400)
        os.chmod(self.root / DATASET_MANIFEST, 0o400)
        return result
