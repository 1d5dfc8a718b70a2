"""How the faces show what the services log: one line per record on stderr.

Services log through :mod:`logging` (``logging.getLogger(__name__)``, under
``medzone_hub``) and never print; the ``medzone`` command and the portal call
:func:`log_to_stderr` so people still see those lines, as ``medzone: …``.
"""

from __future__ import annotations

import logging
import sys


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def log_to_stderr(prefix: str = "medzone") -> None:
    """Show the services' INFO lines (and worse) on stderr as ``<prefix>: <message>``
    (once per process, however often it is called)."""
    logger = logging.getLogger("medzone_hub")
    if any(isinstance(handler, _Stderr) for handler in logger.handlers):
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one line each, whatever the process's root logger does
