"""Dependencies point inward: the layering of docs/architecture.md, checked on every import.

The imports are read from the source (:mod:`medzone_hub.devtools.depgraph`), at the top of
a module and inside functions alike. The layers are :data:`depgraph.LAYERS`; the rules
are :data:`RULES` below, one line each; no modules import each other, and the project's
own modules are imported at the top of a module. A failure names the file, line and
import. What breaks a rule today and is being moved is listed in the PENDING tables with
what removes it; a line left there after its import is gone gives a warning.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from medzone_hub.devtools import depgraph

#: What the screen may import besides the standard library and its own modules: it is a
#: pure library (bytes and a screening index in, findings out). pyspng and zlib_ng are
#: optional (a faster PNG decoder; without them Pillow decodes every image); usearch is the
#: approximate nearest-neighbour search of large screening indexes.
SCREEN_LIBRARIES = {"numpy", "PIL", "scipy", "threadpoolctl", "pyspng", "zlib_ng", "usearch"}


def _in(layer: str):
    return lambda module: depgraph.layer_of(module) == layer


def _is_project(target: str) -> bool:
    return target.split(".")[0] in depgraph.PACKAGES


#: (name, which importing modules it applies to, what they may not import, why)
RULES = [
    ("the screen imports only the standard library, numpy, Pillow, scipy, threadpoolctl "
     "(optionally pyspng and zlib-ng) and itself",
     _in("screen"),
     lambda imp: not (depgraph.is_stdlib(imp.target) or imp.top in SCREEN_LIBRARIES
                      or depgraph.layer_of(imp.target) == "screen"),
     "the screen runs anywhere (CLI, portal, a notebook preview): callers load indexes "
     "and pass them in"),
    ("medzone_kernel never imports medzone_hub",
     _in("kernel"),
     lambda imp: imp.top == "medzone_hub",
     "kernel code runs inside the sandbox, without the store; it reaches the hub only "
     "through the hub API"),
    ("the hub side imports nothing of medzone_kernel but its contract",
     lambda module: module.startswith("medzone_hub."),
     lambda imp: imp.top == "medzone_kernel" and imp.target != "medzone_kernel.contract",
     "the sandbox's paths and variables are agreed in medzone_kernel.contract; the rest of "
     "the kernel runs inside sandboxes"),
    ("the store imports no face, service, sandbox or screen",
     _in("store"),
     lambda imp: _is_project(imp.target)
     and depgraph.layer_of(imp.target) in ("faces", "services", "sandbox", "screen"),
     "the store is the bottom layer every other one stands on"),
    ("services import no face",
     _in("services"),
     lambda imp: _is_project(imp.target) and depgraph.layer_of(imp.target) == "faces",
     "services own rules and queries; the CLI, portal and hub API only format"),
    ("the sandbox imports no face, service or store",
     _in("sandbox"),
     lambda imp: _is_project(imp.target)
     and depgraph.layer_of(imp.target) in ("faces", "services", "store"),
     "the sandbox takes a policy built by the service that knows the grants"),
]

#: Modules that import each other today, and what removes the cycle. Remove a line when
#: its cycle is gone.
PENDING_CYCLES: list[list[str]] = []

#: Imports that break a rule today and are being moved, each with the module, the target,
#: and what removes it. Remove a line when its import is gone (the test says so).
PENDING: set[tuple[str, str]] = set()


#: Modules that may import the project's own modules inside a function, and why. An import
#: inside a function hides a dependency from whoever reads the top of the module; keep them
#: for heavy third-party libraries (torch, monai, matplotlib, papermill, nbdime…) only.
LOCAL_IMPORTS_ALLOWED = {
    "medzone_hub.hubconfig": "JupyterHub's spawner machinery, only when a face asks for it",
    "medzone_kernel.viewers": "imaging is optional where the viewers run (guarded import)",
}

#: Modules whose function-local imports of the project are still to be hoisted.
#: Remove a module when its last one is gone.
PENDING_LOCAL_IMPORTS: set[str] = set()


def _local_project_imports():
    return [imp for imp in depgraph.all_imports()
            if imp.local and _is_project(imp.target) and not imp.module.startswith(
                "medzone_hub.devtools")]


def test_no_function_local_imports_of_the_project():
    hidden = [str(imp) for imp in _local_project_imports()
              if imp.module not in LOCAL_IMPORTS_ALLOWED
              and imp.module not in PENDING_LOCAL_IMPORTS]
    assert not hidden, "import these at the top of the module:\n" + "\n".join(hidden)


def _violations():
    imports = depgraph.all_imports()
    for name, applies, forbidden, why in RULES:
        for imp in imports:
            if applies(imp.module) and forbidden(imp):
                yield name, why, imp


def test_imports_follow_the_layering():
    broken = [f"{imp}\n    breaks: {name} ({why})" for name, why, imp in _violations()
              if (imp.module, imp.target) not in PENDING]
    assert not broken, "imports against the layering:\n" + "\n".join(broken)


def test_no_module_imports_itself_through_others():
    cycles = [c for c in depgraph.import_cycles() if c not in PENDING_CYCLES]
    assert not cycles, "modules that import each other (a cycle hides which one is the " \
        "lower layer):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_pending_exceptions_are_still_needed():
    seen = {(imp.module, imp.target) for _, _, imp in _violations()}
    gone = sorted(PENDING - seen)
    gone += [c for c in PENDING_CYCLES if c not in depgraph.import_cycles()]
    gone += sorted(PENDING_LOCAL_IMPORTS - {imp.module for imp in _local_project_imports()})
    if gone:
        # Not a failure: whoever removed the import may not own this file. Delete the lines.
        warnings.warn(f"test_layering: remove from PENDING / PENDING_CYCLES, gone: {gone}",
                      stacklevel=1)


def test_the_scanner_sees_function_local_and_relative_imports(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("from . import audit\nimport numpy as np\n\n"
                      "def later():\n    from .db import open_store\n")
    imports = list(depgraph.imports_of("medzone_hub.example", source))
    assert [(i.target, i.local) for i in imports] == [
        ("medzone_hub.audit", False), ("numpy", False), ("medzone_hub.db", True)]


@pytest.mark.parametrize("layer", sorted(depgraph.LAYERS))
def test_every_layer_has_modules(layer):
    modules = [m for m, _ in depgraph.modules() if depgraph.layer_of(m) == layer]
    assert modules, f"layer {layer!r} names no existing module: update depgraph.LAYERS"


#: Libraries that take a tenth of a second or more to import and that no command needs
#: before it runs: the CLI imports every service at its top, so the services load these
#: where they are used (``medzone_hub.lazyimport``, or inside the function).
SLOW_IMPORTS = ("scipy", "pandas", "pydicom", "nibabel", "alembic", "jupyterhub", "tornado",
                "torch", "matplotlib", "requests")


def test_the_cli_starts_without_the_slow_libraries():
    code = ("import sys, types, medzone_hub.cli\n"
            "loaded = [m for m in sys.argv[1:] if type(sys.modules.get(m)) is types.ModuleType]\n"
            "print(' '.join(loaded))")
    out = subprocess.run([sys.executable, "-c", code, *SLOW_IMPORTS], capture_output=True,
                         text=True, check=True).stdout.split()
    assert not out, f"`import medzone_hub.cli` loads {out}: import them where they are used"
