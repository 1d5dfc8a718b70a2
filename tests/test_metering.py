"""Metering: CPU-seconds, memory peak and wall time of a REAL bubblewrap sandbox, from its
cgroup where one is made and from the kernel's accounting of its process tree where not;
GPU fields with NVML absent are not measured (``None``, shown ``—``), never 0.

The busy loops burn a known amount of CPU: each stops once its own ``time.process_time()``
reaches a target, and reports the value it reached; the meter must agree within ±10%.
CPU time does not depend on how busy the shared machine is (wall time does: nothing here
asserts on it beyond its sign).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from medzone_hub import accounts, metering
from medzone_hub.config import MedZoneHome
from medzone_hub.db import connect
from medzone_hub.sandbox import GpuDevice, SandboxConfig, cgroup_members, start_sandboxed
from medzone_hub.sessions import policy_for, run_in_sandbox

from .fixtures import sandbox_base

#: CPU-seconds each busy loop burns.
BUSY_S = 3.0
#: Bytes the memory probe allocates and touches.
ALLOCATED = 150 * 1024 * 1024


def _busy(seconds: float, report: str, allocate: int = 0, then_sleep: bool = False) -> str:
    """Python source: touch *allocate* bytes, burn *seconds* of CPU, write the CPU time
    reached to *report* (inside the sandbox), then sleep (a server) or exit (a run)."""
    return (
        "import time\n"
        f"block = bytearray({allocate})\n"
        "for i in range(0, len(block), 4096):\n"
        "    block[i] = 1\n"
        f"while time.process_time() < {seconds}:\n"
        "    pass\n"
        f"open({report!r} + '.tmp', 'w').write(repr(time.process_time()))\n"
        "import os\n"
        f"os.rename({report!r} + '.tmp', {report!r})\n"
        + ("time.sleep(600)\n" if then_sleep else "")
    )


@pytest.fixture(scope="module")
def zone():
    with sandbox_base("medzone-metering-") as base:
        home = MedZoneHome(base / "home").ensure()
        store = connect(home.db_url)
        with store.session() as session:
            accounts.add_user(session, "alice", actor="test")
        yield home, store
        store.close()


def _home_file(home: MedZoneHome, rel: str) -> Path:
    return home.root / "homes" / "alice" / rel


def _within(measured: float | None, known: float, tolerance: float = 0.10) -> bool:
    return measured is not None and abs(measured - known) <= tolerance * known


def test_a_busy_loop_in_a_real_sandbox_is_metered_within_ten_percent(zone):
    home, store = zone
    code = _busy(BUSY_S, "/home/alice/busy-run.txt", allocate=ALLOCATED)
    rc = run_in_sandbox(home, store, "alice", [sys.executable, "-c", code])
    assert rc == 0
    measured = metering.take_last()
    known = float(_home_file(home, "busy-run.txt").read_text())
    assert known >= BUSY_S
    assert _within(measured.cpu_s, known), (measured.cpu_s, known, measured.sources)
    # The default policy has a memory limit, so the sandbox had a cgroup: read from it.
    assert measured.sources["cpu_s"].startswith("cgroup"), measured.sources
    assert measured.mem_peak_bytes >= ALLOCATED, measured.sources
    assert measured.wall_s > 0 and measured.ended >= measured.started
    # Taken once: a later run in this thread does not find it again.
    assert metering.take_last() is None
    # No GPU held, so GPU quantities were not measured: None, not 0.
    assert (measured.gpu_s, measured.gpu_mem_peak_bytes, measured.energy_j) == (None,) * 3


def test_without_a_cgroup_the_kernel_accounting_of_the_tree_is_used(zone):
    home, store = zone
    no_limits = SandboxConfig(memory_limit_bytes=None, cpu_limit=None, pids_limit=None)
    code = _busy(BUSY_S, "/home/alice/busy-nocg.txt", allocate=ALLOCATED)
    rc = run_in_sandbox(home, store, "alice", [sys.executable, "-c", code], config=no_limits)
    assert rc == 0
    measured = metering.take_last()
    known = float(_home_file(home, "busy-nocg.txt").read_text())
    assert "cgroup" not in measured.sources["cpu_s"], measured.sources
    assert _within(measured.cpu_s, known), (measured.cpu_s, known, measured.sources)
    # The largest process's peak resident set: the probe's own allocation at least.
    assert measured.mem_peak_bytes >= ALLOCATED


def _wait_for_file(path: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def test_a_running_server_sandbox_is_measured_before_it_stops(zone):
    """What the spawner does at stop: measure the live tree (and its cgroup), then kill."""
    home, store = zone
    with store.session() as session:
        policy = policy_for(home, session, "alice")
    code = _busy(BUSY_S, "/home/alice/busy-server.txt", allocate=ALLOCATED, then_sleep=True)

    async def scenario():
        box = await start_sandboxed(policy, [sys.executable, "-c", code], home=home,
                                    keeper=True)
        try:
            known = float(await asyncio.to_thread(
                _wait_for_file, _home_file(home, "busy-server.txt")))
            folders = cgroup_members(box.cgroup) if box.cgroup else []
            from_cgroup = metering.measure_tree(box.child_pid, box.child_start, folders,
                                                datasets=["ds-x"])
            from_proc = metering.measure_tree(box.child_pid, box.child_start, [])
        finally:
            await box.stop()
            await box.finish()
        return known, from_cgroup, from_proc

    known, from_cgroup, from_proc = asyncio.run(scenario())
    assert _within(from_cgroup.cpu_s, known), (from_cgroup.cpu_s, known, from_cgroup.sources)
    assert from_cgroup.mem_peak_bytes >= ALLOCATED
    assert from_cgroup.datasets == ("ds-x",)
    assert from_proc.sources["cpu_s"] == "/proc stat of the live tree"
    assert _within(from_proc.cpu_s, known), (from_proc.cpu_s, known)
    assert from_proc.mem_peak_bytes >= ALLOCATED
    assert from_proc.wall_s >= 0
    # Once it is gone and has no cgroup, nothing is left to read: not measured.
    gone = metering.measure_tree(box_pid := 2 ** 22 + 1, None, [])
    assert box_pid and gone.cpu_s is None and gone.mem_peak_bytes is None


# --- GPUs -----------------------------------------------------------------------------

NVML = metering.nvml_available()


@pytest.mark.skipif(NVML, reason="NVML answers here: the GPU path is checked instead")
def test_without_nvml_gpu_fields_are_not_measured_never_zero(zone, monkeypatch):
    home, store = zone
    gpu = GpuDevice(0, "/dev/nvidia0", None)
    # nvidia-ml-py is installed but there is no driver: nvmlInit fails.
    assert metering.GpuMeter.start([gpu]) is None
    # And with the module itself absent.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert metering.GpuMeter.start([gpu]) is None
    meter = metering.Meter([], [gpu], ["ds-a"])
    measured = meter.finish()
    assert measured.gpu_s is None and measured.gpu_mem_peak_bytes is None
    assert measured.energy_j is None
    assert "gpu_s" not in measured.sources
    assert metering.show(measured.gpu_s, "s") == metering.NOT_MEASURED == "—"
    assert metering.show(0.0, "s") == "0.0 s"  # a real zero is shown as zero
    as_json = json.loads(json.dumps(measured.as_dict()))
    assert as_json["gpu_s"] is None and as_json["energy_j"] is None


@pytest.mark.skipif(not NVML, reason="no NVIDIA driver here (run benchmarks/gpu_check.py on a GPU machine)")
def test_on_a_gpu_machine_the_energy_counter_moves():
    from medzone_hub.sandbox import detect_gpus

    gpus = detect_gpus()
    assert gpus, "NVML answers but no /dev/nvidiaN"
    meter = metering.GpuMeter.start(gpus[:1], interval=0.1)
    assert meter is not None
    time.sleep(1.0)
    busy_s, mem_peak, energy_j = meter.stop()
    assert busy_s >= 0 and mem_peak is not None and mem_peak >= 0
    # An idle GPU still draws power: the counter (where supported) moves over a second.
    assert energy_j is None or energy_j > 0


class _MigLikeNvml:
    """NVML's answers for a MIG slice: memory, but no utilisation or energy counter of its
    own (a stand-in for the bookkeeping only: the real NVML path is checked on a GPU
    machine by benchmarks/gpu_check.py and the test above)."""

    class NVMLError(Exception):
        pass

    def __init__(self, used: list[int]):
        self.used = list(used)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetUtilizationRates(self, handle):
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Memory", (), {"used": self.used.pop(0) if len(self.used) > 1 else self.used[0]})

    def nvmlShutdown(self):
        pass


def test_counters_nvml_cannot_give_are_not_measured_rather_than_zero():
    nvml = _MigLikeNvml([1000, 5000, 3000])
    meter = metering.GpuMeter(nvml, ["slice"], interval=60)
    meter.sample()
    gpu_s, mem_peak, energy_j = meter.stop()
    assert gpu_s is None and energy_j is None  # no counter: not measured, not 0
    assert mem_peak == 4000  # the most above what the slice held at the start


# --- the files read -------------------------------------------------------------------------

def test_cgroup_files_of_both_versions_are_read(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    (v2 / "memory.peak").write_text("123456789\n")
    assert metering.cgroup_cpu_seconds([v2]) == (2.5, "cgroup cpu.stat usage_usec")
    assert metering.cgroup_memory_peak([v2]) == (123456789, "cgroup memory.peak")
    memory, cpu, cpuacct = (tmp_path / n for n in ("memory", "cpu", "cpuacct"))
    for folder in (memory, cpu, cpuacct):
        folder.mkdir()
    (memory / "memory.max_usage_in_bytes").write_text("4096\n")
    (cpu / "cpu.stat").write_text("nr_periods 0\nnr_throttled 0\nthrottled_time 0\n")
    (cpuacct / "cpuacct.usage").write_text("1500000000\n")
    folders = [memory, cpu, cpuacct]
    assert metering.cgroup_cpu_seconds(folders) == (1.5, "cgroup cpuacct.usage")
    assert metering.cgroup_memory_peak(folders) == (4096, "cgroup memory.max_usage_in_bytes")
    # A v1 cpu hierarchy without cpuacct accounts no CPU: not measured.
    assert metering.cgroup_cpu_seconds([memory, cpu]) == (None, None)
