"""Cell sources of the student tutorials in this folder (``python templates/generate.py``
writes the ``.ipynb`` files from them).

Each tutorial starts with a title cell and a ``parameters`` cell: settings that a student may
change, and that CI sets small (``medzone run notebooks/<name>.ipynb -p …``) so that every
tutorial is executed inside a real sandbox on each test run.
"""

from __future__ import annotations

from generate import code, md, notebook

PICK_DATASET = '''
from medzone_kernel.datasets import granted_datasets, open_dataset

print("granted to me:", granted_datasets())
if not dataset:
    dataset = granted_datasets()[0]
ds = open_dataset(dataset)
ds
'''

GETTING_STARTED = notebook([
    md("""
# 1. Getting started with your datasets

Inside MedZone your notebook runs in a **sandbox**: it sees `/data/<id>` for each dataset you
hold a live grant for (read-only), your own home folder, and nothing else — no network, no
other users. This notebook shows what is in a dataset and how to read it with
`medzone_kernel`.

You will learn to: list your datasets, list patients and series, read the clinical table,
and load one CT volume and one X-ray with their geometry.
"""),
    code('''
dataset = ""   # a dataset id; empty: the first dataset granted to you
''', "parameters"),
    md("## Which datasets can I read?"),
    code(PICK_DATASET),
    md("""
Patients carry **pseudonyms** (`MZP-…`): the data provider replaced names and IDs before
the data came in, and dates are shifted per patient. The manifest records every file's
sha256, so results can be tied to the exact version of the data.
"""),
    code('''
patients = ds.patients()
print(f"{len(patients)} patients; tables: {ds.tables()}; manifest sha256 {ds.manifest_sha256[:12]}…")
import pandas as pd
series = pd.DataFrame([{"modality": s.modality, "images": s.images,
                        "pixel_spacing_mm": s.pixel_spacing_mm,
                        "slice_spacing_mm": s.slice_spacing_mm} for s in ds.series()])
series.groupby("modality").agg(series=("images", "size"), images=("images", "sum"))
'''),
    md("## The clinical table"),
    code('''
clinical = ds.table("clinical")
print(clinical.columns.tolist())
clinical[["age", "sex", "smoking", "cxr_label", "ct_nodule_count"]].describe(include="all")
'''),
    md("""
## One CT volume

`load_ct_volume` returns Hounsfield units on a grid in **RAS** orientation (`hu[i, j, k]`:
i towards the patient's right, j anterior, k superior) with the voxel spacing in mm and the
affine to patient coordinates. The first load decodes the DICOM files; later loads come
from your volume cache.
"""),
    code('''
from medzone_kernel.imaging import load_ct_volume, load_xray

ct = ds.series("CT")[0]
vol = load_ct_volume(ct)
print("shape", vol.shape, "spacing (mm)", vol.spacing_mm)
print("HU range", float(vol.hu.min()), "to", float(vol.hu.max()))
print("air outside the body ≈", float(vol.hu[0, 0, 0]), "HU")
'''),
    md("""
## One X-ray

`load_xray` returns pixels scaled to 0..1 with **bones bright**, whatever the file's
`PhotometricInterpretation` (MONOCHROME1 stores them inverted).
"""),
    code('''
xray = load_xray(ds.xrays()[0])
print(xray.pixels.shape, "pixel spacing (mm)", xray.pixel_spacing_mm, "stored as", xray.photometric)
'''),
    md("Next: **2. Viewing DICOM with the widgets**."),
])


VIEWING_DICOM = notebook([
    md("""
# 2. Viewing DICOM with the widgets

`medzone_kernel.viewers` shows CT volumes slice by slice (axial, coronal, sagittal), with
window presets (lung, mediastinum, bone) and a mask overlay, and X-rays as a gallery with
their labels. In JupyterLab each viewer is an interactive widget (`viewer.widget()`); every
viewer also draws a static figure (`viewer.figure()`), which is what this notebook saves.
"""),
    code('''
dataset = ""      # a dataset id; empty: the first dataset granted to you
gallery_size = 8  # how many X-rays the gallery shows
''', "parameters"),
    code(PICK_DATASET),
    code('''
import os
from pathlib import Path

import matplotlib.pyplot as plt

from medzone_kernel.imaging import WINDOW_PRESETS, load_ct_volume, load_mask, load_xray
from medzone_kernel.viewers import ct_viewer, xray_gallery

out = Path(os.environ.get("MEDZONE_RUN_DIR", "."))
print("window presets (level, width):", WINDOW_PRESETS)
'''),
    md("""
## A CT with its nodule mask

Pick a patient whose CT has nodules (from the clinical table), load the volume and the mask
on the same grid, and open the viewer. Drag the slider in JupyterLab; here we draw the three
planes through the mask's centre.
"""),
    code('''
import numpy as np

clinical = ds.table("clinical")
with_nodules = clinical.loc[clinical["ct_nodule_count"] > 0, "patient_id"].tolist()
patient = with_nodules[0] if with_nodules else ds.patients()[0]
vol = load_ct_volume(ds.series("CT", patient=patient)[0])
mask = load_mask(ds.mask_path(patient), like=vol)
viewer = ct_viewer(vol, mask, preset="lung")
viewer
'''),
    code('''
centre = {}
if mask.any():
    i, j, k = (int(np.median(a)) for a in np.nonzero(mask))
    centre = {"sagittal": i, "coronal": j, "axial": k}
fig = viewer.figure(indices=centre or None)
fig.savefig(out / "ct_viewer.png", dpi=90)
plt.show()
'''),
    md("""
Windows matter: the **lung** window (level −600, width 1500) shows nodules and vessels in
the lung; the **mediastinum** window (40/400) shows soft tissue; **bone** (400/1800) the
skeleton.
"""),
    code('''
fig = ct_viewer(vol, mask, preset="mediastinum").figure(planes=("axial",), indices=centre or None)
plt.show()
'''),
    md("## X-rays with their labels"),
    code('''
xrays = [load_xray(s) for s in ds.xrays()[:gallery_size]]
labels = clinical.set_index("patient_id")["cxr_label"]
gallery = xray_gallery(xrays, {p: labels.get(p, "?") for p in labels.index})
fig = gallery.figure()
fig.savefig(out / "xray_gallery.png", dpi=90)
plt.show()
'''),
    md("Next: **3. Training a first model**."),
])


FIRST_MODEL = notebook([
    md("""
# 3. Training a first model

A small convolutional network that tells normal chest X-rays from abnormal ones (any of
nodule, cardiomegaly, effusion). The steps are the ones every medical imaging project needs:

1. a **patient-level split** — no patient's images in both training and validation;
2. a reproducible run — seeds fixed, the device chosen for you (GPU if you have one);
3. an honest metric on the held-out patients — ROC AUC;
4. a **saved model** with a sidecar recording the data version and parameters.

For the full recipe (DenseNet121, augmentation, more metrics), run the
`cxr_classifier_training` template.
"""),
    code('''
dataset = ""        # a dataset id; empty: the first dataset granted to you
image_size = 128    # images are resized to this
epochs = 15
learning_rate = 0.001
seed = 0
''', "parameters"),
    code(PICK_DATASET),
    code('''
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from monai.networks.nets import DenseNet121
from monai.transforms import Resize

from medzone_kernel.imaging import load_xray
from medzone_kernel.training import (choose_device, patient_split, progress, roc_auc,
                                     save_model, seed_everything)

out = Path(os.environ.get("MEDZONE_RUN_DIR", "."))
seed_everything(seed)
device = choose_device()
'''),
    md("## Data: one image and one label per patient"),
    code('''
clinical = ds.table("clinical").set_index("patient_id")
resize = Resize((image_size, image_size))
images, targets, patients = [], [], []
for ref in ds.xrays():
    if ref.patient not in clinical.index:
        continue
    images.append(resize(load_xray(ref).pixels[None]).float())
    targets.append(int(clinical.loc[ref.patient, "cxr_label"] != "normal"))
    patients.append(ref.patient)
x = torch.stack(images)
y = torch.tensor(targets)
print(x.shape, "abnormal share", float(y.float().mean()))
'''),
    code('''
train_p, val_p = patient_split(patients, val_fraction=0.3, seed=seed, stratify=targets)
train = [n for n, p in enumerate(patients) if p in set(train_p)]
val = [n for n, p in enumerate(patients) if p in set(val_p)]
assert not set(train_p) & set(val_p), "a patient in both sets would inflate the metric"
print(f"{len(train)} training images, {len(val)} validation images")
'''),
    md("## Training"),
    code('''
model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2, init_features=16,
                    growth_rate=16, block_config=(2, 2, 2, 2)).to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
losses = []
for epoch in progress(range(epochs)):
    model.train()
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x[train].to(device)), y[train].to(device))
    loss.backward()
    optimizer.step()
    losses.append(float(loss))
plt.plot(losses)
plt.xlabel("epoch"); plt.ylabel("training loss")
plt.savefig(out / "first_model_loss.png", dpi=90)
plt.show()
'''),
    md("## How good is it on patients it has never seen?"),
    code('''
model.eval()
with torch.no_grad():
    scores = torch.softmax(model(x[val].to(device)), 1)[:, 1].cpu().numpy()
try:
    auc = roc_auc(y[val].numpy(), scores)
except ValueError as err:  # a validation set with one class only
    auc = None
    print(err)
print("validation ROC AUC:", auc)
'''),
    code('''
save_model(model, out / "first_model.pt", template="tutorial:first_model",
           parameters={"image_size": image_size, "epochs": epochs, "learning_rate": learning_rate,
                       "seed": seed},
           dataset_manifest_sha256={dataset: ds.manifest_sha256}, metrics={"roc_auc": auc})
print(sorted(p.name for p in out.glob("first_model*")))
'''),
    md("""
With a handful of patients the AUC is noisy: more patients, not more epochs, is what makes
it trustworthy. Next: **4. Preparing results for export**.
"""),
])


EXPORT = notebook([
    md("""
# 4. Preparing results for export

Nothing leaves the zone unreviewed. When you ask for an export, your files are copied to a
quarantine and **screened** — for identifiers (pseudonyms, UIDs, dates, free text), copies of
the images, embedded DICOM/arrays/pickles, model weights, and **small counts** — then two
reviewers decide. Results built the right way pass with nothing to fix:

* **aggregate tables** with small counts suppressed: `safe_counts`, `safe_summary`;
* **figures** of aggregates (curves, histograms) rather than patient images;
* **metrics** as JSON; no per-patient rows, no patient IDs anywhere.
"""),
    code('''
dataset = ""         # a dataset id; empty: the first dataset granted to you
threshold = 10       # the zone's small-count threshold
''', "parameters"),
    code(PICK_DATASET),
    code('''
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt

from medzone_kernel.tables import disclosure_report, safe_counts, safe_summary

out = Path(os.environ.get("MEDZONE_RUN_DIR", ".")) / "export"
out.mkdir(parents=True, exist_ok=True)
clinical = ds.table("clinical")
'''),
    md("""
## Counts

A plain `value_counts()` shows every count, including the 1s and 2s that can single a
person out. `safe_counts` hides cells below the threshold (and enough others that they
cannot be worked out from the totals), and rounds the rest.
"""),
    code('''
raw = clinical.groupby(["sex", "cxr_label"]).size()
print("raw (stays in the zone):", raw.to_dict())
table = safe_counts(clinical, by=["sex", "cxr_label"], threshold=threshold)
table
'''),
    code('''
for line in disclosure_report(table):
    print("-", line)
table.to_csv(out / "label_by_sex.csv")
'''),
    md("## Summaries of a measurement"),
    code('''
ages = safe_summary(clinical, "age", by="sex", threshold=threshold)
ages.to_csv(out / "age_by_sex.csv")
ages
'''),
    md("""
## Figures and metrics

A histogram of a whole cohort is fine; an image of one patient's scan is not (the screen
recognises dataset images, also resized or cropped). Metrics go in a small JSON file.
"""),
    code('''
fig, ax = plt.subplots(figsize=(5, 3))
ax.hist(clinical["age"], bins=range(20, 95, 10))
ax.set_xlabel("age (years)"); ax.set_ylabel("patients")
fig.tight_layout()
fig.savefig(out / "age_histogram.png", dpi=90)
(out / "metrics.json").write_text(json.dumps({"patients": "suppressed" if len(clinical) < threshold
                                              else int(round(len(clinical), -1))}))
sorted(p.name for p in out.iterdir())
'''),
    md("""
## Asking for the export

From a terminal in the zone (or the portal's *Export* page), name the files and say why:

```
medzone export request --user <you> export/label_by_sex.csv export/age_by_sex.csv \\
    export/age_histogram.png export/metrics.json --reason "cohort description for the paper"
```

`medzone export screen <files>` shows what the screen will say before you ask.
"""),
])


NOTEBOOKS = {
    "01_getting_started": GETTING_STARTED,
    "02_viewing_dicom": VIEWING_DICOM,
    "03_first_model": FIRST_MODEL,
    "04_preparing_results_for_export": EXPORT,
}
