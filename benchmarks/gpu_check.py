"""Check MedZone's GPU metering on a machine with an NVIDIA GPU (NVML and a driver).

    python -m benchmarks.gpu_check [--seconds 10] [--gpu 0] [--out FILE]

What it does, on one GPU:

1. an **idle** phase: :class:`medzone_hub.metering.GpuMeter` over *seconds* with nothing
   running (the energy an idle GPU draws; GPU-seconds should be near 0);
2. a **busy** phase: a child process runs a float32 matmul loop with ``torch.cuda`` for
   *seconds*, metered exactly as a sandboxed run is (:class:`medzone_hub.metering.Meter`:
   started with the process, ``wait4`` when it ends, ``finish``);
3. a **cross-check** of the energy: NVML's power readings (``nvmlDeviceGetPowerUsage``,
   mW), sampled by this script on its own during the busy phase, integrated over time,
   against the energy counter's delta the meter reported.

It prints a JSON report (and writes it with ``--out``) with the measured values and these
checks: the busy phase's GPU-seconds are more than half its wall time and more than the
idle phase's; its memory peak is at least the tensors' size; its energy is more than the
idle phase's and within 25% of the integrated power. Exit status 0 when every check holds,
1 when one fails, 2 when there is nothing to check here (no NVML or no GPU: the report
says so; nothing is made up).

Without torch built for CUDA the busy phase cannot load the GPU: the report says so and
only the idle phase is checked.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from medzone_hub import metering
from medzone_hub.sandbox import detect_gpus

#: The busy phase's child: matmuls on GPU 0 of what it sees, for *seconds*; prints the
#: bytes its tensors hold.
BUSY = r"""
import sys, time
import torch
seconds = float(sys.argv[1])
n = 4096
a = torch.randn(n, n, device="cuda")
b = torch.randn(n, n, device="cuda")
c = torch.empty(n, n, device="cuda")
print(3 * n * n * 4, flush=True)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
"""


def _torch_cuda() -> str | None:
    """Why the busy phase cannot run (``None`` if it can)."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return "torch is not installed"
    if probe.stdout.strip() != "True":
        return "torch is installed without CUDA (or sees no GPU)"
    return None


class PowerSampler:
    """Integrates ``nvmlDeviceGetPowerUsage`` (mW) over time, independently of the meter."""

    def __init__(self, handle, interval: float = 0.1):
        import pynvml

        self.nvml, self.handle, self.interval = pynvml, handle, interval
        self.joules = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            watts = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000
            self.joules += watts * (now - last)
            self.samples += 1
            last = now

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.joules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--gpu", type=int, default=0, help="minor number (/dev/nvidiaN)")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)

    report: dict = {"machine": platform.node(), "python": platform.python_version(),
                    "seconds": args.seconds, "checks": {}}
    gpus = [g for g in detect_gpus() if g.index == args.gpu]
    if not metering.nvml_available() or not gpus:
        report["result"] = ("not checked: " + ("NVML does not answer here (nvidia-ml-py "
                            "missing or no driver)" if not metering.nvml_available()
                            else f"no /dev/nvidia{args.gpu}"))
        print(json.dumps(report, indent=2))
        return 2
    import pynvml

    pynvml.nvmlInit()
    gpu = gpus[0]
    handle = metering._handle(pynvml, gpu)
    report["gpu"] = {"name": str(pynvml.nvmlDeviceGetName(handle)), "uuid": gpu.uuid,
                     "driver": str(pynvml.nvmlSystemGetDriverVersion()),
                     "nvidia_ml_py": getattr(pynvml, "__version__", None)}

    # 1. idle
    idle = metering.GpuMeter.start([gpu])
    time.sleep(args.seconds)
    gpu_s, mem_peak, energy_j = idle.stop()
    report["idle"] = {"gpu_s": gpu_s, "gpu_mem_peak_bytes": mem_peak, "energy_j": energy_j}

    # 2. busy, metered as a sandboxed run is
    why_not = _torch_cuda()
    if why_not is not None:
        report["busy"] = {"skipped": why_not}
    else:
        env = {"CUDA_VISIBLE_DEVICES": gpu.uuid or str(gpu.index), "PATH": "/usr/bin:/bin",
               "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        power = PowerSampler(handle)
        proc = subprocess.Popen([sys.executable, "-c", BUSY, str(args.seconds)], env=env,
                                stdout=subprocess.PIPE, text=True)
        meter = metering.Meter([], [gpu])
        tensor_bytes = int(proc.stdout.readline() or 0)
        rc = meter.wait(proc)
        measured = meter.finish()
        integrated = power.stop()
        report["busy"] = {"rc": rc, "tensor_bytes": tensor_bytes, **measured.as_dict(),
                          "power_integrated_j": round(integrated, 1),
                          "power_samples": power.samples}
        busy = report["busy"]
        checks = report["checks"]
        checks["gpu_s > half the wall time"] = (busy["gpu_s"] or 0) > 0.5 * busy["wall_s"]
        checks["gpu_s busy > idle"] = (busy["gpu_s"] or 0) > (gpu_s or 0)
        checks["memory peak >= tensors"] = (busy["gpu_mem_peak_bytes"] or 0) >= tensor_bytes
        if busy["energy_j"] is not None and energy_j is not None:
            checks["energy busy > idle"] = busy["energy_j"] > energy_j
            checks["energy within 25% of integrated power"] = (
                abs(busy["energy_j"] - integrated) <= 0.25 * integrated)
        else:
            report["energy"] = "the energy counter is not supported on this GPU (not measured)"
    if energy_j is not None:
        report["checks"]["idle energy > 0"] = energy_j > 0
    pynvml.nvmlShutdown()

    report["result"] = "ok" if all(report["checks"].values()) else "FAILED"
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["result"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
