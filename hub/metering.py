"""Metering: what a sandboxed process tree used.

For every sandbox it measures

* **wall time** (seconds, monotonic clock, from start to end);
* **CPU-seconds** (user + system, every process of the tree): the sandbox cgroup's
  ``cpu.stat`` ``usage_usec`` (cgroup v2) or ``cpuacct.usage`` (cgroup v1, where the cpu
  and cpuacct controllers are mounted together); else the kernel's accounting of the tree:
  ``wait4`` resource usage of bubblewrap's monitor once it is reaped (a finished run), or
  the sum over the live tree's ``/proc/<pid>/stat`` of its own and its reaped children's
  times (a server measured before it is stopped);
* **peak memory** (bytes): the cgroup's ``memory.peak`` (v2) or
  ``memory.max_usage_in_bytes`` (v1, page cache included); without a cgroup, the largest
  single process's peak resident set (``ru_maxrss`` / ``VmHWM``: a lower bound for a tree);
* where NVIDIA GPUs exist and NVML answers (``nvidia-ml-py``): **GPU-seconds** (the
  integral of the GPU's utilisation, sampled every :data:`GPU_SAMPLE_INTERVAL` seconds: a
  GPU busy half the time for 10 s is 5 GPU-seconds), the **GPU memory peak** (bytes, the
  sandbox's processes where NVML lists them, else the device's use above what it held when
  the sandbox started) and the **energy** (joules: the delta of
  ``nvmlDeviceGetTotalEnergyConsumption``, millijoules, over the sandbox's life).

What is not measured is ``None``, never 0: no NVML (the module absent, or no driver: its
``nvmlInit`` fails), a sandbox without a GPU, a GPU whose energy counter is not supported,
a cgroup that offers no CPU accounting while the tree is gone.

This module reads the kernel and NVML only; it knows no store (:mod:`medzone_hub.usage`
records what it measures). The sandbox lifecycle (:mod:`medzone_hub.sandbox.process`)
meters every :func:`~medzone_hub.sandbox.run_sandboxed` call and leaves the result for the
thread that made it (:func:`take_last`); a server is measured by :func:`measure_tree`
before it is stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Seconds between two NVML samples of a GPU's utilisation and memory.
GPU_SAMPLE_INTERVAL = 0.5

#: Shown for a quantity that was not measured.
NOT_MEASURED = "—"

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Usage:
    """What one sandbox used. ``sources`` says where each measured quantity came from."""

    started: datetime
    ended: datetime
    wall_s: float
    cpu_s: float | None = None
    mem_peak_bytes: int | None = None
    gpu_s: float | None = None
    gpu_mem_peak_bytes: int | None = None
    energy_j: float | None = None
    datasets: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"started": self.started.isoformat(timespec="seconds"),
                "ended": self.ended.isoformat(timespec="seconds"),
                "wall_s": round(self.wall_s, 3), "cpu_s": _round(self.cpu_s),
                "mem_peak_bytes": self.mem_peak_bytes, "gpu_s": _round(self.gpu_s),
                "gpu_mem_peak_bytes": self.gpu_mem_peak_bytes,
                "energy_j": _round(self.energy_j), "datasets": list(self.datasets),
                "sources": dict(self.sources)}


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def show(value: float | int | None, unit: str = "", digits: int = 1) -> str:
    """A measured value for people: ``—`` when it was not measured (never ``0``)."""
    if value is None:
        return NOT_MEASURED
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return f"{text} {unit}".rstrip()


# --- cgroups ---------------------------------------------------------------------------

def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_cpu_seconds(folders: Iterable[str | os.PathLike]) -> tuple[float | None, str | None]:
    """CPU-seconds charged to a cgroup (its folders: one for v2, one per v1 hierarchy) and
    the file read; ``(None, None)`` if none of them accounts CPU."""
    for folder in map(Path, folders):
        text = _read(folder / "cpu.stat")
        for line in (text or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6, "cgroup cpu.stat usage_usec"
        text = _read(folder / "cpuacct.usage")
        if text and text.strip().isdigit():
            return int(text) / 1e9, "cgroup cpuacct.usage"
    return None, None


def cgroup_memory_peak(folders: Iterable[str | os.PathLike]) -> tuple[int | None, str | None]:
    """The peak memory charged to a cgroup (bytes) and the file read; ``(None, None)`` if
    none of its folders records one."""
    for folder in map(Path, folders):
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            text = _read(folder / name)
            if text and text.strip().isdigit():
                return int(text), f"cgroup {name}"
    return None, None


def cgroup_pids(folders: Iterable[str | os.PathLike]) -> set[int]:
    """The processes in a cgroup (host pids)."""
    pids: set[int] = set()
    for folder in map(Path, folders):
        for line in (_read(folder / "cgroup.procs") or "").split():
            with contextlib.suppress(ValueError):
                pids.add(int(line))
    return pids


# --- the kernel's accounting of a process tree ----------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    text = _read(Path(f"/proc/{pid}/stat"))
    if text is None:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return text.rsplit(")", 1)[1].split()


def tree_pids(root: int) -> list[int]:
    """*root* and every process descending from it (host pids), while they run."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    if _stat_fields(root) is None:
        return []
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(pids: Iterable[int]) -> float | None:
    """CPU-seconds of a live tree: each process's own user and system time plus those of
    its children it has reaped (what a dead process used is counted once, in the live
    ancestor that reaped it). ``None`` when none of *pids* runs."""
    ticks, seen = 0, False
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        seen = True
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / _CLK_TCK if seen else None


def tree_rss_peak(pids: Iterable[int]) -> int | None:
    """The largest peak resident set (``VmHWM``) among *pids*, in bytes."""
    peak = None
    for pid in pids:
        for line in (_read(Path(f"/proc/{pid}/status")) or "").splitlines():
            if line.startswith("VmHWM:"):
                value = int(line.split()[1]) * 1024
                peak = value if peak is None else max(peak, value)
    return peak


def boot_time() -> float:
    """When the machine booted (seconds since the epoch, from ``/proc/stat``)."""
    for line in (_read(Path("/proc/stat")) or "").splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return time.time() - time.monotonic()


def process_started(start_ticks: int | None) -> datetime | None:
    """A process's start time (``/proc/<pid>/stat`` field 22, clock ticks since boot) as a
    UTC datetime."""
    if start_ticks is None:
        return None
    return datetime.fromtimestamp(boot_time() + start_ticks / _CLK_TCK, timezone.utc)


def wait_process(proc) -> tuple[int, resource.struct_rusage]:
    """Reap the :class:`subprocess.Popen` *proc* with ``wait4``: its return code (negative
    for a signal, as Popen's) and the resource usage of it and every descendant it (or they)
    reaped."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


# --- NVIDIA GPUs through NVML -------------------------------------------------------------

def _nvml():
    """The ``pynvml`` module, initialised; ``None`` when NVML cannot answer here (module
    absent or no driver)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded…
        log.debug("NVML unavailable: %s", err)
        return None
    return pynvml


def nvml_available() -> bool:
    """Whether NVML answers on this machine (``nvidia-ml-py`` installed and a driver)."""
    nvml = _nvml()
    if nvml is None:
        return False
    with contextlib.suppress(Exception):
        nvml.nvmlShutdown()
    return True


def _handle(nvml, gpu):
    """NVML's handle of *gpu* (a :class:`~medzone_hub.sandbox.GpuDevice`: by UUID when the
    driver listed one, else by the device node's minor number, which is not NVML's index)."""
    uuid = getattr(gpu, "uuid", None)
    if uuid:
        with contextlib.suppress(Exception):
            return nvml.nvmlDeviceGetHandleByUUID(uuid)
    minor = getattr(gpu, "index", gpu)
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        with contextlib.suppress(Exception):
            if nvml.nvmlDeviceGetMinorNumber(handle) == minor:
                return handle
    raise LookupError(f"NVML lists no GPU with minor number {minor}")


class GpuMeter:
    """GPU-seconds, GPU memory peak and energy of the GPUs a sandbox holds, from NVML.

    :meth:`start` returns ``None`` when there is nothing to measure (no GPU, no NVML): the
    GPU fields then stay ``None``. A thread samples utilisation and memory every *interval*
    seconds until :meth:`stop`. *pids*, when given, is called for the sandbox's host pids:
    the memory peak is then that of the sandbox's own processes where NVML lists them.
    """

    def __init__(self, nvml, handles: list, interval: float, pids=None):
        self.nvml, self.handles, self.interval, self.pids = nvml, handles, interval, pids
        self.busy_s = 0.0
        self.util_measured = False  # a MIG slice, say, has no utilisation counter
        self.mem_peak: int | None = None
        self.energy_start: list[int | None] = [self._energy(h) for h in handles]
        self.mem_base = [self._used(h) for h in handles]
        self._stop = threading.Event()
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="medzone-gpu-meter",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, gpus: Sequence, *, interval: float = GPU_SAMPLE_INTERVAL,
              pids=None) -> GpuMeter | None:
        gpus = [g for g in gpus if g is not None]
        if not gpus:
            return None
        nvml = _nvml()
        if nvml is None:
            return None
        try:
            handles = [_handle(nvml, g) for g in gpus]
        except Exception as err:  # noqa: BLE001 - an NVML error or a GPU NVML does not list
            log.warning("warning: GPU usage is not measured: %s", err)
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()
            return None
        return cls(nvml, handles, interval, pids)

    def _energy(self, handle) -> int | None:
        try:
            return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(handle))  # mJ
        except Exception:  # noqa: BLE001 - NVMLError_NotSupported on older GPUs
            return None

    def _used(self, handle) -> int | None:
        try:
            return int(self.nvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:  # noqa: BLE001
            return None

    def _process_memory(self, handle) -> int | None:
        if self.pids is None:
            return None
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:  # noqa: BLE001
            return None
        mine = set(self.pids())
        sizes = [p.usedGpuMemory for p in procs if p.pid in mine]
        if any(size is None for size in sizes):
            return None  # NVML does not tell per-process memory here
        return sum(sizes)

    def sample(self) -> None:
        now = time.monotonic()
        dt, self._last = now - self._last, now
        memory = None
        for handle, base in zip(self.handles, self.mem_base):
            with contextlib.suppress(Exception):
                self.busy_s += self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100 * dt
                self.util_measured = True
            own = self._process_memory(handle)
            if own is None:
                used = self._used(handle)
                own = None if used is None or base is None else max(0, used - base)
            if own is not None:
                memory = (memory or 0) + own
        if memory is not None:
            self.mem_peak = memory if self.mem_peak is None else max(self.mem_peak, memory)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> tuple[float | None, int | None, float | None]:
        """Stop sampling: ``(GPU-seconds, memory peak in bytes, energy in joules)``, each
        ``None`` where NVML could not tell it (a MIG slice has no utilisation or energy
        counter of its own)."""
        self._stop.set()
        self._thread.join()
        self.sample()
        energy = None
        ends = [self._energy(h) for h in self.handles]
        if all(s is not None and e is not None for s, e in zip(self.energy_start, ends)):
            energy = sum(e - s for s, e in zip(self.energy_start, ends)) / 1000
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()
        return (self.busy_s if self.util_measured else None), self.mem_peak, energy


# --- one sandbox, start to end ---------------------------------------------------------------

#: Seconds between two samples of a sandbox's process tree where no cgroup counts its CPU.
TREE_SAMPLE_INTERVAL = 0.25


class _TreeSampler:
    """Samples the CPU time and the largest peak resident set of the tree under *root*."""

    def __init__(self, root: int, interval: float):
        self.root, self.interval = root, interval
        self.cpu: float | None = None
        self.rss: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="medzone-tree-meter",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            pids = tree_pids(self.root)
            cpu, rss = tree_cpu_seconds(pids), tree_rss_peak(pids)
            if cpu is not None:
                self.cpu = max(self.cpu or 0.0, cpu)
            if rss is not None:
                self.rss = max(self.rss or 0, rss)
            if self._stop.wait(self.interval):
                return

    def stop(self) -> tuple[float | None, int | None]:
        self._stop.set()
        self._thread.join()
        return self.cpu, self.rss


class Meter:
    """Meters one sandbox: made when it starts, :meth:`wait` reaps it (``wait4``),
    :meth:`finish` reads its cgroup (before it is removed) and stops the GPU sampling."""

    def __init__(self, cgroup_folders: Iterable[str | os.PathLike] = (), gpus: Sequence = (),
                 datasets: Iterable[str] = (), *, interval: float = GPU_SAMPLE_INTERVAL):
        self.cgroup = [Path(f) for f in cgroup_folders]
        self.datasets = tuple(sorted(datasets))
        self.started = _utcnow()
        self._t0 = time.monotonic()
        self.rusage: resource.struct_rusage | None = None
        self.sampled: tuple[float | None, int | None] = (None, None)
        pids = (lambda: cgroup_pids(self.cgroup)) if self.cgroup else None
        self.gpu = GpuMeter.start(gpus, interval=interval, pids=pids)

    def wait(self, proc) -> int:
        """Reap *proc* (the sandbox's bubblewrap), keeping its tree's resource usage. Where
        the cgroup does not account CPU, the live tree is sampled meanwhile (bubblewrap's
        monitor exits without reaping the sandbox, so ``wait4`` alone misses it)."""
        sampler = None
        if cgroup_cpu_seconds(self.cgroup)[0] is None:
            sampler = _TreeSampler(proc.pid, TREE_SAMPLE_INTERVAL)
        try:
            rc, self.rusage = wait_process(proc)
        finally:
            if sampler is not None:
                self.sampled = sampler.stop()
        return rc

    def finish(self) -> Usage:
        wall = time.monotonic() - self._t0
        usage = Usage(started=self.started, ended=self.started + timedelta(seconds=wall),
                      wall_s=wall, datasets=self.datasets, sources={"wall_s": "monotonic clock"})
        usage.cpu_s, source = cgroup_cpu_seconds(self.cgroup)
        if usage.cpu_s is None and self.rusage is not None:
            # Without a cgroup: the larger of the monitor's wait4 account and the samples
            # of the live tree (a lower bound: the last interval before the end is missed).
            usage.cpu_s = max(self.rusage.ru_utime + self.rusage.ru_stime,
                              self.sampled[0] or 0.0)
            source = "wait4 rusage and /proc samples of the tree (lower bound)"
        if source:
            usage.sources["cpu_s"] = source
        usage.mem_peak_bytes, source = cgroup_memory_peak(self.cgroup)
        if usage.mem_peak_bytes is None and self.rusage is not None:
            usage.mem_peak_bytes = max(self.rusage.ru_maxrss * 1024, self.sampled[1] or 0)
            source = "largest process's peak resident set (lower bound)"
        if source:
            usage.sources["mem_peak_bytes"] = source
        _finish_gpu(usage, self.gpu)
        self.gpu = None
        return usage


def _finish_gpu(usage: Usage, gpu: GpuMeter | None) -> None:
    if gpu is None:
        return
    usage.gpu_s, usage.gpu_mem_peak_bytes, usage.energy_j = gpu.stop()
    if usage.gpu_s is not None:
        usage.sources["gpu_s"] = "nvml utilisation samples"
    if usage.gpu_mem_peak_bytes is not None:
        usage.sources["gpu_mem_peak_bytes"] = "nvml memory samples"
    if usage.energy_j is not None:
        usage.sources["energy_j"] = "nvml total energy counter"


# --- what the last sandbox of this thread used ---------------------------------------------

_last = threading.local()


def remember(usage: Usage) -> None:
    """Keep *usage* as what the last sandbox this thread ran used."""
    _last.usage = usage


def take_last(since: datetime | None = None) -> Usage | None:
    """What the last sandbox this thread ran used (once: it is forgotten), or ``None`` —
    also when it started before *since* (a sandbox of something earlier)."""
    usage = getattr(_last, "usage", None)
    _last.usage = None
    if usage is not None and since is not None and usage.started < since - timedelta(seconds=1):
        return None
    return usage


# --- long-lived sandboxes (servers) ------------------------------------------------------------

#: GPU meters of running servers' sandboxes, by ``(pid 1, its start time)``: kept by the
#: process that started them (a restarted hub has none: GPU fields are then not measured).
_watched: dict[tuple[int, int | None], GpuMeter] = {}
_watched_lock = threading.Lock()


def watch_gpus(child_pid: int, child_start: int | None, gpus: Sequence,
               cgroup_folders: Iterable[str | os.PathLike] = ()) -> None:
    """Start metering the GPUs of the long-lived sandbox whose pid 1 is *child_pid*."""
    folders = [Path(f) for f in cgroup_folders]
    pids = (lambda: cgroup_pids(folders)) if folders else (lambda: tree_pids(child_pid))
    meter = GpuMeter.start(gpus, pids=pids)
    if meter is not None:
        with _watched_lock:
            _watched[(child_pid, child_start)] = meter


def measure_tree(child_pid: int | None, child_start: int | None,
                 cgroup_folders: Iterable[str | os.PathLike] = (),
                 started: datetime | None = None, datasets: Iterable[str] = ()) -> Usage:
    """What the long-lived sandbox whose pid 1 is *child_pid* has used so far (call it just
    before stopping it): its cgroup where it accounts CPU/memory, else the kernel's
    accounting of the live tree; its GPUs if :func:`watch_gpus` metered them here."""
    folders = [Path(f) for f in cgroup_folders]
    ended = _utcnow()
    started = started or process_started(child_start) or ended
    usage = Usage(started=started, ended=ended,
                  wall_s=max(0.0, (ended - started).total_seconds()),
                  datasets=tuple(sorted(datasets)),
                  sources={"wall_s": "pid 1 start time to now"})
    fields = _stat_fields(child_pid) if child_pid is not None else None
    alive = fields is not None and (child_start is None or int(fields[19]) == child_start)
    pids = tree_pids(child_pid) if alive else []
    usage.cpu_s, source = cgroup_cpu_seconds(folders)
    if usage.cpu_s is None and pids:
        usage.cpu_s, source = tree_cpu_seconds(pids), "/proc stat of the live tree"
    if source:
        usage.sources["cpu_s"] = source
    usage.mem_peak_bytes, source = cgroup_memory_peak(folders)
    if usage.mem_peak_bytes is None and pids:
        usage.mem_peak_bytes = tree_rss_peak(pids)
        source = "/proc VmHWM (largest process)" if usage.mem_peak_bytes is not None else None
    if source:
        usage.sources["mem_peak_bytes"] = source
    with _watched_lock:
        gpu = _watched.pop((child_pid, child_start), None)
    _finish_gpu(usage, gpu)
    return usage


__all__ = [
    "GPU_SAMPLE_INTERVAL", "GpuMeter", "Meter", "NOT_MEASURED", "Usage", "boot_time",
    "cgroup_cpu_seconds", "cgroup_memory_peak", "cgroup_pids", "measure_tree",
    "nvml_available", "process_started", "remember", "show", "take_last", "tree_cpu_seconds",
    "tree_pids", "tree_rss_peak", "wait_process", "watch_gpus",
]
