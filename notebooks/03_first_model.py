# %% [markdown]
# # 3. Training a first model
#
# A small convolutional network that tells normal chest X-rays from abnormal ones (any of
# nodule, cardiomegaly, effusion). The steps are the ones every medical imaging project needs:
#
# 1. a **patient-level split** — no patient's images in both training and validation;
# 2. a reproducible run — seeds fixed, the device chosen for you (GPU if you have one);
# 3. an honest metric on the held-out patients — ROC AUC;
# 4. a **saved model** with a sidecar recording the data version and parameters.
#
# For the full recipe (DenseNet121, augmentation, more metrics), run the
# `cxr_classifier_training` template.

# %% tags=["parameters"]
dataset = ""        # a dataset id; empty: the first dataset granted to you
image_size = 128    # images are resized to this
epochs = 15
learning_rate = 0.001
seed = 0

# %%
from medzone_kernel.datasets import granted_datasets, open_dataset

print("granted to me:", granted_datasets())
if not dataset:
    dataset = granted_datasets()[0]
ds = open_dataset(dataset)
ds

# %%
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

# %% [markdown]
# ## Data: one image and one label per patient

# %%
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

# %%
train_p, val_p = patient_split(patients, val_fraction=0.3, seed=seed, stratify=targets)
train = [n for n, p in enumerate(patients) if p in set(train_p)]
val = [n for n, p in enumerate(patients) if p in set(val_p)]
assert not set(train_p) & set(val_p), "a patient in both sets would inflate the metric"
print(f"{len(train)} training images, {len(val)} validation images")

# %% [markdown]
# ## Training

# %%
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

# %% [markdown]
# ## How good is it on patients it has never seen?

# %%
model.eval()
with torch.no_grad():
    scores = torch.softmax(model(x[val].to(device)), 1)[:, 1].cpu().numpy()
try:
    auc = roc_auc(y[val].numpy(), scores)
except ValueError as err:  # a validation set with one class only
    auc = None
    print(err)
print("validation ROC AUC:", auc)

# %%
save_model(model, out / "first_model.pt", template="tutorial:first_model",
           parameters={"image_size": image_size, "epochs": epochs, "learning_rate": learning_rate,
                       "seed": seed},
           dataset_manifest_sha256={dataset: ds.manifest_sha256}, metrics={"roc_auc": auc})
print(sorted(p.name for p in out.glob("first_model*")))

# %% [markdown]
# With a handful of patients the AUC is noisy: more patients, not more epochs, is what makes
# it trustworthy. Next: **4. Preparing results for export**.
