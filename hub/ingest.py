"""Ingest: validate a source folder, (de-identify,) stage, index and publish a dataset atomically.

Nothing is visible until the very end: files are written to a staging folder beside the
datasets, the database row and audit entry are added in one transaction, and the staging
folder is renamed into place inside that transaction. A refusal, a bad file, a full disk or
an interrupt leaves neither a row nor a folder behind.
"""

from __future__ import annotations

import fcntl
import hashlib
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
from .deid.profile import basic_profile, profile_description
from .deid.pseudonym import Pseudonymizer
from .deid.tables import deidentify_table, read_csv_table, table_findings
from .indexes import screening_index_key
from .manifest import ManifestBuilder, dicom_facts, sha256_file
from .registry import dataset_exists, register_dataset, validate_dataset_id
from .screen.index import REF_SLOT, InvalidIndex, ScreeningIndexBuilder, dicom_ref_facts
from .screen.recognizers import find_identifiers

SUPPORTED = "DICOM files, CSV tables and NIfTI images"
ENV_KEY_FILE = "MEDZONE_PSEUDONYM_KEY_FILE"
MIN_KEY_BYTES = 16
#: Identity values shorter than this are not searched for in stored bytes: a 3-byte Hangul
#: surname would match random pixel data by chance.
MIN_SEARCHABLE_BYTES = 6

KIND_ORDER = {"table": 0, "dicom": 1, "nifti": 2}

#: Worker processes for DICOM files (default: one per core); or the ``workers`` argument.
ENV_WORKERS = "MEDZONE_INGEST_WORKERS"
#: Files handed to the workers ahead of the one being merged, per worker: enough to keep
#: every core busy, few enough that memory stays bounded whatever the dataset's size.
IN_FLIGHT_PER_WORKER = 4
#: A killed ingest's staged work is kept this long for a rerun with the same arguments.
RESUME_KEEP_DAYS = 7
#: The journal is flushed to the kernel after every file and to the disk this often.
JOURNAL_SYNC_S = 5.0
#: In a staging folder: the resume journal, and files written but not yet in place.
JOURNAL_FILE = "journal"
INCOMING_DIR = "incoming"


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
    resumed_files: int = 0  # DICOM files an interrupted run had finished

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
                "warnings": self.warnings, "resumed_files": self.resumed_files}

    def summary_line(self) -> str:
        how = "de-identified (DICOM PS3.15 basic profile)" if self.deidentified else "as provided"
        line = (f"dataset '{self.dataset_id}' stored {how}: {self.patients} patients, "
                f"{self.series} series, {self.files} files, {self.stored_bytes / 1e6:.1f} MB "
                f"in {self.seconds:.1f} s ({self.files_per_s:.0f} files/s, {self.mb_per_s:.1f} MB/s)")
        if self.resumed_files:
            line += f"; resumed: {self.resumed_files} files were done by an interrupted run"
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


class _IdentityScan:
    """Searches stored bytes for identity values, exactly as :func:`_carries_identity` over
    the whole file would, but first finds the runs of bytes that could hold one (bytes that
    occur in some value, at least as long as the shortest): 12-bit pixel data has none, so
    the matcher only walks the header."""

    def __init__(self, values: set[str]):
        self.auto = _identity_automaton(values)
        words = list(self.auto.keys()) if self.auto is not None else []
        self.shortest = min((len(w) for w in words), default=0)
        used = {ord(ch) for word in words for ch in word}
        # Bytes that occur in some value become "1", every other byte "0".
        self.table = bytes(0x31 if b in used else 0x30 for b in range(256))

    def bytes_carry(self, raw: bytes) -> bool:
        if self.auto is None or len(raw) < self.shortest:
            return False
        marks = raw.translate(self.table)
        run, zero = b"1" * self.shortest, b"0"
        start, runs = marks.find(run), 0
        while start >= 0:
            end = marks.find(zero, start)
            end = len(raw) if end < 0 else end
            runs += 1
            if runs > 256:  # busy bytes (e.g. 16-bit noise): one pass over everything
                return _carries_identity(self.auto, raw.decode("latin-1"))
            # One byte of context each side: a hit glued to a longer digit run is chance.
            lo, hi = max(start - 1, 0), min(end + 1, len(raw))
            if _carries_identity(self.auto, raw[lo:hi].decode("latin-1")):
                return True
            start = marks.find(run, end)
        return False

    def findings(self, root: Path, rel: str) -> list[str]:
        bad = []
        if find_identifiers(rel) or _carries_identity(self.auto, rel.encode().decode("latin-1")):
            bad.append(f"{rel}: the file or folder name carries an identifier")
        if self.bytes_carry((root / rel).read_bytes()):
            bad.append(f"{rel}: an original identifier survived de-identification")
        return bad


def _stored_files(root: Path) -> list[str]:
    return [(Path(dirpath) / name).relative_to(root).as_posix()
            for dirpath, _, filenames in os.walk(root) for name in filenames]


def _survivors_in(root: Path, rels: list[str], values: set[str]) -> list[str]:
    scan = _IdentityScan(values)
    return [line for rel in rels for line in scan.findings(root, rel)]


def identity_survivors(root: Path, values: set[str], pool=None, chunks: int = 1) -> list[str]:
    """Stored files whose name or bytes still contain an original identity value (on
    ``pool``'s worker processes, in about ``chunks`` parts, when given)."""
    rels = _stored_files(root)
    if pool is None or len(rels) < 2:
        return _survivors_in(root, rels, values)
    size = max(16, -(-len(rels) // max(chunks, 1)))
    parts = [rels[i:i + size] for i in range(0, len(rels), size)]
    return [line for found in pool.map(_survivors_in, [root] * len(parts), parts,
                                       [values] * len(parts)) for line in found]


# --- DICOM files, one worker process per core ------------------------------------------

@dataclass
class _DicomDone:
    """What processing one DICOM file produced (sent back from a worker process, and kept,
    encrypted, in the journal). ``identity_values`` and ``patient_id`` are ORIGINAL
    identifiers: never written anywhere in the clear."""

    size: int
    sha256: str
    findings: list[str]
    identity_values: set[str]
    patient_id: str
    facts: dict
    ref_facts: tuple | None
    index_part: ScreeningIndexBuilder
    incoming: str = ""      # its file in the staging folder's incoming/ (a fresh result)
    resumed_from: str = ""  # where a killed run stored it (a result from the journal)


@dataclass
class _Failure:
    """A refusal or bad file met in a worker (re-raised, in file order, by the ingest)."""

    message: str
    findings: list[str] | None = None  # an IngestRefused when not None


class _DicomWorker:
    """Reads, (de-identifies,) writes, hashes, checks and fingerprints one DICOM file: the
    dataset is read once, its pixel data decoded once, and de-identified in place."""

    def __init__(self, pseudonym_key: bytes | None, index_key: bytes, incoming: Path):
        self.pz = Pseudonymizer(pseudonym_key) if pseudonym_key is not None else None
        self.index_key = index_key
        self.incoming = incoming

    def run(self, position: int, src: SourceFile) -> _DicomDone | _Failure:
        try:
            return self._run(position, src)
        except IngestRefused as err:
            return _Failure(str(err), err.findings)
        except (InvalidInput, InvalidIndex) as err:
            return _Failure(str(err))

    def _run(self, position: int, src: SourceFile) -> _DicomDone:
        import io

        out = self.incoming / f"{position}.dcm"
        ds = read_dicom(src)
        identity, patient_id = set(), ""
        if self.pz is None:
            shutil.copyfile(src.path, out)
            size, digest = out.stat().st_size, sha256_file(out)
        else:
            result = deidentify_dicom(ds, self.pz, relpath=str(src.rel), in_place=True)
            ds, identity, patient_id = result.dataset, result.identity_values, result.patient_id
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            raw = buffer.getbuffer()
            with open(out, "wb") as fh:
                fh.write(raw)
            size, digest = len(raw), hashlib.sha256(raw).hexdigest()
            del raw
        findings = dicom_findings(ds, str(src.rel))
        part = ScreeningIndexBuilder(self.index_key)
        part.add_dicom(ds, REF_SLOT)
        return _DicomDone(size, digest, findings, identity, patient_id, dicom_facts(ds),
                          dicom_ref_facts(ds) if "PixelData" in ds else None, part,
                          out.name)


_WORKER: _DicomWorker | None = None


def _init_worker(pseudonym_key: bytes | None, index_key: bytes, incoming: Path,
                 ingest_pid: int) -> None:
    global _WORKER
    _WORKER = _DicomWorker(pseudonym_key, index_key, incoming)
    import threading

    def watch() -> None:  # an ingest killed with SIGKILL leaves no worker behind
        while True:
            time.sleep(0.5)
            if os.getppid() != ingest_pid:  # re-parented: the ingest is gone (or a zombie)
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="ingest-watch").start()


def _work(position: int, src: SourceFile) -> _DicomDone | _Failure:
    return _WORKER.run(position, src)


def ingest_workers(workers: int | None = None) -> int:
    """Worker processes of an ingest: ``workers``, else ``MEDZONE_INGEST_WORKERS``, else one
    per core."""
    if workers is None:
        raw = os.environ.get(ENV_WORKERS, "").strip()
        try:
            workers = int(raw) if raw else (os.cpu_count() or 1)
        except ValueError:
            raise InvalidInput(f"{ENV_WORKERS} must be a whole number, not {raw!r}") from None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidInput(f"the number of ingest workers must be at least 1, not {workers!r}")
    return workers


def _process_pool(workers: int, initargs: tuple):
    """Worker processes forked from this one (MedZone's modules are loaded already; each
    worker ends by itself when the ingest is killed, see :func:`_init_worker`)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_init_worker, initargs=initargs)


# --- the journal of a resumable ingest -------------------------------------------------

class _Journal:
    """Which DICOM files this ingest has finished, so that a killed one resumes: one frame
    per file, appended once the file is in place, AES-GCM encrypted with a key derived from
    the keys and settings of the ingest (frames hold the original identity values that the
    last proof searches for, which must never lie on disk in the clear). Frames another key
    cannot open, or that a kill cut short, end the journal."""

    FORMAT = b"medzone ingest journal v1"

    def __init__(self, path: Path, key: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.path = path
        self._aead = AESGCM(key)
        self._done: dict[str, tuple[int, int, dict]] = {}
        self._synced = time.monotonic()
        end = self._load()
        self._fh = open(path, "r+b" if path.exists() else "w+b")
        self._fh.truncate(end)
        self._fh.seek(end)

    @property
    def resumable(self) -> int:
        return len(self._done)

    def _open(self, frame: bytes) -> bytes:
        return self._aead.decrypt(frame[:12], frame[12:], self.FORMAT)

    def _load(self) -> int:
        import json

        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        offset = 0
        while offset + 4 <= len(raw):
            length = int.from_bytes(raw[offset:offset + 4], "big")
            frame = raw[offset + 4:offset + 4 + length]
            if len(frame) != length:
                break
            try:
                plain = self._open(frame)
            except Exception:  # another key, or torn by a kill
                break
            head = int.from_bytes(plain[:4], "big")
            header = json.loads(plain[4:4 + head])
            self._done[header["rel"]] = (offset + 4, length, header)
            offset += 4 + length
        return offset

    def lookup(self, src: SourceFile) -> dict | None:
        """The header of a finished file, if the source file is unchanged since."""
        entry = self._done.get(src.rel.as_posix())
        if entry is None:
            return None
        st = src.path.stat()
        header = entry[2]
        return header if (header["size"], header["mtime_ns"]) == (st.st_size, st.st_mtime_ns) else None

    def result(self, src: SourceFile) -> _DicomDone:
        import pickle

        offset, length, _ = self._done[src.rel.as_posix()]
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            plain = self._open(fh.read(length))
        head = int.from_bytes(plain[:4], "big")
        # Written by this ingest under a key only it derives (authenticated by AES-GCM).
        return pickle.loads(plain[4 + head:])

    def append(self, src: SourceFile, stored: str, done: _DicomDone) -> None:
        import json
        import pickle

        st = src.path.stat()
        header = json.dumps({"rel": src.rel.as_posix(), "size": st.st_size,
                             "mtime_ns": st.st_mtime_ns, "stored": stored}).encode()
        plain = len(header).to_bytes(4, "big") + header + pickle.dumps(done, protocol=5)
        nonce = secrets.token_bytes(12)
        frame = nonce + self._aead.encrypt(nonce, plain, self.FORMAT)
        self._fh.write(len(frame).to_bytes(4, "big") + frame)
        self._fh.flush()  # in the kernel's hands: a killed process loses nothing
        if time.monotonic() - self._synced > JOURNAL_SYNC_S:
            os.fsync(self._fh.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        self._fh.close()


def _resume_settings(dataset_id: str, source: Path, deidentify: bool) -> bytes:
    import json

    return json.dumps({"dataset": dataset_id, "source": str(source), "deidentify": deidentify,
                       "profile": basic_profile().version if deidentify else None},
                      sort_keys=True).encode()


def _resume_names(dataset_id: str, source: Path, deidentify: bool, pseudonym_key: bytes | None,
                  index_key: bytes) -> tuple[str, bytes]:
    """The staging folder name of a resumable ingest, and its journal key."""
    import hmac

    settings = _resume_settings(dataset_id, source, deidentify)
    folder = hmac.new(index_key, b"medzone ingest folder\0" + settings, hashlib.sha256)
    key = hmac.new(index_key, b"medzone ingest journal\0" + settings + b"\0"
                   + (pseudonym_key or b""), hashlib.sha256)
    return f"{dataset_id}-resume-{folder.hexdigest()[:16]}", key.digest()


def _keep_resumable(folder: Path) -> bool:
    """Sweeping keeps a killed ingest's work for a while (see RESUME_KEEP_DAYS)."""
    try:
        age = time.time() - (folder / JOURNAL_FILE).stat().st_mtime
    except OSError:
        return False
    return age < RESUME_KEEP_DAYS * 86400


# --- the ingest itself -----------------------------------------------------------------

def ingest_dataset(home: MedZoneHome, store, dataset_id: str, source: Path, *,
                   title: str | None = None, deidentify: bool = False,
                   pseudonym_key: bytes | None = None, actor: str,
                   progress: bool = True, workers: int | None = None) -> IngestReport:
    """Validate ``source`` and publish it as dataset ``dataset_id`` (see the module docstring).

    DICOM files are processed by ``workers`` processes (:func:`ingest_workers`). An ingest
    killed before it published resumes when run again with the same arguments (and the same
    key: one-off keys are forgotten, so those ingests start over)."""
    from tqdm import tqdm

    started = time.perf_counter()
    dataset_id = validate_dataset_id(dataset_id)
    workers = ingest_workers(workers)
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
    index_key = screening_index_key(home)

    # What ingests killed (or a power loss) left, but for work a rerun may resume.
    staging.sweep(home.staging_dir, keep=_keep_resumable)
    resume = None
    if not one_off_key:
        resume = _resume_names(dataset_id, source, deidentify,
                               pseudonym_key if deidentify else None, index_key)
    try:
        stager = _Staging(home, dataset_id, title or dataset_id,
                          pseudonym_key if deidentify else None, index_key, resume)
    except staging.Busy:
        raise Conflict(f"dataset '{dataset_id}' is being ingested from this source right "
                       f"now") from None
    published = None
    keep = False
    try:
        sizes = {f.path: f.path.stat().st_size for f in files}
        with tqdm(total=sum(sizes.values()), desc=f"ingest {dataset_id}", unit="B",
                  unit_scale=True, unit_divisor=1000, file=sys.stderr, disable=not progress,
                  dynamic_ncols=True, smoothing=0.1) as bar:
            stager.add_all(files, workers, lambda src: bar.update(sizes[src.path]))
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
    except KeyboardInterrupt:
        keep = stager.resumable  # a rerun with the same arguments continues
        raise
    except OSError as err:
        if err.errno == 28:
            raise MedZoneError("ingest stopped: no space left on the device; nothing was stored") from None
        raise
    finally:
        if published is not None:
            staging.remove_tree(published)
        stager.close(keep=keep)
        clear_deid_caches()  # they hold original header text

    seconds = time.perf_counter() - started
    totals = manifest["totals"]
    return IngestReport(dataset_id=dataset_id, path=home.dataset_dir(dataset_id),
                        deidentified=deidentify, files=len(files),
                        source_bytes=sum(sizes.values()),
                        stored_bytes=totals["bytes"], patients=totals["patients"],
                        series=totals["series"], seconds=seconds, manifest_sha256=manifest_sha,
                        one_off_key=one_off_key, warnings=manifest["warnings"],
                        resumed_files=stager.resumed_files)


class _Staging:
    """One ingest's staging folder and what was learnt while filling it.

    Every file is checked as it will be stored: the source itself when it is kept as
    provided, the de-identified copy otherwise. ``finish`` refuses the whole dataset if any
    check found something. Results are taken in the order of the files, whichever process
    made them, so the stored dataset, manifest and index do not depend on the number of
    workers or on whether the ingest was resumed.
    """

    def __init__(self, home: MedZoneHome, dataset_id: str, title: str,
                 pseudonym_key: bytes | None, index_key: bytes,
                 resume: tuple[str, bytes] | None = None):
        self.folder = staging.stage(home.staging_dir, dataset_id,
                                    name=resume[0] if resume else None)
        self.root = self.folder.path
        self.data = self.root / DATASET_DATA
        self.incoming = self.root / INCOMING_DIR
        self.resumable = resume is not None
        self.journal = None
        try:
            if resume is not None:
                self.journal = _Journal(self.root / JOURNAL_FILE, resume[1])
                if not self.journal.resumable:  # nothing to resume: start from scratch
                    for entry in self.root.iterdir():
                        if entry.name != JOURNAL_FILE:
                            staging.remove_tree(entry)
            staging.remove_tree(self.incoming)  # a killed run's unfinished files
            for dirpath, _, _ in os.walk(self.data):  # killed while sealing: writable again
                os.chmod(dirpath, 0o700)
            self.data.mkdir(exist_ok=True)
            self.incoming.mkdir()
        except BaseException:
            self.close()
            raise
        self.pseudonym_key = pseudonym_key
        self.pz = Pseudonymizer(pseudonym_key) if pseudonym_key is not None else None
        self.index_key = index_key
        self.manifest = ManifestBuilder(dataset_id, title, self.pz is not None,
                                        profile=profile_description() if self.pz else None)
        self.index = ScreeningIndexBuilder(index_key)
        self.findings: list[str] = []
        self.identity_values: set[str] = set()  # original identifiers that must not be stored
        self.patient_ids: set[str] = set()      # original patient ids: folders get pseudonyms
        self.stored: set[str] = set()           # what this run put under data/
        self.resumed_files = 0
        self._pool = None
        self._workers = 1

    def close(self, keep: bool = False) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self.journal is not None:
            self.journal.close()
        self.folder.close(keep=keep)

    def add_all(self, files: list[SourceFile], workers: int, done) -> None:
        """Every file, in order; ``done(src)`` after each."""
        dicom = [f for f in files if f.kind == "dicom"]
        for src in files:
            if src.kind == "table":
                self.add(src)
                done(src)
        self._workers = workers
        if workers > 1 and len(dicom) > 1:
            self._pool = _process_pool(workers, (self.pseudonym_key, self.index_key,
                                                 self.incoming, os.getpid()))
        for src, result in self._dicom_results(dicom):
            self._merge_dicom(src, result)
            done(src)
        for src in files:
            if src.kind == "nifti":
                self.add(src)
                done(src)

    def _dicom_results(self, dicom: list[SourceFile]):
        """(file, result) in file order: from the journal for files a killed run finished,
        else from the workers, at most a few files per worker in flight (memory stays
        bounded whatever the dataset's size)."""
        from collections import deque

        local = _DicomWorker(self.pseudonym_key, self.index_key, self.incoming)
        window = deque()
        limit = IN_FLIGHT_PER_WORKER * self._workers
        in_flight = 0
        files = iter(enumerate(dicom))
        while True:
            while in_flight < limit:
                item = next(files, None)
                if item is None:
                    break
                position, src = item
                header = self.journal.lookup(src) if self.journal is not None else None
                if header is not None and self._still_stored(header):
                    window.append((position, src, header))
                elif self._pool is not None:
                    window.append((position, src, self._pool.submit(_work, position, src)))
                    in_flight += 1
                else:
                    window.append((position, src, None))
                    in_flight += 1
            if not window:
                return
            position, src, pending = window.popleft()
            if isinstance(pending, dict):
                result = self._resumed(src, pending)
                if result is None:  # its stored copy does not verify: do it again
                    result = local.run(position, src)
            else:
                in_flight -= 1
                result = pending.result() if pending is not None else local.run(position, src)
            if isinstance(result, _Failure):
                if result.findings is not None:
                    raise IngestRefused(result.message, result.findings)
                raise InvalidInput(result.message)
            yield src, result

    def _still_stored(self, header: dict) -> bool:
        try:
            return (self.data / header["stored"]).is_file()
        except OSError:
            return False

    def _resumed(self, src: SourceFile, header: dict) -> _DicomDone | None:
        path = self.data / header["stored"]
        done = self.journal.result(src)
        try:
            if path.stat().st_size != done.size or sha256_file(path) != done.sha256:
                return None
        except OSError:
            return None
        self.resumed_files += 1
        done.incoming, done.resumed_from = "", header["stored"]
        return done

    def _merge_dicom(self, src: SourceFile, done: _DicomDone) -> None:
        self.findings += done.findings
        self._learn(done.identity_values, [done.patient_id] if self.pz is not None else [])
        out = self._target(src.rel)
        rel = out.relative_to(self.data)
        if done.incoming:
            os.replace(self.incoming / done.incoming, out)
        else:
            previous = self.data / done.resumed_from
            if previous != out:  # the name may change, never the content
                os.replace(previous, out)
        self.stored.add(rel.as_posix())
        ref = (self.index.dicom_ref(*done.ref_facts) if done.ref_facts is not None else None)
        self.index.merge(done.index_part, ref)
        self.manifest.add_dicom_facts(rel, done.size, done.sha256, done.facts)
        if self.journal is not None and done.incoming:
            done.incoming = ""
            self.journal.append(src, rel.as_posix(), done)

    def add(self, src: SourceFile) -> None:
        try:
            {"table": self._add_table, "nifti": self._add_nifti}[src.kind](src)
        except InvalidIndex as err:  # e.g. an image the fingerprints cannot take
            raise InvalidInput(str(err)) from None

    def _target(self, rel: PurePosixPath) -> Path:
        if self.pz is not None:
            rel = PurePosixPath(*(self.pz.patient_pseudonym(p) if p in self.patient_ids else p
                                  for p in rel.parts))
        out = self.data / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        self.stored.add(rel.as_posix())
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

    def _drop_strays(self) -> None:
        """Remove what a resumed run's earlier attempt stored that this one did not (a
        source file removed or renamed since)."""
        for rel in _stored_files(self.data):
            if rel not in self.stored:
                (self.data / rel).unlink()

    def finish(self) -> tuple[dict, str]:
        """Refuse on any finding; else write the index and manifest and seal the folder."""
        staging.remove_tree(self.incoming)
        if self.folder.resumed:
            self._drop_strays()
        if self.pz is None:
            self.findings += [f"{e['path']}: file or folder name (looks like an identifier)"
                              for e in self.manifest.files if find_identifiers(e["path"])]
            if self.findings:
                raise IngestRefused(
                    f"source holds identifying data; nothing was stored (use --deidentify, or "
                    f"clean the source) — {len(self.findings)} findings", self.findings)
        else:
            self.findings += identity_survivors(self.data, self.identity_values, self._pool,
                                                chunks=4 * self._workers)
            if self.findings:
                raise IngestRefused(
                    f"de-identification could not remove every identifier; nothing was stored "
                    f"({len(self.findings)} findings)", self.findings)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.journal is not None:  # what resumes a killed run is not part of the dataset
            self.journal.close()
            self.journal = None
            (self.root / JOURNAL_FILE).unlink()
        self.index.write(self.root / DATASET_INDEX)
        result = self.manifest.write(self.root / DATASET_MANIFEST)
        # Owner only while staged; seal_dataset gives the dataset's group access on publish.
        staging.seal(self.data, dir_mode=0o500, file_mode=0o400)
        staging.seal(self.root / DATASET_INDEX, dir_mode=0o500, file_mode=0o400)
        os.chmod(self.root / DATASET_MANIFEST, 0o400)
        return result
