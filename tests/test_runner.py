"""``medzone run``: parameters checked against the template, grants enforced, papermill run in
the user's real sandbox, the run recorded in the audit log.

The tiny template ``tests/runner_probe.ipynb`` (written from ``tests/runner_probe.py``) records
its uid, network interfaces, working folder and parameters into ``probe.json`` and fails on
request.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from medzone_hub import access, accounts
from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome
from medzone_hub.errors import InvalidInput
from medzone_hub.runner import (
    ParameterSpec,
    check_parameters,
    coerce_value,
    datasets_named,
    failed_cell,
    find_template,
    template_parameters,
)
from medzone_hub.sandbox import SandboxConfig

from .fixtures import add_tiny_dataset, sandbox_base

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "runner_probe.ipynb"
UID_BASE = SandboxConfig().uid_base


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class RunZone:
    def __init__(self, base: Path):
        from medzone_hub.db import connect

        self.base = base
        self.home = MedZoneHome(base / "home").ensure()
        self.store = connect(self.home.db_url)

    def run(self, user: str, template: str, *params: tuple[str, str]) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
        env[ENV_HOME] = str(self.home.root)
        argv = [sys.executable, "-m", "medzone_hub.cli", "run", template, "--user", user]
        for name, value in params:
            argv += ["-p", name, str(value)]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, cwd="/")

    def audit(self, action: str) -> list:
        from sqlalchemy import select

        from medzone_hub.models import AuditEvent

        with self.store.session() as session:
            rows = session.scalars(select(AuditEvent).where(AuditEvent.action == action)
                                   .order_by(AuditEvent.seq))
            return [(r.actor, r.subject, r.detail) for r in rows]

    def runs(self, user: str) -> list[Path]:
        folder = self.home.root / "homes" / user / "runs"
        return sorted(folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def zone():
    with sandbox_base("medzone-runner-") as base:
        z = RunZone(base)
        with z.store.session() as session:
            for name in ("alice", "bob"):
                accounts.add_user(session, name, actor="test")
            accounts.add_user(session, "steward", roles=["data-steward"], actor="test")
            add_tiny_dataset(session, z.home, "ds-a")
            add_tiny_dataset(session, z.home, "ds-b")
            app = access.apply(session, user="alice", dataset_ids=["ds-a"], purpose="runner tests")
            session.flush()
            access.approve(session, app.id, reviewer="steward")
            z.uids = {u.name: UID_BASE + u.id for u in accounts.list_users(session)}
        yield z
        z.store.close()


@pytest.fixture(scope="module")
def good_run(zone):
    done = zone.run("alice", str(PROBE), ("message", "hi there"), ("count", "5"),
                    ("ratio", "0.25"), ("flag", "true"), ("names", '["x", "y", "z"]'),
                    ("dataset", "ds-a"))
    assert done.returncode == 0, done.stderr
    return done


# --- end to end, in the sandbox ----------------------------------------------------------

def test_run_prints_the_executed_notebook_in_the_users_home(zone, good_run):
    lines = good_run.stdout.splitlines()
    assert len(lines) == 1, good_run.stdout
    notebook = Path(lines[0])
    assert notebook.is_file()
    run_dir = notebook.parent
    assert run_dir.parent == zone.home.root / "homes" / "alice" / "runs"
    assert run_dir.name.endswith("-runner_probe") and run_dir.name[:8].isdigit()
    assert notebook.name == "runner_probe.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    assert nb.metadata["papermill"]["exception"] is None
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "count = 5" in injected[0].source
    # What the notebook wrote sits next to it; the template copy is the diff base.
    assert (run_dir / "after.txt").read_text() == "reached the end"
    assert (run_dir / "template.ipynb").read_bytes() == PROBE.read_bytes()
    assert "Executing" in good_run.stderr  # papermill's progress bar


def test_run_happens_in_the_sandbox(zone, good_run):
    probe = json.loads((Path(good_run.stdout.strip()).parent / "probe.json").read_text())
    assert probe["uid"] == zone.uids["alice"]
    assert probe["interfaces"] == ["lo"]
    assert probe["home"] == "/home/alice"
    assert probe["cwd"] == probe["run_dir"]
    assert probe["cwd"].startswith("/home/alice/runs/")
    assert probe["data"] == ["ds-a"]  # the live grant, and nothing else


def test_parameters_arrive_typed(good_run):
    probe = json.loads((Path(good_run.stdout.strip()).parent / "probe.json").read_text())
    assert probe["params"] == {"message": "hi there", "count": 5, "ratio": 0.25, "flag": True,
                               "names": ["x", "y", "z"], "dataset": "ds-a"}
    assert probe["types"] == ["str", "int", "float", "bool", "list"]


def test_run_is_audited_with_hashes(zone, good_run):
    notebook = Path(good_run.stdout.strip())
    rows = [r for r in zone.audit("run.execute") if r[2]["output"].endswith(
        f"{notebook.parent.name}/runner_probe.ipynb")]
    assert len(rows) == 1
    actor, subject, detail = rows[0]
    assert actor == "alice"
    assert subject == "template:runner_probe"
    assert detail["status"] == "ok"
    assert detail["template_sha256"] == _sha(PROBE)
    assert detail["output_sha256"] == _sha(notebook)
    assert detail["parameters"]["count"] == 5 and detail["parameters"]["dataset"] == "ds-a"


def test_failing_cell_is_one_line_naming_it_and_keeps_the_partial_notebook(zone):
    before = len(zone.runs("bob"))
    done = zone.run("bob", str(PROBE), ("fail", "yes"))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("medzone: error: run of runner_probe failed: cell 3 `if fail:`")
    assert "RuntimeError: probe failure requested" in last
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    kept = Path(last.split("partial notebook kept at ")[1])
    assert kept.is_file() and kept.parent.parent == zone.home.root / "homes" / "bob" / "runs"
    assert len(zone.runs("bob")) == before + 1
    assert (kept.parent / "probe.json").is_file()  # cells before the failure ran
    assert not (kept.parent / "after.txt").exists()  # cells after it did not
    detail = [r[2] for r in zone.audit("run.execute") if r[0] == "bob"][-1]
    assert detail["status"] == "failed" and "cell 3" in detail["error"]
    assert detail["output_sha256"] == _sha(kept)


# --- refusals before anything runs ----------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    ([("nope", "1")], "unknown parameter 'nope' (valid: count, dataset, fail, flag, message, "
                      "names, ratio)"),
    ([("count", "many")], "parameter 'count' takes an int"),
    ([("count", "2.5")], "parameter 'count' takes an int"),
    ([("ratio", "half")], "parameter 'ratio' takes a float"),
    ([("flag", "maybe")], "parameter 'flag' takes a bool"),
    ([("names", "x")], "parameter 'names' takes a list"),
    ([("count", "1"), ("count", "2")], "parameter 'count' given twice"),
    ([("dataset", "ds-b")], "user 'alice' holds no live grant for dataset 'ds-b'"),
    ([("dataset", "ds-none")], "holds no live grant for dataset 'ds-none'"),
])
def test_bad_parameters_are_refused_in_one_line(zone, params, message):
    before = len(zone.runs("alice"))
    done = zone.run("alice", str(PROBE), *params)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("medzone: error: ") and message in lines[0]
    assert len(zone.runs("alice")) == before  # nothing was started


def test_unknown_template_lists_the_templates(zone):
    done = zone.run("alice", "no_such_template")
    assert done.returncode == 1
    line = done.stderr.strip()
    assert "no template 'no_such_template'" in line and "\n" not in line


def test_unknown_user_is_refused(zone):
    done = zone.run("mallory", str(PROBE))
    assert done.returncode == 1 and "mallory" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- the pieces --------------------------------------------------------------------------

def test_inspection_infers_types_from_defaults():
    specs = template_parameters(PROBE)
    assert {n: s.type for n, s in specs.items()} == {
        "message": "str", "count": "int", "ratio": "float", "flag": "bool", "names": "list",
        "dataset": "str", "fail": "bool"}


def test_coercion():
    assert coerce_value(ParameterSpec("n", "int", "1"), " 7 ") == 7
    assert coerce_value(ParameterSpec("r", "float", "0.5"), "3") == 3.0
    assert coerce_value(ParameterSpec("b", "bool", "False"), "No") is False
    assert coerce_value(ParameterSpec("l", "list", "[]"), "[1, 'a']") == [1, "a"]
    assert coerce_value(ParameterSpec("d", "dict", "{}"), '{"a": 1}') == {"a": 1}
    assert coerce_value(ParameterSpec("s", "str", "''"), "007") == "007"
    assert coerce_value(ParameterSpec("x", "any", "None"), "12") == 12
    assert coerce_value(ParameterSpec("x", "any", "None"), "text") == "text"
    with pytest.raises(InvalidInput, match="takes a dict"):
        coerce_value(ParameterSpec("d", "dict", "{}"), "[1]")


def test_dataset_parameters_include_defaults():
    specs = {"dataset": ParameterSpec("dataset", "str", "'demo'"),
             "train_dataset": ParameterSpec("train_dataset", "str", "''"),
             "datasets_note": ParameterSpec("datasets_note", "str", "'x'")}
    assert datasets_named(specs, {}) == {"dataset": "demo"}
    assert datasets_named(specs, check_parameters(specs, [("train_dataset", "b")])) == {
        "dataset": "demo", "train_dataset": "b"}


def test_failed_cell_names_template_index_and_tags(tmp_path):
    nb = nbformat.v4.new_notebook()
    error_tag = nbformat.v4.new_markdown_cell("error")
    error_tag.metadata["tags"] = ["papermill-error-cell-tag"]
    injected = nbformat.v4.new_code_cell("x = 1")
    injected.metadata["tags"] = ["injected-parameters"]
    bad = nbformat.v4.new_code_cell("\n  model.fit(x)  \nmore()")
    bad.metadata["tags"] = ["train"]
    bad.metadata["papermill"] = {"exception": True, "status": "failed"}
    bad.outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="bad shape\nmore",
                                          traceback=[])]
    nb.cells = [error_tag, nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("x = 0"),
                injected, bad]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    assert failed_cell(path) == "cell 2 [train] `model.fit(x)` failed: ValueError: bad shape"


def test_template_names_resolve_in_the_templates_folder(tmp_path):
    (tmp_path / "one.ipynb").write_text("{}")
    assert find_template("one", tmp_path) == (tmp_path / "one.ipynb").resolve()
    with pytest.raises(Exception, match=r"no template 'two' \(templates: one\)"):
        find_template("two", tmp_path)


def test_cli_takes_negative_and_list_values():
    from medzone_hub.cli import build_parser

    args = build_parser().parse_args(["run", "ct_nodule_analysis", "--user", "alice",
                                      "-p", "candidate_threshold_hu", "-200",
                                      "-p", "channels", "[8, 16]"])
    assert args.param == [["candidate_threshold_hu", "-200"], ["channels", "[8, 16]"]]
    spec = template_parameters(ROOT / "templates" / "ct_nodule_analysis.ipynb")
    assert coerce_value(spec["candidate_threshold_hu"], "-200") == -200.0
