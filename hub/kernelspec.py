"""The kernel a MedZone sandbox offers: "MedZone (Python 3)".

It runs the sandbox's Python environment (the one the hub runs from, bound read-only),
which holds ``medzone_kernel``, torch, MONAI and pydicom. The single-user server writes
the spec into the sandbox's private ``/tmp`` at start and offers no other kernel, so what
a notebook runs is always this environment, inside the same sandbox.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

KERNEL_NAME = "medzone"
DISPLAY_NAME = "MedZone (Python 3)"

#: What the kernel's environment must import (checked by the tests, inside a sandbox).
REQUIRED_IMPORTS = ("medzone_kernel", "torch", "monai", "pydicom")


def kernel_spec(python: str | None = None) -> dict:
    """The ``kernel.json`` content."""
    return {
        "argv": [python or sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "env": {"MEDZONE_KERNEL": "1"},
        "metadata": {"debugger": True, "medzone": {"imports": list(REQUIRED_IMPORTS)}},
    }


def write_kernelspec(kernels_root: str | Path, python: str | None = None) -> Path:
    """Write ``<kernels_root>/medzone/kernel.json``; its folder."""
    folder = Path(kernels_root) / KERNEL_NAME
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kernel.json").write_text(json.dumps(kernel_spec(python), indent=1))
    return folder


def configure(config, data_dir: str | Path) -> None:
    """Make *config*'s server offer only the MedZone kernel, written under *data_dir*.

    *data_dir* is put first on ``JUPYTER_PATH`` (kernel folders are found there; the
    kernel folder list itself is not configurable).
    """
    write_kernelspec(Path(data_dir) / "kernels")
    paths = [str(data_dir)] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    os.environ["JUPYTER_PATH"] = os.pathsep.join(paths)
    config.KernelSpecManager.ensure_native_kernel = False
    config.KernelSpecManager.allowed_kernelspecs = {KERNEL_NAME}
    config.MappingKernelManager.default_kernel_name = KERNEL_NAME
