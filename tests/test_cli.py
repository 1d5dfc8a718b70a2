"""The `medzone` command contracts (DESIGN.md): exit codes, one-line errors, --json on stdout."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

from .fixtures import COHORT_PATIENTS

REPO = Path(__file__).resolve().parents[1]


def _ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


def _one_line_error(result, *fragments):
    assert result.returncode != 0
    assert result.stdout == ""
    err = result.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("medzone: error: ")
    for fragment in fragments:
        assert fragment in err
    return err


def _zone_with_dataset(cli, cohort_dir, tmp_path):
    key = tmp_path / "provider.key"
    key.write_bytes(os.urandom(32))
    _ok(cli.run("dataset", "add", "chest", cohort_dir, "--deidentify", "--key-file", key,
                "--quiet", "--title", "Chest"))
    _ok(cli.run("user", "add", "steward", "--role", "data-steward"))
    _ok(cli.run("user", "add", "alice"))
    _ok(cli.run("user", "add", "admin", "--admin"))


def test_access_lifecycle_through_the_cli(cli, cohort_dir, tmp_path):
    _zone_with_dataset(cli, cohort_dir, tmp_path)
    datasets = json.loads(_ok(cli.run("dataset", "list", "--json")))
    assert [d["id"] for d in datasets] == ["chest"]
    assert datasets[0]["patients"] == COHORT_PATIENTS and datasets[0]["deidentified"] is True

    app_id = _ok(cli.run("access", "apply", "alice", "chest", "--purpose", "nodule study",
                         "--days", "30")).strip()
    assert app_id.isdigit()
    _one_line_error(cli.run("access", "approve", app_id, "--reviewer", "alice"), "may not review")
    own = _ok(cli.run("access", "apply", "steward", "chest", "--purpose", "own use")).strip()
    _one_line_error(cli.run("access", "approve", own, "--reviewer", "steward"), "own application")
    _ok(cli.run("access", "reject", own, "--reviewer", "admin", "--reason", "not needed"))
    _one_line_error(cli.run("access", "approve", app_id, "--reviewer", "nobody"), "nobody")
    out = _ok(cli.run("access", "approve", app_id, "--reviewer", "steward", "--days", "10",
                      "--reason", "ethics approval on file"))
    assert "approved" in out
    [app] = json.loads(_ok(cli.run("access", "list", "--json", "--user", "alice")))
    assert app["state"] == "approved" and app["decided_by"] == "steward"
    assert app["reason"] == "ethics approval on file" and app["datasets"] == ["chest"]
    _one_line_error(cli.run("access", "approve", app_id, "--reviewer", "steward"))

    second = _ok(cli.run("access", "apply", "alice", "chest", "--purpose", "more")).strip()
    _ok(cli.run("access", "reject", second, "--reviewer", "steward", "--reason", "duplicate"))
    _ok(cli.run("access", "revoke", app_id, "--by", "steward", "--reason", "project ended"))
    states = {a["id"]: a["state"] for a in json.loads(_ok(cli.run("access", "list", "--json")))}
    assert states == {int(app_id): "revoked", int(second): "rejected", int(own): "rejected"}

    _one_line_error(cli.run("access", "apply", "alice", "no-such-set", "--purpose", "x"), "no-such-set")
    _one_line_error(cli.run("access", "apply", "ghost", "chest", "--purpose", "x"), "ghost")
    _one_line_error(cli.run("access", "approve", "999", "--reviewer", "steward"), "999")
    assert "audit chain intact" in _ok(cli.run("audit", "verify"))


def test_audit_verify_names_the_first_tampered_row(cli, cohort_dir, tmp_path):
    _zone_with_dataset(cli, cohort_dir, tmp_path)
    verdict = json.loads(_ok(cli.run("audit", "verify", "--json")))
    assert verdict["ok"] and verdict["rows"] >= 3
    db = sqlite3.connect(cli.home / "medzone.sqlite")
    with db:
        db.execute("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2")
    db.close()
    result = cli.run("audit", "verify")
    assert result.returncode == 1
    assert "2" in result.stderr and result.stdout == ""


def test_user_add_and_list(cli):
    _ok(cli.run("user", "add", "admin", "--admin"))
    _ok(cli.run("user", "add", "rev", "--role", "export-reviewer"))
    users = {u["name"]: u for u in json.loads(_ok(cli.run("user", "list", "--json")))}
    assert users["admin"]["admin"] is True and users["rev"]["roles"] == ["export-reviewer"]
    _one_line_error(cli.run("user", "add", "admin"), "admin")
    _one_line_error(cli.run("user", "add", "Bad Name!"))


def test_bad_arguments_exit_non_zero_without_traceback(cli):
    result = cli.run("access", "approve", "not-a-number", "--reviewer", "x")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    _one_line_error(cli.run("dataset", "add", "Bad_Id", "/nonexistent"))
    _one_line_error(cli.run("demo-data", str(cli.home.parent), "--patients", "0"))


def test_make_demo_script_sets_up_the_zone_and_is_rerunnable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MEDZONE_DB_URL"}
    env.update(MEDZONE_HOME=str(tmp_path / "home"), DEMO_DIR=str(tmp_path / "demo"),
               DEMO_PATIENTS="2", PROVIDER_KEY=str(tmp_path / "provider.key"),
               MEDZONE=str(Path(os.sys.executable).with_name("medzone")))
    for _ in range(2):
        result = subprocess.run(["bash", str(REPO / ".ci" / "demo")], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "audit chain intact" in result.stdout
    run = lambda *a: subprocess.run([env["MEDZONE"], *a], env=env, capture_output=True,
                                    text=True, check=True).stdout
    assert [d["id"] for d in json.loads(run("dataset", "list", "--json"))] == ["chest-demo"]
    grants = json.loads(run("access", "list", "--json"))
    assert sorted((g["user"], g["state"]) for g in grants) == [
        ("researcher", "approved"), ("student", "approved")]
    assert not list((tmp_path / "home").rglob("provider.key"))


def test_unreachable_database_is_a_one_line_error(cli):
    env = {**os.environ, "MEDZONE_HOME": str(cli.home),
           "MEDZONE_DB_URL": "postgresql+psycopg://medzone:secret@127.0.0.1:1/none"}
    result = subprocess.run([os.sys.executable, "-m", "medzone_hub.cli", "dataset", "list"],
                            env=env, capture_output=True, text=True, timeout=60)
    err = _one_line_error(result, "cannot open the database")
    assert "secret" not in err
