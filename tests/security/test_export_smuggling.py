"""Data smuggled out inside files that look harmless: every byte of an exported file is read.

Each attack file is built from the demo cohort's de-identified DICOM and screened through
``screen_paths`` (what ``medzone export screen`` and the airlock call) against the dataset's
screening index: bytes after an image's end marker, image metadata (PNG text/EXIF chunks,
JPEG comments and APPn segments, GIF extensions), compressed or undecodable PDF streams,
nested archives and decompression bombs, SVG ``data:`` URIs. Clean controls (a matplotlib
PNG, PDF and SVG, a JPEG from Pillow) still pass. One attack runs end to end: written from
inside alice's real sandbox, requested through the airlock, blocked, never approvable and
never downloadable.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from medzone_hub.screen import screen_paths

from ..screen_corpus import dataset_facts, demo_indexes, demo_zone  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def facts(zone):
    return dataset_facts(zone.home.dataset_dir("demo"))


def _screen(tmp_path: Path, name: str, data: bytes, indexes):
    path = tmp_path / name
    path.write_bytes(data)
    return screen_paths([path], indexes=indexes, root=tmp_path)[0]


# --- building blocks -----------------------------------------------------------------------

def _figure(fmt: str, title: str = "validation AUC") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
    ax.plot([0, 0.2, 1], [0, 0.8, 1])
    ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    plt.close(fig)
    return buf.getvalue()


def _pil(fmt: str, **kwargs) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (64, 48))
    image.putdata([(x * 4, y * 5, 128) for y in range(48) for x in range(64)])
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(
        ">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)


def _png_with(chunk: bytes) -> bytes:
    png = _figure("png")
    end = png.rindex(b"IEND") - 4
    return png[:end] + chunk + png[end:]


def _jpeg_with(marker: int, body: bytes) -> bytes:
    jpeg = _pil("JPEG")
    return jpeg[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def _gif_with(label: int, body: bytes) -> bytes:
    gif = _pil("GIF")
    blocks = b"".join(bytes([len(body[i:i + 255])]) + body[i:i + 255]
                      for i in range(0, len(body), 255))
    flags = gif[10]
    start = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    return gif[:start] + bytes([0x21, label]) + blocks + b"\x00" + gif[start:]


def _pdf(stream: bytes, dictionary: bytes) -> bytes:
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R >>",
               b"<< " + dictionary + b" /Length %d >>\nstream\n" % len(stream) + stream
               + b"\nendstream"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def _zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _slice_png(ds) -> bytes:
    from PIL import Image

    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    grey = np.clip((hu + 1000) / 1400 * 255, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "PNG")
    return buf.getvalue()


def _pdf_imshow(values: np.ndarray, **kwargs) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.imshow(values, **kwargs)
    buf = io.BytesIO()
    fig.savefig(buf, format="pdf")
    plt.close(fig)
    return buf.getvalue()


def _rules(verdict) -> set[tuple[str, str]]:
    return {(f.rule, f.severity) for f in verdict.findings}


# --- the variants --------------------------------------------------------------------------

def _variants(facts) -> list[tuple[str, str, bytes, str, tuple[str, str] | None]]:
    """(label, file name, bytes, verdict, a (rule, severity) the findings must hold)."""
    dicom = facts["ct_bytes"]
    b64 = base64.b64encode(dicom)
    pid = facts["rows"][0]["patient_id"]
    EM, MAL = "embedded-data", "malformed"
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w:gz") as tf:
        info = tarfile.TarInfo("slices/0001.dcm")
        info.size = len(dicom)
        tf.addfile(info, io.BytesIO(dicom))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="128" height="128"><image '
           f'href="data:image/png;charset=binary;base64,'
           f'{base64.b64encode(_slice_png(facts["ct"])).decode()}"/></svg>').encode()
    return [
        ("PNG with a DICOM after IEND", "roc.png", _figure("png") + dicom, "block", (EM, "block")),
        ("PNG with a zip of DICOM after IEND", "roc.png", _figure("png") + _zip({"a.dcm": dicom}),
         "block", (EM, "block")),
        ("PNG tEXt with base64 DICOM", "roc.png", _png_with(_chunk(b"tEXt", b"Comment\0" + b64)),
         "block", (EM, "block")),
        ("PNG zTXt with base64 DICOM", "roc.png",
         _png_with(_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b64))), "block", (EM, "block")),
        ("PNG iTXt (compressed) with base64 DICOM", "roc.png",
         _png_with(_chunk(b"iTXt", b"XML:com.adobe.xmp\0\1\0en\0\0" + zlib.compress(b64))),
         "block", (EM, "block")),
        ("PNG iTXt with a patient id", "roc.png",
         _png_with(_chunk(b"iTXt", b"Comment\0\0\0\0\0case " + pid.encode())), "block",
         ("dataset-identifier", "block")),
        ("PNG tEXt with a note", "roc.png", _png_with(_chunk(b"tEXt", b"Comment\0fold 3 of 5")),
         "review", (EM, "review")),
        ("PNG eXIf holding a DICOM", "roc.png",
         _png_with(_chunk(b"eXIf", b"MM\0*\0\0\0\x08" + dicom)), "block", (EM, "block")),
        ("PNG eXIf", "roc.png", _png_with(_chunk(b"eXIf", b"MM\0*\0\0\0\x08\0\0")), "review",
         (EM, "review")),
        ("PNG private chunk", "roc.png", _png_with(_chunk(b"prVt", b"\x01\x02\x03")), "review",
         (EM, "review")),
        ("JPEG with a DICOM after EOI", "fig.jpg", _pil("JPEG") + dicom, "block", (EM, "block")),
        ("JPEG COM with base64 DICOM", "fig.jpg", _jpeg_with(0xFE, b64[:60000]), "block",
         (EM, "block")),
        ("JPEG APP1 holding a DICOM", "fig.jpg", _jpeg_with(0xE1, b"Exif\0\0" + dicom), "block",
         (EM, "block")),
        ("JPEG COM with a note", "fig.jpg", _jpeg_with(0xFE, b"fold 3"), "review", (EM, "review")),
        ("GIF comment with base64 DICOM", "fig.gif", _gif_with(0xFE, b64), "block", (EM, "block")),
        ("GIF comment with a note", "fig.gif", _gif_with(0xFE, b"fold 3"), "review",
         (EM, "review")),
        ("GIF with a DICOM after the trailer", "fig.gif", _pil("GIF") + dicom, "block",
         (EM, "block")),
        ("PDF from matplotlib with a patient id in its compressed page", "fig.pdf",
         _figure("pdf", f"case {pid}"), "block", ("dataset-identifier", "block")),
        ("PDF from matplotlib drawing a dataset slice", "slice.pdf",
         _pdf_imshow(facts["ct"].pixel_array * float(facts["ct"].RescaleSlope)
                     + float(facts["ct"].RescaleIntercept), cmap="bone", vmin=-1000, vmax=400),
         "block", ("dataset-image", "block")),
        ("PDF with a FlateDecode stream showing a patient id", "a.pdf",
         _pdf(zlib.compress(b"BT /F1 12 Tf 10 10 Td [(" + pid[:3].encode() + b") -12 ("
                            + pid[3:].encode() + b")] TJ ET"), b"/Filter /FlateDecode"),
         "block", ("dataset-identifier", "block")),
        ("PDF with an ASCII85+Flate stream holding a DICOM", "a.pdf",
         _pdf(base64.a85encode(zlib.compress(dicom)) + b"~>",
              b"/Type /EmbeddedFile /Filter [/ASCII85Decode /FlateDecode]"),
         "block", (EM, "block")),
        ("PDF with a stream the screen cannot decode", "a.pdf",
         _pdf(os.urandom(64), b"/Filter /JBIG2Decode"), "review", (EM, "review")),
        ("PDF with a DICOM after %%EOF", "a.pdf",
         _pdf(b"BT ET", b"") + dicom, "block", (EM, "block")),
        ("zip in a zip holding a DICOM", "results.zip",
         _zip({"inner.zip": _zip({"x/0001.dcm": dicom})}), "block", (EM, "block")),
        ("tar.gz holding a DICOM", "results.tar.gz", gz.getvalue(), "block", (EM, "block")),
        ("zip bomb", "results.zip", _zip({"zeros.bin": bytes(64 * 1024 * 1024)}), "block",
         (EM, "block")),
        ("SVG with a data: URI PNG of a dataset slice", "fig.svg", svg, "block",
         ("dataset-image", "block")),
        ("SVG with a data: URI of unreadable binary", "fig.svg",
         b'<svg xmlns="http://www.w3.org/2000/svg"><image href="data:application/x-foo;base64,'
         + base64.b64encode(bytes(range(256)) * 4) + b'"/></svg>', "review", (EM, "review")),
        ("WebP image", "fig.webp", _pil("WEBP"), "block", ("file-type", "block")),
        ("PNG cut short", "roc.png", _figure("png")[:-30], "block", (MAL, "block")),
    ]


def test_smuggling_variants_are_blocked_or_reviewed(tmp_path, indexes, facts):
    problems = []
    for label, name, data, verdict, finding in _variants(facts):
        got = _screen(tmp_path, name, data, indexes)
        if got.verdict != verdict or (finding and finding not in _rules(got)):
            problems.append(f"{label}: {got.verdict} {sorted(_rules(got))}")
        text = json.dumps(got.to_dict())
        assert facts["rows"][0]["patient_id"] not in text  # findings never echo the value
    assert not problems, "\n".join(problems)


def test_clean_figures_still_pass(tmp_path, indexes):
    for name, data in [("roc.png", _figure("png")), ("roc.jpg", _figure("jpg")),
                       ("fig.jpg", _pil("JPEG")), ("roc.pdf", _figure("pdf")),
                       ("roc.svg", _figure("svg")), ("fig.png", _pil("PNG")),
                       ("heatmap.pdf", _pdf_imshow(np.random.default_rng(1).random((30, 40)))),
                       ("srgb.png", _pil("PNG", icc_profile=_srgb_profile())),
                       ("srgb.jpg", _pil("JPEG", icc_profile=_srgb_profile()))]:
        got = _screen(tmp_path, name, data, indexes)
        assert got.verdict == "pass", (name, got.findings)


def _srgb_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_the_bounds_hold_on_hostile_nesting(tmp_path, indexes, facts):
    """Images inside image trailers inside zips, deeper than the limit: a block, no hang."""
    data = facts["ct_bytes"]
    for _ in range(6):
        data = _figure("png") + _zip({"next.png": data})
    got = _screen(tmp_path, "deep.png", data, indexes)
    assert got.verdict == "block"
    assert any("nested deeper" in f.detail for f in got.findings)


# --- end to end: written from inside a real sandbox, through the airlock ------------------

WRITE_SMUGGLED_PNG = r"""
import glob, os, struct, zlib
dicom = open(sorted(glob.glob("/data/demo/**/*.dcm", recursive=True))[0], "rb").read()
def chunk(t, b):
    return struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b))
rows = b"".join(b"\0" + bytes([x * 4 % 256 for x in range(64)]) for _ in range(48))
png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 48, 8, 0, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
os.makedirs(os.path.expanduser("~/results"), exist_ok=True)
open(os.path.expanduser("~/results/roc.png"), "wb").write(png + dicom)
print(len(dicom))
"""


@pytest.fixture(scope="module")
def sandbox_zone(cohort_dir):
    from medzone_hub import access
    from medzone_hub.accounts import ROLE_EXPORT_REVIEWER, add_user
    from medzone_hub.config import ENV_DB_URL, MedZoneHome
    from medzone_hub.db import connect
    from medzone_hub.ingest import ingest_dataset

    # pytest's tmp_path sits under a 0700 folder the sandbox uid cannot traverse.
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="medzone-smuggling-"))
    os.chmod(base, 0o755)
    saved = os.environ.pop(ENV_DB_URL, None)
    home = MedZoneHome(base / "home").ensure()
    store = connect(home.db_url)
    ingest_dataset(home, store, "demo", cohort_dir, deidentify=True, pseudonym_key=b"k" * 32,
                   actor="t", progress=False)
    with store.session() as s:
        add_user(s, "alice", actor="test")
        add_user(s, "steward", roles=["data-steward"], actor="test")
        add_user(s, "rev1", roles=[ROLE_EXPORT_REVIEWER], actor="test")
        add_user(s, "rev2", roles=[ROLE_EXPORT_REVIEWER], actor="test")
        app = access.apply(s, user="alice", dataset_ids=["demo"], purpose="smuggling suite")
        s.flush()
        access.approve(s, app.id, reviewer="steward")
    yield home
    store.close()
    if saved is not None:
        os.environ[ENV_DB_URL] = saved
    subprocess.run(["chmod", "-R", "u+rwX", str(base)], check=False)
    shutil.rmtree(base, ignore_errors=True)


def _cli(home, *args, timeout=120) -> subprocess.CompletedProcess:
    from medzone_hub.config import ENV_DB_URL, ENV_HOME

    env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
    env[ENV_HOME] = str(home.root)
    return subprocess.run([sys.executable, "-m", "medzone_hub.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd="/")


def test_a_png_carrying_a_dicom_from_the_sandbox_is_blocked_and_never_released(sandbox_zone):
    home = sandbox_zone
    done = _cli(home, "sandbox", "exec", "--user", "alice", "--", "python3", "-c",
                WRITE_SMUGGLED_PNG)
    assert done.returncode == 0, done.stderr
    written = home.root / "homes" / "alice" / "results" / "roc.png"
    assert written.read_bytes().startswith(b"\x89PNG") and int(done.stdout) > 1000

    # The screen alone (what a user runs before asking) already says block.
    screened = _cli(home, "export", "screen", written, "--dataset", "demo", "--json")
    assert screened.returncode == 0, screened.stderr
    assert json.loads(screened.stdout)["files"][0]["verdict"] == "block"

    requested = _cli(home, "export", "request", "--user", "alice", "results/roc.png",
                     "--reason", "ROC curve for the paper")
    assert requested.returncode == 0, requested.stderr
    rid = int(requested.stdout)
    status = json.loads(_cli(home, "export", "status", rid, "--json").stdout)
    assert (status["state"], status["verdict"]) == ("blocked", "block")
    details = [f["detail"] for f in status["files"][0]["findings"]]
    assert any("after the end of the PNG image" in d for d in details), details
    assert "a DICOM file (by content)" in details

    approved = _cli(home, "export", "review", rid, "--reviewer", "rev1", "--approve")
    assert approved.returncode == 1
    assert approved.stderr.count("\n") == 1 and "cannot be approved" in approved.stderr
    assert "Traceback" not in approved.stderr
    out = home.root / "released"
    downloaded = _cli(home, "export", "download", rid, "--user", "alice", "--to", out)
    assert downloaded.returncode == 1 and downloaded.stderr.count("\n") == 1
    assert downloaded.stdout == ""
    assert not out.exists() or not any(out.iterdir())
    status = json.loads(_cli(home, "export", "status", rid, "--json").stdout)
    assert status["state"] == "blocked"
    verified = _cli(home, "audit", "verify")
    assert verified.returncode == 0 and "intact" in verified.stdout
