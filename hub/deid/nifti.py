"""NIfTI: identifying text in the header, and a copy without it (voxels and affine kept).

A NIfTI header has a few free-text fields (``descrip``, ``aux_file``, ``intent_name`` and the
unused Analyze ``db_name``/``data_type``) and optional extensions; converters put series
descriptions, acquisition times or whole DICOM headers there.
"""

from __future__ import annotations

import math

import numpy as np

from ..screen.recognizers import (PERSON_NAME, describe_kinds, find_identifiers,
                                  looks_like_person_name)

TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name", "data_type", "unused_str")
#: NIfTI extension code for an embedded DICOM header.
DICOM_EXTENSION_CODE = 2
_MAX_EXTENSION_SCAN = 1 << 20


def _decode(raw) -> str:
    data = raw.tobytes() if isinstance(raw, np.ndarray) else bytes(raw)
    data = data.split(b"\x00", 1)[0] if len(data) <= 128 else data.replace(b"\x00", b" ")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return data.decode("latin-1").strip()


def _text_fields(header) -> dict[str, str]:
    keys = set(header.keys())
    return {name: _decode(header[name]) for name in TEXT_FIELDS if name in keys}


def _kinds(text: str) -> set[str]:
    kinds = {m.kind for m in find_identifiers(text, min_confidence=0.5)}
    if looks_like_person_name(text):
        kinds.add(PERSON_NAME)
    return kinds


def nifti_findings(img, relpath, *, strict: bool = False) -> list[str]:
    """Why this image's header is identifying: ``"<relpath>: <field> (<reason>)"``.

    By default a text field or extension is reported when the recognizers find an
    identifier in it (and an embedded DICOM header always); with ``strict`` (checking a
    de-identified copy) any text at all is reported.
    """
    findings = []
    for name, text in _text_fields(img.header).items():
        if not text:
            continue
        if strict:
            findings.append(f"{relpath}: {name} (free text in the header)")
        elif kinds := _kinds(text):
            findings.append(f"{relpath}: {name} ({describe_kinds(kinds)})")
    for i, extension in enumerate(getattr(img.header, "extensions", []) or []):
        code = extension.get_code()
        where = f"{relpath}: header extension {i} (code {code})"
        if strict or code == DICOM_EXTENSION_CODE:
            findings.append(f"{where} (header extensions may carry identifiers)")
            continue
        content = extension.get_content()
        text = (_decode(content[:_MAX_EXTENSION_SCAN]) if isinstance(content, (bytes, bytearray))
                else str(content)[:_MAX_EXTENSION_SCAN])
        if kinds := _kinds(text):
            findings.append(f"{where} ({describe_kinds(kinds)})")
    return findings


def _trivial_scaling(slope, inter) -> bool:
    def unset(x, neutral):
        return x is None or (isinstance(x, float) and math.isnan(x)) or x == neutral

    return unset(slope, 1) and unset(inter, 0)


def deidentify_nifti(img):
    """A copy with every header text field and extension cleared; the stored voxel values,
    their scaling, the affine and both qform and sform are exactly those of ``img``.

    For a scaled image the copy holds the stored (unscaled) values with the original slope
    and intercept in its header, so that saving it writes the same voxels.
    """
    header = img.header.copy()
    for name in TEXT_FIELDS:
        if name in header.keys():
            header[name] = b""
    if hasattr(header, "extensions"):
        header.extensions.clear()
    proxy = img.dataobj
    if hasattr(proxy, "get_unscaled"):
        slope, inter = getattr(proxy, "slope", None), getattr(proxy, "inter", None)
        data = np.asanyarray(proxy.get_unscaled())
    else:
        slope = inter = None
        data = np.asanyarray(proxy)
    out = img.__class__(data, img.affine, header=header)
    if not _trivial_scaling(slope, inter):
        out.header.set_slope_inter(slope, inter)
    return out
