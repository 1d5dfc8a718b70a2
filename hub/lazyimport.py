"""Third-party modules loaded on first use, for modules every `medzone` command imports.

pandas and pydicom take 0.3 s each to import; a `medzone runs list` needs neither. The
module object is a placeholder until an attribute is read (the standard library's
:class:`importlib.util.LazyLoader` recipe), so the code that uses it reads as usual.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """``name`` (a top-level package), imported when one of its attributes is first read."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
