"""What code inside a MedZone sandbox imports: granted datasets, DICOM/volume loading, viewers,
training helpers and export requests.

It never imports the hub side's store or spawner: kernel code runs inside the sandbox without
the database and reaches the hub only through the hub API.

The imaging names (:mod:`.imaging`: numpy) and the MONAI glue (``LoadCTVolumed``,
``LoadXRayd``, ``ct_items``, ``xray_items``: torch) are imported on first use, so
``import medzone_kernel`` stays quick where they are not needed, and the hub, which imports
:mod:`medzone_kernel.contract`, does not load numpy for it.
"""

from . import export
from .datasets import (
    Dataset,
    DatasetError,
    SeriesRef,
    granted_datasets,
    open_dataset,
)

__version__ = "0.1.0"

_LAZY = {"LoadCTVolumed": "transforms", "LoadXRayd": "transforms", "ct_items": "transforms",
         "xray_items": "transforms",
         **dict.fromkeys(("WINDOW_PRESETS", "CTVolume", "ImagingError", "VolumeCache",
                          "XRayImage", "default_cache", "load_ct_volume", "load_mask",
                          "load_xray", "window_hu"), "imaging")}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medzone_kernel' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "CTVolume", "Dataset", "DatasetError", "ImagingError", "export", "LoadCTVolumed", "LoadXRayd",
    "SeriesRef", "VolumeCache", "WINDOW_PRESETS", "XRayImage", "ct_items", "default_cache",
    "granted_datasets", "load_ct_volume", "load_mask", "load_xray", "open_dataset",
    "window_hu", "xray_items",
]
