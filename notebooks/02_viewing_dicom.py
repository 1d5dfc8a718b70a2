# %% [markdown]
# # 2. Viewing DICOM with the widgets
#
# `medzone_kernel.viewers` shows CT volumes slice by slice (axial, coronal, sagittal), with
# window presets (lung, mediastinum, bone) and a mask overlay, and X-rays as a gallery with
# their labels. In JupyterLab each viewer is an interactive widget (`viewer.widget()`); every
# viewer also draws a static figure (`viewer.figure()`), which is what this notebook saves.

# %% tags=["parameters"]
dataset = ""      # a dataset id; empty: the first dataset granted to you
gallery_size = 8  # how many X-rays the gallery shows

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

from medzone_kernel.imaging import WINDOW_PRESETS, load_ct_volume, load_mask, load_xray
from medzone_kernel.viewers import ct_viewer, xray_gallery

out = Path(os.environ.get("MEDZONE_RUN_DIR", "."))
print("window presets (level, width):", WINDOW_PRESETS)

# %% [markdown]
# ## A CT with its nodule mask
#
# Pick a patient whose CT has nodules (from the clinical table), load the volume and the mask
# on the same grid, and open the viewer. Drag the slider in JupyterLab; here we draw the three
# planes through the mask's centre.

# %%
import numpy as np

clinical = ds.table("clinical")
with_nodules = clinical.loc[clinical["ct_nodule_count"] > 0, "patient_id"].tolist()
patient = with_nodules[0] if with_nodules else ds.patients()[0]
vol = load_ct_volume(ds.series("CT", patient=patient)[0])
mask = load_mask(ds.mask_path(patient), like=vol)
viewer = ct_viewer(vol, mask, preset="lung")
viewer

# %%
centre = {}
if mask.any():
    i, j, k = (int(np.median(a)) for a in np.nonzero(mask))
    centre = {"sagittal": i, "coronal": j, "axial": k}
fig = viewer.figure(indices=centre or None)
fig.savefig(out / "ct_viewer.png", dpi=90)
plt.show()

# %% [markdown]
# Windows matter: the **lung** window (level −600, width 1500) shows nodules and vessels in
# the lung; the **mediastinum** window (40/400) shows soft tissue; **bone** (400/1800) the
# skeleton.

# %%
fig = ct_viewer(vol, mask, preset="mediastinum").figure(planes=("axial",), indices=centre or None)
plt.show()

# %% [markdown]
# ## X-rays with their labels

# %%
xrays = [load_xray(s) for s in ds.xrays()[:gallery_size]]
labels = clinical.set_index("patient_id")["cxr_label"]
gallery = xray_gallery(xrays, {p: labels.get(p, "?") for p in labels.index})
fig = gallery.figure()
fig.savefig(out / "xray_gallery.png", dpi=90)
plt.show()

# %% [markdown]
# Next: **3. Training a first model**.
