# %% [markdown]
# # Apply a saved model
#
# Loads a model saved by `cxr_classifier_training` or `ct_nodule_segmentation_training`
# (`model_path`: the `model.pt` in a run folder, absolute or relative to your home) and applies
# it to every image of a granted dataset — typically a different one than it was trained on.
# The architecture and preprocessing come from the model's metadata sidecar.
#
# Outputs (in the run folder): `metrics.json` (AUC for a classifier, Dice for a segmenter,
# computed where the dataset has labels) and `figures/*.png`.

# %% tags=["parameters"]
model_path = ""        # e.g. runs/20260101T120000Z-cxr_classifier_training/model.pt
dataset = ""           # granted dataset id; empty: the only one granted
max_patients = 0       # 0 means every patient
batch_size = 8

# %%
import json
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from medzone_kernel.runs import start_run

out, figures, dataset, ds = start_run(dataset)
started = time.time()
print(ds)

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

# %%
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
