"""Processes the hub side starts: whether one recorded in a pid file is still there, and
ending a child politely."""

from __future__ import annotations

import os
import signal
import subprocess


def pid_alive(pid: object) -> bool:
    """True if *pid* names a running process (also one we may not signal)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def terminate(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM *proc* and reap it; SIGKILL if it has not ended after *timeout* seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
