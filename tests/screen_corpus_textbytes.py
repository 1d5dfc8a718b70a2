"""Labelled cases for bytes written as text, built by code from the synthetic demo cohort.

Leaks: the stored dataset's DICOM files, arrays and pixels written out the way a notebook
does it — ``base64``/``binascii``/``bytes.hex`` output, real ``xxd``/``hexdump -C`` dumps,
printed ``bytes``, ``data:`` URIs, numpy/pandas printing of pixel arrays (``tolist()``,
``np.set_printoptions(threshold=sys.maxsize)``, ``np.savetxt``, ``DataFrame.to_csv``) — in
stream outputs (whole, wrapped, printed in pieces, split over several outputs of one cell),
cell sources, text/HTML outputs, CSV, JSON and text files. Undecodable high-entropy runs and
numeric dumps of another cohort's images are ``review``.

Clean outputs (hard negatives): training logs, tqdm bars, git hashes, UUIDs, checksum
lists, model summaries, ``describe()``, statsmodels summaries, confusion and correlation
matrices, arrays of metrics printed whole, ROC points, tracebacks, metrics JSON/CSV.

Every generator takes a seed: thresholds are chosen on ``CALIBRATION_SEEDS`` only
(:func:`calibration_runs`), and :func:`build_textbytes_cases` builds the cases of
``EVALUATION_SEEDS``, which no threshold was tuned on.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

import numpy as np

from medzone_hub.screen import ScreenConfig

from .screen_corpus import Case, _code, _display, _nb, _result, _stream

CALIBRATION_SEEDS = (1, 2, 3)
EVALUATION_SEEDS = (5, 6, 7)

EM, IM = "embedded-data", "dataset-image"


# --- what a notebook prints ------------------------------------------------------------------

def _printed(fn) -> str:
    """What ``fn`` prints to stdout (as a kernel's stream output records it)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue()


def _tool(argv: list[str], data: bytes, fallback) -> str:
    """A command-line dump (``!xxd file`` in a notebook); the same format from Python where
    the tool is missing."""
    if shutil.which(argv[0]):
        return subprocess.run(argv, input=data, capture_output=True, check=True).stdout.decode()
    return fallback(data)


def _xxd_py(data: bytes) -> str:
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        groups = " ".join(chunk[i:i + 2].hex() for i in range(0, len(chunk), 2))
        text = "".join(chr(c) if 32 <= c < 127 else "." for c in chunk)
        lines.append(f"{off:08x}: {groups:<39}  {text}")
    return "\n".join(lines) + "\n"


def _hexdump_py(data: bytes) -> str:
    lines, previous, starred = [], None, False
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        if chunk == previous and off + 16 < len(data):
            if not starred:
                lines.append("*")
                starred = True
            continue
        previous, starred = chunk, False
        left = " ".join(f"{c:02x}" for c in chunk[:8])
        right = " ".join(f"{c:02x}" for c in chunk[8:])
        text = "".join(chr(c) if 32 <= c < 127 else "." for c in chunk)
        lines.append(f"{off:08x}  {left:<23}  {right:<23}  |{text}|")
    lines.append(f"{len(data):08x}")
    return "\n".join(lines) + "\n"


def _xxd(data: bytes) -> str:
    return _tool(["xxd"], data, _xxd_py)


def _hexdump(data: bytes) -> str:
    return _tool(["hexdump", "-C"], data, _hexdump_py)


def _wrap(s: str, width: int) -> list[str]:
    return [s[i:i + width] for i in range(0, len(s), width)]


def _np_print(arr, **options) -> str:
    with np.printoptions(threshold=sys.maxsize, **options):
        return _printed(lambda: print(arr))


def _savetxt(arr, **options) -> str:
    buf = io.StringIO()
    np.savetxt(buf, arr, **options)
    return buf.getvalue()


def _csv_bytes(rows) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()


def _cell_nb(outputs, source="x") -> bytes:
    return _nb([_code(source, outputs)])


def _streams(parts: list[str]) -> list[dict]:
    return [_stream(p) for p in parts]


# --- the dataset, read as a notebook would ---------------------------------------------------

def _modality(ds) -> np.ndarray:
    values = ds.pixel_array.astype(np.float64)
    if "RescaleSlope" in ds:
        values = values * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return values


def _sources(dataset_root: Path, seed: int) -> dict:
    import pydicom

    rng = np.random.default_rng(seed)
    ct_files = sorted(dataset_root.glob("data/*/CT/*.dcm"))
    cxr_files = sorted(dataset_root.glob("data/*/CXR/*.dcm"))
    ct_path = ct_files[int(rng.integers(len(ct_files) // 4, 3 * len(ct_files) // 4))]
    ct = pydicom.dcmread(ct_path)
    cxr = pydicom.dcmread(cxr_files[int(rng.integers(len(cxr_files)))])
    hu = _modality(ct)
    npy = io.BytesIO()
    np.save(npy, hu.astype(np.int16))
    return {"rng": rng, "dcm": ct_path.read_bytes(), "hu": hu, "npy": npy.getvalue(),
            "cxr": cxr.pixel_array, "next_hu": _modality(pydicom.dcmread(
                ct_files[ct_files.index(ct_path) + 1]))}


def _window(values, lo, hi) -> np.ndarray:
    return (np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


# --- leaks ----------------------------------------------------------------------------------

def leak_cases(dataset_root: Path, seed: int) -> list[Case]:
    """Dataset bytes and pixels written as text, the variants drawn with ``seed``."""
    import pandas as pd

    s = _sources(dataset_root, seed)
    rng, dcm, hu, npy, cxr = s["rng"], s["dcm"], s["hu"], s["npy"], s["cxr"]
    hu_int = hu.astype(np.int64)
    b64 = base64.b64encode(dcm).decode()
    width = int(rng.choice([60, 64, 76, 80, 100, 120]))
    cases: list[Case] = []

    def add(name, data, verdict, rule, label):
        cases.append(Case(f"s{seed}-{name}", data, verdict, rule, ScreenConfig(),
                          f"{label} (seed {seed})"))

    # base64 of a DICOM file / an array
    add("b64-line.ipynb", _cell_nb([_stream(b64 + "\n")], "print(base64.b64encode(raw).decode())"),
        "block", EM, "base64 of a DICOM file on one line of a stream output")
    add("b64-wrapped.ipynb", _cell_nb([_stream(base64.encodebytes(dcm).decode())]),
        "block", EM, "base64.encodebytes of a DICOM file (76 a line)")
    pieces = _wrap(b64, width)
    cut = int(rng.integers(len(pieces) // 4, 3 * len(pieces) // 4))
    add("b64-split.ipynb", _cell_nb(
        _streams(["\n".join(pieces[:cut]) + "\n"]) + [_display({"text/plain": "<progress>"})]
        + _streams(["\n".join(pieces[cut:]) + "\n"]),
        "for i in range(0, len(s), w): print(s[i:i+w])"), "block", EM,
        f"base64 printed {width} a line, split over two stream outputs of one cell")
    add("b64-print-calls.ipynb", _cell_nb(_streams([p + "\n" for p in _wrap(
        base64.b64encode(npy).decode(), width)])), "block", EM,
        "base64 of a .npy array, one stream output per print() call")
    src = "blob = (\n" + "\n".join(f'    "{p}"' for p in _wrap(base64.b64encode(npy).decode(),
                                                                 width)) + "\n)\n"
    add("b64-source.ipynb", _cell_nb([], src), "block", EM,
        "base64 of a .npy array pasted into a cell source as string pieces")
    add("b64-urlsafe.txt", base64.urlsafe_b64encode(dcm) + b"\n", "block", EM,
        "URL-safe base64 of a DICOM file in a text file")
    add("b64-zlib.ipynb", _cell_nb([_result({"text/plain": repr(base64.b64encode(
        zlib.compress(dcm)).decode())})]), "block", EM,
        "base64 of a zlib-compressed DICOM file as a text/plain result")
    add("b64-column.csv", _csv_bytes([["case", "payload"], ["a", base64.b64encode(npy).decode()]]),
        "block", EM, "base64 of an array in a CSV cell")
    add("b64-value.json", json.dumps({"model": "unet", "sample": b64}).encode(), "block", EM,
        "base64 of a DICOM file as a JSON value")
    # data URIs
    add("uri.csv", _csv_bytes([["id", "uri"], ["1", "data:application/dicom;base64," + b64]]),
        "block", EM, "a base64 data: URI of a DICOM file in a CSV cell")
    from urllib.parse import quote_from_bytes
    add("uri-percent.md", ("[slice](data:application/octet-stream,"
                           + quote_from_bytes(dcm[:2048]) + ")\n").encode(), "block", EM,
        "a percent-encoded data: URI of a DICOM file's head in markdown")
    # hex
    add("hex-line.ipynb", _cell_nb([_stream(dcm.hex() + "\n")]), "block", EM,
        "bytes.hex() of a DICOM file")
    add("hex-wrapped.txt", "\n".join(_wrap(binascii.hexlify(npy).decode(), 60)).encode(),
        "block", EM, "hex of an array wrapped at 60 (xxd -p style)")
    sep = str(rng.choice([" ", ":"]))
    add("hex-sep.ipynb", _cell_nb([_stream(dcm[:1024].hex(sep) + "\n")]), "block", EM,
        f"bytes.hex({sep!r}) of a DICOM file's head")
    add("xxd.ipynb", _cell_nb([_stream(_xxd(dcm[:int(rng.integers(256, 2048))]))],
                              "!xxd slice.dcm | head"), "block", EM, "xxd of a DICOM file's head")
    add("hexdump.txt", _hexdump(dcm[:4096]).encode(), "block", EM,
        "hexdump -C of a DICOM file (zero preamble collapsed to *)")
    add("hexdump-npy.ipynb", _cell_nb([_stream(_hexdump(npy))]), "block", EM,
        "hexdump -C of a .npy array")
    # bytes reprs
    n = int(rng.integers(200, 800))
    add("repr.ipynb", _cell_nb([_stream(_printed(lambda: print(dcm[:n])))], "print(raw[:n])"),
        "block", EM, "a printed bytes object (a DICOM file's head)")
    step = int(rng.choice([32, 48, 64]))
    add("repr-pieces.ipynb", _cell_nb([_stream(_printed(lambda: [print(dcm[i:i + step])
                                                                  for i in range(0, 640, step)]))]),
        "block", EM, f"a DICOM file's head printed {step} bytes a line")
    add("repr-result.ipynb", _cell_nb([_result({"text/plain": repr(npy)})]), "block", EM,
        "a .npy array's bytes as an execute result")
    evalue = f"unexpected header {dcm[:400]!r}"
    add("repr-error.ipynb", _nb([_code("check(raw)", [{
        "output_type": "error", "ename": "ValueError", "evalue": evalue,
        "traceback": ["\x1b[0;31mValueError\x1b[0m: " + evalue]}])]), "block", EM,
        "a DICOM file's head in an exception message (error output)")
    # raw pixel bytes
    add("tobytes-b64.ipynb", _cell_nb([_stream(base64.b64encode(hu.astype(np.int16).tobytes())
                                               .decode() + "\n")]), "block", IM,
        "base64 of arr.tobytes() (int16 HU, no header)")
    add("tobytes-zlib.txt", base64.b64encode(zlib.compress(_window(hu, -1000, 400).tobytes())),
        "block", IM, "base64 of zlib-compressed uint8 pixels")
    add("tobytes-repr.ipynb", _cell_nb([_stream(_printed(lambda: print(
        hu.astype(np.int16).tobytes())))]), "block", IM, "printed arr.tobytes()")
    # numeric dumps of pixels
    add("tolist.ipynb", _cell_nb([_stream(_printed(lambda: print(hu_int.tolist())))],
                                 "print(hu.astype(int).tolist())"), "block", IM,
        "a printed tolist() of a CT slice (HU)")
    add("np-print.ipynb", _cell_nb([_stream(_np_print(hu_int))],
                                   "np.set_printoptions(threshold=sys.maxsize); print(hu)"),
        "block", IM, "a CT slice printed with the summarisation threshold raised")
    add("np-print-float.ipynb", _cell_nb([_result({"text/plain": _np_print(
        hu.astype(np.float32), precision=int(rng.integers(1, 4)))})]), "block", IM,
        "a float CT slice as an execute result, threshold raised")
    add("np-print-window.ipynb", _cell_nb([_stream(_np_print(_window(hu, -1350, 150)))]),
        "block", IM, "a lung-windowed uint8 slice printed whole")
    add("np-volume.ipynb", _cell_nb([_stream(_np_print(np.stack([hu_int, s["next_hu"].astype(
        np.int64)])))]), "block", IM, "two slices of the volume printed whole (3-D)")
    add("savetxt.csv", _savetxt(hu, delimiter=",").encode(), "block", IM,
        "np.savetxt of a CT slice to CSV (%.18e)")
    add("savetxt-int.txt", _savetxt(hu_int, fmt="%d").encode(), "block", IM,
        "np.savetxt of a CT slice, fmt %d")
    add("to-csv.csv", pd.DataFrame(hu_int).to_csv().encode(), "block", IM,
        "DataFrame(pixels).to_csv() (header and index)")
    with pd.option_context("display.max_rows", None, "display.max_columns", None,
                           "display.width", 100_000):
        frame = _printed(lambda: print(pd.DataFrame(hu_int)))
    add("frame.ipynb", _cell_nb([_stream(frame)]), "block", IM,
        "a printed DataFrame of pixel values, all rows and columns shown")
    add("pixels.json", json.dumps({"shape": list(hu.shape), "pixels": hu_int.tolist()}).encode(),
        "block", IM, "pixels as nested lists in a JSON file")
    add("cxr-tolist.ipynb", _cell_nb([_stream(_printed(lambda: print(cxr.tolist())))]), "block",
        IM, "a chest X-ray's stored values as tolist()")
    half = cxr.reshape(cxr.shape[0] // 2, 2, cxr.shape[1] // 2, 2).mean(axis=(1, 3))
    add("cxr-half.ipynb", _cell_nb([_stream(_np_print(half, precision=1))]), "block", IM,
        "a chest X-ray averaged down ×0.5 and printed whole")
    return cases


def review_cases(other_cohort_root: Path, seed: int) -> list[Case]:
    """Undecodable high-entropy text and a numeric dump of another cohort's image."""
    import pydicom

    rng = np.random.default_rng(1000 + seed)
    blob = rng.bytes(int(rng.integers(600, 3000)))
    other = sorted(other_cohort_root.glob("*/CT/*.dcm"))
    o = _modality(pydicom.dcmread(other[int(rng.integers(len(other)))])).astype(np.int64)
    out = []

    def add(name, data, label):
        out.append(Case(f"s{seed}-{name}", data, "review", EM, ScreenConfig(),
                        f"{label} (seed {seed})"))

    add("random-b64.ipynb", _cell_nb([_stream(base64.b64encode(blob).decode() + "\n")]),
        "base64 of encrypted-looking bytes")
    add("random-hex.txt", blob.hex().encode(), "hex of encrypted-looking bytes")
    add("random-wrapped.ipynb", _cell_nb([_stream(base64.encodebytes(blob).decode())]),
        "wrapped base64 of encrypted-looking bytes")
    add("random-repr.ipynb", _cell_nb([_stream(_printed(lambda: print(blob)))]),
        "a printed bytes object of encrypted-looking bytes")
    add("other-tolist.ipynb", _cell_nb([_stream(_printed(lambda: print(o.tolist())))]),
        "a printed tolist() of another cohort's CT slice")
    add("other-savetxt.txt", _savetxt(o, fmt="%d").encode(),
        "np.savetxt of another cohort's CT slice")
    return out


# --- clean research outputs -------------------------------------------------------------------

def _tqdm(rng) -> str:
    from tqdm import tqdm

    buf = io.StringIO()
    for _ in tqdm(range(int(rng.integers(50, 400))), file=buf, mininterval=0, ascii=False,
                  desc="epoch"):
        pass
    return buf.getvalue()


def _model_summary(rng) -> str:
    import torch

    torch.manual_seed(int(rng.integers(1 << 30)))
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 32, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(32, 2))
    lines = [str(model)]
    for name, p in model.named_parameters():
        lines.append(f"{name:30s} {tuple(p.shape)!s:20s} {p.numel():>8d}")
    lines.append(f"Total params: {sum(p.numel() for p in model.parameters()):,}")
    lines.append(str(model[5].weight.data))
    return "\n".join(lines) + "\n"


def clean_outputs(dataset_root: Path, seed: int) -> list[tuple[str, bytes]]:
    """(name, file bytes) of clean research outputs drawn with ``seed``."""
    import pandas as pd
    import statsmodels.api as sm

    rng = np.random.default_rng(seed)
    clinical = pd.read_csv(dataset_root / "data" / "clinical.csv")
    epochs = int(rng.integers(50, 400))
    loss = np.exp(-np.linspace(0, 3, epochs)) + rng.normal(0, 0.02, epochs)
    log = "".join(f"Epoch {i + 1}/{epochs} - loss: {loss[i]:.4f} - val_auc: "
                  f"{0.6 + 0.3 * (1 - np.exp(-i / 30)):.4f} - lr: {1e-3 * 0.95 ** i:.2e}\n"
                  for i in range(epochs))
    hashes = "".join(f"commit {rng.bytes(20).hex()}\nAuthor: analyst\n\n    step {i}\n\n"
                     for i in range(int(rng.integers(5, 30))))
    sums = "".join(f"{rng.bytes(32).hex()}  results/fold{i}.csv\n"
                   for i in range(int(rng.integers(5, 40))))
    bare_sums = "".join(f"{rng.bytes(32).hex()}\n" for _ in range(int(rng.integers(5, 40))))
    uuids = "".join(f"run {uuid.UUID(bytes=rng.bytes(16))} finished\n"
                    for _ in range(int(rng.integers(5, 40))))
    n_cls = int(rng.integers(2, 12))
    confusion = rng.integers(10, 300, (n_cls, n_cls))
    corr = np.corrcoef(rng.normal(size=(int(rng.integers(5, 25)), 200)))
    metrics = rng.random(int(rng.integers(200, 1000)))
    fpr = np.sort(rng.random(int(rng.integers(50, 400))))
    roc = np.stack([fpr, np.sqrt(fpr)], axis=1)
    x = rng.normal(size=(120, 3))
    y = x @ np.array([0.5, -1.0, 2.0]) + rng.normal(size=120)
    ols = str(sm.OLS(y, sm.add_constant(x)).fit().summary())
    traceback_text = (
        "Traceback (most recent call last):\n"
        '  File "/home/analyst/.venv/lib/python3.11/site-packages/torch/nn/modules/module.py", '
        "line 1553, in _wrapped_call_impl\n    return self._call_impl(*args, **kwargs)\n"
        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    folds = pd.DataFrame({"fold": np.arange(1, 6), "auc": (0.8 + 0.1 * rng.random(5)).round(4),
                          "loss": (0.3 + 0.1 * rng.random(5)).round(4)})
    measures = pd.DataFrame(rng.normal(50, 10, (int(rng.integers(200, 2000)), 4)),
                            columns=["age", "bmi", "hu_mean", "volume_ml"])
    with np.printoptions(threshold=sys.maxsize):
        metric_dump = str(metrics.round(4))
        metric_list = str(metrics.round(4).tolist())
    outputs = [
        ("train.log", log.encode()),
        ("tqdm.ipynb", _cell_nb([{"output_type": "stream", "name": "stderr", "text": _tqdm(rng)}])),
        ("git.txt", hashes.encode()),
        ("sha256sums.txt", sums.encode()),
        ("checksums.txt", bare_sums.encode()),
        ("runs.txt", uuids.encode()),
        ("model.ipynb", _cell_nb([_stream(_model_summary(rng))], "print(model)")),
        ("describe.ipynb", _cell_nb([_result({"text/plain": str(measures.describe()),
                                               "text/html": measures.describe().to_html()})])),
        ("ols.ipynb", _cell_nb([_stream(ols)], "print(model.fit().summary())")),
        ("confusion.ipynb", _cell_nb([_stream(_printed(lambda: print(confusion)))])),
        ("corr.ipynb", _cell_nb([_result({"text/plain": _np_print(corr, precision=3)})])),
        ("metrics-array.ipynb", _cell_nb([_stream(metric_dump + "\n" + metric_list + "\n")],
                                         "np.set_printoptions(threshold=sys.maxsize)")),
        ("roc.ipynb", _cell_nb([_stream(_printed(lambda: print(roc.round(4).tolist())))])),
        ("traceback.ipynb", _nb([_code("train()", [{"output_type": "error", "ename": "RuntimeError",
                                                     "evalue": "CUDA out of memory",
                                                     "traceback": traceback_text.split("\n")},
                                                    _stream(traceback_text)])])),
        ("folds.csv", folds.to_csv(index=False).encode()),
        ("metrics.json", json.dumps({"auc": float(metrics.mean()), "loss_curve":
                                     loss.round(4).tolist()[:100],
                                     "git": rng.bytes(20).hex(),
                                     "run": str(uuid.UUID(bytes=rng.bytes(16)))}).encode()),
        ("columns.ipynb", _cell_nb([_result({"text/plain": str(clinical.dtypes)})])),
        ("pip.txt", "\n".join(f"package-{i}=={rng.integers(0, 9)}.{rng.integers(0, 30)}.0"
                              for i in range(60)).encode()),
    ]
    return outputs


def clean_cases(dataset_root: Path, seed: int) -> list[Case]:
    return [Case(f"s{seed}-clean-{name}", data, "pass", None, ScreenConfig(),
                 f"clean: {name} (seed {seed})")
            for name, data in clean_outputs(dataset_root, seed)]


def textbytes_cases(dataset_root: Path, other_cohort_root: Path, seeds) -> list[Case]:
    cases: list[Case] = []
    for seed in seeds:
        cases += leak_cases(dataset_root, seed)
        cases += review_cases(other_cohort_root, seed)
        cases += clean_cases(dataset_root, seed)
    return cases


def build_textbytes_cases(dataset_root: Path, other_cohort_root: Path, work: Path) -> list[Case]:
    """The evaluation cases (seeds no threshold was tuned on). ``work`` is unused: every
    case is bytes."""
    return textbytes_cases(dataset_root, other_cohort_root, EVALUATION_SEEDS)
