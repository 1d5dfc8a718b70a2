# %% [markdown]
# # 1. Getting started with your datasets
#
# Inside MedZone your notebook runs in a **sandbox**: it sees `/data/<id>` for each dataset you
# hold a live grant for (read-only), your own home folder, and nothing else — no network, no
# other users. This notebook shows what is in a dataset and how to read it with
# `medzone_kernel`.
#
# You will learn to: list your datasets, list patients and series, read the clinical table,
# and load one CT volume and one X-ray with their geometry.

# %% tags=["parameters"]
dataset = ""   # a dataset id; empty: the first dataset granted to you

# %% [markdown]
# ## Which datasets can I read?

# %%
from medzone_kernel.datasets import granted_datasets, open_dataset

print("granted to me:", granted_datasets())
if not dataset:
    dataset = granted_datasets()[0]
ds = open_dataset(dataset)
ds

# %% [markdown]
# Patients carry **pseudonyms** (`MZP-…`): the data provider replaced names and IDs before
# the data came in, and dates are shifted per patient. The manifest records every file's
# sha256, so results can be tied to the exact version of the data.

# %%
patients = ds.patients()
print(f"{len(patients)} patients; tables: {ds.tables()}; manifest sha256 {ds.manifest_sha256[:12]}…")
import pandas as pd
series = pd.DataFrame([{"modality": s.modality, "images": s.images,
                        "pixel_spacing_mm": s.pixel_spacing_mm,
                        "slice_spacing_mm": s.slice_spacing_mm} for s in ds.series()])
series.groupby("modality").agg(series=("images", "size"), images=("images", "sum"))

# %% [markdown]
# ## The clinical table

# %%
clinical = ds.table("clinical")
print(clinical.columns.tolist())
clinical[["age", "sex", "smoking", "cxr_label", "ct_nodule_count"]].describe(include="all")

# %% [markdown]
# ## One CT volume
#
# `load_ct_volume` returns Hounsfield units on a grid in **RAS** orientation (`hu[i, j, k]`:
# i towards the patient's right, j anterior, k superior) with the voxel spacing in mm and the
# affine to patient coordinates. The first load decodes the DICOM files; later loads come
# from your volume cache.

# %%
from medzone_kernel.imaging import load_ct_volume, load_xray

ct = ds.series("CT")[0]
vol = load_ct_volume(ct)
print("shape", vol.shape, "spacing (mm)", vol.spacing_mm)
print("HU range", float(vol.hu.min()), "to", float(vol.hu.max()))
print("air outside the body ≈", float(vol.hu[0, 0, 0]), "HU")

# %% [markdown]
# ## One X-ray
#
# `load_xray` returns pixels scaled to 0..1 with **bones bright**, whatever the file's
# `PhotometricInterpretation` (MONOCHROME1 stores them inverted).

# %%
xray = load_xray(ds.xrays()[0])
print(xray.pixels.shape, "pixel spacing (mm)", xray.pixel_spacing_mm, "stored as", xray.photometric)

# %% [markdown]
# Next: **2. Viewing DICOM with the widgets**.
