# %% [markdown]
# # CT nodule segmentation (MONAI 3D UNet)
#
# Trains a 3-D UNet on patches of the granted dataset's chest CTs against the nodule masks,
# with a **patient-level** split, and measures **Dice on the held-out patients** (whole
# volumes, sliding-window inference) next to trivial baselines: predicting nothing,
# predicting everything, and thresholding at soft-tissue density.
#
# Outputs (in the run folder): `model.pt` with its metadata sidecar, `metrics.json`,
# `figures/*.png` (training curve, a held-out slice with prediction and truth).

# %% tags=["parameters"]
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

# %%
import json
import time

import matplotlib.pyplot as plt
import numpy as np

from medzone_kernel.runs import start_run

out, figures, dataset, ds = start_run(dataset)
started = time.time()
print(ds)

import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from monai.transforms import (Compose, RandAffined, RandCropByPosNegLabeld, RandFlipd,
                              RandShiftIntensityd, ScaleIntensityRanged)

from medzone_kernel.imaging import WINDOW_PRESETS, window_hu
from medzone_kernel.training import (autocast, choose_device, dice, grad_scaler, patient_split,
                                     progress, save_model, seed_everything, train_epoch)
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

# %%
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

# %%
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
    batches = ((batch["image"].to(device), batch["label"].to(device)) for batch in loader)
    losses, seen = train_epoch(model, batches, loss_fn, optimizer, scaler, device)
    patches_seen += seen
    history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
train_seconds = time.time() - train_started
print(f"{epochs} epochs in {train_seconds:.1f} s ({patches_seen / max(train_seconds, 1e-9):.1f} patches/s)")

# %% [markdown]
# ## Held-out patients

# %%
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

# %%
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
