"""The export airlock's workflow: request, quarantine, review, release, crash safety.

The screen's rules are tested in their own suite; these tests run the real screen on files
whose verdicts are not in doubt: a PNG and a CSV of large counts pass, a CSV with a count
of 3 needs review, a file carrying a DICOM preamble is blocked, and an ONNX model is model
weights (review, and a disclosure-risk report before it can be approved).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from medzone_hub import access, airlock, audit
from medzone_hub.accounts import ROLE_EXPORT_REVIEWER, add_user
from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome
from medzone_hub.db import connect
from medzone_hub.errors import Conflict, InvalidInput, NotFound, RuleViolation
from medzone_hub.models import ExportRequest

from .fixtures import add_tiny_dataset

# --- files with known verdicts -----------------------------------------------------------

def write_png(path: Path) -> None:
    from PIL import Image

    image = Image.new("RGB", (64, 48))
    image.putdata([(x * 4, y * 5, 128) for y in range(48) for x in range(64)])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_files(root: Path) -> dict[str, Path]:
    files = {
        "clean_csv": root / "results" / "counts.csv",
        "small_csv": root / "results" / "small.csv",
        "dicom": root / "results" / "leak.bin",
        "png": root / "results" / "roc.png",
        "weights": root / "models" / "nodule.onnx",
        "risk_md": root / "reports" / "risk.md",
    }
    files["clean_csv"].parent.mkdir(parents=True, exist_ok=True)
    files["clean_csv"].write_text("group,patients\ntreated,1200\ncontrol,1350\n")
    files["small_csv"].write_text("group,patients\ntreated,3\ncontrol,1350\n")
    files["dicom"].write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" * 8)
    write_png(files["png"])
    files["weights"].parent.mkdir()
    files["weights"].write_bytes(ONNX_MODEL)
    files["risk_md"].parent.mkdir()
    files["risk_md"].write_text(RISK_REPORT_MD)
    return files


#: The head of an ONNX model (ir_version 7, producer "pytorch"): the screen's model weights.
ONNX_MODEL = b"\x08\x07\x12\x07pytorch" + bytes(32)

RISK_REPORT_MD = """# Disclosure-risk report
## Model type
2D DenseNet121 classifier of frontal chest X-rays (nodule / no nodule).
## Training data
The cxr-demo dataset, frontal views, one image per patient.
## Cohort size
480 patients
## Memorisation and membership inference
Twenty epochs with augmentation and early stopping; training and held-out loss stay close.
The file holds weights only: no embeddings, images or per-patient outputs.
## Intended use
Fine-tuning on public data outside the zone, for teaching.
"""


class Airlock:
    """A zone with a requester, two reviewers, a user without the role, and files."""

    def __init__(self, home: MedZoneHome, store):
        self.home, self.store = home, store
        with store.session() as s:
            add_user(s, "alice", actor="test")
            add_user(s, "rev1", roles=[ROLE_EXPORT_REVIEWER], actor="test")
            add_user(s, "rev2", roles=[ROLE_EXPORT_REVIEWER], actor="test")
            add_user(s, "rev3", roles=[ROLE_EXPORT_REVIEWER], actor="test")
            add_user(s, "carol", roles=[ROLE_EXPORT_REVIEWER], actor="test")  # also a requester
            add_user(s, "bob", actor="test")
            add_user(s, "root", admin=True, actor="test")
        self.user_root = airlock.user_home(home, "alice")
        self.user_root.mkdir(parents=True)
        self.files = write_files(self.user_root)

    def request(self, *paths, user="alice", reason="figures for the paper",
                risk_report=None) -> int:
        return airlock.submit_export(self.store, self.home, user=user, paths=list(paths),
                                     reason=reason, risk_report=risk_report)

    def review(self, request_id, reviewer, approve=True, comment=None) -> str:
        return airlock.decide_export(self.store, request_id, reviewer=reviewer,
                                     approve=approve, comment=comment).state

    def get(self, request_id) -> ExportRequest:
        with self.store.session() as s:
            return airlock.get_request(s, request_id)

    def audit_actions(self) -> list[str]:
        with self.store.session() as s:
            return [e.action for e in audit.events(s)]

    def verify(self) -> audit.AuditVerification:
        with self.store.session() as s:
            return audit.verify(s)


@pytest.fixture
def zone(env) -> Airlock:
    return Airlock(env.home, env.store)


@pytest.fixture
def any_backend(db_url, tmp_path) -> Airlock:
    store = connect(db_url)
    yield Airlock(MedZoneHome(tmp_path / "zone").ensure(), store)
    store.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the workflow on both backends -------------------------------------------------------

def test_pass_request_needs_one_approval_and_releases_the_reviewed_bytes(any_backend, tmp_path):
    z = any_backend
    rid = z.request("results/counts.csv", "results/roc.png")
    request = z.get(rid)
    assert (request.state, request.verdict, request.approvals_required) == ("pending", "pass", 1)
    assert {f.path: f.sha256 for f in request.files} == {
        "results/counts.csv": sha256(z.files["clean_csv"]),
        "results/roc.png": sha256(z.files["png"])}
    quarantine = airlock.quarantine_dir(z.home, rid)
    for f in request.files:
        copy = quarantine / "files" / f.path
        assert copy.stat().st_mode & 0o777 == 0o444
        assert sha256(copy) == f.sha256
    # The original changing after the request changes nothing that is released.
    z.files["clean_csv"].write_text("group,patients\ntreated,2\n")

    assert z.review(rid, "rev1", comment="fine") == "approved"
    out = tmp_path / "out"
    record, written = airlock.release_export(z.store, z.home, rid, user="alice", dest=out)
    for f in request.files:
        assert sha256(out / f.path) == f.sha256
    saved = json.loads((out / f"release-{rid}.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["screen_report_sha256"] == hashlib.sha256(
        request.screen_report.encode()).hexdigest()
    assert [r["reviewer"] for r in saved["reviews"]] == ["rev1"]
    assert saved["screen_settings"]["tools"]["medzone"]
    assert "rules" in saved["screen_settings"]
    assert z.get(rid).state == "released"
    with z.store.session() as s:
        actions = [e.action for e in audit.events(s, subject=f"export:{rid}")]
    assert actions == ["export.request", "export.approve", "export.release"]
    assert z.verify().ok


def test_review_verdict_needs_two_distinct_reviewers(any_backend):
    z = any_backend
    rid = z.request("results/small.csv")
    request = z.get(rid)
    assert (request.verdict, request.approvals_required) == ("review", 2)
    finding = request.files[0].findings[0]
    assert finding["severity"] == "review" and "row" in finding["location"]

    assert z.review(rid, "rev1") == "pending"
    with pytest.raises(Conflict, match="already reviewed"):
        z.review(rid, "rev1")
    with pytest.raises(RuleViolation, match="only approved requests"):
        airlock.release_export(z.store, z.home, rid, user="alice", dest=z.home.root / "o")
    assert z.review(rid, "rev2") == "approved"
    assert z.verify().ok


def test_model_weights_need_a_risk_report_before_approval_and_release(any_backend, tmp_path):
    z = any_backend
    bare = z.request("models/nodule.onnx")
    request = z.get(bare)
    assert (request.state, request.verdict) == ("pending", "review")
    assert airlock.status(request)["model_weights"] == ["models/nodule.onnx"]
    assert airlock.status(request)["risk_report"] is None
    with pytest.raises(airlock.MissingRiskReport, match="no disclosure-risk report"):
        airlock.decide_export(z.store, bare, reviewer="rev1", approve=True)
    assert z.get(bare).reviews == [] and z.get(bare).state == "pending"
    with z.store.session() as s:
        refused = audit.events(s, subject=f"export:{bare}")
    assert [e.action for e in refused] == ["export.request", "export.refuse"]
    assert refused[-1].actor == "rev1" and refused[-1].detail["paths"] == ["models/nodule.onnx"]
    assert z.review(bare, "rev1", approve=False) == "rejected"  # rejecting needs no report

    rid = z.request("models/nodule.onnx", risk_report="/home/alice/reports/risk.md")
    request = z.get(rid)
    assert request.risk_report_path == "reports/risk.md"
    report_hash = sha256(z.files["risk_md"])
    assert {f.path: f.sha256 for f in request.files}["reports/risk.md"] == report_hash
    assert {f.path: f.verdict for f in request.files} == {
        "models/nodule.onnx": "review", "reports/risk.md": "pass"}  # screened too
    assert airlock.risk_report_text(z.home, request) == RISK_REPORT_MD
    assert z.review(rid, "rev1") == "pending"
    assert airlock.decide_export(z.store, rid, reviewer="rev2", approve=True).state == "approved"
    out = tmp_path / "out"
    record, _written = airlock.release_export(z.store, z.home, rid, user="alice", dest=out)
    assert (out / "reports" / "risk.md").read_bytes() == z.files["risk_md"].read_bytes()
    assert (out / "models" / "nodule.onnx").read_bytes() == ONNX_MODEL
    saved = json.loads((out / f"release-{rid}.json").read_text())
    assert saved["risk_report"] == {"path": "reports/risk.md", "sha256": report_hash,
                                    "size": len(RISK_REPORT_MD.encode())}
    assert saved["model_weights"] == ["models/nodule.onnx"]
    with z.store.session() as s:
        (requested,) = [e for e in audit.events(s, subject=f"export:{rid}")
                        if e.action == "export.request"]
    assert requested.detail["risk_report"]["sha256"] == report_hash
    assert z.verify().ok


@pytest.mark.parametrize("name, text, message", [
    ("risk.md", RISK_REPORT_MD.replace("## Intended use", "## Notes"), "'## Intended use'"),
    ("risk.md", RISK_REPORT_MD.replace("480 patients", "most of them"), "cohort size"),
    ("risk.json", json.dumps({"model_type": "unet", "cohort_size": 40}),
     "training_data, memorisation, intended_use"),
    ("risk.json", "{not json", "not valid JSON"),
    ("risk.txt", RISK_REPORT_MD, ".md or .json"),
])
def test_a_risk_report_missing_a_field_is_refused_and_nothing_is_stored(zone, name, text,
                                                                         message):
    (zone.user_root / "reports" / name).write_text(text)
    with pytest.raises(InvalidInput, match=message):
        zone.request("models/nodule.onnx", risk_report=f"reports/{name}")
    with zone.store.session() as s:
        assert s.scalars(select(ExportRequest)).all() == []
    assert list(airlock.staging_dir(zone.home).iterdir()) == []


def test_a_json_risk_report_counts_and_folders_are_refused(zone):
    (zone.user_root / "reports" / "risk.json").write_text(json.dumps({
        "model_type": "3D UNet", "training_data": "ct-demo", "cohort_size": 120,
        "memorisation": "patch-based training", "intended_use": "segmentation"}))
    rid = zone.request("models", risk_report="reports/risk.json")
    assert airlock.status(zone.get(rid))["risk_report"]["path"] == "reports/risk.json"
    with pytest.raises(InvalidInput, match="is a folder"):
        zone.request("models", risk_report="reports")


def test_self_review_is_refused_even_for_a_reviewer(zone):
    (airlock.user_home(zone.home, "carol") / "r").mkdir(parents=True)
    (airlock.user_home(zone.home, "carol") / "r" / "t.csv").write_text("g,n\na,500\n")
    rid = zone.request("r/t.csv", user="carol")
    with pytest.raises(RuleViolation, match="own export request"):
        zone.review(rid, "carol")
    with pytest.raises(RuleViolation, match="export-reviewer"):
        zone.review(rid, "bob")
    assert zone.review(rid, "root") == "approved"  # admins may review
    assert zone.get(rid).reviews[0].reviewer.name == "root"


def test_block_cannot_be_approved(zone):
    rid = zone.request("results/leak.bin", "results/counts.csv")
    request = zone.get(rid)
    assert (request.state, request.verdict) == ("blocked", "block")
    assert {f.path: f.verdict for f in request.files} == {
        "results/leak.bin": "block", "results/counts.csv": "pass"}
    with pytest.raises(RuleViolation, match="blocked by the screen and cannot be approved"):
        zone.review(rid, "rev1")
    with pytest.raises(RuleViolation, match="only approved"):
        airlock.release_export(zone.store, zone.home, rid, user="alice", dest=zone.home.root / "o")
    assert zone.get(rid).reviews == []


def test_one_rejection_rejects(zone):
    rid = zone.request("results/small.csv")
    assert zone.review(rid, "rev1") == "pending"
    assert zone.review(rid, "rev2", approve=False, comment="count of 3") == "rejected"
    with pytest.raises(Conflict, match="rejected"):
        zone.review(rid, "rev3")


def test_only_the_requester_downloads(zone, tmp_path):
    rid = zone.request("results/counts.csv")
    zone.review(rid, "rev1")
    with pytest.raises(RuleViolation, match="only 'alice'"):
        airlock.release_export(zone.store, zone.home, rid, user="rev1", dest=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_tampered_quarantine_is_refused_at_download_and_audited(zone, tmp_path):
    rid = zone.request("results/counts.csv", "results/roc.png")
    zone.review(rid, "rev1")
    copy = airlock.quarantine_dir(zone.home, rid) / "files" / "results" / "counts.csv"
    os.chmod(copy, 0o644)
    copy.write_text("group,patients\ntreated,1\n")
    out = tmp_path / "out"
    with pytest.raises(airlock.TamperedQuarantine, match="results/counts.csv"):
        airlock.release_export(zone.store, zone.home, rid, user="alice", dest=out)
    assert not out.exists() or not any(out.rglob("*"))
    assert zone.get(rid).state == "approved"
    assert zone.audit_actions()[-1] == "export.tamper"
    assert zone.verify().ok


@pytest.mark.parametrize("path, message", [
    ("/etc/passwd", "only files in alice's home"),
    ("../bob/secret.csv", r"'\.\.' is not allowed"),
    ("results/../../bob/secret.csv", r"'\.\.' is not allowed"),
    ("escape.csv", "leads out of alice's home"),
    ("linked", "leads out of alice's home"),
    ("nowhere.csv", "does not exist"),
])
def test_paths_outside_the_home_are_refused(zone, path, message):
    outside = zone.home.root / "homes" / "bob"
    outside.mkdir(parents=True)
    (outside / "secret.csv").write_text("g,n\na,500\n")
    (zone.user_root / "escape.csv").symlink_to(outside / "secret.csv")
    (zone.user_root / "linked").symlink_to(outside)
    with pytest.raises((RuleViolation, NotFound), match=message):
        zone.request(path)
    with zone.store.session() as s:
        assert s.scalars(select(ExportRequest)).all() == []
    assert not [p for p in airlock.airlock_dir(zone.home).glob("*") if p.name != ".staging"]


def test_absolute_paths_inside_the_home_and_folders(zone):
    rid = zone.request(str(zone.user_root / "results" / "roc.png"), "/home/alice/results")
    assert [f.path for f in zone.get(rid).files] == [
        "results/counts.csv", "results/leak.bin", "results/roc.png", "results/small.csv"]
    assert zone.get(rid).verdict == "block"


def test_per_dataset_review_approvals(zone, monkeypatch):
    from medzone_hub import indexes

    monkeypatch.setattr(indexes, "load_indexes", lambda home, ids: ())
    with zone.store.session() as s:
        add_tiny_dataset(s, zone.home, "ct-demo")
        add_tiny_dataset(s, zone.home, "xr-demo")
        add_user(s, "steward", roles=["data-steward"], actor="test")
    with zone.store.session() as s:
        app = access.apply(s, user="alice", dataset_ids=["ct-demo", "xr-demo"], purpose="study")
        access.approve(s, app.id, reviewer="steward")
    with zone.store.session() as s:
        assert airlock.review_approvals(s, ["ct-demo"]) == 2  # the default
        airlock.set_review_approvals(s, "ct-demo", 3, actor="steward")
        airlock.set_review_approvals(s, "xr-demo", 1, actor="steward")
    rid = zone.request("results/small.csv")
    request = zone.get(rid)
    assert request.dataset_ids == ["ct-demo", "xr-demo"]
    assert request.approvals_required == 3  # the strictest dataset wins
    assert [zone.review(rid, r) for r in ("rev1", "rev2", "rev3")] == [
        "pending", "pending", "approved"]


def test_show_diffs_an_executed_template(zone, capsys):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    run = zone.user_root / "runs" / "20250101-roc"
    run.mkdir(parents=True)
    template = new_notebook(cells=[new_code_cell("threshold = 0.5", metadata={"tags": ["parameters"]}),
                                   new_code_cell("print(auc)")])
    nbformat.write(template, run / "template.ipynb")
    executed = new_notebook(cells=[
        new_code_cell("threshold = 0.5", metadata={"tags": ["parameters"]}),
        new_code_cell("threshold = 0.7", metadata={"tags": ["injected-parameters"]}),
        new_code_cell("print(auc)", outputs=[new_output("stream", name="stdout", text="0.91\n")]),
    ])
    nbformat.write(executed, run / "roc.ipynb")
    # The run as the runner records it: the base is the hub's own copy of the template, by
    # the sha256 its run.execute row names (a template.ipynb in the home is never read).
    from medzone_hub import runner

    digest = runner.keep_template(zone.home, (run / "template.ipynb").read_bytes())
    with zone.store.session() as s:
        audit.append(s, actor="alice", action="run.execute", subject="template:roc",
                     detail={"template": "roc", "template_sha256": digest,
                             "template_copy": digest, "status": "ok",
                             "output": "/home/alice/runs/20250101-roc/roc.ipynb"})
    rid = zone.request("runs/20250101-roc/roc.ipynb")
    (path, diff), = airlock.notebook_diffs(zone.home, zone.get(rid))
    assert path == "runs/20250101-roc/roc.ipynb"
    assert "threshold = 0.7" in diff and "0.91" in diff
    # The template is a diff base, not something that leaves.
    assert [f.path for f in zone.get(rid).files] == ["runs/20250101-roc/roc.ipynb"]

    from medzone_hub.cli import main

    assert main(["--home", str(zone.home.root), "export", "show", str(rid)]) == 0
    shown = capsys.readouterr().out
    assert "nbdime diff of runs/20250101-roc/roc.ipynb against its template" in shown
    assert "threshold = 0.7" in shown


# --- the command line, and kills at every step -------------------------------------------

KILLING_CLI = r'''
import os, signal, sys
import medzone_hub.airlock as airlock
import medzone_hub.audit as audit

mode, argv = sys.argv[1], sys.argv[2:]

def die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def after(module, name, when=lambda *a, **k: True):
    original = getattr(module, name)
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            die()
        return result
    setattr(module, name, wrapped)

if mode.startswith("after-audit:"):
    after(audit, "append", lambda *a, **k: k["action"] == mode.split(":", 1)[1])
elif mode == "mid-copy":
    calls = []
    after(airlock, "_copy_file", lambda *a, **k: calls.append(1) or len(calls) == 2)
elif mode == "after-publish":
    after(airlock, "_publish")
elif mode == "before-write":
    airlock.write_release = die

from medzone_hub.cli import main
sys.exit(main(argv))
'''


class KillableCLI:
    def __init__(self, home: Path):
        self.home = home

    def _env(self):
        env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
        env[ENV_HOME] = str(self.home)
        return env

    def run(self, *args, kill=None):
        if kill is None:
            argv = [sys.executable, "-m", "medzone_hub.cli", *map(str, args)]
        else:
            argv = [sys.executable, "-c", KILLING_CLI, kill, *map(str, args)]
        return subprocess.run(argv, env=self._env(), capture_output=True, text=True, timeout=120)

    def popen(self, *args):
        argv = [sys.executable, "-m", "medzone_hub.cli", *map(str, args)]
        return subprocess.Popen(argv, env=self._env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


def status_json(cli, rid) -> dict:
    result = cli.run("export", "status", rid, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def audit_verifies(cli) -> None:
    result = cli.run("audit", "verify")
    assert result.returncode == 0, result.stderr
    assert "intact" in result.stdout


def test_cli_killed_at_every_step_loses_nothing_and_releases_nothing(zone, tmp_path):
    cli = KillableCLI(zone.home.root)
    staging = airlock.staging_dir(zone.home)

    # Killed while copying into quarantine: no request, the staged copy is swept later.
    killed = cli.run("export", "request", "--user", "alice", "results/counts.csv",
                     "results/small.csv", "--reason", "r", kill="mid-copy")
    assert killed.returncode == -signal.SIGKILL
    assert any(staging.iterdir())
    # Killed after the quarantine folder got its final name, before the commit.
    killed = cli.run("export", "request", "--user", "alice", "results/counts.csv",
                     "results/small.csv", "--reason", "r", kill="after-publish")
    assert killed.returncode == -signal.SIGKILL
    orphan = airlock.quarantine_dir(zone.home, 1)
    assert orphan.is_dir()  # complete, but no row points to it
    # Killed after the audit row, before the commit.
    killed = cli.run("export", "request", "--user", "alice", "results/counts.csv",
                     "results/small.csv", "--reason", "r", kill="after-audit:export.request")
    assert killed.returncode == -signal.SIGKILL
    with zone.store.session() as s:
        assert s.scalars(select(ExportRequest)).all() == []
    audit_verifies(cli)

    # Restarted: the request goes through; leftovers are gone.
    done = cli.run("export", "request", "--user", "alice", "results/counts.csv",
                   "results/small.csv", "--reason", "r")
    assert done.returncode == 0, done.stderr
    rid = int(done.stdout)
    assert rid == 1  # SQLite reuses the id: the orphan was replaced, not trusted
    assert list(staging.iterdir()) == []
    assert sorted(p.name for p in airlock.airlock_dir(zone.home).iterdir()) == [".staging", "1"]
    info = status_json(cli, rid)
    assert (info["state"], info["verdict"]) == ("pending", "review")
    assert airlock.check_quarantine(zone.home, zone.get(rid)) == []

    # Killed mid-review, after the review row and its audit row, before the commit.
    killed = cli.run("export", "review", rid, "--reviewer", "rev1", "--approve",
                     kill="after-audit:export.approve")
    assert killed.returncode == -signal.SIGKILL
    assert status_json(cli, rid)["reviews"] == []
    # Killed while waiting for the database, held by another writer.
    holder = sqlite3.connect(zone.home.sqlite_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    waiting = cli.popen("export", "review", rid, "--reviewer", "rev1", "--approve")
    time.sleep(1.0)
    waiting.send_signal(signal.SIGKILL)
    waiting.wait(timeout=30)
    holder.execute("ROLLBACK")
    holder.close()
    assert status_json(cli, rid)["reviews"] == []

    # Restarted: one approval of two; the second reviewer is killed too, then completes.
    assert cli.run("export", "review", rid, "--reviewer", "rev1", "--approve").returncode == 0
    killed = cli.run("export", "review", rid, "--reviewer", "rev2", "--approve",
                     kill="after-audit:export.approve")
    assert killed.returncode == -signal.SIGKILL
    info = status_json(cli, rid)
    assert info["state"] == "pending" and [r["reviewer"] for r in info["reviews"]] == ["rev1"]
    out = tmp_path / "out"
    refused = cli.run("export", "download", rid, "--user", "alice", "--to", out)
    assert refused.returncode == 1 and "only approved" in refused.stderr
    assert not out.exists()
    done = cli.run("export", "review", rid, "--reviewer", "rev2", "--approve", "--comment", "ok")
    assert done.returncode == 0 and "approved" in done.stdout

    # Download killed before its audit row commits: nothing written, still approved.
    killed = cli.run("export", "download", rid, "--user", "alice", "--to", out,
                     kill="after-audit:export.release")
    assert killed.returncode == -signal.SIGKILL
    assert status_json(cli, rid)["state"] == "approved"
    assert not out.exists() or not any(out.iterdir())
    # Killed after the release is audited, before a byte is written: download again.
    killed = cli.run("export", "download", rid, "--user", "alice", "--to", out,
                     kill="before-write")
    assert killed.returncode == -signal.SIGKILL
    assert status_json(cli, rid)["state"] == "released"
    assert not out.exists() or not any(out.iterdir())
    done = cli.run("export", "download", rid, "--user", "alice", "--to", out)
    assert done.returncode == 0, done.stderr
    info = status_json(cli, rid)
    for f in info["files"]:
        assert sha256(out / f["path"]) == f["sha256"]
    assert sorted(p.name for p in out.iterdir()) == [f"release-{rid}.json", "results"]
    assert [r["reviewer"] for r in json.loads(
        (out / f"release-{rid}.json").read_text())["reviews"]] == ["rev1", "rev2"]
    audit_verifies(cli)
    actions = zone.audit_actions()
    assert actions.count("export.request") == 1
    assert actions.count("export.approve") == 2
    assert actions.count("export.release") == 2


def test_cli_faces(zone, tmp_path):
    cli = KillableCLI(zone.home.root)
    result = cli.run("export", "request", "--user", "alice", "/etc/passwd", "--reason", "r")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "only files in alice's home" in result.stderr
    result = cli.run("export", "request", "--user", "alice", "results/leak.bin", "--reason", "r")
    rid = int(result.stdout)
    result = cli.run("export", "review", rid, "--reviewer", "rev1", "--approve")
    assert result.returncode == 1 and "cannot be approved" in result.stderr
    shown = cli.run("export", "show", rid)
    assert shown.returncode == 0
    assert "BLOCK" in shown.stdout and "results/leak.bin" in shown.stdout
    result = cli.run("export", "status", 999, "--json")
    assert result.returncode == 1 and result.stdout == ""


def test_cli_risk_report(zone):
    cli = KillableCLI(zone.home.root)
    result = cli.run("export", "request", "--user", "alice", "models/nodule.onnx",
                     "--reason", "share the model")
    assert result.returncode == 0 and "no disclosure-risk report" in result.stderr
    bare = int(result.stdout)
    result = cli.run("export", "review", bare, "--reviewer", "rev1", "--approve")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "holds model weights (models/nodule.onnx) and no disclosure-risk report" in result.stderr
    assert zone.audit_actions()[-1] == "export.refuse"
    assert "cannot be approved" in cli.run("export", "show", bare).stdout

    result = cli.run("export", "request", "--user", "alice", "models/nodule.onnx",
                     "--reason", "share the model", "--risk-report", "reports/risk.md")
    assert result.returncode == 0 and result.stderr == ""
    rid = int(result.stdout)
    shown = cli.run("export", "show", rid).stdout
    report_hash = sha256(zone.files["risk_md"])
    assert f"disclosure-risk report reports/risk.md (sha256 {report_hash})" in shown
    assert "480 patients" in shown
    assert status_json(cli, rid)["risk_report"]["path"] == "reports/risk.md"
    audit_verifies(cli)


# --- with the real screen and a real dataset's index -------------------------------------

def test_screen_uses_the_indexes_of_the_requesters_grants(env, cohort_dir):
    import csv

    from medzone_hub.ingest import ingest_dataset

    ingest_dataset(env.home, env.store, "demo", cohort_dir, deidentify=True,
                   pseudonym_key=b"airlock-tests-provider-key-00001", actor="steward",
                   progress=False)
    zone = Airlock(env.home, env.store)
    with env.store.session() as s:
        add_user(s, "steward", roles=["data-steward"], actor="test")
        app = access.apply(s, user="alice", dataset_ids=["demo"], purpose="study")
        s.flush()
        access.approve(s, app.id, reviewer="steward")
    with open(env.home.dataset_dir("demo") / "data" / "clinical.csv", newline="") as f:
        pseudonym = next(csv.DictReader(f))["patient_id"]
    (zone.user_root / "notes.txt").write_text(f"look again at {pseudonym} next week\n")

    clean = zone.request("results/counts.csv", "results/roc.png")
    assert zone.get(clean).verdict == "pass"
    assert zone.get(clean).dataset_ids == ["demo"]
    leaky = zone.get(zone.request("notes.txt", "results/counts.csv"))
    assert (leaky.state, leaky.verdict) == ("blocked", "block")
    notes = next(f for f in leaky.files if f.path == "notes.txt")
    assert notes.verdict == "block"
    assert any(f["rule"] == "dataset-identifier" for f in notes.findings)
    assert pseudonym not in leaky.screen_report  # the report never echoes the value
    with pytest.raises(RuleViolation, match="cannot be approved"):
        zone.review(leaky.id, "rev1")


def test_concurrent_reviews_of_one_request(any_backend):
    from concurrent.futures import ThreadPoolExecutor

    z = any_backend
    rid = z.request("results/small.csv")
    outcomes = []

    def review(reviewer):
        try:
            return z.review(rid, reviewer)
        except Conflict:  # anything else (a constraint error, a deadlock) fails the test
            return "refused"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(review, ["rev1", "rev1", "rev2", "rev2"]))
    assert sorted(outcomes) == ["approved", "pending", "refused", "refused"]
    request = z.get(rid)
    assert request.state == "approved"
    assert sorted(r.reviewer.name for r in request.reviews) == ["rev1", "rev2"]
    assert z.verify().ok
