"""Resource profiles a person chooses at spawn: CPU only, one whole GPU, a MIG slice, or a
shared GPU with a memory share.

The machine's GPUs are split by the operator (``SafeZoneSpawner`` settings), so the
profiles never compete for one device:

* a GPU partitioned with MIG (``mig_slices``, else found through NVML) is offered only as
  its slices, each listed by its ``MIG-…`` UUID; the sandbox gets the parent's device node
  and the NVIDIA support nodes (``nvidia-caps`` included) and ``CUDA_VISIBLE_DEVICES`` set
  to the slice's UUID, so CUDA sees exactly that slice;
* the GPUs in ``shared_gpu_indices`` are shared by up to ``shared_gpu_sessions`` servers,
  each told its memory share (``MEDZONE_GPU_MEMORY_FRACTION``; CUDA has no hard
  per-process memory cap outside MIG, so the share is advisory);
* every other GPU goes whole to one server.

Reservations are the zone's GPU registry (``MEDZONE_HOME/sandbox/gpu-sessions.json``), the
same one ``medzone sandbox exec`` and template runs use; a MIG slice is recorded under a
number of its own (:func:`mig_registry_index`). A profile that is full says who holds its
devices, since when, and when they free up, instead of a bare error.
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Conflict, InvalidInput
from .processes import pid_alive
from .sandbox.gpus import GpuDevice

CPU, GPU, SHARED, MIG = "cpu", "gpu", "shared", "mig"
#: The user option a spawn request carries (the form's field; a JSON body of the REST API).
OPTION = "profile"
ENV_MEMORY_FRACTION = "MEDZONE_GPU_MEMORY_FRACTION"


@dataclass(frozen=True)
class MigSlice:
    """One MIG slice: its parent GPU's index, its UUID (``MIG-…``) and profile name."""

    parent: int
    uuid: str
    name: str = ""
    slot: int = 0  # its position on the parent (0, 1, …)


def mig_registry_index(mig: MigSlice) -> int:
    """The number a MIG slice is recorded under in the GPU registry (never a GPU index)."""
    return 10000 + mig.parent * 100 + mig.slot


def slice_device(mig: MigSlice, parent: GpuDevice) -> GpuDevice:
    """The slice as the registry and the sandbox see it: the parent's node, the slice's UUID."""
    return GpuDevice(mig_registry_index(mig), parent.path, mig.uuid)


def detect_mig_slices() -> list[MigSlice]:
    """MIG slices through NVML; none where there is no driver or no MIG."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver
        return []
    found = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            try:
                current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
            except Exception:  # noqa: BLE001 - no MIG on this GPU
                continue
            if not current:
                continue
            minor = pynvml.nvmlDeviceGetMinorNumber(handle)
            for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                except Exception:  # noqa: BLE001 - an empty slot
                    continue
                uuid = pynvml.nvmlDeviceGetUUID(mig)
                name = pynvml.nvmlDeviceGetName(mig)
                found.append(MigSlice(minor, _text(uuid), _text(name), slot))
    finally:
        pynvml.nvmlShutdown()
    return found


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class Choice:
    """One profile as the form offers it."""

    key: str  # "cpu", "gpu", "shared", "mig:<uuid>"
    label: str
    free: bool = True
    detail: str = ""  # who holds it and when it frees up, when full
    devices: list[GpuDevice] = field(default_factory=list)
    per_gpu: int = 1


@dataclass
class Inventory:
    """The GPUs of the machine, split into the profiles' pools."""

    whole: list[GpuDevice]
    shared: list[GpuDevice]
    slices: list[tuple[MigSlice, GpuDevice]]
    shared_sessions: int = 2

    @classmethod
    def build(cls, gpus: list[GpuDevice], slices: list[MigSlice], shared_indices,
              shared_sessions: int) -> "Inventory":
        by_index = {g.index: g for g in gpus}
        mig_parents = {s.parent for s in slices}
        shared_indices = set(shared_indices)
        return cls(
            whole=[g for g in gpus if g.index not in mig_parents | shared_indices],
            shared=[g for g in gpus if g.index in shared_indices - mig_parents],
            slices=[(s, slice_device(s, by_index[s.parent])) for s in slices
                    if s.parent in by_index],
            shared_sessions=max(2, shared_sessions),
        )


def registry_entries(path: str | os.PathLike | None) -> dict:
    """The GPU registry's live reservations (read only; entries of exited owners left out)."""
    if not path:
        return {}
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in entries.items()
            if isinstance(v, dict) and pid_alive(v.get("pid"))}


def _holders(entries: dict, indices) -> list[dict]:
    return sorted((e for e in entries.values() if e.get("gpu") in set(indices)),
                  key=lambda e: e.get("since", 0))


def frees_up(idle_timeout: int | None, max_age: int | None, since: int | None) -> str:
    """When a server holding a device lets it go, in words."""
    parts = ["when that server stops"]
    if idle_timeout:
        parts.append(f"or after {_duration(idle_timeout)} without activity")
    if max_age and since:
        parts.append(f"at the latest at {time.strftime('%H:%M', time.localtime(since + max_age))}")
    return ", ".join(parts)


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def describe_full(entries: dict, indices, *, idle_timeout=None, max_age=None) -> str:
    """Who holds the devices *indices* (user and since when) and when they free up."""
    holders = _holders(entries, indices)
    if not holders:
        return "all in use"
    who = ", ".join(f"{h.get('user', '?')} since "
                    f"{time.strftime('%H:%M', time.localtime(h.get('since', 0)))}"
                    for h in holders[:5])
    if len(holders) > 5:
        who += f" and {len(holders) - 5} more"
    first = holders[0].get("since")
    return f"in use by {who}; frees up {frees_up(idle_timeout, max_age, first)}"


def choices(inv: Inventory, *, gpu_allowed: bool, entries: dict,
            idle_timeout: int | None = None, max_age: int | None = None) -> list[Choice]:
    """The profiles a person may choose (CPU always; GPU profiles with the GPU role)."""
    out = [Choice(CPU, "CPU only")]
    if not gpu_allowed:
        return out
    kw = dict(idle_timeout=idle_timeout, max_age=max_age)
    used = {}
    for e in entries.values():
        used[e.get("gpu")] = used.get(e.get("gpu"), 0) + 1
    if inv.whole:
        free = [g for g in inv.whole if not used.get(g.index)]
        out.append(Choice(GPU, f"One whole GPU ({len(free)} of {len(inv.whole)} free)",
                          bool(free), "" if free else
                          describe_full(entries, [g.index for g in inv.whole], **kw),
                          inv.whole, 1))
    if inv.shared:
        n = inv.shared_sessions
        free = [g for g in inv.shared if used.get(g.index, 0) < n]
        out.append(Choice(SHARED, f"A shared GPU (1/{n} of its memory; "
                                  f"{len(free)} of {len(inv.shared)} with room)",
                          bool(free), "" if free else
                          describe_full(entries, [g.index for g in inv.shared], **kw),
                          inv.shared, n))
    for mig, device in inv.slices:
        free = not used.get(device.index)
        name = f" {mig.name}" if mig.name else ""
        out.append(Choice(f"{MIG}:{mig.uuid}", f"MIG slice{name} on GPU {mig.parent}: {mig.uuid}",
                          free, "" if free else describe_full(entries, [device.index], **kw),
                          [device], 1))
    return out


def pick(all_choices: list[Choice], key: str) -> Choice:
    """The choice named *key*; :class:`InvalidInput` for one not offered, :class:`Conflict`
    (saying who holds it and when it frees up) for one that is full."""
    for choice in all_choices:
        if choice.key == key:
            if not choice.free:
                raise Conflict(f"{choice.label.split(' (')[0]} is not available: {choice.detail}")
            return choice
    offered = ", ".join(c.key for c in all_choices)
    raise InvalidInput(f"profile {key!r} is not offered to you (offered: {offered})")


def form_html(all_choices: list[Choice], default: str | None = None) -> str:
    """The spawn form: one radio button per profile; a full one disabled, with who holds it."""
    default = default or next((c.key for c in all_choices if c.free), CPU)
    rows = []
    for c in all_choices:
        checked = " checked" if c.key == default and c.free else ""
        disabled = "" if c.free else " disabled"
        detail = (f'<div class="medzone-profile-full" style="margin-left:1.6em;color:#8a4b00">'
                  f"{html.escape(c.detail)}</div>") if c.detail else ""
        rows.append(
            f'<div class="radio"><label><input type="radio" name="{OPTION}" '
            f'value="{html.escape(c.key, quote=True)}"{checked}{disabled}> '
            f"{html.escape(c.label)}</label>{detail}</div>")
    return ('<div class="form-group medzone-profiles"><p>Choose the resources for your '
            "server. Memory, CPU and process limits apply to every profile.</p>"
            + "".join(rows) + "</div>")


__all__ = ["CPU", "GPU", "MIG", "OPTION", "SHARED", "Choice", "Inventory", "MigSlice",
           "choices", "describe_full", "detect_mig_slices", "form_html", "mig_registry_index",
           "pick", "registry_entries"]
