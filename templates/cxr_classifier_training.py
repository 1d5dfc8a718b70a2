# %% [markdown]
# # Chest X-ray classifier (MONAI DenseNet121)
#
# Trains a DenseNet121 on the granted dataset's chest X-rays, labelled from the clinical
# table's `cxr_label`, with a **patient-level** train/validation split (no patient in both).
#
# * `task = "abnormal"`: normal vs any finding (binary; ROC AUC);
# * `task = "multiclass"`: normal / nodule / cardiomegaly / effusion (macro one-vs-rest AUC).
#
# Outputs (in the run folder): `model.pt` with its metadata sidecar (template, parameters,
# dataset manifest hash, metrics), `metrics.json`, `figures/*.png` (training curve, ROC,
# confusion matrix).

# %% tags=["parameters"]
dataset = ""            # granted dataset id; empty: the only one granted
task = "abnormal"       # abnormal (binary) or multiclass
image_size = 224        # images are resized to image_size x image_size
epochs = 30
batch_size = 16
learning_rate = 1e-4
val_fraction = 0.3      # share of patients held out for validation
max_patients = 0        # 0 means every patient with an X-ray
seed = 0

# %%
import json
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from medzone_kernel.runs import start_run

out, figures, dataset, ds = start_run(dataset)
started = time.time()
print(ds)

import torch
from monai.networks.nets import DenseNet121
from monai.transforms import Compose, RandAffined, RandGaussianNoised, Resized

from medzone_kernel.training import (autocast, choose_device, confusion_matrix, grad_scaler,
                                     patient_split, progress, roc_auc, roc_auc_ovr, save_model,
                                     seed_everything, train_epoch)
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

# %%
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

# %%
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
def augmented_batches(order):
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield (torch.stack([augment({"image": x})["image"] for x in x_train[idx]]).float().to(device),
               y_train[idx].to(device))

for epoch in progress(range(epochs)):
    losses, seen = train_epoch(model, augmented_batches(torch.randperm(len(x_train))),
                               loss_fn, optimizer, scaler, device)
    images_seen += seen
    val_probs = predict(x_val)
    val_loss = float(torch.nn.functional.nll_loss(torch.log(torch.as_tensor(val_probs).clamp(min=1e-7)), y_val)) if len(val_probs) else float("nan")
    history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss})
train_seconds = time.time() - train_started
print(f"{epochs} epochs in {train_seconds:.1f} s ({images_seen / max(train_seconds, 1e-9):.1f} images/s)")

# %% [markdown]
# ## Validation

# %%
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

# %%
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
