"""CT volumes, masks and X-rays with their medical meaning explicit.

* A :class:`CTVolume` holds Hounsfield units (``stored * RescaleSlope + RescaleIntercept``,
  per slice), indexed ``hu[i, j, k]`` in **RAS** orientation: ``i`` runs towards the
  patient's Right, ``j`` towards Anterior, ``k`` towards Superior (the orientation
  ``nibabel.as_closest_canonical`` and MONAI ``Orientation(axcodes="RAS")`` produce).
  ``affine_ras`` maps ``(i, j, k, 1)`` to RAS millimetres. DICOM patient coordinates are
  LPS, so x and y are negated on the way; :meth:`CTVolume.voxel_of_lps` takes LPS points.
* Slices are ordered by their position along the slice normal (``ImagePositionPatient``
  projected on ``row × column`` direction), never by InstanceNumber or file name; the slice
  spacing is measured from those positions (SliceThickness is not the spacing).
* One series per folder: a folder holding two series is refused with the uids, rather
  than silently merged (what MONAI's PydicomReader does).
* :func:`load_xray` returns pixels in 0..1 with **bones bright** whatever the
  PhotometricInterpretation (MONOCHROME1 stores them inverted).

Decoding uses pydicom directly: several times faster than MONAI's LoadImage on the same
series (see ``benchmarks/bench_volume.py``); MONAI is for what comes after
(:mod:`medzone_kernel.transforms`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import ArrayCache, default_root
from .datasets import SeriesRef, resolve_series

#: Window (level, width) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit/explicit VR little endian


class ImagingError(ValueError):
    """A series or image MedZone will not load as asked (the message says why)."""


@dataclass
class CTVolume:
    """A CT series in HU on a RAS grid. ``spacing_mm`` is the voxel size along i, j, k."""

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    affine_ras: np.ndarray
    series_uid: str
    patient: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    def voxel_of(self, ras_mm) -> tuple[int, int, int]:
        """The (i, j, k) voxel whose centre is nearest to the RAS point *ras_mm*."""
        ijk = np.linalg.solve(self.affine_ras, np.r_[np.asarray(ras_mm, float), 1.0])[:3]
        return tuple(int(v) for v in np.rint(ijk))

    def voxel_of_lps(self, lps_mm) -> tuple[int, int, int]:
        """Same for a DICOM patient-coordinate (LPS) point, e.g. from a nodule table."""
        x, y, z = (float(v) for v in lps_mm)
        return self.voxel_of((-x, -y, z))

    def axial(self, k: int) -> np.ndarray:
        """Axial slice *k* for display: rows anterior→posterior, columns patient right→left
        (the radiological convention: the patient's right on the viewer's left)."""
        return np.asarray(self.hu[::-1, ::-1, k]).T


def window_hu(hu, level: float, width: float) -> np.ndarray:
    """HU → 0..1 (float32) for display with window *level*/*width* (see WINDOW_PRESETS)."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    lo = level - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


# --- CT --------------------------------------------------------------------------------

DEFAULT_CACHE = object()  # sentinel: "the user's default VolumeCache"


def load_ct_volume(series, *, cache=DEFAULT_CACHE) -> CTVolume:
    """Load a CT series (a :class:`SeriesRef`, a ``{"dataset","series_uid"}`` dict or a
    folder) as HU on a RAS grid.

    With the default *cache* the decoded volume is kept as a memory-mappable ``.npy`` in
    the user's cache and later loads map it (then ``hu`` is a read-only memmap); pass
    ``cache=None`` to always decode, or a :class:`VolumeCache`.
    """
    ref = resolve_series(series)
    if cache is None:
        return decode_ct_volume(ref)
    if cache is DEFAULT_CACHE:
        cache = default_cache()
    return cache.load(ref)


def series_files(folder: Path) -> list[Path]:
    """The DICOM files of a folder (``.dcm``, or any file starting with the DICM preamble)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImagingError(f"{folder} is not a folder of DICOM files")
    files = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            path = Path(entry.path)
            if path.suffix.lower() == ".dcm" or _has_dicm_magic(path):
                files.append(path)
    if not files:
        raise ImagingError(f"{folder} holds no DICOM files")
    return sorted(files)


class VolumeCache(ArrayCache):
    """Decoded CT volumes (HU as float32) in the user's array cache, so repeated epochs do
    not decode DICOM again: see :mod:`medzone_kernel.cache`."""

    def files_of(self, folder: Path) -> list[Path]:
        return series_files(folder)

    def get(self, series_ref) -> CTVolume | None:
        """The cached volume (``hu`` a read-only memmap), or None when absent or stale."""
        entry = self.get_entry(series_ref)
        if entry is None:
            return None
        hu, meta = entry
        if hu.dtype != np.float32:
            return None
        return CTVolume(hu=hu, spacing_mm=tuple(meta["spacing_mm"]),
                        affine_ras=np.array(meta["affine_ras"], dtype=float),
                        series_uid=meta["series_uid"], patient=meta["patient"])

    def put(self, series_ref, vol: CTVolume) -> Path:
        """Store *vol* for *series_ref* (atomically); returns the sidecar's path."""
        return self.put_entry(series_ref, np.asarray(vol.hu, dtype=np.float32), {
            "series_uid": vol.series_uid, "patient": vol.patient,
            "spacing_mm": list(vol.spacing_mm),
            "affine_ras": np.asarray(vol.affine_ras, dtype=float).tolist(),
        })

    def load(self, series_ref) -> CTVolume:
        """Warm: the cached memmap. Cold or stale: decode with pydicom, store, then map."""
        ref = resolve_series(series_ref)
        vol = self.get(ref)
        if vol is not None:
            self.hits += 1
            return vol
        self.misses += 1
        vol = decode_ct_volume(ref)
        try:
            self.put(ref, vol)
        except OSError:
            return vol  # a full or read-only cache never stops a load
        return vol


_DEFAULT: dict[str, VolumeCache] = {}


def default_cache() -> VolumeCache:
    """The user's volume cache (one object per root, so hit/miss counters add up)."""
    root = str(default_root())
    if root not in _DEFAULT:
        _DEFAULT[root] = VolumeCache(root)
    return _DEFAULT[root]


def _has_dicm_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _floats(value) -> list[float]:
    return [float(v) for v in value]


def decode_ct_volume(series) -> CTVolume:
    """Decode a CT series folder with pydicom (no cache): see :func:`load_ct_volume`."""
    import pydicom

    ref = resolve_series(series)
    folder = ref.folder if isinstance(ref, SeriesRef) else Path(ref)
    files = series_files(folder)
    headers = [pydicom.dcmread(p) for p in files]

    uids: dict[str, int] = {}
    for ds in headers:
        uid = str(ds.get("SeriesInstanceUID", ""))
        uids[uid] = uids.get(uid, 0) + 1
    if len(uids) > 1:
        listed = ", ".join(f"{u or '(none)'}: {n} files" for u, n in sorted(uids.items()))
        raise ImagingError(
            f"{folder} holds {len(uids)} series ({listed}); MedZone loads one series per "
            "folder — move each series into its own folder")
    series_uid = next(iter(uids))
    if isinstance(ref, SeriesRef) and ref.series_uid and series_uid != ref.series_uid:
        raise ImagingError(f"{folder} holds series {series_uid}, not {ref.series_uid}")

    first = headers[0]
    for ds in headers:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames != 1:
            raise ImagingError(f"{folder}: multi-frame images ({frames} frames in one file) "
                               "are not supported as a CT series; one slice per file is")
        if "PixelData" not in ds:
            raise ImagingError(f"{folder}: a file of the series has no pixel data")
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise ImagingError(f"{folder}: slices lack ImagePositionPatient/"
                               "ImageOrientationPatient: not a volume")
    rows, cols = int(first.Rows), int(first.Columns)
    iop = np.array(_floats(first.ImageOrientationPatient))
    for ds in headers:
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ImagingError(f"{folder}: slices of different sizes in one series")
        if not np.allclose(_floats(ds.ImageOrientationPatient), iop, atol=1e-4):
            raise ImagingError(f"{folder}: slices with different orientations in one series")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([_floats(ds.ImagePositionPatient) for ds in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    gaps = np.diff(along)
    if len(headers) > 1 and np.min(gaps) < 1e-3:
        raise ImagingError(f"{folder}: two slices at the same position — duplicates, or "
                           "more than one acquisition in the folder")
    if len(headers) > 1:
        slice_mm = float(np.median(gaps))
        if not np.allclose(gaps, slice_mm, rtol=0.05, atol=1e-3):
            warnings.warn(f"{folder}: uneven slice spacing ({gaps.min():.3g}…{gaps.max():.3g} mm);"
                          f" the volume assumes {slice_mm:.4g} mm", stacklevel=2)
    else:
        slice_mm = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    pixel = _floats(first.PixelSpacing) if "PixelSpacing" in first else [1.0, 1.0]
    row_mm, col_mm = pixel[0], pixel[1]  # between rows, between columns

    # Affine of the array indexed [col, row, slice] in LPS, then RAS.
    origin = positions[order[0]]
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_mm
    lps[:3, 1] = col_dir * row_mm
    lps[:3, 2] = normal * slice_mm
    lps[:3, 3] = origin
    ras = _LPS_TO_RAS @ lps

    from nibabel.orientations import inv_ornt_aff, io_orientation

    ornt = io_orientation(ras)
    shape_crs = (cols, rows, len(headers))
    axial = bool(np.array_equal(ornt[:, 0], [0, 1, 2]))
    flip_c, flip_r, flip_s = (ornt[:, 1] < 0) if axial else (False, False, False)

    # Decode straight into the final layout: buf[s, r, c] C-order is hu[c, r, s] F-order,
    # and flips are applied while filling, so no transposing copy is needed.
    buf = np.empty((len(headers), rows, cols), dtype=np.float32)
    for out_index, src in enumerate(order):
        ds = headers[src]
        pixels = _pixels(ds)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        k = len(headers) - 1 - out_index if flip_s else out_index
        view = pixels
        if flip_r:
            view = view[::-1, :]
        if flip_c:
            view = view[:, ::-1]
        target = buf[k]
        np.multiply(view, np.float32(slope), out=target, casting="unsafe")
        if intercept:
            target += np.float32(intercept)
    hu = buf.transpose(2, 1, 0)
    if axial:
        affine = ras @ inv_ornt_aff(ornt, shape_crs)
    else:
        from nibabel.orientations import apply_orientation

        hu = np.ascontiguousarray(apply_orientation(hu, ornt))
        affine = ras @ inv_ornt_aff(ornt, shape_crs)
    spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    patient = str(first.get("PatientID", "")) or (ref.patient if isinstance(ref, SeriesRef) else "")
    return CTVolume(hu=hu, spacing_mm=spacing, affine_ras=affine, series_uid=series_uid,
                    patient=patient)


def _pixels(ds) -> np.ndarray:
    """Stored values of a single-frame image, without pydicom's generic path when the data
    is plain little-endian (most CT)."""
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    bits = int(ds.get("BitsAllocated", 16))
    if (syntax in _UNCOMPRESSED and bits == 16 and int(ds.get("SamplesPerPixel", 1)) == 1):
        dtype = np.int16 if int(ds.get("PixelRepresentation", 0)) else np.uint16
        raw = ds.PixelData
        n = int(ds.Rows) * int(ds.Columns)
        arr = np.frombuffer(raw, dtype="<" + np.dtype(dtype).str[1:], count=n)
        stored = int(ds.get("BitsStored", 16))
        if stored < 16:  # ignore bits above BitsStored (overlays, garbage)
            if dtype is np.uint16:
                arr = arr & np.uint16((1 << stored) - 1)
            else:
                shift = 16 - stored
                arr = (arr << shift) >> shift
        return arr.reshape(int(ds.Rows), int(ds.Columns))
    return ds.pixel_array


# --- masks -----------------------------------------------------------------------------

def load_mask(path, like: CTVolume, *, atol_mm: float = 1e-3) -> np.ndarray:
    """A NIfTI mask on *like*'s grid: reoriented to RAS, then checked to have the volume's
    shape and affine (within *atol_mm*); :class:`ImagingError` naming the difference if not."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImagingError(f"{path}: a mask must be 3-D, this one has shape {data.shape}")
    affine = img.affine
    ornt = io_orientation(affine)
    data = apply_orientation(data, ornt)
    affine = affine @ inv_ornt_aff(ornt, img.shape[:3])
    if tuple(data.shape) != tuple(like.hu.shape):
        raise ImagingError(f"{path}: mask shape {tuple(data.shape)} (in RAS) differs from the "
                           f"volume's {tuple(like.hu.shape)}")
    if not np.allclose(affine, like.affine_ras, atol=atol_mm):
        raise ImagingError(f"{path}: mask affine (RAS)\n{np.round(affine, 3)}\ndiffers from the "
                           f"volume's\n{np.round(like.affine_ras, 3)}")
    return np.ascontiguousarray(data)


# --- X-rays ----------------------------------------------------------------------------

@dataclass
class XRayImage:
    """A projection radiograph: ``pixels`` float32 0..1 with bones bright, rows top→bottom."""

    pixels: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None
    photometric: str
    patient: str
    series_uid: str


def load_xray(series_or_path) -> XRayImage:
    """A single-image X-ray (a SeriesRef/dict of a CR/DX series, its folder or its file)
    normalised to 0..1 with bones bright: MONOCHROME1 (stored inverted) is inverted back."""
    import pydicom

    ref = resolve_series(series_or_path)
    path = ref.folder if isinstance(ref, SeriesRef) else Path(ref)
    if path.is_dir():
        files = series_files(path)
        if len(files) != 1:
            raise ImagingError(f"{path} holds {len(files)} DICOM files; an X-ray series here is "
                               "one image — pass the file")
        path = files[0]
    ds = pydicom.dcmread(path)
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ImagingError(f"{path}: multi-frame X-rays are not supported")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImagingError(f"{path}: PhotometricInterpretation {photometric} is not a grey-scale "
                           "radiograph")
    values = ds.pixel_array.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1 or intercept:
        values = values * np.float32(slope) + np.float32(intercept)
    lo, hi = float(values.min()), float(values.max())
    pixels = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return XRayImage(
        pixels=pixels.astype(np.float32, copy=False),
        pixel_spacing_mm=tuple(float(v) for v in spacing[:2]) if spacing else None,
        photometric=photometric,
        patient=str(ds.get("PatientID", "")) or (ref.patient if isinstance(ref, SeriesRef) else ""),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
    )


__all__ = [
    "CTVolume", "DEFAULT_CACHE", "ImagingError", "VolumeCache", "WINDOW_PRESETS", "XRayImage",
    "decode_ct_volume", "default_cache", "load_ct_volume", "load_mask", "load_xray",
    "series_files", "window_hu",
]
