"""Escape attempts, run as a script inside a sandbox (and, as a control, outside one).

Standalone on purpose: it imports nothing of MedZone, so it behaves the same inside and
outside. ``python3 sandbox_probe.py '<json plan>'`` prints one JSON object of results; each
attempt records what happened ("ok", or the error) and never raises. The tests assert on
the results: an attempt that succeeded inside a sandbox is an escape.

Network attempts only ever aim at 127.0.0.1, where the test listens on the host.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
import tempfile

CLONE_NEWUSER = 0x10000000
PTRACE_ATTACH = 16
PTRACE_DETACH = 17


def _err(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def attempt(fn):
    try:
        result = fn()
    except BaseException as exc:  # noqa: BLE001 - every outcome is a result here
        return _err(exc)
    return "ok" if result is None else result


def in_child(fn):
    """Run *fn* in a forked child (for attempts that would change this process if they worked)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        except OSError as exc:
            os._exit(exc.errno or 255)
        os._exit(0)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code:
        raise OSError(code, os.strerror(code))


def read(path: str):
    if os.path.isdir(path):
        os.listdir(path)
    else:
        with open(path, "rb") as fh:
            fh.read(1)


def write(path: str):
    with open(path, "w") as fh:
        fh.write("probe\n")


def tcp_connect(port: int):
    with socket.create_connection(("127.0.0.1", port), timeout=3):
        pass


def tcp_loopback_inside():
    """Connect to a listener of our own on 127.0.0.1: shows the connect attempt itself works."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        tcp_connect(server.getsockname()[1])


def udp_send(port: int, token: str):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(token.encode(), ("127.0.0.1", port))


def libc_call(name: str, *args):
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, name)
    fn.restype = ctypes.c_long
    if fn(*args) == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def ptrace_attach(pid: int):
    libc_call("ptrace", ctypes.c_long(PTRACE_ATTACH), ctypes.c_long(pid), None, None)
    libc_call("ptrace", ctypes.c_long(PTRACE_DETACH), ctypes.c_long(pid), None, None)


def run(argv: list[str]) -> dict:
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=10)
    except OSError as exc:
        return {"rc": None, "error": _err(exc), "out": ""}
    return {"rc": done.returncode, "out": (done.stdout + done.stderr).strip()[-500:]}


def mount_attempt() -> dict:
    """Try to mount a tmpfs on a fresh empty folder (needs root: must fail)."""
    target = tempfile.mkdtemp(prefix="probe-mnt-")
    try:
        return run(["mount", "-t", "tmpfs", "none", target])
    finally:
        os.rmdir(target)


def main(plan: dict) -> dict:
    out: dict = {
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "tcp_loopback_inside": attempt(tcp_loopback_inside),
        "setuid0": attempt(lambda: in_child(lambda: os.setuid(0))),
        "unshare_user": attempt(
            lambda: in_child(lambda: libc_call("unshare", ctypes.c_int(CLONE_NEWUSER)))),
        "unshare_cmd": run(["unshare", "-U", "true"]),
        "su": run(["/usr/bin/su", "-c", "id -u", "root"]),
        "mount": mount_attempt(),
    }
    if "tcp_port" in plan:
        out["tcp_host"] = attempt(lambda: tcp_connect(plan["tcp_port"]))
    if "udp_port" in plan:
        out["udp_host"] = attempt(lambda: udp_send(plan["udp_port"], plan["udp_token"]))
    if "host_pid" in plan:
        pid = plan["host_pid"]
        out["host_pid_visible"] = os.path.exists(f"/proc/{pid}")
        out["ptrace_host"] = attempt(lambda: ptrace_attach(pid))
        out["signal_host"] = attempt(lambda: os.kill(pid, 0))
    if "setuid_binary" in plan:
        out["setuid_binary"] = run([plan["setuid_binary"]])
    out["exists"] = {p: os.path.lexists(p) for p in plan.get("paths", [])}
    out["read"] = {p: attempt(lambda p=p: read(p)) for p in plan.get("paths", [])}
    out["write"] = {p: attempt(lambda p=p: write(p)) for p in plan.get("write", [])}
    out["listdir"] = {p: attempt(lambda p=p: sorted(os.listdir(p))) for p in plan.get("listdir", [])}
    out["cat"] = {p: attempt(lambda p=p: open(p).read()) for p in plan.get("cat", [])}
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
