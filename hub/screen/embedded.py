"""What bytes are, by content (never by name), and archives opened with caps.

Nothing here loads a pickle, a model or an array: types are told by magic bytes only."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
import zlib

# kinds
DICOM, NIFTI, NPY, NPZ, PICKLE, HDF5, PARQUET = "dicom", "nifti", "npy", "npz", "pickle", "hdf5", "parquet"
ZIP, GZIP, TAR, OTHER_ARCHIVE = "zip", "gzip", "tar", "archive"
TORCH, SAFETENSORS, ONNX = "torch", "safetensors", "onnx"
PNG, JPEG, GIF, PDF = "png", "jpeg", "gif", "pdf"
WEBP, TIFF, BMP = "webp", "tiff", "bmp"

#: Data a dataset is made of: never leaves.
DATA_KINDS = {DICOM: "a DICOM file", NIFTI: "a NIfTI volume", NPY: "a NumPy array",
              NPZ: "NumPy arrays (.npz)", PICKLE: "a Python pickle", HDF5: "an HDF5 file",
              PARQUET: "a Parquet table"}
WEIGHT_KINDS = {TORCH: "PyTorch weights", SAFETENSORS: "safetensors weights",
                ONNX: "an ONNX model"}
ARCHIVE_KINDS = {ZIP: "a zip archive", GZIP: "a gzip stream", TAR: "a tar archive",
                 OTHER_ARCHIVE: "an archive (bzip2/xz/7z/rar)"}
#: Images the screen does not decode (no pixel checks, no metadata rules): never leave.
UNREAD_IMAGE_KINDS = {WEBP: "a WebP image", TIFF: "a TIFF image", BMP: "a BMP image"}
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".onnx", ".bin", ".h5", ".keras")


def sniff(data: bytes, name: str = "") -> str | None:
    """The kind of ``data`` by its magic bytes (``name`` only tells weights from pickles)."""
    head = data[:600]
    lower = name.lower()
    if len(data) >= 132 and data[128:132] == b"DICM":
        return DICOM
    if len(head) >= 348 and (struct.unpack("<i", head[:4])[0] == 348 or
                             struct.unpack(">i", head[:4])[0] == 348) and \
            head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return NIFTI
    if len(head) >= 540 and struct.unpack("<i", head[:4])[0] == 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return NIFTI
    if head.startswith(b"\x93NUMPY"):
        return NPY
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    if head.startswith(b"%PDF-"):
        return PDF
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return TIFF
    if head[:2] == b"BM" and len(head) >= 14 and struct.unpack("<I", head[2:6])[0] == len(data):
        return BMP
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return HDF5
    if head.startswith(b"PAR1") and data.endswith(b"PAR1"):
        return PARQUET
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_kind(data)
    if head.startswith(b"\x1f\x8b"):
        return GZIP
    if len(data) > 262 and data[257:262] == b"ustar":
        return TAR
    if head.startswith((b"BZh", b"\xfd7zXZ\x00", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07")):
        return OTHER_ARCHIVE
    if _is_safetensors(data):
        return SAFETENSORS
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and data.rstrip().endswith(b"."):
        return TORCH if lower.endswith(WEIGHT_SUFFIXES) else PICKLE
    if lower.endswith(".onnx") or _looks_onnx(head):
        return ONNX
    return None


def _zip_kind(data: bytes) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return ZIP
    if names and all(n.endswith(".npy") for n in names):
        return NPZ
    if any(n.endswith("data.pkl") for n in names):
        return TORCH
    return ZIP


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    if not (2 <= n <= len(data) - 8 and data[8:9] == b"{"):
        return False
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        return False
    return isinstance(header, dict) and any(
        isinstance(v, dict) and "dtype" in v and "data_offsets" in v for v in header.values())


def _looks_onnx(head: bytes) -> bool:
    # ModelProto: field 1 (ir_version, varint) then producer_name "pytorch"/"onnx"/…
    return head[:1] == b"\x08" and b"\x12" in head[2:4] and (b"pytorch" in head[:64] or
                                                             b"onnx" in head[:64].lower())


class ArchiveError(Exception):
    """An archive that must not be opened further (bomb, encrypted, broken); the message says
    why (no member names are echoed)."""


def unpack(kind: str, data: bytes, *, max_members: int, max_bytes: int, max_ratio: float):
    """(member name, bytes) of a zip/gzip/tar, within the caps; ArchiveError otherwise."""
    budget = [max_bytes]

    def take(n: int) -> None:
        budget[0] -= n
        if budget[0] < 0:
            raise ArchiveError(f"unpacks to more than {max_bytes} bytes (a decompression bomb?)")

    if kind in (ZIP, NPZ, TORCH):
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
            infos = zf.infolist()
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            raise ArchiveError(f"a broken zip archive ({type(err).__name__})") from None
        if len(infos) > max_members:
            raise ArchiveError(f"more than {max_members} members")
        for info in infos:
            if info.flag_bits & 0x1:
                raise ArchiveError("an encrypted zip archive")
            if info.is_dir():
                continue
            if info.compress_size and info.file_size / info.compress_size > max_ratio:
                raise ArchiveError(f"a member compressed more than {max_ratio:.0f}:1 "
                                   "(a decompression bomb?)")
            take(info.file_size)
            try:
                with zf.open(info) as fh:
                    member = fh.read(info.file_size + 1)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError,
                    zlib.error, ValueError) as err:
                raise ArchiveError(f"a zip member cannot be read ({type(err).__name__})") from None
            if len(member) > info.file_size:
                raise ArchiveError("a zip member is larger than it declares (a bomb?)")
            yield info.filename, member
        return
    if kind == GZIP:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = bytearray()
        try:
            chunk = d.decompress(data, 1 << 20)
            while True:
                out += chunk
                take(len(chunk))
                if len(out) > max(len(data), 1) * max_ratio and len(out) > (1 << 20):
                    raise ArchiveError(f"compressed more than {max_ratio:.0f}:1 "
                                       "(a decompression bomb?)")
                if not d.unconsumed_tail:
                    break
                chunk = d.decompress(d.unconsumed_tail, 1 << 20)
        except zlib.error as err:
            raise ArchiveError(f"a broken gzip stream ({err})") from None
        yield "(gzip content)", bytes(out)
        return
    if kind == TAR:
        try:
            tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
            members = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ArchiveError(f"a broken tar archive ({type(err).__name__})") from None
        if len(members) > max_members:
            raise ArchiveError(f"more than {max_members} members")
        for m in members:
            if m.issym() or m.islnk():
                raise ArchiveError("a tar archive with links")
            if not m.isfile():
                continue
            take(m.size)
            fh = tf.extractfile(m)
            yield m.name, fh.read() if fh else b""
        return
    raise ArchiveError("an archive format that is not opened (bzip2, xz, 7z, rar)")
