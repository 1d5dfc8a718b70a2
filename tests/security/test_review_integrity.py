"""What a reviewer sees cannot be chosen by the requester.

The requester works from inside their real sandbox (``medzone sandbox exec``): they run a
template (``medzone run``), edit the executed notebook, and write a ``template.ipynb``
beside it that matches their edits (identical, forged, or a link to the notebook). The
diff reviewers get (the service function, ``medzone export show`` and the portal's review
page, behind a real hub) is still against the hub's own copy of the template, so the edits
show. A notebook no recorded run wrote is shown whole. A file type the review page cannot
preview says "no preview — download to inspect", offers reviewers the download and needs
two approvals. File names with ``#``, ``?``, quotes and non-ASCII letters keep working
in preview links and download headers.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import nbformat
import pytest
import requests

from ..hub_harness import PASSWORD, login, require_hub_tools, running_hub

require_hub_tools()

from medzone_hub import accounts, airlock, previews  # noqa: E402
from medzone_hub.accounts import set_password  # noqa: E402
from medzone_hub.config import ENV_DB_URL, ENV_HOME  # noqa: E402

USER = "alice"
REVIEWERS = ("rita", "ray")

EDIT = r"""
import json, os, shutil, sys
import nbformat
run_rel, mode = sys.argv[1], sys.argv[2]
home = os.environ["HOME"]
folder = os.path.join(home, os.path.dirname(run_rel))
notebook = os.path.join(home, run_rel)
template = os.path.join(folder, "template.ipynb")
nb = nbformat.read(notebook, as_version=4)
for cell in nb.cells:  # the executed notebook, edited after the run
    if "EXPECTED-OUTPUT" in cell.source:
        cell.source = cell.source.replace("EXPECTED-OUTPUT", "EDITED-SOURCE")
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="EDITED-OUTPUT\n")]
nb.cells.append(nbformat.v4.new_code_cell("smuggled = 'ADDED-CELL'", outputs=[
    nbformat.v4.new_output("stream", name="stdout", text="ADDED-OUTPUT\n")]))
nbformat.write(nb, notebook)
os.unlink(template)
if mode == "identical":  # a "template" identical to the edited notebook
    shutil.copy(notebook, template)
elif mode == "forged":  # the template's cells with the edits, outputs cleared
    forged = nbformat.read(notebook, as_version=4)
    for cell in forged.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("papermill", None)
    forged.cells = [c for c in forged.cells
                    if "injected-parameters" not in c.metadata.get("tags", [])]
    nbformat.write(forged, template)
elif mode == "symlink":
    os.symlink(os.path.basename(notebook), template)
print("edited")
"""

WRITE = r"""
import base64, os, sys
home = os.environ["HOME"]
rel, data = sys.argv[1], base64.b64decode(sys.argv[2])
path = os.path.join(home, rel)
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path, "wb") as f:
    f.write(data)
"""


def _template(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Review probe"),
        nbformat.v4.new_code_cell("label = 'auc'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print('EXPECTED-OUTPUT', label)"),
    ]
    nbformat.write(nb, str(path))
    return path


def _notebook_bytes(*cells: tuple[str, str]) -> bytes:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src, outputs=[
        nbformat.v4.new_output("stream", name="stdout", text=out + "\n")]) for src, out in cells]
    return nbformat.writes(nb).encode()


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    image = Image.new("RGB", (40, 30))
    image.putdata([((x * 6 + seed) % 256, y * 8 % 256, 90) for y in range(30) for x in range(40)])
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


class Zone:
    def __init__(self, hub):
        self.hub = hub
        self.home = hub.home
        self.store = hub.store
        self.template = _template(hub.base / "review_probe.ipynb")
        self._people: dict[str, requests.Session] = {}

    def cli(self, *args, timeout: float = 240) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
        env[ENV_HOME] = str(self.home.root)
        return subprocess.run([sys.executable, "-m", "medzone_hub.cli", *map(str, args)],
                              env=env, capture_output=True, text=True, timeout=timeout, cwd="/")

    def sandbox(self, *cmd) -> subprocess.CompletedProcess:
        done = self.cli("sandbox", "exec", "--user", USER, "--", *cmd, timeout=90)
        assert done.returncode == 0, done.stderr
        return done

    def write(self, rel: str, data: bytes) -> None:
        import base64

        self.sandbox("python3", "-c", WRITE, rel, base64.b64encode(data).decode())

    def run(self) -> str:
        done = self.cli("run", self.template, "--user", USER)
        assert done.returncode == 0, done.stderr
        notebook = Path(done.stdout.strip())
        return notebook.relative_to(self.home.root / "homes" / USER).as_posix()

    def request(self, *paths: str) -> int:
        done = self.cli("export", "request", "--user", USER, *paths, "--reason", "paper")
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    def views(self, rid: int) -> list[tuple[str, str, str]]:
        with self.store.session() as session:
            request = airlock.get_request(session, rid)
            assert [p for p, _ in airlock.notebook_diffs(self.home, request)] == [
                p for p, _, _ in airlock.notebook_views(self.home, request, session)]
            return airlock.notebook_views(self.home, request, session)

    def person(self, name: str) -> requests.Session:
        if name not in self._people:
            s = login(self.hub, name, PASSWORD)
            assert s.login_response.status_code == 302, name
            assert s.get(self.hub.portal_url + "catalog", timeout=60).status_code == 200
            self._people[name] = s
        return self._people[name]

    def page(self, name: str, path: str) -> requests.Response:
        return self.person(name).get(self.hub.portal_url + path, timeout=120)

    def post(self, name: str, path: str, data: dict) -> requests.Response:
        s = self.person(name)
        data = {**data, "_xsrf": s.cookies.get("_xsrf", path="/services/medzone-portal/")}
        return s.post(self.hub.portal_url + path, data=data, timeout=120, allow_redirects=False)


def _setup(hub):
    with hub.store.session() as session:
        accounts.add_user(session, USER, actor="test")
        for name in REVIEWERS:
            accounts.add_user(session, name, roles=["export-reviewer"], actor="test")
    for name in (USER, *REVIEWERS):
        set_password(hub.home, name, PASSWORD, actor="test")


@pytest.fixture(scope="module")
def zone():
    saved = os.environ.pop(ENV_DB_URL, None)
    try:
        with running_hub({"review-ds": "review test data\n"}, setup=_setup) as hub:
            yield Zone(hub)
    finally:
        if saved is not None:
            os.environ[ENV_DB_URL] = saved


# --- the diff base is the hub's copy -------------------------------------------------------

@pytest.mark.parametrize("mode", ["identical", "forged", "symlink"])
def test_a_template_beside_the_notebook_does_not_hide_the_edits(zone, mode):
    rel = zone.run()
    zone.sandbox("python3", "-c", EDIT, rel, mode)
    rid = zone.request(rel)

    (path, kind, text), = zone.views(rid)
    assert (path, kind) == (rel, "diff")
    for edit in ("EDITED-SOURCE", "EDITED-OUTPUT", "ADDED-CELL", "ADDED-OUTPUT"):
        assert edit in text, (edit, text)
    assert "EXPECTED-OUTPUT" in text  # what the template had, shown as removed

    shown = zone.cli("export", "show", rid)
    assert shown.returncode == 0, shown.stderr
    assert f"nbdime diff of {rel} against its template" in shown.stdout
    assert "ADDED-OUTPUT" in shown.stdout and "(no changes)" not in shown.stdout

    page = zone.page("rita", f"review/{rid}")
    assert page.status_code == 200, page.text[-2000:]
    body = html.unescape(page.text)
    assert 'class="notebook-diff"' in page.text
    assert "EDITED-OUTPUT" in body and "ADDED-CELL" in body and "(no changes)" not in body


def test_an_unedited_run_shows_no_changes(zone):
    rel = zone.run()
    rid = zone.request(rel)
    (path, kind, text), = zone.views(rid)
    assert kind == "diff" and "EDITED" not in text and "ADDED" not in text


# --- no recorded base: the whole notebook -------------------------------------------------

@pytest.mark.parametrize("rel", [
    "analysis/mine.ipynb",                              # written by hand
    "runs/20990101T000000Z-review_probe/review_probe.ipynb",  # a run folder no run made
])
def test_a_notebook_without_a_recorded_run_is_shown_whole(zone, rel):
    data = _notebook_bytes(("x = 'WHOLE-SOURCE-1'", "WHOLE-OUTPUT-1"),
                           ("y = 'WHOLE-SOURCE-2'", "WHOLE-OUTPUT-2"))
    zone.write(rel, data)
    zone.write(str(Path(rel).parent / "template.ipynb"), data)  # identical "template"
    rid = zone.request(rel)

    (path, kind, text), = zone.views(rid)
    assert (path, kind) == (rel, "whole")
    assert text.startswith(airlock.WHOLE_NOTEBOOK_HEADER)
    for piece in ("WHOLE-SOURCE-1", "WHOLE-OUTPUT-1", "WHOLE-SOURCE-2", "WHOLE-OUTPUT-2"):
        assert piece in text

    shown = zone.cli("export", "show", rid).stdout
    assert f"{rel}, shown whole" in shown and "WHOLE-OUTPUT-2" in shown
    page = zone.page("rita", f"review/{rid}")
    assert 'class="notebook-whole"' in page.text
    assert "WHOLE-OUTPUT-1" in page.text and "WHOLE-OUTPUT-2" in page.text


def test_a_run_notebook_copied_elsewhere_is_shown_whole(zone):
    rel = zone.run()
    zone.sandbox("sh", "-c", f'mkdir -p "$HOME/copy" && cp "$HOME/{rel}" "$HOME/copy/" && '
                             f'cp "$HOME/{Path(rel).parent}/template.ipynb" "$HOME/copy/"')
    rid = zone.request(f"copy/{Path(rel).name}")
    (path, kind, text), = zone.views(rid)
    assert kind == "whole" and "EXPECTED-OUTPUT" in text


# --- every file gets a preview, or a download and two approvals ----------------------------

def test_a_file_the_page_cannot_preview_needs_a_download_and_two_approvals(zone):
    data = b"ordinary notes, nothing else\n"
    zone.write("results/notes.xyz", data)
    rid = zone.request("results/notes.xyz")
    with zone.store.session() as session:
        request = airlock.get_request(session, rid)
        (f,) = request.files
        assert f.verdict == "review"
        assert previews.NO_PREVIEW_RULE in [x["rule"] for x in f.findings]
        assert request.approvals_required >= 2

    shown = zone.cli("export", "show", rid).stdout
    assert previews.NO_PREVIEW_TEXT in shown

    page = zone.page("rita", f"review/{rid}")
    assert previews.NO_PREVIEW_TEXT in html.unescape(page.text)
    link = re.search(r'class="download-quarantined" href="([^"]+)"', page.text)
    assert link, page.text[-3000:]
    got = zone.person("rita").get(zone.hub.url + html.unescape(link.group(1)), timeout=60)
    assert got.status_code == 200 and got.content == data
    assert got.headers["Content-Disposition"].startswith("attachment;")
    assert zone.page(USER, html.unescape(link.group(1))[len("/services/medzone-portal/"):]
                     ).status_code == 403  # never to the requester

    assert zone.post("rita", f"review/{rid}", {"decision": "approve"}).status_code == 302
    with zone.store.session() as session:
        assert airlock.get_request(session, rid).state == "pending"  # one is not enough
    assert zone.post("ray", f"review/{rid}", {"decision": "approve"}).status_code == 302
    with zone.store.session() as session:
        assert airlock.get_request(session, rid).state == "approved"


def test_the_preview_rule_is_one_rule():
    from medzone_hub.portal import export_pages

    assert export_pages.IMAGE_TYPES is previews.IMAGE_TYPES
    for name, kind in (("a.png", "image"), ("a.CSV", "table"), ("a.md", "text"),
                       ("a.ipynb", "notebook"), ("a.parquet", None), ("a", None)):
        assert previews.preview_kind(name) == kind
    results = [{"path": "x.npy", "verdict": "pass", "findings": []},
               {"path": "x.png", "verdict": "pass", "findings": []}]
    previews.add_preview_findings(results)
    assert [r["verdict"] for r in results] == ["review", "pass"]


# --- file names ----------------------------------------------------------------------------

NAMES = ['figs/a#b?c".png', "figs/그림 ü#1.png", 'tables/a#b?c".csv']


def test_odd_file_names_work_in_preview_links_and_downloads(zone):
    contents = {NAMES[0]: _png(1), NAMES[1]: _png(2),
                NAMES[2]: b"group,patients\ntreated,1200\ncontrol,1350\n"}
    for rel, data in contents.items():
        zone.write(rel, data)
    rid = zone.request(*contents)

    page = zone.page("rita", f"review/{rid}")
    assert page.status_code == 200
    sources = [html.unescape(s) for s in re.findall(r'<img class="preview"[^>]* src="([^"]+)"',
                                                    page.text)]
    assert len(sources) == 2, page.text[-3000:]
    for src in sources:
        assert "#" not in src and "?" not in src and '"' not in src
        got = zone.person("rita").get(zone.hub.url + src, timeout=60)
        assert got.status_code == 200
        rel = unquote(src.split("/files/", 1)[1])
        assert got.content == contents[rel]
    with zone.store.session() as session:
        needed = airlock.get_request(session, rid).approvals_required
    for reviewer in REVIEWERS[:needed]:
        assert zone.post(reviewer, f"review/{rid}", {"decision": "approve"}).status_code == 302

    for rel, data in contents.items():
        got = zone.post(USER, f"exports/{rid}/download", {"path": rel})
        assert got.status_code == 200 and got.content == data
        header = got.headers["Content-Disposition"]
        fallback = re.fullmatch(r'attachment; filename="([^"\\]*)"; '
                                r"filename\*=UTF-8''([A-Za-z0-9%._~-]+)", header)
        assert fallback, header
        assert all(32 <= ord(c) < 127 for c in fallback.group(1))
        assert unquote(fallback.group(2), encoding="utf-8") == Path(rel).name


def test_content_disposition_round_trips():
    for name in ('a#b?c".csv', "그림 ü#1.png", "plain.txt", "back\\slash;x=1.csv",
                 "line\r\nbreak.csv"):
        header = previews.content_disposition(name)
        assert header.isascii() and "\r" not in header and "\n" not in header
        match = re.fullmatch(r'attachment; filename="([^"\\]*)"; '
                             r"filename\*=UTF-8''([A-Za-z0-9%._~-]+)", header)
        assert match, header
        assert unquote(match.group(2), encoding="utf-8") == name  # RFC 5987: the exact name
        assert previews.url_path(f"d/{name}").count("/") == 1
        assert unquote(previews.url_path(f"d/{name}")) == f"d/{name}"
    assert previews.content_disposition("a.png", "inline").startswith('inline; filename="a.png"')
