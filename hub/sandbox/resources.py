"""What a sandbox holds on the host besides its processes: a GPU and a cgroup.

Both are taken and given back explicitly: :func:`reserve_gpu` records a GPU in the zone's
:class:`GpuRegistry` and binds it into a policy; :func:`sandbox_cgroup` makes a cgroup with
the policy's limits; :func:`release_resources` frees both. Building a policy takes neither.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import Conflict, InvalidInput
from ..processes import pid_alive
from .gpus import GpuDevice
from .policy import SandboxConfig, SandboxError, SandboxPolicy, _under

#: NVIDIA nodes every CUDA process needs besides its GPU's own ``/dev/nvidiaN``.
NVIDIA_SUPPORT_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")

#: Set by Slurm in a job given GPUs (``--gres=gpu:N``): their indices, e.g. ``0,2``.
SLURM_JOB_GPUS = "SLURM_JOB_GPUS"

#: The zone's GPU registry, in the sandbox state folder (``MEDZONE_HOME/sandbox``).
GPU_REGISTRY_NAME = "gpu-sessions.json"

_GPU_NODE = re.compile(r"nvidia(\d+)")


# --- GPUs ------------------------------------------------------------------------------


def detect_gpus(dev: str = "/dev", driver_proc: str = "/proc/driver/nvidia/gpus") -> list[GpuDevice]:
    """NVIDIA GPUs on this machine (``/dev/nvidiaN``), with UUIDs where the driver lists them."""
    try:
        names = os.listdir(dev)
    except OSError:
        return []
    uuids: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for bus in os.listdir(driver_proc):
            with contextlib.suppress(OSError, ValueError):
                text = Path(driver_proc, bus, "information").read_text()
                minor = re.search(r"Device Minor:\s*(\d+)", text)
                uuid = re.search(r"GPU UUID:\s*(\S+)", text)
                if minor and uuid:
                    uuids[int(minor.group(1))] = uuid.group(1)
    gpus = []
    for name in names:
        match = _GPU_NODE.fullmatch(name)
        if match:
            index = int(match.group(1))
            gpus.append(GpuDevice(index, os.path.join(dev, name), uuids.get(index)))
    job_gpus = os.environ.get(SLURM_JOB_GPUS)
    if job_gpus is not None:  # in a Slurm job: the GPUs Slurm gave it, and no others
        given = {int(i) for i in job_gpus.split(",") if i.strip().isdigit()}
        gpus = [g for g in gpus if g.index in given]
    return sorted(gpus, key=lambda g: g.index)


def nvidia_support_nodes(dev: str = "/dev") -> list[str]:
    nodes = [os.path.join(dev, n) for n in NVIDIA_SUPPORT_NODES if os.path.exists(os.path.join(dev, n))]
    caps = os.path.join(dev, "nvidia-caps")
    if os.path.isdir(caps):
        nodes += sorted(os.path.join(caps, n) for n in os.listdir(caps))
    return nodes


def choose_gpu(gpus: Sequence[GpuDevice], usage: Mapping[int, int], per_gpu: int) -> GpuDevice:
    """The least-used GPU with room (lowest index on ties); :class:`Conflict` when all are full."""
    if per_gpu < 1:
        raise InvalidInput(f"gpu_sessions_per_gpu must be at least 1, not {per_gpu}")
    free = [g for g in gpus if usage.get(g.index, 0) < per_gpu]
    if not free:
        raise Conflict(
            f"all {len(gpus)} GPU(s) are in use ({per_gpu} session(s) per GPU): "
            "stop another server or try again later"
        )
    return min(free, key=lambda g: (usage.get(g.index, 0), g.index))


class GpuRegistry:
    """Which sandbox holds which GPU: a small JSON file, changed under an exclusive lock.

    Each entry is keyed by the caller's name for the sandbox (the spawner: one per server)
    and records the GPU, the user and the pid of the process that owns the reservation;
    entries whose owner has exited are dropped, so a crashed ``exec`` frees its GPU.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries = json.loads(self.path.read_text()) if self.path.exists() else {}
            except ValueError:
                entries = {}
            entries = {k: v for k, v in entries.items() if pid_alive(v.get("pid"))}
            yield entries
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
            os.replace(tmp, self.path)

    def usage(self) -> dict[int, int]:
        """Sessions per GPU index."""
        with self._locked() as entries:
            return _count(entries)

    def acquire(self, key: str, *, user: str, gpus: Sequence[GpuDevice], per_gpu: int,
                pid: int | None = None) -> GpuDevice:
        """Reserve the least-used GPU for *key* (the same GPU again if *key* holds one)."""
        with self._locked() as entries:
            held = entries.get(key)
            if held is not None:
                for gpu in gpus:
                    if gpu.index == held["gpu"]:
                        return gpu
            entries.pop(key, None)
            gpu = choose_gpu(gpus, _count(entries), per_gpu)
            entries[key] = {"gpu": gpu.index, "user": user, "pid": pid or os.getpid(),
                            "since": int(time.time())}
            return gpu

    def set_owner(self, key: str, pid: int) -> None:
        """Tie *key*'s reservation to process *pid* (e.g. the sandbox's monitor)."""
        with self._locked() as entries:
            if key in entries:
                entries[key]["pid"] = pid

    def release(self, key: str) -> None:
        with self._locked() as entries:
            entries.pop(key, None)


def _count(entries: Mapping[str, dict]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for entry in entries.values():
        counts[entry["gpu"]] = counts.get(entry["gpu"], 0) + 1
    return counts


def reserve_gpu(
    policy: SandboxPolicy,
    key: str | None = None,
    *,
    gpus: Sequence[GpuDevice] | None = None,
    support_nodes: Sequence[str] | None = None,
    registry: GpuRegistry | None = None,
) -> SandboxPolicy:
    """Reserve the least-used GPU for *policy* when its account may have one and GPUs exist
    (*gpus*, default :func:`detect_gpus`), and bind it (with the NVIDIA *support_nodes*) into
    the policy; the policy unchanged otherwise. The reservation is *key* (default: one per
    calling process and user) in *registry* (default: the zone's); free it with
    :func:`release_resources`. When every GPU is full: :class:`Conflict`."""
    if not policy.gpu_allowed:
        return policy
    gpus = detect_gpus() if gpus is None else list(gpus)
    if not gpus:
        return policy
    if registry is None and SLURM_JOB_GPUS in os.environ:
        # A Slurm job's GPUs are its own (Slurm gave them): the zone's registry, whose
        # entries name processes on other machines, takes no part.
        gpu, key, registry_path = gpus[0], None, None
    else:
        if registry is None:
            if policy.state_dir is None:
                raise SandboxError("this policy names no sandbox state folder for the GPU registry")
            registry = GpuRegistry(policy.state_dir / GPU_REGISTRY_NAME)
        key = key or f"pid{os.getpid()}:{policy.user}"
        gpu = registry.acquire(key, user=policy.user, gpus=gpus,
                               per_gpu=policy.gpu_sessions_per_gpu)
        registry_path = registry.path
    support = nvidia_support_nodes() if support_nodes is None else list(support_nodes)
    policy.gpu = gpu
    policy.gpu_key = key
    policy.gpu_registry = registry_path
    policy.gpu_devices = [gpu.path, *support]
    policy.env["CUDA_VISIBLE_DEVICES"] = gpu.cuda_id
    policy.env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return policy


def release_gpu(registry: str | os.PathLike | None, key: str | None) -> None:
    """Give back reservation *key* of the GPU registry at *registry* (either may be empty)."""
    if registry and key:
        GpuRegistry(registry).release(key)


# --- cgroup limits (v2, or the v1 hierarchies) -------------------------------------------

def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or ``…/unified`` on
    hybrid machines); ``None`` if it is not."""
    with contextlib.suppress(OSError):
        for line in Path(mountinfo).read_text().splitlines():
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return left.split(" ")[4]
    return None


_cgroup2_mount = cgroup2_mount  # kept for callers of the earlier private name

#: The cgroup v1 controllers a sandbox uses when cgroup v2 does not offer them
#: (``cpuacct`` sets no limit: it counts the sandbox's CPU time, for metering).
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")


def cgroup1_parents(mountinfo: str = "/proc/self/mountinfo",
                    own: str = "/proc/self/cgroup") -> dict[str, Path]:
    """For each cgroup v1 controller of :data:`V1_CONTROLLERS` mounted (read-write) here:
    the folder sandbox cgroups go in, ``<mount>/<this process's cgroup>/medzone`` — under
    the hub's own cgroup, so limits set on the hub's service still cover its sandboxes."""
    mounts: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(mountinfo).read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields = right.split(" ")
            if fields[0] != "cgroup" or len(fields) < 3:
                continue
            options = set(fields[2].split(","))
            mount_point, mount_options = left.split(" ")[4], left.split(" ")[5].split(",")
            for name in V1_CONTROLLERS:
                if name in options and "rw" in mount_options:
                    # "cpu,cpuacct" mounts together on many machines: the first one wins.
                    mounts.setdefault(name, mount_point)
    paths: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(own).read_text().splitlines():
            _, names, path = line.split(":", 2)
            for name in names.split(","):
                paths[name] = path
    return {name: Path(mount, paths.get(name, "/").lstrip("/"), "medzone")
            for name, mount in mounts.items()}


def _v1_member_parent(path: Path) -> tuple[dict[str, Path], str] | None:
    """``(v1 parents, cgroup name)`` when *path* is a sandbox cgroup in a v1 hierarchy."""
    parents = cgroup1_parents()
    if any(path.parent == parent for parent in parents.values()):
        return parents, path.name
    return None


def cgroup_members(path: str | os.PathLike) -> list[Path]:
    """The folders a process joins to be in sandbox cgroup *path*: the folder itself (v2),
    or the folder of the same name in each v1 hierarchy (memory, pids, cpu)."""
    path = Path(path)
    found = _v1_member_parent(path)
    if found is None:
        return [path]
    parents, name = found
    return [parent / name for parent in parents.values() if (parent / name).is_dir()] or [path]


def _needed(config) -> dict[str, bool]:
    """Which controllers the limits need (memory and cpu always: a sandbox in its own cpu
    cgroup gets a fair share against the hub and other sandboxes even without a quota)."""
    return {"memory": True, "cpu": True, "pids": getattr(config, "pids_limit", None) is not None}


def cgroup_limits_unavailable_reason(
    config: SandboxConfig | None = None, *, mount: str | None = None
) -> str | None:
    """``None`` if memory/CPU (and pids) limits can be applied here; otherwise why not, in
    one line (the spawner logs it; sandboxes then run without those limits — nothing
    pretends otherwise).

    Checks that a cgroup v2 hierarchy offers the ``memory`` and ``cpu`` controllers, and
    that a sandbox cgroup can be created under the parent and its limits written. Without
    *mount*, where v2 cannot, the cgroup v1 hierarchies are tried (``memory`` needed; ``cpu``
    and ``pids`` where mounted; see :func:`cgroup1_parents`).
    """
    config = config or SandboxConfig()
    reason = _cgroup2_unavailable_reason(config, mount or cgroup2_mount())
    if reason is None or mount is not None:
        return reason
    return reason if _cgroup1_unavailable_reason(config) else None


def _cgroup2_unavailable_reason(config, mount: str | None) -> str | None:
    if mount is None:
        return "no cgroup v2 hierarchy is mounted: memory and CPU limits are not applied"
    parent = Path(config.cgroup_parent or Path(mount, "medzone"))
    try:
        offered = Path(mount, "cgroup.controllers").read_text().split()
    except OSError as err:
        return f"cannot read {mount}/cgroup.controllers ({err.strerror}): limits are not applied"
    missing = [c for c in ("memory", "cpu") if c not in offered]
    if missing:
        return (f"the cgroup v2 hierarchy at {mount} does not offer the {' and '.join(missing)} "
                f"controller{'s' if len(missing) > 1 else ''} (it offers: "
                f"{' '.join(offered) or 'none'}; they are held by cgroup v1 or "
                "not delegated): memory and CPU limits are not applied")
    try:
        probe = create_cgroup(parent, f"probe-{secrets.token_hex(4)}",
                              memory_limit_bytes=1 << 30, cpu_limit=1.0, mount=mount,
                              pids_limit=1024 if "pids" in offered else None)
    except SandboxError as err:
        return str(err)
    remove_cgroup(probe)
    return None


def _cgroup1_unavailable_reason(config) -> str | None:
    parents = cgroup1_parents()
    if "memory" not in parents:
        return "no cgroup v1 memory hierarchy is mounted read-write"
    name = f"probe-{secrets.token_hex(4)}"
    try:
        created = _create_cgroup1(parents, name, memory_limit_bytes=1 << 30, cpu_limit=1.0,
                                  pids_limit=1024 if config.pids_limit is not None else None)
    except SandboxError as err:
        return str(err)
    for folder in created:
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    return None


def create_cgroup(parent: str | os.PathLike, name: str, *, memory_limit_bytes: int | None,
                  cpu_limit: float | None, mount: str | None = None,
                  pids_limit: int | None = None) -> Path:
    """Make cgroup v2 *parent*/*name* with the limits written; :class:`SandboxError` if not
    allowed. The ``pids`` controller is enabled only with *pids_limit*."""
    parent = Path(parent)
    step = "create"
    wanted = ["memory", "cpu"] + (["pids"] if pids_limit is not None else [])
    try:
        if not parent.is_dir():
            parent.mkdir()
        # Controllers must be enabled on every level from the mount down to the parent.
        mount = Path(mount or cgroup2_mount() or parent.parent)
        chain = [p for p in [*reversed(parent.parents), parent] if _under(str(p), str(mount))]
        for level in chain:
            step = f"enable the {' and '.join(wanted)} controllers in {level}"
            control = level / "cgroup.subtree_control"
            enabled = control.read_text().split() if control.exists() else []
            if not set(wanted) <= set(enabled):
                control.write_text(" ".join(f"+{c}" for c in wanted))
        path = parent / name
        step = f"create {path}"
        path.mkdir(exist_ok=True)
        if memory_limit_bytes is not None:
            step = f"write {path}/memory.max"
            (path / "memory.max").write_text(str(int(memory_limit_bytes)))
            with contextlib.suppress(OSError):
                (path / "memory.swap.max").write_text("0")
        if cpu_limit is not None:
            step = f"write {path}/cpu.max"
            period = 100_000
            (path / "cpu.max").write_text(f"{max(1000, int(cpu_limit * period))} {period}")
        if pids_limit is not None:
            step = f"write {path}/pids.max"
            (path / "pids.max").write_text(str(int(pids_limit)))
        return path
    except OSError as err:
        raise SandboxError(
            f"cannot {step} ({err.strerror or err}): memory and CPU limits are not applied"
        ) from None


def _create_cgroup1(parents: Mapping[str, Path], name: str, *,
                    memory_limit_bytes: int | None, cpu_limit: float | None,
                    pids_limit: int | None) -> list[Path]:
    """Make *name* under each v1 parent with its limits; the folders made (memory first)."""
    created: list[Path] = []
    step = "create"
    try:
        for controller in ("memory", "pids", "cpu", "cpuacct"):
            parent = parents.get(controller)
            if parent is None or (controller == "pids" and pids_limit is None):
                continue
            step = f"create {parent / name}"
            parent.mkdir(parents=True, exist_ok=True)
            path = parent / name
            path.mkdir(exist_ok=True)
            created.append(path)
            if controller == "memory" and memory_limit_bytes is not None:
                step = f"write {path}/memory.limit_in_bytes"
                (path / "memory.limit_in_bytes").write_text(str(int(memory_limit_bytes)))
                with contextlib.suppress(OSError):  # no swap beyond the limit, where offered
                    (path / "memory.memsw.limit_in_bytes").write_text(str(int(memory_limit_bytes)))
            elif controller == "pids":
                step = f"write {path}/pids.max"
                (path / "pids.max").write_text(str(int(pids_limit)))
            elif controller == "cpu" and cpu_limit is not None:
                step = f"write {path}/cpu.cfs_quota_us"
                (path / "cpu.cfs_period_us").write_text("100000")
                (path / "cpu.cfs_quota_us").write_text(str(max(1000, int(cpu_limit * 100_000))))
    except OSError as err:
        for folder in created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise SandboxError(
            f"cannot {step} ({err.strerror or err}): memory and CPU limits are not applied"
        ) from None
    return created


def remove_cgroup(path: str | os.PathLike | None) -> None:
    """Remove a sandbox cgroup (each of its v1 folders) once its processes are gone
    (quietly if it is not there)."""
    if path is None:
        return
    # The processes of a sandbox that just ended may take a moment to leave: retry a little.
    deadline = time.monotonic() + 0.5
    for folder in cgroup_members(path):
        while True:
            try:
                os.rmdir(folder)
            except OSError as err:
                if err.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(0.005)
                    continue
            break


def sandbox_cgroup(policy: SandboxPolicy) -> tuple[Path | None, str | None]:
    """A fresh cgroup with *policy*'s limits: ``(path, None)``; ``(None, None)`` when the
    policy sets no limits; ``(None, reason)`` when they cannot be applied here (log it).
    A limit that cannot apply for another reason (e.g. ``RLIMIT_NPROC`` without root) is
    named in the reason too, next to a path. Pass the path to :func:`bwrap_argv`
    (``cgroup=``) and later to :func:`release_resources`.

    cgroup v2 is used when it offers the memory and cpu controllers; else, on a machine
    with the v1 hierarchies, one folder per controller (memory, pids, cpu), which
    :func:`cgroup_members` finds again from the memory one."""
    notes = list(policy.limit_notes)
    if (policy.memory_limit_bytes is None and policy.cpu_limit is None
            and policy.pids_limit is None):
        return None, "; ".join(notes) or None
    name = f"{policy.user}-{secrets.token_hex(4)}"
    config = SandboxConfig(cgroup_parent=policy.cgroup_parent, pids_limit=policy.pids_limit)
    mount = cgroup2_mount()
    reason = _cgroup2_unavailable_reason(config, mount)
    path = None
    if reason is None:
        try:
            offered = Path(mount, "cgroup.controllers").read_text().split()
            pids = policy.pids_limit if "pids" in offered else None
            if policy.pids_limit is not None and pids is None:
                notes.append(f"the cgroup v2 hierarchy at {mount} does not offer pids: "
                             "the pids limit is not applied")
            path = create_cgroup(policy.cgroup_parent or os.path.join(mount, "medzone"), name,
                                 memory_limit_bytes=policy.memory_limit_bytes,
                                 cpu_limit=policy.cpu_limit, mount=mount, pids_limit=pids)
        except (OSError, SandboxError) as err:
            reason = str(err)
    else:
        parents = cgroup1_parents()
        if "memory" in parents:
            try:
                path = _create_cgroup1(parents, name,
                                       memory_limit_bytes=policy.memory_limit_bytes,
                                       cpu_limit=policy.cpu_limit,
                                       pids_limit=policy.pids_limit)[0]
                reason = None
                if policy.pids_limit is not None and "pids" not in parents:
                    notes.append("no cgroup v1 pids hierarchy is mounted: "
                                 "the pids limit is not applied")
                if policy.cpu_limit is not None and "cpu" not in parents:
                    notes.append("no cgroup v1 cpu hierarchy is mounted: "
                                 "the CPU limit is not applied")
            except SandboxError as err:
                reason = f"{reason}; in cgroup v1: {err}"
    if reason is not None:
        notes.insert(0, reason if "not applied" in reason
                     else f"{reason}: memory, CPU and pids limits are not applied")
    return path, "; ".join(notes) or None


def release_resources(policy: SandboxPolicy, cgroup: str | os.PathLike | None = None) -> None:
    """Free what a stopped sandbox held: its GPU reservation and its cgroup."""
    release_gpu(policy.gpu_registry, policy.gpu_key)
    remove_cgroup(cgroup)
