"""Sandbox ↔ host resources: limits on by default, and the seccomp filter.

Every attack runs inside a real bubblewrap sandbox: the default limits through
``medzone sandbox exec`` itself; a fork bomb and a memory hog through the same function with
small limits (``run_in_sandbox(…, config=SandboxConfig(…))``, what ``exec`` calls). While one
sandbox is being bombed, a second user's sandbox still runs a command and the store still
answers. Each denied system call is made with ``ctypes`` ``syscall()`` from inside and must
fail with EPERM; as a control, the same probe in a sandbox without the filter gets through
where the kernel alone would allow it. No assertion is about time: waits are bounded by the
sandbox's own ``timeout`` and generous subprocess timeouts.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medzone_hub import access, accounts
from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome
from medzone_hub.sandbox import (
    SandboxConfig,
    SandboxError,
    bwrap_argv,
    cgroup1_parents,
    cgroup2_mount,
    seccomp,
)
from medzone_hub.sessions import policy_for

from ..fixtures import add_tiny_dataset, sandbox_base

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="drops to sandbox uids: run as root")
DEFAULT = SandboxConfig()

#: Small limits for the attacks (the defaults are sized for real work).
PIDS = 64
MEMORY = 256 << 20
SMALL = dict(pids_limit=PIDS, nproc_limit=4 * PIDS, memory_limit_bytes=MEMORY,
             tmp_size_bytes=32 << 20, shm_size_bytes=16 << 20)

#: Runs run_in_sandbox with a SandboxConfig given as JSON (what `medzone sandbox exec`
#: does with the defaults).
RUNNER = """
import json, sys
from medzone_hub.config import resolve_home
from medzone_hub.db import connect
from medzone_hub.sandbox import SandboxConfig
from medzone_hub.sessions import run_in_sandbox
home = resolve_home()
config = SandboxConfig(**json.loads(sys.argv[1]))
sys.exit(run_in_sandbox(home, connect(home.db_url), sys.argv[2], sys.argv[3:], config=config))
"""

#: System calls made from inside: name -> (number source, args). Each must fail with EPERM.
SYSCALL_PROBE = r"""
import ctypes, errno, json, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
nr = json.loads(sys.argv[1])
sibling = os.fork()
if sibling == 0:
    time.sleep(30)
    os._exit(0)

def call(name, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr[name]), *[ctypes.c_ulong(a) for a in args])
    if ret == 0 and name == "clone":  # only if the filter let a namespace clone through
        os._exit(0)
    if ret >= 0:
        return "ok"
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))

buf = ctypes.create_string_buffer(256)
b = ctypes.addressof(buf)
attempts = {
    "mount": ("mount", b, b, b, 0, 0),
    "umount2": ("umount2", b, 0),
    "pivot_root": ("pivot_root", b, b),
    "ptrace_sibling": ("ptrace", 16, sibling, 0, 0),           # PTRACE_ATTACH
    "process_vm_readv": ("process_vm_readv", sibling, b, 1, b, 1, 0),
    "unshare_mount": ("unshare", 0x00020000),                  # CLONE_NEWNS
    "unshare_user": ("unshare", 0x10000000),                   # CLONE_NEWUSER
    "unshare_net": ("unshare", 0x40000000),                    # CLONE_NEWNET
    "clone_newns": ("clone", 0x00020000 | 17, 0, 0, 0, 0),     # CLONE_NEWNS | SIGCHLD
    "setns": ("setns", 0, 0),
    "keyctl": ("keyctl", 0, 0xFFFFFFFD, 0),                    # GET_KEYRING_ID, session
    "add_key": ("add_key", b, b, 0, 0, 0xFFFFFFFD),
    "request_key": ("request_key", b, b, 0, 0),
    "bpf": ("bpf", 0, b, 48),
    "perf_event_open": ("perf_event_open", b, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0),
    "userfaultfd": ("userfaultfd", 1),                         # UFFD_USER_MODE_ONLY
    "init_module": ("init_module", b, 0, b),
    "finit_module": ("finit_module", 0, b, 0),
    "delete_module": ("delete_module", b, 0),
    "kexec_load": ("kexec_load", 0, 0, 0, 0),
    "open_by_handle_at": ("open_by_handle_at", 0, b, 0),
    "name_to_handle_at": ("name_to_handle_at", 0xFFFFFF9C, b, b, b, 0),
    "reboot": ("reboot", 0, 0, 0, 0),
    "swapon": ("swapon", b, 0),
    "acct": ("acct", 0),
    "settimeofday": ("settimeofday", 0, 0),
    "clock_settime": ("clock_settime", 0, b),
    "syslog": ("syslog", 3, b, 16),                            # SYSLOG_ACTION_READ_ALL
    "io_uring_setup": ("io_uring_setup", 1, b),
    "personality_no_aslr": ("personality", 0x0040000),         # ADDR_NO_RANDOMIZE
}
if "iopl" in nr:
    attempts["iopl"] = ("iopl", 3)
    attempts["ioperm"] = ("ioperm", 0x80, 1, 1)
result = {key: call(*spec) for key, spec in attempts.items()}
result["personality_query"] = call("personality", 0xFFFFFFFF)
result["clone3"] = call("clone3", 0, 0)
os.kill(sibling, 9)
print(json.dumps(result))
"""

#: What the filter denies with EPERM, as the probe names it.
DENIED_INSIDE = (
    "mount", "umount2", "pivot_root", "ptrace_sibling", "process_vm_readv", "unshare_mount",
    "unshare_user", "unshare_net", "clone_newns", "setns", "keyctl", "add_key",
    "request_key", "bpf", "perf_event_open", "userfaultfd", "init_module", "finit_module",
    "delete_module", "kexec_load", "open_by_handle_at", "name_to_handle_at", "reboot",
    "swapon", "acct", "settimeofday", "clock_settime", "syslog", "io_uring_setup",
    "personality_no_aslr",
)


class Zone:
    def __init__(self, base: Path):
        from medzone_hub.db import connect
        from medzone_hub.hubapp import secure_home

        self.base = base
        self.home = MedZoneHome(base / "home").ensure()
        self.store = connect(self.home.db_url)
        with self.store.session() as session:
            for name in ("eve", "frank"):
                accounts.add_user(session, name, actor="test")
            accounts.add_user(session, "steward", roles=["data-steward"], actor="test")
            add_tiny_dataset(session, self.home, "ds-a")
            app = access.apply(session, user="eve", dataset_ids=["ds-a"], purpose="limits")
            session.flush()
            access.approve(session, app.id, reviewer="steward")
        secure_home(self.home)

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
        env[ENV_HOME] = str(self.home.root)
        return env

    def exec(self, user: str, *cmd, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "medzone_hub.cli", "sandbox", "exec", "--user", user, "--",
             *map(str, cmd)],
            env=self.env(), capture_output=True, text=True, timeout=timeout, cwd="/")

    def with_config(self, config: dict, user: str, *cmd, **popen) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", RUNNER, json.dumps(config), user, *map(str, cmd)],
            env=self.env(), text=True, cwd="/", **popen)

    def run_with_config(self, config: dict, user: str, *cmd, timeout: float = 120):
        proc = self.with_config(config, user, *cmd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def policy(self, user: str, **kwargs):
        with self.store.session() as session:
            return policy_for(self.home, session, user, **kwargs)


@pytest.fixture(scope="module")
def zone():
    with sandbox_base("medzone-limits-") as base:
        z = Zone(base)
        yield z
        z.store.close()


def _syscall_numbers() -> dict:
    return seccomp.SYSCALLS[seccomp.native_arch()]


# --- limits on by default ----------------------------------------------------------------

@needs_root
def test_default_limits_hold_inside_a_sandbox(zone):
    done = zone.exec("eve", "python3", "-c", """
import json, os, resource
def size(p):
    s = os.statvfs(p)
    return s.f_blocks * s.f_frsize
try:
    open("/dev/new-node", "w")
    dev = "ok"
except OSError as e:
    dev = e.strerror
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
print(json.dumps({"nproc": resource.getrlimit(resource.RLIMIT_NPROC), "tmp": size("/tmp"),
                  "shm": size("/dev/shm"), "dev": dev, "seccomp": status["Seccomp"].strip()}))
""")
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr  # every default limit applied here
    got = json.loads(done.stdout)
    assert got["nproc"] == [DEFAULT.nproc_limit, DEFAULT.nproc_limit]
    assert got["tmp"] == DEFAULT.tmp_size_bytes
    assert got["shm"] == DEFAULT.shm_size_bytes
    assert got["dev"] == "Read-only file system"
    assert got["seccomp"] == "2"  # SECCOMP_MODE_FILTER


@needs_root
def test_small_settings_are_what_the_sandbox_gets(zone):
    done = zone.run_with_config(SMALL, "eve", "sh", "-c",
                                "prlimit --nproc --noheadings --output SOFT,HARD; "
                                "df -B1 --output=size /tmp /dev/shm | tail -n 2; "
                                "dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>&1 | head -1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0].split() == [str(4 * PIDS)] * 2
    assert [int(lines[1]), int(lines[2])] == [32 << 20, 16 << 20]
    assert "No space left on device" in lines[3]


def test_default_settings_are_on():
    assert DEFAULT.pids_limit and DEFAULT.nproc_limit and DEFAULT.memory_limit_bytes
    assert DEFAULT.tmp_size_bytes and DEFAULT.shm_size_bytes and DEFAULT.seccomp
    from medzone_hub.spawner import SafeZoneSpawner

    config = SafeZoneSpawner().sandbox_config()
    assert (config.pids_limit, config.nproc_limit, config.tmp_size_bytes,
            config.shm_size_bytes, config.seccomp) == (
        DEFAULT.pids_limit, DEFAULT.nproc_limit, DEFAULT.tmp_size_bytes,
        DEFAULT.shm_size_bytes, True)
    assert config.memory_limit_bytes == DEFAULT.memory_limit_bytes


# --- a fork bomb and a memory hog -----------------------------------------------------------

BOMB = r"""
import errno, os, sys, time
told = False
while True:                     # every process forks for ever: exponential until capped
    try:
        os.fork()
    except OSError as e:
        if not told and e.errno == errno.EAGAIN:
            told = True
            print("capped", flush=True)
"""


def _others_still_work(zone):
    """frank's sandbox runs a command and the store answers, while eve's is under attack."""
    other = zone.exec("frank", "sh", "-c", "echo frank-alive")
    assert (other.returncode, other.stdout) == (0, "frank-alive\n"), other.stderr
    listed = subprocess.run([sys.executable, "-m", "medzone_hub.cli", "dataset", "list",
                             "--json"], env=zone.env(), capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["id"] == "ds-a"


@needs_root
def test_a_fork_bomb_is_capped_and_others_keep_working(zone):
    bomb = zone.with_config(SMALL, "eve", "timeout", "-s", "KILL", "60", "python3", "-c",
                            BOMB, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert bomb.stdout.readline() == "capped\n"  # fork() failed with EAGAIN: capped
        # The pids cgroup holds the count at the limit while the bomb keeps trying.
        counts = [int(p.read_text()) for p in _cgroup_files("eve", "pids.current")]
        assert counts and all(n <= PIDS for n in counts)
        _others_still_work(zone)
    finally:
        bomb.send_signal(signal.SIGINT)  # as Ctrl-C on exec: the sandbox is killed, freed
        bomb.wait(timeout=120)
    assert zone.exec("eve", "true").returncode == 0  # the next sandbox starts as usual


@needs_root
def test_a_memory_hog_is_killed_inside_its_sandbox_only(zone):
    hog = zone.with_config(SMALL, "eve", "python3", "-c", """
import sys
chunks = []
print("started", flush=True)
while True:
    chunks.append(bytearray(b"x") * (16 << 20))   # touched pages, not just reserved
""", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert hog.stdout.readline() == "started\n"
    _others_still_work(zone)
    hog.wait(timeout=300)
    assert hog.returncode == 128 + 9  # the kernel's OOM killer, inside the sandbox's cgroup


def _cgroup_files(user: str, name: str) -> list[Path]:
    roots = [Path(cgroup2_mount() or "/nonexistent", "medzone"),
             *cgroup1_parents().values()]
    return [p for root in roots for p in root.glob(f"{user}-*/{name}")]


# --- the seccomp filter ----------------------------------------------------------------------

@needs_root
def test_denied_system_calls_fail_with_eperm_inside(zone):
    done = zone.exec("eve", "python3", "-c", SYSCALL_PROBE, json.dumps(_syscall_numbers()))
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    wrong = {k: got[k] for k in (*DENIED_INSIDE, *("iopl", "ioperm")) if k in got
             and got[k] != "EPERM"}
    assert wrong == {}
    assert got["personality_query"] == "ok"  # reading the personality stays allowed
    assert got["clone3"] == "ENOSYS"  # so the C library falls back to a checked clone()


@needs_root
def test_without_the_filter_the_same_probe_gets_through(zone):
    """Control: the probe does detect the filter (the kernel alone allows these)."""
    policy = zone.policy("eve", config=SandboxConfig(seccomp=False))
    assert policy.seccomp_program is None
    argv = bwrap_argv(policy, ["python3", "-c", SYSCALL_PROBE, json.dumps(_syscall_numbers())])
    done = subprocess.run(argv, env={}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["keyctl"] != "EPERM" and got["personality_no_aslr"] == "ok"
    assert got["clone3"] != "ENOSYS"


@needs_root
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x32 is an x86_64 ABI")
def test_another_abi_kills_the_process(zone):
    # getpid through the x32 ABI: the filter's table would not match it, so it kills.
    done = zone.exec("eve", "python3", "-c",
                     "import ctypes; ctypes.CDLL(None).syscall(0x40000000 | 39); print('alive')")
    assert done.returncode == 128 + 31 and "alive" not in done.stdout  # SIGSYS


def test_filter_verdicts_on_both_architectures():
    for arch in ("x86_64", "aarch64"):
        program = seccomp.compile_filter(arch)
        table, audit = seccomp.SYSCALLS[arch], seccomp.AUDIT_ARCH[arch]

        def verdict(name, *args, _p=program, _t=table, _a=audit):
            return seccomp.evaluate(_p, _t[name], arch=_a, args=args)

        eperm = seccomp.RET_ERRNO | errno.EPERM
        for name in seccomp.DENIED:
            if name in table:
                assert verdict(name) == eperm, (arch, name)
        assert verdict("clone", 0x11) == seccomp.RET_ALLOW  # a plain fork
        assert verdict("clone", 0x10000000 | 0x11) == eperm  # CLONE_NEWUSER
        assert verdict("clone3") == seccomp.RET_ERRNO | errno.ENOSYS
        assert verdict("personality", 0) == seccomp.RET_ALLOW
        assert verdict("personality", 0x0040000) == eperm
        assert verdict("personality", 1 << 32) == eperm  # the upper half counts too
        assert seccomp.evaluate(program, 0, arch=audit) == seccomp.RET_ALLOW  # read/io_setup
        other = 0x40000003  # AUDIT_ARCH_I386
        assert seccomp.evaluate(program, 1, arch=other) == seccomp.RET_KILL_PROCESS
    x86 = seccomp.compile_filter("x86_64")
    assert seccomp.evaluate(x86, 0x40000000 | 39, arch=seccomp.AUDIT_ARCH["x86_64"]) == \
        seccomp.RET_KILL_PROCESS


def test_syscall_tables_match_libseccomp():
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        pytest.skip("libseccomp is not installed")
    resolve = lib.seccomp_syscall_resolve_name_arch
    resolve.restype, resolve.argtypes = ctypes.c_int, [ctypes.c_uint32, ctypes.c_char_p]
    for arch, table in seccomp.SYSCALLS.items():
        for name, number in table.items():
            assert resolve(seccomp.AUDIT_ARCH[arch], name.encode()) == number, (arch, name)


def test_an_unknown_architecture_refuses_to_start(zone, monkeypatch):
    with pytest.raises(seccomp.UnsupportedArchitecture, match="riscv64"):
        seccomp.compile_filter("riscv64")
    from medzone_hub import sandbox

    sandbox._compiled_filter.cache_clear()
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    try:
        with pytest.raises(SandboxError, match="refusing to start a sandbox without a seccomp"):
            zone.policy("eve")
        assert zone.policy("eve", config=SandboxConfig(seccomp=False)).seccomp_program is None
    finally:
        monkeypatch.undo()
        sandbox._compiled_filter.cache_clear()
