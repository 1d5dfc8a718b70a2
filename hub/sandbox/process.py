"""A sandbox's life on the host: start it, learn its pid 1, wait for it, stop it, free
what it held. The spawner (servers), ``medzone sandbox exec`` and template runs all go
through here, so what the tests start is what the product starts.

bubblewrap forwards no signals: a sandbox is stopped by SIGKILL to its pid 1 (learnt from
``--info-fd``), which tears down its whole pid namespace. A :class:`SandboxProcess` can be
rebuilt from its persisted fields (:meth:`SandboxProcess.state`), so a restarted hub still
stops and frees what an earlier one started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import metering
from ..config import MedZoneHome
from .argv import bwrap_argv
from .policy import SandboxError, SandboxPolicy, homes_dir
from .resources import GpuRegistry, cgroup_members, release_gpu, release_resources, \
    remove_cgroup, sandbox_cgroup

log = logging.getLogger(__name__)

#: The keeper's command line before bubblewrap's: a shell in its own session that stays
#: the sandbox monitor's parent when the process that started it exits (a hub restart),
#: so ``--die-with-parent`` watches the keeper instead.
KEEPER = ("/bin/sh", "-c", '"$@"', "medzone-sandbox")


# --- before starting -------------------------------------------------------------------

def ensure_home(home: MedZoneHome, policy: SandboxPolicy) -> Path:
    """Create (or repair) ``MEDZONE_HOME/homes/<user>``: owned by the sandbox uid, 0700.
    A home left by an earlier uid of the same user has its contents given to the new one
    (:func:`give_home_to`).

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
                if st.st_uid not in (0, policy.uid):  # the user's uid changed
                    # The folder itself changes last: a repair cut short runs again.
                    given = give_home_to(fd, (st.st_uid, st.st_gid), (policy.uid, policy.gid))
                    log.warning("home %s: the user's uid changed from %d to %d; %d entries "
                                "inside given to the new uid", path, st.st_uid, policy.uid,
                                given)
                os.fchown(fd, policy.uid, policy.gid)
        os.fchmod(fd, 0o700)
        if policy.home_quota_bytes is not None:
            used = home_usage_bytes(fd)
            if used > policy.home_quota_bytes:
                raise HomeOverQuota(
                    f"the home of {path.name} uses {_size(used)}, over its quota of "
                    f"{_size(policy.home_quota_bytes)}: delete files (a data steward can "
                    "reach them on the host) before starting a server or a run")
    finally:
        os.close(fd)
    return path


class HomeOverQuota(SandboxError):
    """A home over ``home_quota_bytes``: no new sandbox for it until files are deleted."""


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


#: A home holding more entries than this is not repaired in one go (the spawn is refused
#: with a message naming the home) rather than stalling a spawn for minutes.
MAX_REPAIRED_ENTRIES = 2_000_000

_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def home_entries(home_fd: int) -> Iterator[tuple[int, str, os.stat_result]]:
    """Every entry below the home open as *home_fd*, as ``(folder_fd, name, lstat)``.

    The user owns the home and may have planted links in it, so nothing is followed: each
    folder is opened from its parent's descriptor with ``O_NOFOLLOW`` (one swapped for a
    link meanwhile is skipped) and a mount point is not entered. *folder_fd* is valid
    until the next entry."""
    dev = os.fstat(home_fd).st_dev
    pending = [os.dup(home_fd)]
    try:
        while pending:
            fd = pending.pop()
            try:
                with os.scandir(fd) as entries:
                    names = [e.name for e in entries]
                for name in names:
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        continue  # gone meanwhile
                    if st.st_dev != dev:
                        continue
                    yield fd, name, st
                    if stat.S_ISDIR(st.st_mode):
                        try:
                            pending.append(os.open(name, _DIR_OPEN, dir_fd=fd))
                        except OSError:
                            continue
            finally:
                os.close(fd)
    finally:
        for fd in pending:
            os.close(fd)


def give_home_to(home_fd: int, old: tuple[int, int], new: tuple[int, int]) -> int:
    """Everything inside the home (open as *home_fd*) owned by the *old* (uid, gid) is
    given to the *new* one: the files a user made before their sandbox uid changed (a new
    ``uid_base``, a home restored from a backup). How many entries changed.

    Nothing is followed (:func:`home_entries`); each entry is changed with
    ``fchownat(AT_SYMLINK_NOFOLLOW)`` (a symbolic link itself, never its target), and only
    what the old uid owns (a hard link to a file of root's or of anyone else stays
    theirs). The group changes only where it was the old group.
    """
    given = 0
    for fd, name, st in home_entries(home_fd):
        if st.st_uid != old[0]:
            continue
        given += 1
        if given > MAX_REPAIRED_ENTRIES:
            raise SandboxError(
                f"the home holds more than {MAX_REPAIRED_ENTRIES} entries of uid {old[0]}: "
                f"give them to uid {new[0]} by hand (chown -R --no-dereference) before the "
                "next start")
        os.chown(name, new[0], new[1] if st.st_gid == old[1] else -1, dir_fd=fd,
                 follow_symlinks=False)
    return given


def home_usage_bytes(home_fd: int) -> int:
    """The space the home's entries take on disk (allocated blocks, as ``du`` counts),
    links not followed, other mounts not counted; hard links counted once."""
    seen: set[int] = set()
    used = os.fstat(home_fd).st_blocks * 512
    for _fd, _name, st in home_entries(home_fd):
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        used += st.st_blocks * 512
    return used


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


# --- pid 1 -----------------------------------------------------------------------------

def proc_start_time(pid: int) -> int | None:
    """The start time of *pid* (clock ticks since boot), to tell a pid from a reused one."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[19])


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


# --- a running sandbox -----------------------------------------------------------------

@dataclass
class SandboxProcess:
    """A started sandbox: ``child_pid`` is its pid 1 on the host (what :func:`kill_sandbox`
    needs), ``monitor_pid`` the process started for it (bubblewrap's monitor, or the keeper
    shell). ``process`` is only known to the process that started it; the rest survives in
    :meth:`state`, from which :meth:`from_state` rebuilds it."""

    child_pid: int
    child_start: int | None = None
    monitor_pid: int | None = None
    cgroup: Path | None = None
    gpu_registry: Path | None = None
    gpu_key: str | None = None
    process: asyncio.subprocess.Process | None = None
    policy: SandboxPolicy | None = None
    cgroup_unavailable_reason: str | None = None

    @property
    def pid(self) -> int | None:
        return self.monitor_pid

    def alive(self) -> bool:
        """Whether pid 1 still runs (and is the same process, not a reused pid)."""
        start = proc_start_time(self.child_pid)
        return start is not None and (self.child_start is None or start == self.child_start)

    def kill(self) -> bool:
        return kill_sandbox(self.child_pid)

    def release(self) -> None:
        """Free its GPU reservation and its cgroup (once its processes are gone)."""
        release_gpu(self.gpu_registry, self.gpu_key)
        remove_cgroup(self.cgroup)

    async def wait(self) -> int:
        """Wait for the sandbox to end, free its resources, return its exit status."""
        rc = await self.process.wait()
        self.release()
        return 128 - rc if rc < 0 else rc

    async def stop(self, timeout: float = 10) -> None:
        """Kill pid 1 and wait (up to *timeout*) until it is gone; :meth:`finish` frees
        what it held."""
        if not self.alive():
            return
        self.kill()
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def finish(self, timeout: float = 5) -> None:
        """Reap the monitor (when this process started it) and free the resources."""
        if self.process is not None:
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except asyncio.TimeoutError:
                self.process.kill()
            self.process = None
        self.release()

    def state(self) -> dict:
        """What to persist to find the sandbox again (JSON-ready)."""
        return {"child_pid": self.child_pid, "child_start": self.child_start,
                "monitor_pid": self.monitor_pid, "cgroup": str(self.cgroup or ""),
                "gpu_registry": str(self.gpu_registry or ""), "gpu_key": self.gpu_key or ""}

    @classmethod
    def from_state(cls, state: Mapping) -> "SandboxProcess":
        return cls(child_pid=state["child_pid"], child_start=state.get("child_start"),
                   monitor_pid=state.get("monitor_pid"),
                   cgroup=Path(state["cgroup"]) if state.get("cgroup") else None,
                   gpu_registry=(Path(state["gpu_registry"]) if state.get("gpu_registry")
                                 else None),
                   gpu_key=state.get("gpu_key") or None)


def _prepare_start(policy: SandboxPolicy, home: MedZoneHome | None,
                   extra_ro_binds: Sequence[tuple[str, str]]) -> tuple[Path | None, str | None]:
    """What every start does first: the home (with *home*), the bind sources checked, and
    the policy's cgroup — ``(cgroup, reason it could not be made)``. On failure whatever was
    reserved is released."""
    cgroup = None
    try:
        if home is not None:
            ensure_home(home, policy)
        check_reachable(policy, extra_ro_binds)
        cgroup, reason = sandbox_cgroup(policy)
    except BaseException:
        release_resources(policy, cgroup)
        raise
    return cgroup, reason


async def start_sandboxed(
    policy: SandboxPolicy,
    command: Sequence[str],
    *,
    extra_ro_binds: Iterable[tuple[str, str]] = (),
    extra_env: Mapping[str, str] | None = None,
    home: MedZoneHome | None = None,
    pass_fds: Sequence[int] = (),
    keeper: bool = False,
    timeout: float = 30,
    **popen_kwargs,
) -> SandboxProcess:
    """Start *command* in *policy*'s sandbox and return once its pid 1 exists.

    With *home*, the user's home folder is created first (:func:`ensure_home`). A cgroup
    with the policy's limits is made where possible (else the reason is recorded on the
    result). *pass_fds* stay open in the sandbox (a listening socket, a secrets pipe). With
    *keeper*, the sandbox outlives this process (see :data:`KEEPER`). *popen_kwargs* go to
    :func:`asyncio.create_subprocess_exec` (stdin, stdout, stderr…). The policy's GPU
    reservation, if any, is tied to the started process.
    """
    extra_ro_binds = [tuple(b) for b in extra_ro_binds]
    cgroup, reason = _prepare_start(policy, home, extra_ro_binds)
    try:
        read_end, write_end = os.pipe()
    except BaseException:
        release_resources(policy, cgroup)
        raise
    try:
        argv = bwrap_argv(policy, command, info_fd=write_end, extra_ro_binds=extra_ro_binds,
                          extra_env=extra_env, cgroup=cgroup)
        if keeper:
            argv = [*KEEPER, *argv]
        process = await asyncio.create_subprocess_exec(
            *argv, pass_fds=(write_end, *pass_fds), env={}, start_new_session=True,
            **popen_kwargs)
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
        raise SandboxError(f"the sandbox for {policy.user} did not start "
                           f"(exit status {rc})") from err
    if policy.gpu_key and policy.gpu_registry:
        GpuRegistry(policy.gpu_registry).set_owner(policy.gpu_key, process.pid)
    if policy.gpu is not None:  # metered until measured (medzone_hub.metering.measure_tree)
        metering.watch_gpus(child_pid, proc_start_time(child_pid), [policy.gpu],
                            cgroup_members(cgroup) if cgroup is not None else ())
    return SandboxProcess(child_pid, proc_start_time(child_pid), process.pid, cgroup,
                          policy.gpu_registry, policy.gpu_key, process, policy, reason)


def run_sandboxed(policy: SandboxPolicy, command: Sequence[str], *,
                  home: MedZoneHome | None = None,
                  extra_ro_binds: Iterable[tuple[str, str]] = (),
                  extra_env: Mapping[str, str] | None = None,
                  pass_fds: Sequence[int] = (),
                  on_start: Callable[[int], None] | None = None) -> int:
    """Run *command* in *policy*'s sandbox attached to this process's stdin/stdout/stderr
    and wait for it; its exit status (128+N if killed by signal N). Its GPU reservation and
    cgroup are freed when it ends, whatever happens.

    With *home*, the user's home folder is created first. *extra_ro_binds* and *extra_env*
    are as for :func:`bwrap_argv`; *pass_fds* stay open in the sandboxed command.
    *on_start* is called with bubblewrap's monitor pid once it runs (a template run records
    it, to be cancelled: killing the monitor takes the sandbox down, ``--die-with-parent``)."""
    extra_ro_binds = [tuple(b) for b in extra_ro_binds]
    cgroup, reason = _prepare_start(policy, home, extra_ro_binds)
    if reason:
        log.warning("warning: %s", reason)
    meter = None
    try:
        argv = bwrap_argv(policy, list(command), cgroup=cgroup, extra_ro_binds=extra_ro_binds,
                          extra_env=extra_env)
        try:
            proc = subprocess.Popen(argv, env={}, close_fds=True, pass_fds=tuple(pass_fds))
        except OSError as err:
            raise SandboxError(f"cannot start bubblewrap: {err}") from None
        # What the sandbox uses, for medzone_hub.metering.take_last in this thread.
        meter = metering.Meter(cgroup_members(cgroup) if cgroup is not None else (),
                               [policy.gpu] if policy.gpu is not None else (),
                               policy.datasets)
        try:
            if on_start is not None:
                on_start(proc.pid)
            rc = meter.wait(proc)
        except BaseException:
            # On SIGINT the monitor got the same signal; --die-with-parent takes the sandbox
            # down with it.
            proc.kill()
            proc.wait()
            raise
    finally:
        if meter is not None:  # read before the cgroup goes
            metering.remember(meter.finish())
        release_resources(policy, cgroup)
    return 128 - rc if rc < 0 else rc
