"""Sandboxes: what one user's server or kernel sees, and how it runs on the host.

The package takes a policy; it never reads grants or accounts (the service that knows the
rules, :mod:`medzone_hub.sessions`, builds the policy from them):

* :mod:`.policy` — :class:`SandboxConfig` (the zone's settings), :class:`SandboxPolicy`
  and the pure builder :func:`build_policy` (account facts and granted datasets in);
* :mod:`.argv` — the bubblewrap command line of a policy (:func:`bwrap_argv`);
* :mod:`.gpus` — :class:`GpuDevice`, the GPU a policy is given;
* :mod:`.resources` — GPUs (detect, choose, the registry: :func:`reserve_gpu`) and cgroups
  (:func:`sandbox_cgroup`), taken and freed explicitly;
* :mod:`.process` — the lifecycle the spawner, ``medzone sandbox exec`` and template runs
  share: :func:`start_sandboxed`, :func:`run_sandboxed`, :class:`SandboxProcess`;
* :mod:`.seccomp` — the system-call filter bubblewrap installs.

See ``docs/sandbox.md``.
"""

from . import seccomp
from .argv import bwrap_argv
from .gpus import GpuDevice
from .policy import (
    DATASET_GID_BASE,
    MANIFESTS_INSIDE,
    AccountFacts,
    SandboxConfig,
    SandboxError,
    SandboxPolicy,
    _compiled_filter,
    build_policy,
    check_binds,
    dataset_gids,
    default_memory_limit,
    gpu_allowed,
    homes_dir,
    python_paths,
    sandbox_state_dir,
    seccomp_file,
)
from .process import (
    SandboxProcess,
    check_reachable,
    ensure_home,
    kill_sandbox,
    proc_start_time,
    read_info_fd,
    run_sandboxed,
    start_sandboxed,
)
from .resources import (
    GpuRegistry,
    cgroup1_parents,
    cgroup2_mount,
    cgroup_limits_unavailable_reason,
    cgroup_members,
    choose_gpu,
    create_cgroup,
    detect_gpus,
    nvidia_support_nodes,
    release_gpu,
    release_resources,
    remove_cgroup,
    reserve_gpu,
    sandbox_cgroup,
)

__all__ = [
    "AccountFacts", "GpuDevice", "GpuRegistry", "MANIFESTS_INSIDE", "SandboxConfig",
    "SandboxError", "SandboxPolicy", "SandboxProcess", "build_policy", "bwrap_argv",
    "cgroup1_parents", "cgroup2_mount", "cgroup_limits_unavailable_reason", "cgroup_members",
    "check_binds", "check_reachable", "choose_gpu", "create_cgroup", "dataset_gids",
    "HomeOverQuota", "default_memory_limit", "detect_gpus", "ensure_home", "gpu_allowed",
    "homes_dir",
    "kill_sandbox", "nvidia_support_nodes", "proc_start_time", "python_paths", "read_info_fd",
    "release_gpu", "release_resources", "remove_cgroup", "reserve_gpu", "run_sandboxed",
    "sandbox_cgroup", "sandbox_state_dir", "seccomp", "seccomp_file", "start_sandboxed",
]
