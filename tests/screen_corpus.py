"""The export screen's labelled corpus, built by code from the synthetic demo cohort.

Every case is a file (or notebook) that a user might try to export, the verdict the screen
must give and the rule it is about. Leaky cases carry the rule's target; clean cases
(``rule=None``, verdict ``pass``) are the hard negatives: large counts, ROC curves, git
hashes, UUIDs, the DICOM transfer-syntax UID, study periods, another cohort's images.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from medzone_hub.indexes import load_indexes
from medzone_hub.screen import ScreenConfig


@dataclass
class Case:
    name: str  # file name handed to the screen (or a path below the corpus root)
    data: bytes | None  # None: a path case, already on disk under ``root``
    verdict: str
    rule: str | None  # the rule a leaky case is about; None for a clean case
    config: ScreenConfig = field(default_factory=ScreenConfig)
    label: str = ""


def _nb(cells, metadata=None) -> bytes:
    return json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": metadata or {},
                       "cells": cells}).encode()


def _code(source, outputs=(), attachments=None) -> dict:
    cell = {"cell_type": "code", "execution_count": 1, "id": os.urandom(4).hex(),
            "metadata": {}, "source": source, "outputs": list(outputs)}
    if attachments:
        cell["attachments"] = attachments
    return cell


def _stream(text) -> dict:
    return {"output_type": "stream", "name": "stdout", "text": text}


def _display(data: dict) -> dict:
    return {"output_type": "display_data", "data": data, "metadata": {}}


def _result(data: dict) -> dict:
    return {"output_type": "execute_result", "execution_count": 1, "data": data, "metadata": {}}


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _window(pixels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((pixels.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _html_table(header, rows, index_name="") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr><th>" + str(label) + "</th>" + "".join(f"<td>{v}</td>" for v in vals)
                   + "</tr>" for label, vals in rows)
    return (f'<table border="1" class="dataframe"><thead><tr style="text-align: right;">'
            f"<th>{index_name}</th>{head}</tr></thead><tbody>{body}</tbody></table>")


def _text_table(header, rows) -> str:
    lines = ["          " + "  ".join(f"{h:>10}" for h in header)]
    lines += [f"{label:<10}" + "  ".join(f"{v:>10}" for v in vals) for label, vals in rows]
    return "\n".join(lines)


def _csv(header, rows) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def _figure(draw) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    draw(ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _imsave(values: np.ndarray, cmap: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    plt.imsave(buf, values, cmap=cmap, format="png")
    return buf.getvalue()


def _modality(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _encrypted_zip(member: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("result.csv", member)
    raw = bytearray(buf.getvalue())
    local = raw.find(b"PK\x03\x04")
    central = raw.find(b"PK\x01\x02")
    raw[local + 6] |= 1  # general-purpose flag bit 0: encrypted
    raw[central + 8] |= 1
    return bytes(raw)


def dataset_facts(dataset_root: Path) -> dict:
    """What the stored (de-identified) dataset holds, read the way a notebook would."""
    import pydicom

    rows = list(csv.DictReader((dataset_root / "data" / "clinical.csv").open()))
    ct_files = sorted(dataset_root.glob("data/*/CT/*.dcm"))
    cxr_files = sorted(dataset_root.glob("data/*/CXR/*.dcm"))
    ct = pydicom.dcmread(ct_files[len(ct_files) // 2])
    cxr = pydicom.dcmread(cxr_files[0])
    masks = sorted(dataset_root.glob("data/*/*.nii.gz"))
    return {"rows": rows, "ct": ct, "ct_bytes": ct_files[0].read_bytes(), "cxr": cxr,
            "mask_bytes": masks[0].read_bytes()}


def build_cases(dataset_root: Path, other_cohort_root: Path, work: Path) -> list[Case]:
    """All cases; path cases are written under ``work`` (the export root)."""
    f = dataset_facts(dataset_root)
    rows = f["rows"]
    pid, acc = rows[0]["patient_id"], rows[1]["accession_ct"]
    visit = rows[2]["visit_date"]  # shifted date, YYYY-MM-DD
    ct, cxr = f["ct"], f["cxr"]
    sop_uid = str(ct.SOPInstanceUID)
    hu = ct.pixel_array.astype(np.float64) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    cases: list[Case] = []

    def add(name, data, verdict, rule, label, config=None):
        cases.append(Case(name, data, verdict, rule, config or ScreenConfig(), label))

    # --- dataset identifiers ------------------------------------------------------------
    DI = "dataset-identifier"
    add("ids.ipynb", _nb([_code(f"df[df.patient_id == '{pid}']",
                                [_stream(f"{pid}  69  M\n")])]), "block", DI,
        "patient id in a cell source and a stream output")
    add("acc.ipynb", _nb([_code("df.head()", [_result({
        "text/html": _html_table(["acc", "label"], [(0, [acc.lower(), "nodule"])]),
        "text/plain": "x"})])]), "block", DI, "accession number, lower case, in an HTML table")
    add("uids.csv", _csv(["series", "sop"], [["a", sop_uid]]), "block", DI, "a SOP UID in a CSV cell")
    add("widget.ipynb", _nb([_code("w", [])], {"widgets": {
        "application/vnd.jupyter.widget-state+json": {"state": {"m1": {"state": {
            "value": pid.replace("-", "_").lower()}}}}}}), "block", DI,
        "patient id with underscores in widget state")
    add("dates.txt", f"visit on {visit.replace('-', '/')}\n".encode(), "block", DI,
        "a shifted visit date spelled with slashes")
    spaced = pid.replace("-", " ")
    add("json-output.ipynb", _nb([_code("x", [_display({"application/json": {"case": spaced}})])]),
        "block", DI, "patient id with spaces in a JSON output")
    add("meta.ipynb", _nb([_code("1", [])], {"title": f"cohort extract {acc}"}), "block", DI,
        "accession number in notebook metadata")

    # --- direct identifiers -------------------------------------------------------------
    DIR = "direct-identifier"
    add("rrn.txt", "주민등록번호: ９００１０１－１２３４５６８\n".encode(), "block", DIR,
        "a full-width resident registration number")
    add("phone.ipynb", _nb([_code("print(contact)", [_stream("연락처 010-2345-6789\n")])]),
        "block", DIR, "a mobile number in a stream output")
    add("emails.csv", _csv(["who", "contact"], [["a", "kim.minsu@example.com"]]), "block", DIR,
        "an e-mail address in a CSV cell")
    add("dob.md", b"Patient DOB 1985-03-12, scanned later.\n", "block", DIR, "a date of birth")

    # --- embedded data ------------------------------------------------------------------
    EM = "embedded-data"
    add("notes.txt", f["ct_bytes"], "block", EM, "a DICOM file under a text name")
    add("mask.png", f["mask_bytes"], "block", EM, "a gzipped NIfTI mask under an image name")
    npy = io.BytesIO()
    np.save(npy, hu.astype(np.int16))
    add("figure.png", npy.getvalue(), "block", EM, "a NumPy array under an image name")
    add("results.json", pickle.dumps({"x": [1, 2, 3]}), "block", EM, "a pickle (never loaded)")
    add("b64.ipynb", _nb([_code("x", [_display({
        "application/x-data": base64.b64encode(npy.getvalue()).decode()})])]), "block", EM,
        "a base64 NumPy array in a notebook output")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("readme.txt", "results")
        zf.writestr("series/slice.dcm", f["ct_bytes"])
    add("bundle.zip", zbuf.getvalue(), "block", EM, "a DICOM file inside a zip")
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.txt", b"\0" * (64 << 20))
    add("bomb.zip", bomb.getvalue(), "block", EM, "a zip bomb")
    add("secret.zip", _encrypted_zip(b"a,b\n1,2\n"), "block", EM, "an encrypted zip")
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as tf:
        info = tarfile.TarInfo("arr.npy")
        info.size = len(npy.getvalue())
        tf.addfile(info, io.BytesIO(npy.getvalue()))
    add("out.tar.gz", tbuf.getvalue(), "block", EM, "a NumPy array in a tar.gz")
    add("table.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 512, "block", EM, "HDF5 by magic bytes")
    add("table.bin", b"PAR1" + b"\0" * 64 + b"PAR1", "block", EM, "Parquet by magic bytes")
    add("wstate.ipynb", _nb([_code("1", [])], {"widgets": {"state": {
        "blob": base64.b64encode(f["ct_bytes"]).decode()}}}), "block", EM,
        "a base64 DICOM file in widget state")

    # --- copies of dataset images --------------------------------------------------------
    IM = "dataset-image"
    add("slice.png", _png(_window(hu, -1000, 400)), "block", IM, "a windowed CT slice as PNG")
    from PIL import Image
    flipped = Image.fromarray(_window(hu, -1350, 150)[:, ::-1]).resize((200, 200))
    jbuf = io.BytesIO()
    flipped.save(jbuf, format="JPEG", quality=85)
    add("flip.ipynb", _nb([_code("show()", [_display({
        "image/jpeg": base64.b64encode(jbuf.getvalue()).decode(), "text/plain": "<Figure>"})])]),
        "block", IM, "a flipped, re-windowed, resized JPEG in a notebook output")
    cxr_arr = cxr.pixel_array
    cmap = (np.stack([_window(cxr_arr, cxr_arr.min(), cxr_arr.max())] * 3, axis=-1))
    add("cxr-attachment.ipynb", _nb([{"cell_type": "markdown", "id": "m1", "metadata": {},
                                      "source": "![x](attachment:x.png)",
                                      "attachments": {"x.png": {"image/png": base64.b64encode(
                                          _png(cmap)).decode()}}}]), "block", IM,
        "an X-ray as an RGB PNG attachment")
    fig = _figure(lambda ax: ax.imshow(hu, cmap="gray", vmin=-1000, vmax=400))
    add("figure-axes.png", fig, "block", IM, "a dataset slice drawn inside matplotlib axes")
    add("soft-tissue.png", _png(_window(hu, -160, 240)), "block", IM,
        "a soft-tissue window (40/400 HU) of a slice: lungs and air clipped")
    add("viridis.ipynb", _nb([_code("plt.imsave(buf, hu, cmap='viridis')", [_display({
        "image/png": base64.b64encode(_imsave(hu, "viridis")).decode()})])]), "block", IM,
        "a slice colour-mapped with viridis in a notebook output")

    # --- row-level data -----------------------------------------------------------------
    RL = "row-level-data"
    add("subjects.csv", _csv(["subject_id", "age", "label"],
                             [[f"S{i:03d}", 40 + i, "x"] for i in range(5)]), "block", RL,
        "an ID-like column")
    rng = np.random.default_rng(0)
    add("measurements.csv", _csv(["height_cm", "weight_kg"],
                                 [[f"{h:.1f}", f"{w:.1f}"] for h, w in rng.normal(170, 8, (40, 2))]),
        "block", RL, "40 rows of per-person measurements")
    add("rows.ipynb", _nb([_code("df", [_result({"text/html": _html_table(
        ["mrn", "age"], [(i, [f"X{i}", 50]) for i in range(3)])})])]), "block", RL,
        "an HTML table with an MRN column")

    # --- small counts -------------------------------------------------------------------
    SC = "small-counts"
    add("counts.csv", _csv(["label", "n"], [["nodule", 3], ["normal", 140]]), "review", SC,
        "a count of 3 in a CSV")
    add("zeros.ipynb", _nb([_code("pd.crosstab(a, b)", [_result({"text/html": _html_table(
        ["F", "M"], [("nodule", [0, 40]), ("normal", [55, 61])], "label")})])]), "review", SC,
        "a zero in an HTML cross-tabulation")
    add("text-counts.ipynb", _nb([_code("print(t)", [_stream(_text_table(
        ["F", "M"], [("current", [7, 25]), ("never", [31, 44])]))])]), "review", SC,
        "a count of 7 in a text table")
    add("os.csv", _csv(["label", "n"], [["nodule", 12], ["normal", 140]]), "review", SC,
        "a count not rounded to 5 (opensafely profile)", ScreenConfig(profile="opensafely"))
    add("dominance.csv", _csv(["site", "total", "max"], [["a", 1000, 950], ["b", 800, 200]]),
        "review", SC, "a total dominated by one contributor")

    # --- model weights ------------------------------------------------------------------
    MW = "model-weights"
    import torch
    tw = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, tw)
    add("model.pt", tw.getvalue(), "review", MW, "a torch state dict")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    add("weights.bin", struct.pack("<Q", len(header)) + header + b"\0" * 8, "review", MW,
        "safetensors by content")
    add("model.onnx", b"\x08\x07\x12\x07pytorch" + b"\0" * 32, "review", MW, "an ONNX model")

    # --- file type and size ---------------------------------------------------------------
    add("blob.dat", os.urandom(2048), "block", "malformed", "random binary bytes")
    add("big.txt", b"a\n" * 2000, "block", "file-size", "a file over the size limit",
        ScreenConfig(max_file_bytes=1000))
    add("long.csv", _csv(["group", "n"], [[f"g{i}", 100 + i] for i in range(60)]), "block",
        "file-size", "a CSV over the row limit", ScreenConfig(max_csv_rows=50))

    # --- malformed ----------------------------------------------------------------------
    add("broken.ipynb", b'{"cells": [ {"cell_type": ', "block", "malformed", "broken JSON")
    add("latin1.txt", "caf\xe9 r\xe9sultats\n".encode("latin-1"), "block", "malformed",
        "not UTF-8")
    add("huge.ipynb", _nb([_code("print(x)", [_stream("ok " * 5000)])]), "block", "malformed",
        "a huge output", ScreenConfig(max_output_bytes=10_000))

    # --- paths (on disk, below ``work``) --------------------------------------------------
    work.mkdir(parents=True, exist_ok=True)
    outside = work.parent / "outside.txt"
    outside.write_text("ok\n")
    link = work / "link.txt"
    if not link.exists():
        link.symlink_to(outside)
    add("link.txt", None, "block", "path", "a symlink out of the export root")
    add("../outside.txt", None, "block", "path", "path traversal")

    # --- clean (hard negatives) -------------------------------------------------------------
    roc = _figure(lambda ax: (ax.plot([0, .1, .3, 1], [0, .6, .85, 1]), ax.plot([0, 1], [0, 1], "--"),
                              ax.set_xlabel("FPR"), ax.set_ylabel("TPR"), ax.set_title("AUC 0.87")))
    other_ct = sorted(other_cohort_root.glob("*/CT/*.dcm"))
    import pydicom
    o = pydicom.dcmread(other_ct[len(other_ct) // 2])
    o_hu = o.pixel_array.astype(np.float64) * float(o.RescaleSlope) + float(o.RescaleIntercept)
    clean_nb = _nb([
        {"cell_type": "markdown", "id": "md", "metadata": {},
         "source": "# Nodule study\nStudy period 2020–2023. Code at commit "
                   "3f2a9c1d0b8e7f6a5d4c3b2a1f0e9d8c7b6a5f4e; run "
                   "550e8400-e29b-41d4-a716-446655440000."},
        _code("import pandas as pd\nts = '1.2.840.10008.1.2.1'  # explicit VR little endian\n"
              "pd.crosstab(df.label, df.sex)",
              [_result({"text/html": _html_table(["F", "M"], [("nodule", [120, 141]),
                                                               ("normal", [310, 298])], "label"),
                        "text/plain": _text_table(["F", "M"], [("nodule", [120, 141]),
                                                               ("normal", [310, 298])])})]),
        _code("print(summary)", [_stream("n = 1,234 patients; <10 excluded; suppressed cells: 2\n"
                                         "epoch  loss\n1  0.91\n2  0.55\n3  0.41\n")]),
        _code("plot_roc()", [_display({"image/png": base64.b64encode(roc).decode(),
                                       "text/plain": "<Figure size 320x320>"})]),
        _code("show(other)", [_display({"image/png": base64.b64encode(
            _png(_window(o_hu, -1000, 400))).decode()})]),
    ], {"kernelspec": {"name": "python3", "display_name": "Python 3"},
        "language_info": {"name": "python", "version": "3.12.3"}})
    add("analysis.ipynb", clean_nb, "pass", None, "clean notebook: large counts, ROC, hashes, "
        "UUID, transfer-syntax UID, study period, another cohort's CT slice")
    add("counts-ok.csv", _csv(["age_group", "n", "mean_bmi"],
                              [["40-49", 120, 24.1], ["50-59", "<10", 25.3], ["60-69", 233, 26.0],
                               ["70+", "suppressed", 25.7]]), "pass", None,
        "large counts with suppression markers")
    add("os-ok.csv", _csv(["label", "n"], [["nodule", 15], ["normal", 140]]), "pass", None,
        "counts rounded to 5 (opensafely)", ScreenConfig(profile="opensafely"))
    add("roc.png", roc, "pass", None, "an ROC curve")
    add("other-cohort.png", _png(_window(o_hu, -1000, 400)), "pass", None,
        "a CT slice of a different patient (same anatomy)")
    # The hard clean case: the same synthetic anatomy, other patients (another seed); every
    # 4th slice in two windows and the chest X-ray.
    slices = [_modality(pydicom.dcmread(p)) for p in other_ct[::4]]
    shown = [_window(v, -1000, 400) for v in slices] + [_window(v, -160, 240) for v in slices]
    o_cxr = pydicom.dcmread(sorted(other_cohort_root.glob("*/CXR/*.dcm"))[0]).pixel_array
    shown.append(_window(o_cxr, o_cxr.min(), o_cxr.max()))
    add("other-seed-cohort.ipynb", _nb([_code(f"show({i})", [_display({
        "image/png": base64.b64encode(_png(arr)).decode()})]) for i, arr in enumerate(shown)]),
        "pass", None, "slices and an X-ray of another cohort's patients (same anatomy)")
    add("metrics.json", json.dumps({"auc": 0.874, "git": "3f2a9c1d0b8e7f6a5d4c3b2a1f0e9d8c7b6a5f4e",
                                    "run": "550e8400-e29b-41d4-a716-446655440000",
                                    "transfer_syntax": "1.2.840.10008.1.2.1",
                                    "period": "2020-2023"}).encode(), "pass", None,
        "metrics JSON with hashes and UIDs")
    add("README.md", "# Results\nCohort 2020–2023, 1,432 studies. AUC 0.87 (95% CI 0.84–0.90).\n"
        .encode(), "pass", None, "a results summary")
    add("train.log", "".join(f"epoch {i} loss {1 / (i + 1):.4f} val_auc {0.7 + i / 100:.3f}\n"
                             for i in range(30)).encode(), "pass", None, "a training log")
    add("figure.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><path d="M0 0L10 10"/>'
        b"<text>AUC 0.87</text></svg>", "pass", None, "an SVG figure")
    return cases


# --- fixtures the screen tests share (import them into a test module to use them) --------

@pytest.fixture(scope="module", name="zone")
def demo_zone(module_env, cohort_dir):
    """The test cohort ingested, de-identified, as dataset ``demo``."""
    from medzone_hub.ingest import ingest_dataset

    ingest_dataset(module_env.home, module_env.store, "demo", cohort_dir, deidentify=True,
                   pseudonym_key=b"k" * 32, actor="t", progress=False)
    return module_env


@pytest.fixture(scope="module", name="indexes")
def demo_indexes(zone):
    """The screening index of ``demo``, loaded as the airlock loads it."""
    return load_indexes(zone.home, ["demo"])


@pytest.fixture(scope="module", name="corpus")
def demo_corpus(zone, tmp_path_factory):
    """The corpus's cases built against ``demo`` and one other patient (seed 99), and the
    home they were written in."""
    from medzone_hub.demodata import generate_cohort

    other = tmp_path_factory.mktemp("other") / "cohort"
    generate_cohort(other, patients=1, seed=99, progress=False)
    work = tmp_path_factory.mktemp("export") / "home"
    return work, build_cases(zone.home.dataset_dir("demo"), other, work)
