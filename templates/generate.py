"""Writes the repository's notebooks from the cell sources below: ``python templates/generate.py``.

The notebooks are kept as code here so that a change reads as a plain diff; the ``.ipynb``
files are what people open and what ``medzone run`` executes (no outputs stored). The tests
check that the committed files are what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text: str, *tags: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def notebook(cells: list) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = cells
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


# --- tests/runner_probe.ipynb: the tiny template of tests/test_runner.py -----------------

RUNNER_PROBE = notebook([
    md("""
# Runner probe

A tiny template for the runner's tests: records where and as whom it ran, writes a file
into its run folder, and fails on request.
"""),
    code("""
message = "hello"
count = 2
ratio = 0.5
flag = False
names = ["a", "b"]
dataset = ""
fail = False
""", "parameters"),
    code("""
import json, os, socket
from pathlib import Path

run_dir = Path(os.environ.get("MEDZONE_RUN_DIR", "."))
probe = {
    "uid": os.getuid(),
    "interfaces": sorted(name for _, name in socket.if_nameindex()),
    "cwd": os.getcwd(),
    "run_dir": str(run_dir),
    "home": os.environ.get("HOME"),
    "data": sorted(os.listdir("/data")) if os.path.isdir("/data") else None,
    "params": {"message": message, "count": count, "ratio": ratio, "flag": flag,
               "names": names, "dataset": dataset},
    "types": [type(v).__name__ for v in (message, count, ratio, flag, names)],
}
Path("probe.json").write_text(json.dumps(probe))
print(probe)
"""),
    code("""
if fail:
    raise RuntimeError("probe failure requested")
"""),
    code("""
Path("after.txt").write_text("reached the end")
"""),
])


def targets() -> dict[Path, nbformat.NotebookNode]:
    out = {ROOT / "tests" / "runner_probe.ipynb": RUNNER_PROBE}
    for folder, module in (("templates", "template_sources"), ("notebooks", "tutorial_sources")):
        try:
            sources = __import__(module)
        except ImportError:
            continue
        for name, nb in sources.NOTEBOOKS.items():
            out[ROOT / folder / f"{name}.ipynb"] = nb
    return out


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, nb in targets().items():
        text = render(nb)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not check:
            path.write_text(text)
    for path in stale:
        print(f"{'stale' if check else 'wrote'}: {path.relative_to(ROOT)}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT / "templates"), str(ROOT / "notebooks")]
    sys.exit(main(sys.argv[1:]))
