"""The export screen (a pure library): bytes and screening indexes in, findings out.

See ``docs/screen.md`` for the rules and their defaults."""

from .engine import load_indexes, screen_bytes, screen_path, screen_paths
from .model import RULES, FileVerdict, Finding, ScreenConfig

__version__ = "1"

__all__ = ["FileVerdict", "Finding", "RULES", "ScreenConfig", "load_indexes", "screen_bytes",
           "screen_path", "screen_paths"]
