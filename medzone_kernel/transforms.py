"""MONAI glue: dictionary transforms that load through MedZone's loaders and volume cache.

>>> from monai.data import Dataset, DataLoader
>>> from monai.transforms import Compose, ScaleIntensityRanged, RandSpatialCropd
>>> items = ct_items(open_dataset("demo"))          # {"image": ref, "label": mask path, …}
>>> pipeline = Compose([LoadCTVolumed(keys="image", mask_keys="label"),
...                     ScaleIntensityRanged("image", -1000, 400, 0, 1, clip=True),
...                     RandSpatialCropd(["image", "label"], (64, 64, 32), random_size=False)])
>>> batch = next(iter(DataLoader(Dataset(items, pipeline), batch_size=2)))

The image is a channel-first float32 ``MetaTensor`` in HU on the RAS grid (its ``affine``
is the volume's, so MONAI's spatial transforms know the geometry); ``<key>_meta`` holds the
spacing, affine, series uid and patient as plain values. References in items are small
dicts (dataset id + series uid), so items pickle cheaply into DataLoader workers and MONAI's
caching datasets; the volume itself comes from the per-user cache after the first epoch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .datasets import Dataset, open_dataset
from .imaging import DEFAULT_CACHE, load_ct_volume, load_mask, load_xray


def _as_tuple(keys) -> tuple:
    if keys is None:
        return ()
    if isinstance(keys, (str, Hashable)) and not isinstance(keys, (tuple, list)):
        return (keys,)
    return tuple(keys)


class LoadCTVolumed(MapTransform):
    """Load CT series named by ``keys`` (SeriesRef, ``{"dataset","series_uid"}`` dict or
    folder) → channel-first float32 HU ``MetaTensor`` (1, I, J, K) in RAS, plus
    ``<key>_meta``. With *mask_keys*, those keys (NIfTI paths) are loaded with
    :func:`~medzone_kernel.imaging.load_mask` onto the first key's grid (uint8 → float32,
    channel-first). *cache*: as in :func:`~medzone_kernel.imaging.load_ct_volume`."""

    def __init__(self, keys: KeysCollection = "image", mask_keys: KeysCollection | None = None,
                 *, cache=DEFAULT_CACHE, meta_suffix: str = "_meta",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = _as_tuple(mask_keys)
        self.cache = cache
        self.meta_suffix = meta_suffix

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        first = None
        for key in self.key_iterator(d):
            vol = load_ct_volume(d[key], cache=self.cache)
            first = first or vol
            # One copy out of the (read-only) memmap: the tensor owns its memory.
            image = torch.from_numpy(np.array(vol.hu, dtype=np.float32, copy=True))[None]
            affine = torch.as_tensor(vol.affine_ras, dtype=torch.float64)
            d[key] = MetaTensor(image, affine=affine,
                                meta={"series_uid": vol.series_uid, "patient": vol.patient,
                                      "space": "RAS", "original_channel_dim": "no_channel"})
            d[f"{key}{self.meta_suffix}"] = {
                "spacing_mm": tuple(vol.spacing_mm), "affine": vol.affine_ras.copy(),
                "series_uid": vol.series_uid, "patient": vol.patient, "space": "RAS"}
        for key in self.mask_keys:
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"mask key {key!r} not in the item")
            if first is None:
                raise ValueError("mask keys need a CT key loaded in the same transform")
            mask = load_mask(d[key], like=first)
            tensor = torch.from_numpy(mask.astype(np.float32))[None]
            d[key] = MetaTensor(tensor, affine=torch.as_tensor(first.affine_ras),
                                meta={"space": "RAS", "source": str(d[key])})
        return d


class LoadXRayd(MapTransform):
    """Load X-rays named by ``keys`` → channel-first float32 (1, H, W) in 0..1, bones
    bright, plus ``<key>_meta`` (pixel spacing, photometric, patient, series uid)."""

    def __init__(self, keys: KeysCollection = "image", *, meta_suffix: str = "_meta",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.meta_suffix = meta_suffix

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            xr = load_xray(d[key])
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(xr.pixels))[None],
                                meta={"patient": xr.patient, "series_uid": xr.series_uid})
            d[f"{key}{self.meta_suffix}"] = {
                "pixel_spacing_mm": xr.pixel_spacing_mm, "photometric": xr.photometric,
                "patient": xr.patient, "series_uid": xr.series_uid}
        return d


def _clinical_by_patient(dataset: Dataset) -> dict[str, dict]:
    if "clinical" not in dataset.tables():
        return {}
    table = dataset.table("clinical")
    if "patient_id" not in table.columns:
        return {}
    out = {}
    for row in table.to_dict(orient="records"):
        pid = str(row.pop("patient_id"))
        out[pid] = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
    return out


def ct_items(dataset: Dataset | str, with_masks: bool = True,
             mask_name: str = "ct_nodule_mask") -> list[dict]:
    """One item per CT series, for MONAI datasets::

        {"image": {"dataset": id, "series_uid": uid}, "label": "<mask path>",
         "patient": pid, "series_uid": uid, "labels": {clinical columns of the patient}}

    With *with_masks* only series whose patient has the mask are listed (``label`` always
    set); without, ``label`` is left out. *dataset*: a Dataset or a granted dataset's id.
    """
    dataset = open_dataset(dataset) if isinstance(dataset, str) else dataset
    clinical = _clinical_by_patient(dataset)
    items = []
    for ref in dataset.series("CT"):
        item = {"image": ref.as_dict(), "patient": ref.patient, "series_uid": ref.series_uid,
                "labels": dict(clinical.get(ref.patient, {}))}
        if with_masks:
            mask = dataset.mask_path(ref.patient, mask_name)
            if mask is None:
                continue
            item["label"] = str(mask)
        items.append(item)
    return items


def xray_items(dataset: Dataset | str, label_column: str | None = "cxr_label") -> list[dict]:
    """One item per X-ray: ``{"image": ref, "patient", "series_uid", "labels": {…}}``, plus
    ``"label"`` (the clinical table's *label_column* for the patient) when it exists."""
    dataset = open_dataset(dataset) if isinstance(dataset, str) else dataset
    clinical = _clinical_by_patient(dataset)
    items = []
    for ref in dataset.xrays():
        labels = dict(clinical.get(ref.patient, {}))
        item = {"image": ref.as_dict(), "patient": ref.patient, "series_uid": ref.series_uid,
                "labels": labels}
        if label_column and label_column in labels:
            item["label"] = labels[label_column]
        items.append(item)
    return items


__all__ = ["LoadCTVolumed", "LoadXRayd", "ct_items", "xray_items"]
