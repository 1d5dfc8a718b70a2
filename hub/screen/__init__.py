"""The export screen (a pure library): bytes and screening indexes in, findings out.

It imports only the standard library, numpy, scipy, Pillow and threadpoolctl: callers load
the indexes (:func:`medzone_hub.indexes.load_indexes`) and pass them in.

See ``docs/screen.md`` for the rules and their defaults."""

from .engine import screen_bytes, screen_path, screen_paths
from .model import RULES, FileVerdict, Finding, ScreenConfig

__version__ = "1"

__all__ = ["FileVerdict", "Finding", "RULES", "ScreenConfig", "screen_bytes", "screen_path",
           "screen_paths"]
