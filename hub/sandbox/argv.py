"""The bubblewrap command line of a sandbox: a pure builder from a :class:`SandboxPolicy`.

Like KubeSpawner's ``objects.py``, :func:`bwrap_argv` only turns a policy (and the cgroup
and descriptors the caller already holds) into argv; starting it is :mod:`.process`'s job.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence

from medzone_kernel import contract

from ..errors import InvalidInput
from .policy import MANIFESTS_INSIDE, SandboxError, SandboxPolicy, check_binds
from .resources import cgroup_members

BWRAP = "bwrap"
SETPRIV = "setpriv"
PRLIMIT = "prlimit"


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
    argv += ["--tmpfs", contract.DATA_INSIDE]
    for dataset_id, source in sorted(policy.datasets.items()):
        argv += ["--ro-bind", str(source), contract.dataset_inside(dataset_id)]
    argv += ["--remount-ro", contract.DATA_INSIDE]
    # The granted datasets' manifests (what is in them), the same way: nothing else of
    # MEDZONE_HOME/datasets/<id>, the screening index least of all.
    argv += ["--tmpfs", MANIFESTS_INSIDE]
    for dataset_id, source in sorted(policy.manifests.items()):
        if dataset_id in policy.datasets:
            argv += ["--ro-bind", str(source), contract.manifest_inside(dataset_id)]
    argv += ["--remount-ro", MANIFESTS_INSIDE]
    argv += ["--bind", str(policy.home_host), policy.home_inside]
    for source, dest in [*policy.ro_binds, *extra_ro_binds]:
        argv += ["--ro-bind", str(source), str(dest)]
    for node in policy.gpu_devices:
        # A node outside /dev (a stand-in folder of device nodes) appears as /dev/<name>.
        inside = node if node.startswith("/dev/") else f"/dev/{os.path.basename(node)}"
        argv += ["--dev-bind", node, inside]
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
