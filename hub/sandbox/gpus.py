"""One GPU as a sandbox is given it: the device node and the name CUDA knows it by.

Its own module because the policy holds the GPU it was given and the resources detect and
reserve GPUs: both import it, neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuDevice:
    """One GPU: ``/dev/nvidia<index>``; ``uuid`` (``GPU-…``) when the driver tells it."""

    index: int
    path: str
    uuid: str | None = None

    @property
    def cuda_id(self) -> str:
        # A UUID names the same GPU however the driver numbers the visible ones.
        return self.uuid or str(self.index)
