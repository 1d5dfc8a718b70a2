"""Whether a process recorded in a pid file is still there."""

from __future__ import annotations

import os


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
