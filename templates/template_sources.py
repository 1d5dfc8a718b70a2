"""Cell sources of the papermill templates in this folder (``python templates/generate.py``
writes the ``.ipynb`` files from them).

Conventions every template follows:

* cell 0 is a markdown title and description; cell 1 is the code cell tagged ``parameters``;
* ``dataset = ""`` means "the one dataset granted to me" (``medzone run`` checks a named one
  against the user's live grants before anything runs);
* everything the notebook writes goes to ``MEDZONE_RUN_DIR`` (the run folder ``medzone run``
  makes; the notebook's own folder when opened interactively): ``metrics.json``,
  ``figures/*.png``, safe tables (``*.csv`` from ``safe_counts``/``safe_summary``), models;
* nothing per patient leaves the notebook's memory: files hold aggregates, figures and
  tables with small counts suppressed, so outputs pass the export screen by design.
"""

from __future__ import annotations

from generate import code, md, notebook

# Shared setup: where outputs go, which dataset.
SETUP = '''
import json
import os
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from medzone_kernel.datasets import granted_datasets, open_dataset

out = Path(os.environ.get("MEDZONE_RUN_DIR", "."))
figures = out / "figures"
figures.mkdir(parents=True, exist_ok=True)
if not dataset:
    granted = granted_datasets()
    if len(granted) != 1:
        raise ValueError(f"set the dataset parameter: the granted datasets are {granted or 'none'}")
    dataset = granted[0]
ds = open_dataset(dataset)
started = time.time()
print(ds)
'''


# --- ct_nodule_analysis ---------------------------------------------------------------------

CT_NODULE_ANALYSIS = notebook([
    md("""
# CT lung nodule analysis

Classical image analysis of every chest CT in a granted dataset, no training needed:

1. **lung segmentation** by Hounsfield-unit thresholding (air inside the body, the two
   largest connected regions, holes filled so that nodules and vessels belong to the lung);
2. **nodule candidates**: connected regions denser than `candidate_threshold_hu` inside
   the lungs, at least `min_diameter_mm` across;
3. **measurements against the ground truth** (`nodules.csv` centres and diameters, the
   nodule masks): detection sensitivity, false positives per scan, diameter error, Dice;
4. a **cohort summary** with small counts suppressed.

Outputs (in the run folder): `metrics.json`, `cohort_summary.csv`, `lung_volume_summary.csv`,
`figures/*.png`.
"""),
    code('''
dataset = ""                    # granted dataset id; empty: the only one granted
max_patients = 0                # 0 means every CT series
lung_threshold_hu = -400.0      # lung parenchyma is darker than this
candidate_threshold_hu = -300.0  # nodule candidates are denser than this
min_diameter_mm = 6.0           # smallest candidate kept (equivalent-sphere diameter)
max_elongation = 3.0            # longest extent over diameter; vessels are long, nodules round
match_distance_mm = 10.0        # a candidate this close to a true centre detects it
figure_patients = 4             # how many scans the slice figure shows
small_count_threshold = 10      # cells below this are suppressed in the cohort table
''', "parameters"),
    code(SETUP + '''
from scipy import ndimage

from medzone_kernel.imaging import WINDOW_PRESETS, load_ct_volume, load_mask, window_hu
from medzone_kernel.tables import safe_counts, safe_summary

series = ds.series("CT")
if max_patients:
    series = series[:max_patients]
truth = ds.table("nodules") if "nodules" in ds.tables() else pd.DataFrame()
clinical = ds.table("clinical")
print(f"{len(series)} CT series, {len(truth)} annotated nodules")
'''),
    md("""
## Methods

The lung mask is air (`HU < lung_threshold_hu`) not connected to the in-plane border of the
scan (which is outside air), keeping the two largest regions, with enclosed cavities
filled in 3-D and per axial slice. Candidates are voxels above `candidate_threshold_hu`
inside the lung mask eroded by one voxel (so the chest wall does not count), grouped into
26-connected components; components longer than `max_elongation` times their diameter
(vessels) are dropped.
"""),
    code('''
def segment_lungs(hu, threshold):
    air = hu < threshold
    labels, n = ndimage.label(air)
    if n == 0:
        return np.zeros_like(air)
    sizes = ndimage.sum(air, labels, index=np.arange(1, n + 1))
    border = np.unique(np.concatenate([labels[[0, -1], :, :].ravel(), labels[:, [0, -1], :].ravel()]))
    sizes[border[border > 0] - 1] = 0  # outside air touches the in-plane border
    order = np.argsort(sizes)[::-1]
    keep = [order[0] + 1]
    if n > 1 and sizes[order[1]] > 0.1 * sizes[order[0]]:
        keep.append(order[1] + 1)
    lungs = np.isin(labels, keep) & (sizes[order[0]] > 0)
    lungs = ndimage.binary_fill_holes(lungs)
    for k in range(lungs.shape[2]):
        lungs[:, :, k] = ndimage.binary_fill_holes(lungs[:, :, k])
    return lungs


def find_candidates(vol, lungs, threshold, min_diameter, max_elongation):
    inner = ndimage.binary_erosion(lungs)
    dense = (vol.hu > threshold) & inner
    labels, n = ndimage.label(dense, structure=np.ones((3, 3, 3)))
    voxel_mm3 = float(np.prod(vol.spacing_mm))
    found, mask = [], np.zeros(dense.shape, bool)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        region = labels[box] == index
        volume = region.sum() * voxel_mm3
        diameter = (6 * volume / np.pi) ** (1 / 3)
        extent = max((s.stop - s.start) * mm for s, mm in zip(box, vol.spacing_mm))
        if diameter < min_diameter or extent > max_elongation * diameter:
            continue
        ijk = np.array(ndimage.center_of_mass(region)) + [s.start for s in box]
        ras = vol.affine_ras @ np.r_[ijk, 1.0]
        found.append({"lps": np.array([-ras[0], -ras[1], ras[2]]), "diameter_mm": diameter,
                      "volume_mm3": volume, "mean_hu": float(vol.hu[box][region].mean())})
        mask[box] |= region
    return found, mask


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else float("nan")
'''),
    code('''
per_scan, matches, shown = [], [], []
for ref in series:
    vol = load_ct_volume(ref)
    lungs = segment_lungs(vol.hu, lung_threshold_hu)
    candidates, cand_mask = find_candidates(vol, lungs, candidate_threshold_hu, min_diameter_mm,
                                            max_elongation)
    gt = truth[truth["series_uid"] == ref.series_uid] if len(truth) else truth
    mask_path = ds.mask_path(ref.patient)
    gt_mask = load_mask(mask_path, like=vol) > 0 if mask_path is not None else None
    used = set()
    for _, row in gt.iterrows():
        centre = row[["center_x_mm", "center_y_mm", "center_z_mm"]].to_numpy(float)
        best, best_d = None, np.inf
        for c, cand in enumerate(candidates):
            d = float(np.linalg.norm(cand["lps"] - centre))
            if c not in used and d < best_d:
                best, best_d = c, d
        hit = best is not None and best_d <= match_distance_mm
        if hit:
            used.add(best)
        matches.append({"true_diameter_mm": float(row["diameter_mm"]), "detected": hit,
                        "measured_diameter_mm": candidates[best]["diameter_mm"] if hit else np.nan,
                        "distance_mm": best_d if hit else np.nan})
    per_scan.append({
        "patient": ref.patient, "true_nodules": len(gt), "candidates": len(candidates),
        "true_positives": len(used), "false_positives": len(candidates) - len(used),
        "lung_volume_ml": float(lungs.sum() * np.prod(vol.spacing_mm) / 1000),
        "dice": dice(cand_mask, gt_mask) if gt_mask is not None and gt_mask.any() else np.nan,
    })
    if len(gt) and len(shown) < figure_patients:
        k = vol.voxel_of_lps(gt.iloc[0][["center_x_mm", "center_y_mm", "center_z_mm"]].to_numpy(float))[2]
        shown.append((vol.axial(k), np.asarray(lungs[::-1, ::-1, k]).T,
                      np.asarray(cand_mask[::-1, ::-1, k]).T,
                      None if gt_mask is None else np.asarray(gt_mask[::-1, ::-1, k]).T))
scans = pd.DataFrame(per_scan)
nodules = pd.DataFrame(matches, columns=["true_diameter_mm", "detected", "measured_diameter_mm",
                                         "distance_mm"])
print(f"{len(scans)} scans analysed in {time.time() - started:.1f} s")
'''),
    md("## Results"),
    code('''
n_true = int(scans["true_nodules"].sum())
detected = int(nodules["detected"].sum()) if len(nodules) else 0
found = nodules[nodules["detected"]]
metrics = {
    "template": "ct_nodule_analysis",
    "dataset": dataset,
    "dataset_manifest_sha256": ds.manifest_sha256,
    "scans": int(len(scans)),
    "true_nodules": n_true,
    "sensitivity": detected / n_true if n_true else None,
    "false_positives_per_scan": float(scans["false_positives"].mean()) if len(scans) else None,
    "diameter_error_mm_mean_abs": float((found["measured_diameter_mm"] - found["true_diameter_mm"]).abs().mean()) if len(found) else None,
    "diameter_bias_mm": float((found["measured_diameter_mm"] - found["true_diameter_mm"]).mean()) if len(found) else None,
    "dice_mean": float(scans["dice"].mean()) if scans["dice"].notna().any() else None,
    "lung_volume_ml_mean": float(scans["lung_volume_ml"].mean()) if len(scans) else None,
    "parameters": {"lung_threshold_hu": lung_threshold_hu, "candidate_threshold_hu": candidate_threshold_hu,
                   "min_diameter_mm": min_diameter_mm, "max_elongation": max_elongation,
                   "match_distance_mm": match_distance_mm},
    "seconds": round(time.time() - started, 1),
}
(out / "metrics.json").write_text(json.dumps(metrics, indent=1))
{k: v for k, v in metrics.items() if k != "parameters"}
'''),
    code('''
if shown:
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4.2), squeeze=False)
    level, width = WINDOW_PRESETS["lung"]
    for ax, (image, lung, cand, gt) in zip(axes[0], shown):
        ax.imshow(window_hu(image, level, width), cmap="gray")
        ax.contour(lung, levels=[0.5], colors="lime", linewidths=0.6)
        if cand.any():
            ax.contour(cand, levels=[0.5], colors="red", linewidths=1.0)
        if gt is not None and gt.any():
            ax.contour(gt, levels=[0.5], colors="yellow", linewidths=1.0, linestyles="dashed")
        ax.set_axis_off()
    fig.suptitle("lung mask (green), candidates (red), ground truth (yellow dashed)")
    fig.tight_layout()
    fig.savefig(figures / "nodule_slices.png", dpi=100)
    plt.show()
'''),
    code('''
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
if len(found):
    top = max(found["true_diameter_mm"].max(), found["measured_diameter_mm"].max()) * 1.1
    axes[0].scatter(found["true_diameter_mm"], found["measured_diameter_mm"])
    axes[0].plot([0, top], [0, top], "k--", linewidth=0.8)
axes[0].set_xlabel("true diameter (mm)")
axes[0].set_ylabel("measured diameter (mm)")
axes[0].set_title("detected nodules")
axes[1].hist(scans["lung_volume_ml"] / 1000, bins=10)
axes[1].set_xlabel("lung volume (L)")
axes[1].set_ylabel("scans")
axes[1].set_title("lung volumes")
fig.tight_layout()
fig.savefig(figures / "measurements.png", dpi=100)
plt.show()
'''),
    md("""
## Cohort summary

Scans grouped by smoking status and whether the analysis found a candidate, with counts
below `small_count_threshold` suppressed by the zone's disclosure rule: this table can leave
the zone as it is.
"""),
    code('''
cohort = scans.merge(clinical, left_on="patient", right_on="patient_id", how="left")
cohort["any_candidate"] = np.where(cohort["candidates"] > 0, "yes", "no")
by = [c for c in ("smoking", "any_candidate") if c in cohort.columns]
summary = safe_counts(cohort, by=by, threshold=small_count_threshold)
summary.to_csv(out / "cohort_summary.csv")
volumes = safe_summary(cohort, "lung_volume_ml", by="sex", threshold=small_count_threshold)
volumes.to_csv(out / "lung_volume_summary.csv")
display(summary, volumes)
'''),
])


# --- cxr_classifier_training ---------------------------------------------------------------

CXR_CLASSIFIER_TRAINING = notebook([
    md("""
# Chest X-ray classifier (MONAI DenseNet121)

Trains a DenseNet121 on the granted dataset's chest X-rays, labelled from the clinical
table's `cxr_label`, with a **patient-level** train/validation split (no patient in both).

* `task = "abnormal"`: normal vs any finding (binary; ROC AUC);
* `task = "multiclass"`: normal / nodule / cardiomegaly / effusion (macro one-vs-rest AUC).

Outputs (in the run folder): `model.pt` with its metadata sidecar (template, parameters,
dataset manifest hash, metrics), `metrics.json`, `figures/*.png` (training curve, ROC,
confusion matrix).
"""),
    code('''
dataset = ""            # granted dataset id; empty: the only one granted
task = "abnormal"       # abnormal (binary) or multiclass
image_size = 224        # images are resized to image_size x image_size
epochs = 30
batch_size = 16
learning_rate = 1e-4
val_fraction = 0.3      # share of patients held out for validation
max_patients = 0        # 0 means every patient with an X-ray
seed = 0
''', "parameters"),
    code(SETUP + '''
import torch
from monai.networks.nets import DenseNet121
from monai.transforms import Compose, RandAffined, RandGaussianNoised, Resized

from medzone_kernel.training import (autocast, choose_device, confusion_matrix, grad_scaler,
                                     patient_split, progress, roc_auc, roc_auc_ovr, save_model,
                                     seed_everything)
from medzone_kernel.transforms import LoadXRayd, xray_items

seed_everything(seed)
device = choose_device()
classes = ["normal", "abnormal"] if task == "abnormal" else ["normal", "nodule", "cardiomegaly", "effusion"]
items = [i for i in xray_items(ds) if "label" in i]
if max_patients:
    keep = sorted({i["patient"] for i in items})[:max_patients]
    items = [i for i in items if i["patient"] in keep]
for item in items:
    label = str(item["label"])
    item["target"] = classes.index("normal" if label == "normal" else "abnormal") if task == "abnormal" else classes.index(label)
print(f"{len(items)} X-rays, device {device}, classes {classes}")
'''),
    code('''
patients = sorted({i["patient"] for i in items})
target_of = {i["patient"]: i["target"] for i in items}
train_patients, val_patients = patient_split(patients, val_fraction=val_fraction, seed=seed,
                                             stratify=[target_of[p] for p in patients])
train_items = [i for i in items if i["patient"] in set(train_patients)]
val_items = [i for i in items if i["patient"] in set(val_patients)]
assert not set(train_patients) & set(val_patients)

load = Compose([LoadXRayd(keys="image"), Resized(keys="image", spatial_size=(image_size, image_size))])
def tensors(batch):
    loaded = [load(i) for i in batch]
    return (torch.stack([torch.as_tensor(d["image"]).float() for d in loaded]),
            torch.tensor([i["target"] for i in batch]))
x_train, y_train = tensors(train_items)
x_val, y_val = tensors(val_items)
augment = Compose([RandAffined(keys="image", prob=0.8, rotate_range=0.1, scale_range=0.1,
                               translate_range=(image_size // 16,) * 2, padding_mode="zeros"),
                   RandGaussianNoised(keys="image", prob=0.3, std=0.02)])
print(f"train: {len(train_items)} images ({len(train_patients)} patients); "
      f"validation: {len(val_items)} images ({len(val_patients)} patients)")
'''),
    code('''
model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=len(classes)).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
counts = torch.bincount(y_train, minlength=len(classes)).float().clamp(min=1)
loss_fn = torch.nn.CrossEntropyLoss(weight=(counts.sum() / counts).to(device))
scaler = grad_scaler(device)

def predict(x):
    model.eval()
    probs = []
    with torch.no_grad(), autocast(device):
        for start in range(0, len(x), batch_size):
            probs.append(torch.softmax(model(x[start:start + batch_size].to(device)).float(), 1).cpu())
    return torch.cat(probs).numpy() if probs else np.zeros((0, len(classes)))

history = []
train_started = time.time()
images_seen = 0
for epoch in progress(range(epochs)):
    model.train()
    order = torch.randperm(len(x_train))
    losses = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        xb = torch.stack([augment({"image": x})["image"] for x in x_train[idx]]).float().to(device)
        yb = y_train[idx].to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = loss_fn(model(xb).float(), yb)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss))
        images_seen += len(idx)
    val_probs = predict(x_val)
    val_loss = float(torch.nn.functional.nll_loss(torch.log(torch.as_tensor(val_probs).clamp(min=1e-7)), y_val)) if len(val_probs) else float("nan")
    history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss})
train_seconds = time.time() - train_started
print(f"{epochs} epochs in {train_seconds:.1f} s ({images_seen / max(train_seconds, 1e-9):.1f} images/s)")
'''),
    md("## Validation"),
    code('''
y_true = y_val.numpy()
y_pred = val_probs.argmax(1)
try:
    if task == "abnormal":
        auc = roc_auc(y_true, val_probs[:, 1])
    else:
        auc = roc_auc_ovr(y_true, val_probs, classes=list(range(len(classes))))
except ValueError as err:  # a validation set with one class only: no AUC
    print(f"no ROC AUC: {err}")
    auc = None
names = np.array(classes)
cm = confusion_matrix(names[y_true], names[y_pred], classes)
confusion_matrix(names[y_true], names[y_pred], classes, safe=True).to_csv(out / "confusion_matrix.csv")
metrics = {
    "template": "cxr_classifier_training",
    "dataset": dataset,
    "dataset_manifest_sha256": ds.manifest_sha256,
    "task": task,
    "classes": classes,
    "roc_auc": None if auc is None or np.isnan(auc) else float(auc),
    "accuracy": float((y_pred == y_true).mean()) if len(y_true) else None,
    "train_images": len(train_items),
    "val_images": len(val_items),
    "epochs": epochs,
    "final_train_loss": history[-1]["train_loss"] if history else None,
    "images_per_second": images_seen / max(train_seconds, 1e-9),
    "device": str(device),
    "seconds": round(time.time() - started, 1),
}
parameters = {"dataset": dataset, "task": task, "image_size": image_size, "epochs": epochs,
              "batch_size": batch_size, "learning_rate": learning_rate,
              "val_fraction": val_fraction, "seed": seed, "classes": classes,
              "architecture": "monai.networks.nets.DenseNet121", "spatial_dims": 2}
save_model(model, out / "model.pt", template="cxr_classifier_training", parameters=parameters,
           dataset_manifest_sha256={dataset: ds.manifest_sha256}, metrics=metrics)
(out / "metrics.json").write_text(json.dumps(metrics, indent=1))
{k: metrics[k] for k in ("roc_auc", "accuracy", "train_images", "val_images", "images_per_second")}
'''),
    code('''
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
h = pd.DataFrame(history)
axes[0].plot(h["epoch"], h["train_loss"], label="train")
axes[0].plot(h["epoch"], h["val_loss"], label="validation")
axes[0].set_xlabel("epoch"); axes[0].set_ylabel("loss"); axes[0].legend(); axes[0].set_title("training")

def roc_points(truth, score):
    order = np.argsort(-score)
    truth = np.asarray(truth)[order]
    tp = np.r_[0, np.cumsum(truth)] / max(truth.sum(), 1)
    fp = np.r_[0, np.cumsum(1 - truth)] / max((1 - truth).sum(), 1)
    return fp, tp

for c, name in enumerate(classes if task != "abnormal" else ["abnormal"]):
    column = 1 if task == "abnormal" else c
    fp, tp = roc_points((y_true == column).astype(int), val_probs[:, column])
    axes[1].plot(fp, tp, label=name)
axes[1].plot([0, 1], [0, 1], "k--", linewidth=0.8)
axes[1].set_xlabel("false positive rate"); axes[1].set_ylabel("true positive rate")
axes[1].set_title(f"ROC (AUC {metrics['roc_auc'] if metrics['roc_auc'] is not None else float('nan'):.2f})")
axes[1].legend()
axes[2].imshow(cm.to_numpy(), cmap="Blues")
for (r, c), v in np.ndenumerate(cm.to_numpy()):
    axes[2].text(c, r, int(v), ha="center", va="center")
axes[2].set_xticks(range(len(classes)), classes, rotation=30)
axes[2].set_yticks(range(len(classes)), classes)
axes[2].set_xlabel("predicted"); axes[2].set_ylabel("true"); axes[2].set_title("confusion matrix")
fig.tight_layout()
fig.savefig(figures / "training_roc_confusion.png", dpi=100)
plt.show()
'''),
])


# --- ct_nodule_segmentation_training --------------------------------------------------------

CT_NODULE_SEGMENTATION_TRAINING = notebook([
    md("""
# CT nodule segmentation (MONAI 3D UNet)

Trains a 3-D UNet on patches of the granted dataset's chest CTs against the nodule masks,
with a **patient-level** split, and measures **Dice on the held-out patients** (whole
volumes, sliding-window inference) next to trivial baselines: predicting nothing,
predicting everything, and thresholding at soft-tissue density.

Outputs (in the run folder): `model.pt` with its metadata sidecar, `metrics.json`,
`figures/*.png` (training curve, a held-out slice with prediction and truth).
"""),
    code('''
dataset = ""                 # granted dataset id; empty: the only one granted
patch = 64                   # training patch edge (voxels)
patches_per_volume = 8       # patches drawn per CT per epoch (2/3 centred on nodules)
channels = [16, 32, 64, 128]  # UNet feature channels per level
epochs = 100
batch_size = 2               # volumes per step, each giving patches_per_volume patches
learning_rate = 1e-2
pos_weight = 20.0            # weight of nodule voxels in the cross-entropy term
val_fraction = 0.3           # share of patients held out
max_patients = 0             # 0 means every patient with a CT and a mask
threshold = 0.5              # probability above which a voxel is nodule
augment = True               # random scaling, rotation and intensity shifts of the patches
seed = 0
''', "parameters"),
    code(SETUP + '''
import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from monai.transforms import (Compose, RandAffined, RandCropByPosNegLabeld, RandFlipd,
                              RandShiftIntensityd, ScaleIntensityRanged)

from medzone_kernel.imaging import WINDOW_PRESETS, window_hu
from medzone_kernel.training import (autocast, choose_device, dice, grad_scaler, patient_split,
                                     progress, save_model, seed_everything)
from medzone_kernel.transforms import LoadCTVolumed, ct_items

seed_everything(seed)
device = choose_device()
items = ct_items(ds)
if max_patients:
    items = items[:max_patients]
load = Compose([LoadCTVolumed(keys="image", mask_keys="label"),
                ScaleIntensityRanged(keys="image", a_min=-1000, a_max=400, b_min=0, b_max=1, clip=True)])
volumes = [load(i) for i in items]
voxel_mm3 = float(np.prod(volumes[0]["image_meta"]["spacing_mm"])) if volumes else 1.0
for item, v in zip(items, volumes):
    burden = float(v["label"].sum()) * voxel_mm3
    item["has_nodule"] = int(burden > 0)
    # Split stratified by nodule burden, so that held-out patients have nodules of every size.
    item["burden"] = "none" if burden == 0 else ("small" if burden < 500 else "large")
print(f"{len(items)} CT volumes with masks, device {device}")
'''),
    code('''
patients = [i["patient"] for i in items]
train_patients, val_patients = patient_split(patients, val_fraction=val_fraction, seed=seed,
                                             stratify=[i["burden"] for i in items])
train = [{"image": v["image"], "label": v["label"]} for i, v in zip(items, volumes) if i["patient"] in set(train_patients)]
val = [(i, v) for i, v in zip(items, volumes) if i["patient"] in set(val_patients)]
assert not set(train_patients) & set(val_patients)
# Patches centred on nodules (2 in 3) or anywhere; with augment, cut a little larger, then
# scaled (nodules of other sizes), rotated and cropped back to patch size.
margin = 8 if augment else 0
steps = [RandCropByPosNegLabeld(keys=["image", "label"], label_key="label",
                                spatial_size=(patch + margin,) * 3, pos=2, neg=1,
                                num_samples=patches_per_volume, allow_smaller=True)]
if augment:
    steps += [RandAffined(keys=["image", "label"], prob=0.8, scale_range=(0.35,) * 3,
                          rotate_range=(0.3,) * 3, spatial_size=(patch,) * 3,
                          mode=("bilinear", "nearest"), padding_mode="border"),
              RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
              RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0)]
crop = Compose(steps)
loader = DataLoader(CacheDataset(train, transform=crop, cache_rate=0, progress=False),
                    batch_size=batch_size, shuffle=True, num_workers=0)
print(f"train: {len(train)} volumes; held out: {len(val)} volumes "
      f"({sum(i['has_nodule'] for i, _ in val)} with nodules)")
'''),
    code('''
model = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(channels),
             strides=(2,) * (len(channels) - 1), num_res_units=1, norm="batch").to(device)
dice_loss = DiceLoss(sigmoid=True, batch=True)  # Dice over the batch: patches without nodule are fine
bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=device))
loss_fn = lambda logits, target: dice_loss(logits, target) + bce(logits, target)
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
scaler = grad_scaler(device)
history, patches_seen = [], 0
train_started = time.time()
for epoch in progress(range(epochs)):
    model.train()
    losses = []
    for batch in loader:
        x, y = batch["image"].to(device), batch["label"].to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = loss_fn(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss))
        patches_seen += len(x)
    history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
train_seconds = time.time() - train_started
print(f"{epochs} epochs in {train_seconds:.1f} s ({patches_seen / max(train_seconds, 1e-9):.1f} patches/s)")
'''),
    md("## Held-out patients"),
    code('''
model.eval()
inter = {"model": 0.0, "empty": 0.0, "everything": 0.0, "soft_tissue": 0.0}
sums = {k: 0.0 for k in inter}
per_volume, example = [], None
with torch.no_grad():
    for item, v in val:
        x = torch.as_tensor(v["image"])[None].to(device)
        with autocast(device):
            prob = torch.sigmoid(sliding_window_inference(x, (patch,) * 3, 4, model, overlap=0.25).float())
        pred = (prob[0, 0] > threshold).cpu().numpy()
        truth = np.asarray(v["label"][0]) > 0.5
        image = np.asarray(v["image"][0])
        guesses = {"model": pred, "empty": np.zeros_like(truth), "everything": np.ones_like(truth),
                   "soft_tissue": image > (-300 + 1000) / 1400}
        for name, guess in guesses.items():
            inter[name] += float((guess & truth).sum())
            sums[name] += float(guess.sum() + truth.sum())
        if truth.any():
            per_volume.append(float(dice(pred, truth)))
            if example is None:
                k = int(np.argmax(truth.sum(axis=(0, 1))))
                example = (image[::-1, ::-1, k].T, pred[::-1, ::-1, k].T, truth[::-1, ::-1, k].T)
pooled = {k: (2 * inter[k] / sums[k] if sums[k] else float("nan")) for k in inter}
baseline = max(pooled[k] for k in ("empty", "everything", "soft_tissue"))
metrics = {
    "template": "ct_nodule_segmentation_training",
    "dataset": dataset,
    "dataset_manifest_sha256": ds.manifest_sha256,
    "dice": pooled["model"],
    "dice_per_volume_mean": float(np.mean(per_volume)) if per_volume else None,
    "baseline_dice": {k: pooled[k] for k in ("empty", "everything", "soft_tissue")},
    "best_baseline_dice": baseline,
    "beats_baseline": bool(pooled["model"] > baseline),
    "train_volumes": len(train),
    "val_volumes": len(val),
    "epochs": epochs,
    "final_loss": history[-1]["loss"] if history else None,
    "patches_per_second": patches_seen / max(train_seconds, 1e-9),
    "device": str(device),
    "seconds": round(time.time() - started, 1),
}
parameters = {"dataset": dataset, "patch": patch, "channels": list(channels), "epochs": epochs,
              "patches_per_volume": patches_per_volume, "batch_size": batch_size,
              "learning_rate": learning_rate, "val_fraction": val_fraction, "seed": seed,
              "threshold": threshold, "pos_weight": pos_weight, "norm": "batch", "augment": augment,
              "architecture": "monai.networks.nets.UNet",
              "spatial_dims": 3, "intensity_hu": [-1000, 400]}
save_model(model, out / "model.pt", template="ct_nodule_segmentation_training",
           parameters=parameters, dataset_manifest_sha256={dataset: ds.manifest_sha256},
           metrics=metrics)
(out / "metrics.json").write_text(json.dumps(metrics, indent=1))
{k: metrics[k] for k in ("dice", "best_baseline_dice", "beats_baseline", "patches_per_second")}
'''),
    code('''
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
axes[0].plot([h["epoch"] for h in history], [h["loss"] for h in history])
axes[0].set_xlabel("epoch"); axes[0].set_ylabel("Dice + cross-entropy loss"); axes[0].set_title("training")
if example is not None:
    image, pred, truth = example
    axes[1].imshow(image, cmap="gray", vmin=0, vmax=1)
    if truth.any():
        axes[1].contour(truth, levels=[0.5], colors="yellow", linestyles="dashed")
    if pred.any():
        axes[1].contour(pred, levels=[0.5], colors="red")
    axes[1].set_title(f"held-out slice: prediction (red), truth (yellow); Dice {metrics['dice']:.2f}")
axes[1].set_axis_off()
fig.tight_layout()
fig.savefig(figures / "segmentation.png", dpi=100)
plt.show()
'''),
])


# --- model_inference ------------------------------------------------------------------------

MODEL_INFERENCE = notebook([
    md("""
# Apply a saved model

Loads a model saved by `cxr_classifier_training` or `ct_nodule_segmentation_training`
(`model_path`: the `model.pt` in a run folder, absolute or relative to your home) and applies
it to every image of a granted dataset — typically a different one than it was trained on.
The architecture and preprocessing come from the model's metadata sidecar.

Outputs (in the run folder): `metrics.json` (AUC for a classifier, Dice for a segmenter,
computed where the dataset has labels) and `figures/*.png`.
"""),
    code('''
model_path = ""        # e.g. runs/20260101T120000Z-cxr_classifier_training/model.pt
dataset = ""           # granted dataset id; empty: the only one granted
max_patients = 0       # 0 means every patient
batch_size = 8
''', "parameters"),
    code(SETUP + '''
import torch

from medzone_kernel.training import choose_device, load_model, sidecar_path

if not model_path:
    raise ValueError("set model_path to a model.pt saved by a training template")
path = Path(model_path)
if not path.is_absolute():
    path = Path(os.environ.get("HOME", ".")) / path
device = choose_device()
meta = json.loads(sidecar_path(path).read_text())
template, params = meta["template"], meta["parameters"]
print(f"model from {template}, trained on {params.get('dataset')!r}; applying to {dataset!r}")
'''),
    code('''
metrics = {"template": "model_inference", "model_template": template, "dataset": dataset,
           "dataset_manifest_sha256": ds.manifest_sha256,
           "trained_on_manifest_sha256": meta.get("dataset_manifest_sha256")}
if template == "cxr_classifier_training":
    from monai.networks.nets import DenseNet121
    from monai.transforms import Compose, Resized

    from medzone_kernel.training import roc_auc, roc_auc_ovr
    from medzone_kernel.transforms import LoadXRayd, xray_items

    classes = params["classes"]
    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=len(classes))
    load_model(path, model)
    model.to(device).eval()
    items = xray_items(ds)
    if max_patients:
        keep = sorted({i["patient"] for i in items})[:max_patients]
        items = [i for i in items if i["patient"] in keep]
    load = Compose([LoadXRayd(keys="image"), Resized(keys="image", spatial_size=(params["image_size"],) * 2)])
    probs = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            x = torch.stack([torch.as_tensor(load(i)["image"]).float() for i in items[start:start + batch_size]])
            probs.append(torch.softmax(model(x.to(device)).float(), 1).cpu())
    probs = torch.cat(probs).numpy()
    labelled = [n for n, i in enumerate(items) if "label" in i]
    if labelled:
        labels = [str(items[n]["label"]) for n in labelled]
        if params["task"] == "abnormal":
            y = np.array([0 if l == "normal" else 1 for l in labels])
            score = probs[labelled, 1]
        else:
            y = np.array([classes.index(l) for l in labels])
            score = probs[labelled]
        try:
            metrics["roc_auc"] = (roc_auc(y, score) if params["task"] == "abnormal"
                                  else roc_auc_ovr(y, score, classes=list(range(len(classes)))))
        except ValueError as err:
            print(f"no ROC AUC: {err}")
            metrics["roc_auc"] = None
        metrics["accuracy"] = float((probs[labelled].argmax(1) == y).mean())
    metrics["images"] = len(items)
    fig, ax = plt.subplots(figsize=(6, 4))
    score = probs[:, 1] if params["task"] == "abnormal" else probs.max(1)
    ax.hist(score, bins=20)
    ax.set_xlabel("P(abnormal)" if params["task"] == "abnormal" else "top-class probability")
    ax.set_ylabel("images")
    ax.set_title("model scores on " + dataset)
elif template == "ct_nodule_segmentation_training":
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet
    from monai.transforms import Compose, ScaleIntensityRanged

    from medzone_kernel.training import dice
    from medzone_kernel.transforms import LoadCTVolumed, ct_items

    channels = params["channels"]
    model = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(channels),
                 strides=(2,) * (len(channels) - 1), num_res_units=1, norm=params.get("norm", "batch"))
    load_model(path, model)
    model.to(device).eval()
    items = ct_items(ds)
    if max_patients:
        items = items[:max_patients]
    lo, hi = params.get("intensity_hu", [-1000, 400])
    load = Compose([LoadCTVolumed(keys="image", mask_keys="label"),
                    ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0, b_max=1, clip=True)])
    inter = total = 0.0
    example = None
    with torch.no_grad():
        for item in items:
            v = load(item)
            prob = torch.sigmoid(sliding_window_inference(torch.as_tensor(v["image"])[None].to(device),
                                                          (params["patch"],) * 3, 4, model, overlap=0.25))
            pred = (prob[0, 0] > params.get("threshold", 0.5)).cpu().numpy()
            truth = np.asarray(v["label"][0]) > 0.5
            inter += float((pred & truth).sum())
            total += float(pred.sum() + truth.sum())
            if example is None and truth.any():
                k = int(np.argmax(truth.sum(axis=(0, 1))))
                example = (np.asarray(v["image"][0])[::-1, ::-1, k].T, pred[::-1, ::-1, k].T, truth[::-1, ::-1, k].T)
    metrics["dice"] = 2 * inter / total if total else None
    metrics["volumes"] = len(items)
    fig, ax = plt.subplots(figsize=(5, 5))
    if example is not None:
        image, pred, truth = example
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        if truth.any():
            ax.contour(truth, levels=[0.5], colors="yellow", linestyles="dashed")
        if pred.any():
            ax.contour(pred, levels=[0.5], colors="red")
    ax.set_axis_off()
    ax.set_title("prediction (red), truth (yellow)")
else:
    raise ValueError(f"no inference recipe for models of template {template!r}")
fig.tight_layout()
fig.savefig(figures / "inference.png", dpi=100)
metrics["seconds"] = round(time.time() - started, 1)
(out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
plt.show()
metrics
'''),
])


NOTEBOOKS = {
    "ct_nodule_analysis": CT_NODULE_ANALYSIS,
    "cxr_classifier_training": CXR_CLASSIFIER_TRAINING,
    "ct_nodule_segmentation_training": CT_NODULE_SEGMENTATION_TRAINING,
    "model_inference": MODEL_INFERENCE,
}
