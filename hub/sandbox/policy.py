"""What one sandbox gets: the zone's sandbox settings and the pure policy builder.

:func:`build_policy` decides everything a sandbox gets from facts it is given — the
account (:class:`AccountFacts`), the datasets it holds a live grant for, the zone's
:class:`SandboxConfig` — and never reads the store: the service that knows the rules
(:func:`medzone_hub.sessions.policy_for`) gathers those facts. Building a policy reserves
nothing; GPUs and cgroups are taken explicitly (:mod:`.resources`). See ``docs/sandbox.md``.

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

import contextlib
import functools
import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medzone_kernel import contract

from ..config import DATASET_GID_BASE, DATASET_GID_SPAN, MedZoneHome
from ..errors import InvalidInput, MedZoneError, RuleViolation
from . import seccomp
from .gpus import GpuDevice

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
MANIFESTS_INSIDE = contract.MANIFESTS_INSIDE


class SandboxError(MedZoneError):
    """A sandbox could not be set up or started."""


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
    :mod:`medzone_hub.sandbox.seccomp` (a sandbox does not start on a machine it has no table for).
    ``dataset_gid_base``: dataset groups (see :func:`dataset_gids`) are given to a sandbox
    only from this range. ``home_quota_bytes``: a home using more (allocated blocks, as
    ``du`` counts) gets no new server, run or ``sandbox exec`` until files are deleted
    (default 20 GiB).
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
    home_quota_bytes: int | None = 20 << 30


def default_memory_limit() -> int:
    """Half of this machine's memory, at most 8 GiB: one sandbox cannot take the host's."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30
    return min(8 << 30, max(256 << 20, total // 2))


@dataclass(frozen=True)
class AccountFacts:
    """What the policy needs to know of an approved account: its name, its id in the store
    (the sandbox uid is ``uid_base + id``) and its roles (a GPU role, say)."""

    name: str
    id: int
    roles: tuple[str, ...] = ()


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
    gpu_allowed: bool = False  # the account may have a GPU (reserve_gpu binds one)
    gpu_sessions_per_gpu: int = 1
    gpu: GpuDevice | None = None  # set by reserve_gpu
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
    state_dir: Path | None = None  # MEDZONE_HOME/sandbox: the GPU registry's folder
    home_quota_bytes: int | None = None  # checked by ensure_home before a sandbox starts

    @property
    def host_uid(self) -> int:
        return self.uid if self.drop_to_uid else os.getuid()

    @property
    def host_gid(self) -> int:
        return self.gid if self.drop_to_uid else os.getgid()


def homes_dir(home: MedZoneHome) -> Path:
    return home.homes_dir


def sandbox_state_dir(home: MedZoneHome) -> Path:
    """Host-side sandbox bookkeeping (the GPU registry); never bound into a sandbox."""
    return home.sandbox_state_dir


def build_policy(home: MedZoneHome, account: AccountFacts, granted: Iterable[str], *,
                 config: SandboxConfig | None = None) -> SandboxPolicy:
    """The sandbox of *account*, holding the *granted* datasets (its live grants, which the
    caller looked up). Pure of the store: whether the account is approved and which grants
    are live is decided before (:func:`medzone_hub.sessions.policy_for`).

    Whether it may have a GPU is recorded (``gpu_allowed``); none is reserved here: see
    :func:`medzone_hub.sandbox.resources.reserve_gpu`.
    """
    config = config or SandboxConfig()
    user = account.name
    privileged = os.geteuid() == 0
    uid = gid = config.uid_base + account.id
    zone_root = home.root.resolve()
    datasets_root = home.datasets_dir.resolve()
    notes: list[str] = []

    datasets: dict[str, Path] = {}
    manifests: dict[str, Path] = {}
    for dataset_id in granted:
        data = home.dataset_data_dir(dataset_id).resolve()
        if not data.is_dir() or datasets_root not in data.parents:
            notes.append(f"dataset {dataset_id!r} is granted but its stored copy is missing")
            continue
        datasets[dataset_id] = data
        manifest = home.dataset_manifest_path(dataset_id).resolve()
        if manifest.is_file() and datasets_root in manifest.parents:
            manifests[dataset_id] = manifest

    home_inside = contract.home_inside(user)
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
        contract.ENV_DATA: contract.DATA_INSIDE,
        contract.ENV_MANIFESTS: contract.MANIFESTS_INSIDE,
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
        home_quota_bytes=config.home_quota_bytes,
        groups=dataset_gids(home, datasets, config.dataset_gid_base) if privileged else [],
        gpu_allowed=gpu_allowed(account, config),
        gpu_sessions_per_gpu=config.gpu_sessions_per_gpu,
        state_dir=sandbox_state_dir(home),
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
    return seccomp.compile_filter()


def gpu_allowed(account: AccountFacts, config: SandboxConfig) -> bool:
    """Whether *account* may have a GPU under *config* (switch on, and the role if one is set)."""
    if not config.gpu_enabled:
        return False
    return config.allow_gpu_role is None or config.allow_gpu_role in account.roles


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
    reserved = (policy.home_inside, contract.DATA_INSIDE, MANIFESTS_INSIDE, "/proc", "/dev")
    for source, dest in [*policy.system_ro_binds, *policy.ro_binds, *extra_ro_binds]:
        real = os.path.realpath(source)
        if _under(zone, real) or _under(zone, source):
            raise RuleViolation(
                f"refusing to bind {source} into a sandbox: it contains MEDZONE_HOME ({zone}); "
                "keep MEDZONE_HOME outside the Python environment and system folders"
            )
        if not os.path.isabs(dest) or any(_under(dest, r) for r in reserved) or dest == "/":
            raise InvalidInput(f"cannot bind {source} at {dest!r} in a sandbox: reserved path")
