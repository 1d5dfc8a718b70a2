"""Sandboxes: what one user's server or kernel sees, and the bubblewrap command that makes it.

One policy builder (:func:`build_policy`) decides everything a sandbox gets: the uid it
runs as, its private home, the datasets the user holds a live grant for at that moment,
the Python environment, GPUs. One argv builder (:func:`bwrap_argv`) turns a policy into
the command line; the spawner and ``medzone sandbox exec`` both use it, so a command run
with ``exec`` sees exactly what the user's kernel sees. See ``docs/sandbox.md``.

Inside a sandbox::

    /home/<user>      MEDZONE_HOME/homes/<user>, read-write, owned by the sandbox uid, 0700
    /data/<id>        MEDZONE_HOME/datasets/<id>/data, read-only, one per live grant
    /run/medzone/manifests/<id>.json
                      MEDZONE_HOME/datasets/<id>/manifest.json, read-only, one per live grant
                      (env MEDZONE_MANIFESTS; never the dataset's screening index)
    /tmp, /dev/shm    private tmpfs of a set size (/dev itself read-only)
    /usr /bin /lib*   the host's, read-only (/etc: a small read-only subset)
    /proc /dev        a new procfs (own pid namespace) and a minimal /dev
    <sys.prefix>      the Python environment, read-only, at the same path
    (nothing else of MEDZONE_HOME, no network but ``lo``, no capabilities, a seccomp
    filter, a cgroup with memory/pids limits, RLIMIT_NPROC; supplementary groups: the
    live grants' dataset groups only)

Running as root, the sandbox process is host uid ``uid_base + user.id`` (no passwd entry
needed): ``setpriv`` drops to it before bubblewrap starts, so bubblewrap's own user
namespace maps that uid to itself. Running as another user, the sandbox is that user on
the host (bubblewrap's unprivileged user namespace) and shows ``uid_base + user.id`` inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .config import DATASET_GID_BASE, DATASET_GID_SPAN, MedZoneHome
from .processes import pid_alive
from .errors import Conflict, InvalidInput, MedZoneError, RuleViolation

BWRAP = "bwrap"
SETPRIV = "setpriv"
PRLIMIT = "prlimit"

#: Top-level system folders bound read-only (or re-created as the host's symlink).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

#: What of the host's /etc a kernel needs (dynamic linker, users, time zone, fonts,
#: certificates, Python's Debian config). Missing entries are skipped. Not /etc as a
#: whole: it holds host configuration (ssh, database, PAM) a sandbox has no use for.
ETC_ENTRIES = (
    "alternatives", "bash.bashrc", "ca-certificates", "debian_version", "fonts", "gai.conf",
    "group", "host.conf", "hosts", "inputrc", "jupyter", "ld.so.cache", "ld.so.conf",
    "ld.so.conf.d", "localtime", "magic", "magic.mime", "matplotlibrc", "mime.types",
    "nsswitch.conf", "os-release", "passwd", "profile", "protocols", "python3",
    f"python3.{sys.version_info.minor}", "services", "ssl/certs", "ssl/openssl.cnf",
    "terminfo", "timezone", "xdg",
)

#: Packages of this project whose source folders an editable install points into.
PROJECT_PACKAGES = ("medzone_hub", "medzone_kernel")

#: Where each granted dataset's manifest appears inside a sandbox, as ``<id>.json``.
MANIFESTS_INSIDE = "/run/medzone/manifests"

#: NVIDIA nodes every CUDA process needs besides its GPU's own ``/dev/nvidiaN``.
NVIDIA_SUPPORT_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")

_GPU_NODE = re.compile(r"nvidia(\d+)")


class SandboxError(MedZoneError):
    """A sandbox could not be set up or started."""


# --- configuration and policy ----------------------------------------------------------

@dataclass
class SandboxConfig:
    """Zone-wide sandbox settings (the spawner exposes each as a traitlet).

    ``uid_base``: sandbox uid/gid is ``uid_base + user.id`` (pick a range no host account
    uses). ``gpu_enabled``: pass GPUs through at all. ``allow_gpu_role``: users holding
    this role get a GPU (``None``: every user). ``gpu_sessions_per_gpu``: how many
    sandboxes may share one GPU. ``memory_limit_bytes``/``cpu_limit`` (CPUs, e.g. 2.0):
    cgroup v2 limits, applied only where the machine allows it (see
    :func:`cgroup_limits_unavailable_reason`). ``cgroup_parent``: a delegated cgroup v2
    folder to create sandbox cgroups in (default: ``<cgroup2 mount>/medzone``).
    ``extra_ro_binds``: ``(host path, path inside)`` pairs every sandbox also gets,
    read-only. ``python_prefix``: the environment kernels run from (default: the running
    interpreter's ``sys.prefix``).

    Limits, all on by default (``None`` turns one off; see ``docs/sandbox.md``):
    ``memory_limit_bytes`` (default :func:`default_memory_limit`: half the machine's memory,
    at most 8 GiB) and ``pids_limit`` (processes and threads of one sandbox, default 2048)
    through a cgroup — v2 where it offers the controllers, else the v1 hierarchies;
    ``nproc_limit``: ``RLIMIT_NPROC`` of the sandbox uid (a per-user cap over all of its
    sandboxes, default 4096; applied when running as root); ``tmp_size_bytes`` /
    ``shm_size_bytes``: the sizes of the ``/tmp`` and ``/dev/shm`` tmpfs (default 2 GiB and
    512 MiB; ``/dev`` itself is read-only); ``seccomp``: install the system-call filter of
    :mod:`medzone_hub.seccomp` (a sandbox does not start on a machine it has no table for).
    ``dataset_gid_base``: dataset groups (see :func:`dataset_gids`) are given to a sandbox
    only from this range.
    """

    uid_base: int = 200000
    gpu_enabled: bool = True
    allow_gpu_role: str | None = "gpu"
    gpu_sessions_per_gpu: int = 1
    memory_limit_bytes: int | None = field(default_factory=lambda: default_memory_limit())
    cpu_limit: float | None = None
    cgroup_parent: str | None = None
    extra_ro_binds: list[tuple[str, str]] = field(default_factory=list)
    python_prefix: str | None = None
    pids_limit: int | None = 2048
    nproc_limit: int | None = 4096
    tmp_size_bytes: int | None = 2 << 30
    shm_size_bytes: int | None = 512 << 20
    seccomp: bool = True
    dataset_gid_base: int = DATASET_GID_BASE


def default_memory_limit() -> int:
    """Half of this machine's memory, at most 8 GiB: one sandbox cannot take the host's."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30
    return min(8 << 30, max(256 << 20, total // 2))


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


@dataclass
class SandboxPolicy:
    """Everything one sandbox gets; :func:`bwrap_argv` turns it into a command line."""

    user: str
    uid: int  # inside the sandbox (and on the host when ``drop_to_uid``)
    gid: int
    home_host: Path
    home_inside: str
    datasets: dict[str, Path]  # dataset id -> host folder mounted at /data/<id>
    gpu_devices: list[str]  # device nodes bound with --dev-bind (GPU + NVIDIA support nodes)
    env: dict[str, str]
    ro_binds: list[tuple[str, str]]  # Python environment, project sources, config extras
    system_ro_binds: list[tuple[str, str]] = field(default_factory=list)
    symlinks: list[tuple[str, str]] = field(default_factory=list)  # (target, path inside)
    drop_to_uid: bool = False  # running as root: setpriv to uid/gid before bwrap
    zone_root: Path | None = None  # MEDZONE_HOME; nothing else of it may be bound
    gpu: GpuDevice | None = None
    gpu_key: str | None = None  # this sandbox's entry in the GPU registry
    gpu_registry: Path | None = None
    memory_limit_bytes: int | None = None
    cpu_limit: float | None = None
    cgroup_parent: str | None = None
    notes: list[str] = field(default_factory=list)  # things the spawner should log
    # dataset id -> host manifest.json bound at MANIFESTS_INSIDE/<id>.json (granted ones only)
    manifests: dict[str, Path] = field(default_factory=dict)
    pids_limit: int | None = None
    nproc_limit: int | None = None  # RLIMIT_NPROC, set before dropping to uid
    tmp_size_bytes: int | None = None
    shm_size_bytes: int | None = None
    seccomp_program: Path | None = None  # compiled filter (bwrap --seccomp), see seccomp_file
    groups: list[int] = field(default_factory=list)  # supplementary gids: live grants' datasets
    limit_notes: list[str] = field(default_factory=list)  # limits that cannot apply here

    @property
    def host_uid(self) -> int:
        return self.uid if self.drop_to_uid else os.getuid()

    @property
    def host_gid(self) -> int:
        return self.gid if self.drop_to_uid else os.getgid()


def homes_dir(home: MedZoneHome) -> Path:
    return home.root / "homes"


def sandbox_state_dir(home: MedZoneHome) -> Path:
    """Host-side sandbox bookkeeping (the GPU registry); never bound into a sandbox."""
    return home.root / "sandbox"


def build_policy(
    home: MedZoneHome,
    session,
    user: str,
    *,
    config: SandboxConfig | None = None,
    now: datetime | None = None,
    gpus: Sequence[GpuDevice] | None = None,
    gpu_support_nodes: Sequence[str] | None = None,
    gpu_registry: "GpuRegistry | None" = None,
    gpu_key: str | None = None,
) -> SandboxPolicy:
    """The sandbox *user* gets now: :class:`NotFound` if unknown, :class:`RuleViolation` if
    the account is not approved.

    ``/data`` holds exactly :func:`medzone_hub.access.live_grants` at *now*. When the user
    may use a GPU and GPUs exist (*gpus*, default: :func:`detect_gpus`), the least-used one
    is reserved in *gpu_registry* (default: the zone's file) under *gpu_key* (default: one
    per calling process and user) — release it with :func:`release_resources`. When every
    GPU is full: :class:`Conflict`.
    """
    from .access import live_grants
    from .accounts import get_user, validate_user_name

    config = config or SandboxConfig()
    validate_user_name(user)
    account = get_user(session, user)
    if not account.approved:
        raise RuleViolation(f"user {user!r} is not approved: no sandbox until an admin approves")

    privileged = os.geteuid() == 0
    uid = gid = config.uid_base + account.id
    zone_root = home.root.resolve()
    datasets_root = home.datasets_dir.resolve()
    notes: list[str] = []

    datasets: dict[str, Path] = {}
    manifests: dict[str, Path] = {}
    for dataset_id in live_grants(session, user, now=now):
        data = (home.dataset_dir(dataset_id) / "data").resolve()
        if not data.is_dir() or datasets_root not in data.parents:
            notes.append(f"dataset {dataset_id!r} is granted but its stored copy is missing")
            continue
        datasets[dataset_id] = data
        manifest = (home.dataset_dir(dataset_id) / "manifest.json").resolve()
        if manifest.is_file() and datasets_root in manifest.parents:
            manifests[dataset_id] = manifest

    home_inside = f"/home/{user}"
    prefix = config.python_prefix or sys.prefix
    env = {
        "HOME": home_inside,
        "USER": user,
        "LOGNAME": user,
        "PATH": f"{prefix}/bin:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "SHELL": "/bin/sh",
        "MEDZONE_USER": user,
        "MEDZONE_DATA": "/data",
        "MEDZONE_MANIFESTS": MANIFESTS_INSIDE,
    }
    if Path(prefix, "pyvenv.cfg").is_file():
        env["VIRTUAL_ENV"] = prefix

    policy = SandboxPolicy(
        user=user,
        uid=uid,
        gid=gid,
        home_host=homes_dir(home) / user,
        home_inside=home_inside,
        datasets=datasets,
        gpu_devices=[],
        env=env,
        ro_binds=[(p, p) for p in python_paths(prefix)] + [tuple(b) for b in config.extra_ro_binds],
        system_ro_binds=[],
        symlinks=[],
        drop_to_uid=privileged,
        zone_root=zone_root,
        memory_limit_bytes=config.memory_limit_bytes,
        cpu_limit=config.cpu_limit,
        cgroup_parent=config.cgroup_parent,
        notes=notes,
        manifests=manifests,
        pids_limit=config.pids_limit,
        nproc_limit=config.nproc_limit,
        tmp_size_bytes=config.tmp_size_bytes,
        shm_size_bytes=config.shm_size_bytes,
        groups=dataset_gids(home, datasets, config.dataset_gid_base) if privileged else [],
    )
    if config.nproc_limit is not None and not privileged:
        policy.limit_notes.append(
            "not running as root, sandboxes share the hub's uid: RLIMIT_NPROC "
            f"({config.nproc_limit}) is not applied (it would count the hub's own processes)")
    if config.seccomp:
        policy.seccomp_program = seccomp_file(home)
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            policy.symlinks.append((os.readlink(path), path))
        elif os.path.isdir(path):
            policy.system_ro_binds.append((path, path))
    for entry in ETC_ENTRIES:
        path = f"/etc/{entry}"
        if os.path.exists(path):
            policy.system_ro_binds.append((path, path))
    check_binds(policy)

    if gpu_allowed(account, config):
        gpus = detect_gpus() if gpus is None else list(gpus)
        if gpus:
            registry = gpu_registry or GpuRegistry(sandbox_state_dir(home) / "gpu-sessions.json")
            key = gpu_key or f"pid{os.getpid()}:{user}"
            gpu = registry.acquire(key, user=user, gpus=gpus,
                                   per_gpu=config.gpu_sessions_per_gpu)
            support = (nvidia_support_nodes() if gpu_support_nodes is None
                       else list(gpu_support_nodes))
            policy.gpu = gpu
            policy.gpu_key = key
            policy.gpu_registry = registry.path
            policy.gpu_devices = [gpu.path, *support]
            policy.env["CUDA_VISIBLE_DEVICES"] = gpu.cuda_id
            policy.env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return policy


def dataset_gids(home: MedZoneHome, datasets: Iterable[str],
                 gid_base: int = DATASET_GID_BASE) -> list[int]:
    """The host groups of *datasets* (their folders' group, when it lies in the dataset
    range): what a sandbox with those grants gets as supplementary groups."""
    gids = set()
    for dataset_id in datasets:
        with contextlib.suppress(OSError):
            gid = os.stat(home.dataset_dir(dataset_id)).st_gid
            if gid_base <= gid < gid_base + DATASET_GID_SPAN:
                gids.add(gid)
    return sorted(gids)


def seccomp_file(home: MedZoneHome) -> Path:
    """The compiled seccomp filter for this machine, kept in ``MEDZONE_HOME/sandbox/``
    (written once per program; the command line's first step opens it for bubblewrap).
    :class:`SandboxError` on an architecture the filter has no table for."""
    from . import seccomp

    try:
        program = _compiled_filter()
        arch = seccomp.native_arch()
    except seccomp.UnsupportedArchitecture as err:
        raise SandboxError(f"{err}: refusing to start a sandbox without a seccomp filter "
                           "(seccomp=False turns the filter off)") from None
    digest = hashlib.sha256(program).hexdigest()[:16]
    folder = sandbox_state_dir(home)
    path = folder / f"seccomp-{arch}-{digest}.bpf"
    try:
        if path.read_bytes() == program:
            return path
    except OSError:
        pass
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}"
    tmp.write_bytes(program)
    os.replace(tmp, path)
    return path


@functools.lru_cache(maxsize=1)
def _compiled_filter() -> bytes:
    from . import seccomp

    return seccomp.compile_filter()


def gpu_allowed(account, config: SandboxConfig) -> bool:
    """Whether *account* may have a GPU under *config* (switch on, and the role if one is set)."""
    if not config.gpu_enabled:
        return False
    return config.allow_gpu_role is None or account.has_role(config.allow_gpu_role)


def python_paths(prefix: str | None = None) -> list[str]:
    """Folders the kernel's Python needs, besides the system dirs: the environment
    (*prefix*), its base interpreter when that lives outside /usr, and the source folders
    of this project's packages when an editable install points outside the environment.

    Only those folders: never the whole project checkout, which may hold MEDZONE_HOME.
    """
    prefix = os.path.abspath(prefix or sys.prefix)
    paths = [prefix]
    base = os.path.abspath(sys.base_prefix)
    if not _under(base, "/usr") and not _under(base, prefix):
        paths.append(base)
    for name in PROJECT_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec else []:
            location = os.path.abspath(location)
            if os.path.isdir(location) and not any(_under(location, p) for p in paths):
                paths.append(location)
    return paths


def _under(path: str, parent: str) -> bool:
    path, parent = os.path.abspath(path), os.path.abspath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def check_binds(policy: SandboxPolicy, extra_ro_binds: Iterable[tuple[str, str]] = ()) -> None:
    """Refuse binds that would expose MEDZONE_HOME: no bind source other than the user's
    home and granted datasets may be MEDZONE_HOME or contain it; the sandbox's own folders
    may not be replaced by an extra bind."""
    if policy.zone_root is None:
        return
    zone = str(policy.zone_root)
    reserved = (policy.home_inside, "/data", MANIFESTS_INSIDE, "/proc", "/dev")
    for source, dest in [*policy.system_ro_binds, *policy.ro_binds, *extra_ro_binds]:
        real = os.path.realpath(source)
        if _under(zone, real) or _under(zone, source):
            raise RuleViolation(
                f"refusing to bind {source} into a sandbox: it contains MEDZONE_HOME ({zone}); "
                "keep MEDZONE_HOME outside the Python environment and system folders"
            )
        if not os.path.isabs(dest) or any(_under(dest, r) for r in reserved) or dest == "/":
            raise InvalidInput(f"cannot bind {source} at {dest!r} in a sandbox: reserved path")


# --- the command line ------------------------------------------------------------------

def bwrap_argv(
    policy: SandboxPolicy,
    command: Sequence[str],
    *,
    info_fd: int | None = None,
    extra_ro_binds: Iterable[tuple[str, str]] = (),
    extra_env: Mapping[str, str] | None = None,
    cgroup: str | os.PathLike | None = None,
) -> list[str]:
    """The full command line running *command* in *policy*'s sandbox.

    *extra_ro_binds* (e.g. the hub's socket folder) are bound read-only at the given
    paths. *extra_env* is set inside (note: like the rest of this argv it is visible in
    the host's process list). With *info_fd*, bubblewrap writes ``{"child-pid": N}`` there
    (see :func:`read_info_fd`). With *cgroup* (made by :func:`sandbox_cgroup`), the whole
    sandbox starts inside that cgroup (each of its v1 hierarchies' folders).

    Before bubblewrap, still with the caller's privileges, a small shell step joins the
    cgroup and opens the seccomp program on a descriptor for ``--seccomp``; ``prlimit``
    sets ``RLIMIT_NPROC``; ``setpriv`` drops to the sandbox uid with the live grants'
    dataset groups as its only supplementary groups.
    """
    if not command:
        raise InvalidInput("no command to run in the sandbox")
    extra_ro_binds = [tuple(b) for b in extra_ro_binds]
    check_binds(policy, extra_ro_binds)
    argv: list[str] = []
    steps: list[str] = []
    params: list[str] = []
    for folder in cgroup_members(cgroup) if cgroup is not None else []:
        # Join the cgroup first (still root), then drop privileges: nothing escapes it.
        params.append(os.fspath(folder))
        steps.append(f'echo $$ > "${len(params)}/cgroup.procs"')
    seccomp_fd = None
    if policy.seccomp_program is not None:
        # bubblewrap reads the program from this descriptor and closes it.
        seccomp_fd = 8 if info_fd == 9 else 9
        params.append(os.fspath(policy.seccomp_program))
        steps.append(f'exec {seccomp_fd}< "${len(params)}"')
    if steps:
        steps += [f"shift {len(params)}", 'exec "$@"']
        argv += ["/bin/sh", "-c", " && ".join(steps), "medzone-sandbox", *params]
    if policy.drop_to_uid and policy.nproc_limit is not None:
        # Per real uid: a cap over all of this user's sandboxes (root is not bound by it).
        argv += [_tool(PRLIMIT), f"--nproc={policy.nproc_limit}:{policy.nproc_limit}", "--"]
    if policy.drop_to_uid:
        groups = (f"--groups={','.join(map(str, policy.groups))}" if policy.groups
                  else "--clear-groups")
        argv += [_tool(SETPRIV), f"--reuid={policy.uid}", f"--regid={policy.gid}",
                 groups, "--"]
    argv += [
        _tool(BWRAP),
        "--unshare-user", "--uid", str(policy.uid), "--gid", str(policy.gid),
        "--disable-userns",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
        "--unshare-cgroup-try",
        "--hostname", "medzone",
        "--die-with-parent",
        "--new-session",
        "--cap-drop", "ALL",
        "--clearenv",
    ]
    for name, value in {**policy.env, **(extra_env or {})}.items():
        argv += ["--setenv", name, str(value)]
    for source, dest in policy.system_ro_binds:
        argv += ["--ro-bind", source, dest]
    for target, dest in policy.symlinks:
        argv += ["--symlink", target, dest]
    # Sized tmpfs: without --size each would be allowed half of the machine's memory.
    argv += ["--proc", "/proc", "--dev", "/dev", *_size(policy.shm_size_bytes),
             "--tmpfs", "/dev/shm", *_size(policy.tmp_size_bytes), "--tmpfs", "/tmp",
             "--dir", "/var/tmp"]
    # /data: its own tmpfs holding one read-only bind per grant, then made read-only itself.
    argv += ["--tmpfs", "/data"]
    for dataset_id, source in sorted(policy.datasets.items()):
        argv += ["--ro-bind", str(source), f"/data/{dataset_id}"]
    argv += ["--remount-ro", "/data"]
    # The granted datasets' manifests (what is in them), the same way: nothing else of
    # MEDZONE_HOME/datasets/<id>, the screening index least of all.
    argv += ["--tmpfs", MANIFESTS_INSIDE]
    for dataset_id, source in sorted(policy.manifests.items()):
        if dataset_id in policy.datasets:
            argv += ["--ro-bind", str(source), f"{MANIFESTS_INSIDE}/{dataset_id}.json"]
    argv += ["--remount-ro", MANIFESTS_INSIDE]
    argv += ["--bind", str(policy.home_host), policy.home_inside]
    for source, dest in [*policy.ro_binds, *extra_ro_binds]:
        argv += ["--ro-bind", str(source), str(dest)]
    for node in policy.gpu_devices:
        argv += ["--dev-bind", node, node]
    # bubblewrap's /dev is an unsized tmpfs the sandbox uid owns: nothing may be written
    # there (/dev/shm and /dev/pts are mounts of their own and stay writable).
    argv += ["--remount-ro", "/dev"]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    # The sandbox's root is a tmpfs bubblewrap made; nothing may be added to it later.
    argv += ["--remount-ro", "/"]
    argv += ["--chdir", policy.home_inside]
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    argv += ["--", *command]
    return argv


def _size(size: int | None) -> list[str]:
    return [] if size is None else ["--size", str(int(size))]


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/bin:/usr/sbin")
    if path is None:
        package = "bubblewrap" if name == BWRAP else "util-linux"
        raise SandboxError(f"{name} is not installed (install the {package} package)")
    return path


# --- homes -----------------------------------------------------------------------------

def ensure_home(home: MedZoneHome, policy: SandboxPolicy) -> Path:
    """Create (or repair) ``MEDZONE_HOME/homes/<user>``: owned by the sandbox uid, 0700.

    ``homes/`` itself is 0711 so a sandbox uid can reach its own home but list no other.
    The home is owned and its mode set through a descriptor opened with ``O_NOFOLLOW``
    (see :mod:`medzone_hub.homefs`), never by path.
    """
    parent = homes_dir(home)
    parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(parent, 0o711)
    path = policy.home_host
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise SandboxError(f"{path} is not a folder: refusing to use it as a home") from None
    try:
        if policy.drop_to_uid:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (policy.uid, policy.gid):
                os.fchown(fd, policy.uid, policy.gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def check_reachable(policy: SandboxPolicy, extra_ro_binds: Iterable[tuple[str, str]] = ()) -> None:
    """As root, bubblewrap runs as the sandbox uid, which must be able to reach every bind
    source: fail with the folder to fix rather than bubblewrap's "Permission denied"."""
    if not policy.drop_to_uid:
        return
    sources = [s for s, _ in [*policy.ro_binds, *extra_ro_binds]]
    sources += [str(p) for p in policy.datasets.values()] + [str(policy.home_host)]
    sources += [str(p) for i, p in policy.manifests.items() if i in policy.datasets]
    for source in sources:
        for folder in [*reversed(Path(source).parents), Path(source)]:
            try:
                st = os.stat(folder)
            except FileNotFoundError:
                raise SandboxError(f"cannot bind {source} into a sandbox: it does not exist")
            if stat.S_ISDIR(st.st_mode) and not _may(st, policy.uid, policy.gid, 1,
                                                     policy.groups):
                raise SandboxError(
                    f"the sandbox uid {policy.uid} cannot reach {source}: {folder} is mode "
                    f"{stat.S_IMODE(st.st_mode):04o}; make it traversable (o+x) or move it"
                )


def _may(st: os.stat_result, uid: int, gid: int, bit: int, groups: Iterable[int] = ()) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == gid or st.st_gid in groups:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


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

#: The cgroup v1 controllers a sandbox uses when cgroup v2 does not offer them.
V1_CONTROLLERS = ("memory", "pids", "cpu")


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
        for controller in ("memory", "pids", "cpu"):
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
    if policy.gpu_key and policy.gpu_registry:
        GpuRegistry(policy.gpu_registry).release(policy.gpu_key)
    remove_cgroup(cgroup)


# --- running ---------------------------------------------------------------------------

def run_in_sandbox(home: MedZoneHome, store, user: str, command: Sequence[str], *,
                   config: SandboxConfig | None = None,
                   extra_ro_binds: Iterable[tuple[str, str]] = (),
                   extra_env: Mapping[str, str] | None = None,
                   pass_fds: Sequence[int] = ()) -> int:
    """Run *command* in *user*'s sandbox (as their kernel would see it), attached to this
    process's stdin/stdout/stderr; returns its exit status (128+N if killed by signal N).

    *extra_ro_binds* and *extra_env* are as for :func:`bwrap_argv` (a template run binds
    the hub's kernel folder and sets where Jupyter and IPython look); *pass_fds* stay open
    in the sandboxed command (a template run reports its output's hash on a pipe)."""
    extra_ro_binds = [tuple(b) for b in extra_ro_binds]
    with store.session() as session:
        policy = build_policy(home, session, user, config=config)
    cgroup = None
    try:
        ensure_home(home, policy)
        check_reachable(policy, extra_ro_binds)
        cgroup, reason = sandbox_cgroup(policy)
        if reason:
            print(f"medzone: warning: {reason}", file=sys.stderr)
        argv = bwrap_argv(policy, list(command), cgroup=cgroup, extra_ro_binds=extra_ro_binds,
                          extra_env=extra_env)
        try:
            proc = subprocess.Popen(argv, env={}, close_fds=True, pass_fds=tuple(pass_fds))
        except OSError as err:
            raise SandboxError(f"cannot start bubblewrap: {err}") from None
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            # The monitor got the same SIGINT; --die-with-parent takes the sandbox down.
            proc.kill()
            proc.wait()
            raise
    finally:
        release_resources(policy, cgroup)
    return 128 - rc if rc < 0 else rc


def read_info_fd(fd: int) -> int:
    """Read bubblewrap's ``--info-fd`` JSON from *fd* (closing it) and return the host pid of
    the sandbox's pid 1; :class:`SandboxError` if bubblewrap exited before writing it.

    Reads until the closing ``}``: the write end may stay open in the sandbox.
    """
    data = b""
    try:
        while not data.rstrip().endswith(b"}"):
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    try:
        return int(json.loads(data)["child-pid"])
    except (ValueError, KeyError, TypeError):
        raise SandboxError("bubblewrap exited before the sandbox started") from None


def kill_sandbox(child_pid: int) -> bool:
    """Stop a sandbox at once: SIGKILL to its pid 1 tears down its whole pid namespace
    (bubblewrap forwards no signals). ``False`` if it was already gone."""
    try:
        os.kill(child_pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


@dataclass
class SandboxProcess:
    """A running sandbox: ``process`` is bubblewrap's monitor; ``child_pid`` the sandbox's
    pid 1 on the host (what :func:`kill_sandbox` needs)."""

    process: asyncio.subprocess.Process
    child_pid: int
    policy: SandboxPolicy
    cgroup: Path | None = None
    cgroup_unavailable_reason: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait(self) -> int:
        """Wait for the sandbox to end, free its resources, return its exit status."""
        rc = await self.process.wait()
        release_resources(self.policy, self.cgroup)
        return 128 - rc if rc < 0 else rc

    async def stop(self, timeout: float = 10) -> int:
        kill_sandbox(self.child_pid)
        try:
            return await asyncio.wait_for(self.wait(), timeout)
        except asyncio.TimeoutError:
            self.process.kill()
            return await self.wait()


async def start_sandboxed(
    policy: SandboxPolicy,
    command: Sequence[str],
    *,
    extra_ro_binds: Iterable[tuple[str, str]] = (),
    extra_env: Mapping[str, str] | None = None,
    home: MedZoneHome | None = None,
    timeout: float = 30,
    **popen_kwargs,
) -> SandboxProcess:
    """Start *command* in *policy*'s sandbox and return once its pid 1 exists.

    With *home*, the user's home folder is created first (:func:`ensure_home`). A cgroup
    with the policy's limits is made where possible (else the reason is recorded on the
    result). *popen_kwargs* go to :func:`asyncio.create_subprocess_exec` (stdout, stderr…).
    """
    extra_ro_binds = [tuple(b) for b in extra_ro_binds]
    if home is not None:
        ensure_home(home, policy)
    check_reachable(policy, extra_ro_binds)
    cgroup, reason = sandbox_cgroup(policy)
    read_end, write_end = os.pipe()
    try:
        argv = bwrap_argv(policy, command, info_fd=write_end, extra_ro_binds=extra_ro_binds,
                          extra_env=extra_env, cgroup=cgroup)
        process = await asyncio.create_subprocess_exec(
            *argv, pass_fds=(write_end,), env={}, start_new_session=True, **popen_kwargs)
    except BaseException:
        os.close(read_end)
        release_resources(policy, cgroup)
        raise
    finally:
        os.close(write_end)
    loop = asyncio.get_running_loop()
    try:
        child_pid = await asyncio.wait_for(loop.run_in_executor(None, read_info_fd, read_end),
                                           timeout)
    except (SandboxError, asyncio.TimeoutError) as err:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        rc = await process.wait()
        release_resources(policy, cgroup)
        raise SandboxError(f"the sandbox for {policy.user!r} did not start "
                           f"(bubblewrap exit status {rc})") from err
    if policy.gpu_key and policy.gpu_registry:
        GpuRegistry(policy.gpu_registry).set_owner(policy.gpu_key, process.pid)
    return SandboxProcess(process, child_pid, policy, cgroup, reason)


__all__ = [
    "GpuDevice", "GpuRegistry", "SandboxConfig", "SandboxError", "SandboxPolicy",
    "SandboxProcess", "build_policy", "bwrap_argv", "cgroup_limits_unavailable_reason",
    "cgroup2_mount", "check_binds", "check_reachable", "choose_gpu", "create_cgroup",
    "detect_gpus", "gpu_allowed", "nvidia_support_nodes", "python_paths", "sandbox_cgroup",
    "ensure_home", "kill_sandbox", "read_info_fd", "release_resources",
    "remove_cgroup", "run_in_sandbox", "start_sandboxed",
]
