"""The sandbox's seccomp filter: a classic-BPF program that bubblewrap installs (``--seccomp FD``).

A deny-list, like the default profiles of container runtimes (Docker, Podman): every system
call is allowed except those below, which fail with ``EPERM`` (the process is not killed, so
a library probing a feature gets an ordinary error):

* mounts and namespaces: ``mount``, ``umount2``, ``pivot_root``, the new mount API
  (``fsopen`` … ``mount_setattr``), ``unshare``, ``setns``, and ``clone`` with any
  namespace flag (``clone3``, whose flags live in memory a filter cannot read, fails with
  ``ENOSYS`` so that the C library falls back to ``clone``, as under Docker);
* other processes' memory: ``ptrace``, ``process_vm_readv``/``writev``, ``kcmp``;
* the kernel itself: module loading (``init_module``, ``finit_module``, ``delete_module``),
  ``kexec_load``/``kexec_file_load``, ``reboot``, ``bpf``, ``perf_event_open``,
  ``userfaultfd``, ``io_uring_*``, keyrings (``keyctl``, ``add_key``, ``request_key``),
  ``syslog``, ``acct``, ``swapon``/``swapoff``, ``quotactl``, ``lookup_dcookie``,
  ``open_by_handle_at``/``name_to_handle_at``, ``vhangup``, the clock (``settimeofday``,
  ``clock_settime``, ``clock_adjtime``, ``adjtimex``), port I/O (``iopl``, ``ioperm``) and
  obsolete calls (``uselib``, ``ustat``, ``sysfs``, ``_sysctl``, …);
* ``personality`` other than the default Linux personalities Docker allows (0, 0x8,
  0x20000, 0x20008, and 0xffffffff to query).

A system call made through another ABI than the machine's own (i386 ``int 0x80`` or x32 on
x86_64, 32-bit ARM on aarch64) kills the process: the numbers above would not match there.

Only x86_64 and aarch64 have a table here: on any other architecture :func:`compile_filter`
raises :class:`UnsupportedArchitecture`, and no sandbox starts (rather than one without a
filter). The numbers are the kernel's (``asm/unistd_64.h``, ``asm-generic/unistd.h``);
``tests/security/test_sandbox_limits.py`` checks them against libseccomp where it is installed.
"""

from __future__ import annotations

import errno
import platform
import struct

#: ``AUDIT_ARCH_*`` values the kernel puts in ``seccomp_data.arch``.
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

#: Machine names (``platform.machine()``) for the same architectures.
MACHINE_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}

#: System calls numbers per architecture: every call this module names.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "acct": 163, "add_key": 248, "adjtimex": 159, "afs_syscall": 183, "bpf": 321,
        "clock_adjtime": 305, "clock_settime": 227, "clone": 56, "clone3": 435,
        "create_module": 174, "delete_module": 176, "finit_module": 313, "fsconfig": 431,
        "fsmount": 432, "fsopen": 430, "fspick": 433, "get_kernel_syms": 177,
        "init_module": 175, "io_uring_enter": 426, "io_uring_register": 427,
        "io_uring_setup": 425, "ioperm": 173, "iopl": 172, "kcmp": 312,
        "kexec_file_load": 320, "kexec_load": 246, "keyctl": 250, "lookup_dcookie": 212,
        "mount": 165, "mount_setattr": 442, "move_mount": 429, "name_to_handle_at": 303,
        "nfsservctl": 180, "open_by_handle_at": 304, "open_tree": 428,
        "perf_event_open": 298, "personality": 135, "pivot_root": 155,
        "process_vm_readv": 310, "process_vm_writev": 311, "ptrace": 101,
        "query_module": 178, "quotactl": 179, "quotactl_fd": 443, "reboot": 169,
        "request_key": 249, "security": 185, "setns": 308, "settimeofday": 164,
        "swapoff": 168, "swapon": 167, "_sysctl": 156, "sysfs": 139, "syslog": 103,
        "tuxcall": 184, "umount2": 166, "unshare": 272, "uselib": 134, "userfaultfd": 323,
        "ustat": 136, "vhangup": 153, "vserver": 236,
    },
    "aarch64": {
        "acct": 89, "add_key": 217, "adjtimex": 171, "bpf": 280, "clock_adjtime": 266,
        "clock_settime": 112, "clone": 220, "clone3": 435, "delete_module": 106,
        "finit_module": 273, "fsconfig": 431, "fsmount": 432, "fsopen": 430, "fspick": 433,
        "init_module": 105, "io_uring_enter": 426, "io_uring_register": 427,
        "io_uring_setup": 425, "kcmp": 272, "kexec_file_load": 294, "kexec_load": 104,
        "keyctl": 219, "lookup_dcookie": 18, "mount": 40, "mount_setattr": 442,
        "move_mount": 429, "name_to_handle_at": 264, "nfsservctl": 42,
        "open_by_handle_at": 265, "open_tree": 428, "perf_event_open": 241,
        "personality": 92, "pivot_root": 41, "process_vm_readv": 270,
        "process_vm_writev": 271, "ptrace": 117, "quotactl": 60, "quotactl_fd": 443,
        "reboot": 142, "request_key": 218, "setns": 268, "settimeofday": 170,
        "swapoff": 225, "swapon": 224, "syslog": 116, "umount2": 39, "unshare": 97,
        "userfaultfd": 282, "vhangup": 58,
    },
}

#: Denied outright (EPERM) wherever the architecture has the call.
DENIED = (
    "acct", "add_key", "adjtimex", "afs_syscall", "bpf", "clock_adjtime", "clock_settime",
    "create_module", "delete_module", "finit_module", "fsconfig", "fsmount", "fsopen",
    "fspick", "get_kernel_syms", "init_module", "io_uring_enter", "io_uring_register",
    "io_uring_setup", "ioperm", "iopl", "kcmp", "kexec_file_load", "kexec_load", "keyctl",
    "lookup_dcookie", "mount", "mount_setattr", "move_mount", "name_to_handle_at",
    "nfsservctl", "open_by_handle_at", "open_tree", "perf_event_open", "pivot_root",
    "process_vm_readv", "process_vm_writev", "ptrace", "query_module", "quotactl",
    "quotactl_fd", "reboot", "request_key", "security", "setns", "settimeofday", "swapoff",
    "swapon", "_sysctl", "sysfs", "syslog", "tuxcall", "umount2", "unshare", "uselib",
    "userfaultfd", "ustat", "vhangup", "vserver",
)

#: ``clone`` flags that make new namespaces (CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC,
#: NEWUSER, NEWPID, NEWNET): a ``clone`` with any of them set is denied.
CLONE_NAMESPACE_FLAGS = 0x7E020000

#: ``personality`` values allowed (Docker's list): PER_LINUX, PER_LINUX32, UNAME26 and
#: both together, and 0xffffffff, which only reads the current one.
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# --- classic BPF -----------------------------------------------------------------------

# seccomp return values (linux/seccomp.h)
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

# instruction classes and modes (linux/filter.h)
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = 32-bit word at offset k of seccomp_data
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET = 0x06  # BPF_RET | BPF_K

# offsets in struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6];} (little-endian)
_NR, _ARCH = 0, 4


def _arg_lo(i: int) -> int:
    return 16 + 8 * i


def _arg_hi(i: int) -> int:
    return 20 + 8 * i


#: x86_64 marks x32-ABI system calls with this bit in the number.
X32_SYSCALL_BIT = 0x40000000


class UnsupportedArchitecture(Exception):
    """No system-call table for this machine: no filter can be built."""


def native_arch(machine: str | None = None) -> str:
    """``"x86_64"`` or ``"aarch64"``; :class:`UnsupportedArchitecture` otherwise."""
    machine = machine or platform.machine()
    arch = MACHINE_ALIASES.get(machine.lower())
    if arch is None:
        raise UnsupportedArchitecture(
            f"no seccomp filter for the {machine!r} architecture (only x86_64 and aarch64)")
    return arch


class _Program:
    """A tiny assembler: instructions with forward jumps to named labels."""

    def __init__(self):
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def load(self, offset: int) -> None:
        self.code.append((_LD_W_ABS, 0, 0, offset))

    def jump(self, op: int, k: int, true: str | None, false: str | None) -> None:
        # None: fall through to the next instruction.
        self.code.append((op, true, false, k))

    def ret(self, value: int) -> None:
        self.code.append((_RET, 0, 0, value))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (op, jt, jf, k) in enumerate(self.code):
            offsets = []
            for target in (jt, jf):
                if isinstance(target, str):
                    delta = self.labels[target] - pc - 1
                    if not 0 <= delta <= 255:
                        raise ValueError(f"BPF jump to {target} out of range ({delta})")
                    offsets.append(delta)
                else:
                    offsets.append(0 if target is None else target)
            out += struct.pack("<HBBI", op, offsets[0], offsets[1], k & 0xFFFFFFFF)
        return bytes(out)


def compile_filter(arch: str | None = None, *, errno_value: int = errno.EPERM) -> bytes:
    """The filter for *arch* (default: this machine) as bytes for ``bwrap --seccomp``:
    an array of ``struct sock_filter`` in the machine's byte order (little-endian)."""
    arch = native_arch(arch)
    table = SYSCALLS[arch]
    deny = RET_ERRNO | (errno_value & 0xFFFF)
    p = _Program()
    # 1. Another ABI than the native one: kill (its numbers mean other calls).
    p.load(_ARCH)
    p.jump(_JEQ, AUDIT_ARCH[arch], None, "kill")
    p.load(_NR)
    if arch == "x86_64":
        p.jump(_JGE, X32_SYSCALL_BIT, "kill", None)
    # 2. The deny-list, one comparison each.
    for name in DENIED:
        if name in table:
            p.jump(_JEQ, table[name], "deny", None)
    # 3. Calls allowed with some arguments only.
    p.jump(_JEQ, table["clone"], "clone", None)
    p.jump(_JEQ, table["clone3"], "enosys", None)
    p.jump(_JEQ, table["personality"], "personality", None)
    p.ret(RET_ALLOW)
    # clone(flags, …): flags are the first argument on both architectures; every
    # namespace flag sits in its low 32 bits.
    p.label("clone")
    p.load(_arg_lo(0))
    p.jump(_JSET, CLONE_NAMESPACE_FLAGS, "deny", None)
    p.ret(RET_ALLOW)
    # personality(persona): an allowed value with a zero upper half.
    p.label("personality")
    p.load(_arg_hi(0))
    p.jump(_JEQ, 0, None, "deny")
    p.load(_arg_lo(0))
    for value in PERSONALITY_ALLOWED:
        p.jump(_JEQ, value, "allow", None)
    p.label("deny")
    p.ret(deny)
    p.label("allow")
    p.ret(RET_ALLOW)
    p.label("enosys")
    p.ret(RET_ERRNO | errno.ENOSYS)
    p.label("kill")
    p.ret(RET_KILL_PROCESS)
    return p.assemble()


def evaluate(program: bytes, nr: int, *, arch: int, args: tuple[int, ...] = ()) -> int:
    """Run *program* on one system call as the kernel would and return its verdict
    (``RET_ALLOW``, ``RET_ERRNO | errno``, ``RET_KILL_PROCESS``). For tests and docs."""
    args = tuple(args) + (0,) * (6 - len(args))
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(a & 0xFFFFFFFFFFFFFFFF for a in args))
    code = [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = code[pc]
        if op == _LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif op == _RET:
            return k
        elif op in (_JEQ, _JGE, _JSET):
            hit = (acc == k) if op == _JEQ else (acc >= k) if op == _JGE else bool(acc & k)
            pc += 1 + (jt if hit else jf)
        else:
            raise ValueError(f"unknown BPF instruction {op:#x} at {pc}")


__all__ = [
    "AUDIT_ARCH", "CLONE_NAMESPACE_FLAGS", "DENIED", "PERSONALITY_ALLOWED", "RET_ALLOW",
    "RET_ERRNO", "RET_KILL_PROCESS", "SYSCALLS", "UnsupportedArchitecture", "compile_filter",
    "evaluate", "native_arch",
]
