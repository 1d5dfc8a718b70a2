"""Who imports whom in MedZone's own code, read from the source with :mod:`ast`.

``python -m medzone_hub.devtools.depgraph > docs/architecture-deps.md`` writes the picture
``docs/architecture.md`` shows: a Mermaid graph of the imports between the hub's layers and
``medzone_kernel``. ``tests/test_layering.py`` checks the same imports against the layering
rules. Every import counts, at the top of a module or inside a function: a deferred import
is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: The project's packages and the folders that hold them (``package-dir`` in pyproject.toml).
REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"medzone_hub": REPO / "hub", "medzone_kernel": REPO / "medzone_kernel"}

#: Modules of the hub side grouped into the layers of docs/architecture.md; a module not
#: named here is drawn on its own. The groups are prefixes: ``medzone_hub.portal`` holds
#: ``medzone_hub.portal.app`` too.
LAYERS = {
    "faces": ("medzone_hub.cli", "medzone_hub.portal", "medzone_hub.hub_api",
              "medzone_hub.spawner", "medzone_hub.authenticator", "medzone_hub.hubapp",
              "medzone_hub.singleuser", "medzone_hub.jupyterhub_config",
              "medzone_hub.kernelspec", "medzone_hub.hubconfig"),
    "services": ("medzone_hub.access", "medzone_hub.accounts", "medzone_hub.airlock",
                 "medzone_hub.ingest", "medzone_hub.runner", "medzone_hub.registry",
                 "medzone_hub.indexes", "medzone_hub.manifest", "medzone_hub.previews",
                 "medzone_hub.risk_report", "medzone_hub.deid", "medzone_hub.demodata",
                 "medzone_hub.homefs", "medzone_hub.sessions", "medzone_hub.staging",
                 "medzone_hub.executors", "medzone_hub.runqueue", "medzone_hub.usage",
                 "medzone_hub.slurm"),
    "sandbox": ("medzone_hub.sandbox", "medzone_hub.seccomp", "medzone_hub.processes",
                "medzone_hub.metering"),
    "screen": ("medzone_hub.screen",),
    "store": ("medzone_hub.models", "medzone_hub.db", "medzone_hub.audit",
              "medzone_hub.migrations"),
    "base": ("medzone_hub.config", "medzone_hub.errors", "medzone_hub.logs",
             "medzone_hub.lazyimport"),
    "kernel": ("medzone_kernel",),
}


@dataclass(frozen=True)
class Import:
    """One import statement's target, as seen from *module*."""

    module: str  # the importing module, e.g. "medzone_hub.cli"
    target: str  # the imported module, e.g. "medzone_hub.db" or "numpy.linalg"
    path: Path
    line: int
    local: bool  # inside a function (or class) body, not at the top of the module

    @property
    def top(self) -> str:
        """The target's top-level package (``numpy`` for ``numpy.linalg``)."""
        return self.target.split(".")[0]

    def __str__(self) -> str:
        where = "function-local " if self.local else ""
        return f"{self.path.relative_to(REPO)}:{self.line}: {self.module} {where}imports {self.target}"


def modules() -> Iterator[tuple[str, Path]]:
    """(dotted name, file) of every Python module of the project's packages."""
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join((package, *parts)), path


def imports_of(module: str, path: Path) -> Iterator[Import]:
    """Every import in *path* (the module *module*), relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, local: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.ClassDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(module, alias.name, path, child.lineno, local)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target == "__future__":
                    continue
                # "from . import audit" imports the module medzone_hub.audit.
                # "from . import __version__" imports the package itself.
                names = [a.name for a in child.names]
                submodules = [f"{target}.{n}" for n in names if _is_module(f"{target}.{n}")]
                for t in submodules or [target]:
                    yield Import(module, t, path, child.lineno, local)
            yield from visit(child, inner)

    yield from visit(tree, False)


def _is_module(name: str) -> bool:
    package, _, rest = name.partition(".")
    folder = PACKAGES.get(package)
    if folder is None or not rest:
        return False
    base = folder.joinpath(*rest.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def all_imports() -> list[Import]:
    return [imp for module, path in modules() for imp in imports_of(module, path)]


def module_graph() -> dict[str, set[str]]:
    """Module → the project's modules it imports (a package's own submodules aside)."""
    known = {module for module, _ in modules()}
    graph: dict[str, set[str]] = {module: set() for module in known}
    for imp in all_imports():
        target = imp.target
        while target and target not in known:  # "pkg.mod.name" → "pkg.mod"
            target = target.rpartition(".")[0]
        if target and target != imp.module and not imp.module.startswith(target + "."):
            graph[imp.module].add(target)
    return graph


def import_cycles() -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's
    strongly connected components of :func:`module_graph`)."""
    graph = module_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def is_stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names


def layer_of(module: str) -> str:
    if module == "medzone_hub":  # the package's __init__: its version, nothing else
        return "base"
    for layer, prefixes in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    return module


def mermaid() -> str:
    """The layers and the imports between them, as a Mermaid flowchart in Markdown."""
    members: dict[str, set[str]] = {}
    edges: dict[tuple[str, str], set[str]] = {}
    project = tuple(PACKAGES)
    for imp in all_imports():
        if imp.module.startswith("medzone_hub.devtools"):
            continue
        src = layer_of(imp.module)
        members.setdefault(src, set()).add(imp.module)
        if imp.top not in project:
            continue
        dst = layer_of(imp.target)
        if dst != src:
            edges.setdefault((src, dst), set()).add(f"{_short(imp.module)} → {_short(imp.target)}")
    lines = [
        "# MedZone's dependency picture",
        "",
        "Generated from the code by `python -m medzone_hub.devtools.depgraph > "
        "docs/architecture-deps.md`; do not edit by hand. An arrow is at least one import "
        "(at the top of a module or inside a function) from one layer to another; the "
        "number is how many distinct module pairs it stands for.",
        "",
        "```mermaid",
        "flowchart TD",
    ]
    for layer in sorted(members):
        shown = sorted(_short(m) for m in members[layer])
        label = f"{layer}<br/><small>{', '.join(shown[:12])}{' …' if len(shown) > 12 else ''}</small>"
        lines.append(f'    {_node(layer)}["{label}"]')
    for (src, dst), pairs in sorted(edges.items()):
        lines.append(f"    {_node(src)} -->|{len(pairs)}| {_node(dst)}")
    lines += ["```", "", "## The imports between layers", ""]
    for (src, dst), pairs in sorted(edges.items()):
        lines.append(f"- **{src} → {dst}**: {', '.join(sorted(pairs))}")
    return "\n".join(lines) + "\n"


def _short(module: str) -> str:
    return module.removeprefix("medzone_hub.")


def _node(layer: str) -> str:
    return layer.replace(".", "_")


def main() -> int:
    sys.stdout.write(mermaid())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
