"""Ingest in worker processes, and resumed after a SIGKILL: the published dataset is the
one an uninterrupted ingest of the same source publishes, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome
from medzone_hub.ingest import JOURNAL_FILE, ingest_dataset

KEY = b"provider-secret-key-for-tests-0123456789"
ZONE_INDEX_KEY = b"zone-screening-index-key-for-tests-0123"

#: The real CLI, killed with SIGKILL right after the journal records its Nth DICOM file.
KILLING_CLI = r'''
import os, signal, sys
import medzone_hub.ingest as ingest

after, argv = int(sys.argv[1]), sys.argv[2:]
original = ingest._Journal.append
calls = []

def append(self, *args, **kwargs):
    original(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == after:
        os.kill(os.getpid(), signal.SIGKILL)

ingest._Journal.append = append

from medzone_hub.cli import main
if __name__ == "__main__":
    sys.exit(main(argv))
'''


def _home(root: Path) -> MedZoneHome:
    """A zone whose screening index key is fixed, so that two zones' indexes compare."""
    home = MedZoneHome(root).ensure()
    home.screening_index_key_path.write_bytes(ZONE_INDEX_KEY)
    os.chmod(home.screening_index_key_path, 0o600)
    return home


def _cli(home: Path, *args, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
    env[ENV_HOME] = str(home)
    if kill_after is None:
        argv = [sys.executable, "-m", "medzone_hub.cli", *map(str, args)]
    else:
        script = home.parent / "killing_cli.py"
        script.write_text(KILLING_CLI)
        argv = [sys.executable, str(script), str(kill_after), *map(str, args)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _dicom_count(source: Path) -> int:
    return sum(1 for p in source.rglob("*.dcm"))


def test_killed_ingest_resumes_and_publishes_what_an_uninterrupted_one_does(cohort_dir,
                                                                            tmp_path):
    key = tmp_path / "provider.key"
    key.write_bytes(KEY)
    args = ["dataset", "add", "chest", cohort_dir, "--deidentify", "--key-file", key, "--quiet"]
    home = _home(tmp_path / "resumed" / "home")
    staging = home.staging_dir
    dicom = _dicom_count(cohort_dir)
    kill_after = dicom // 2

    killed = _cli(home.root, *args, kill_after=kill_after)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert json.loads(_cli(home.root, "dataset", "list", "--json").stdout) == []
    assert not home.dataset_dir("chest").exists()
    left = [p for p in staging.iterdir() if p.is_dir()]
    assert len(left) == 1 and (left[0] / JOURNAL_FILE).stat().st_size > 0
    # The journal holds the original identities the last proof searches for: encrypted.
    journal = (left[0] / JOURNAL_FILE).read_bytes()
    for patient in (p.name for p in cohort_dir.iterdir() if p.is_dir()):
        assert patient.encode() not in journal

    resumed = _cli(home.root, *args[:-1], "--json")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert kill_after <= report["resumed_files"] < dicom
    assert not any(staging.iterdir())  # nothing left behind: no journal, no lock
    assert not (home.dataset_dir("chest") / JOURNAL_FILE).exists()

    reference_home = _home(tmp_path / "reference" / "home")
    reference = _cli(reference_home.root, *args[:-1], "--json")
    assert reference.returncode == 0, reference.stderr
    assert json.loads(reference.stdout)["resumed_files"] == 0
    assert report["manifest_sha256"] == json.loads(reference.stdout)["manifest_sha256"]
    assert _tree(home.dataset_dir("chest")) == _tree(reference_home.dataset_dir("chest"))


def test_a_kill_then_another_key_starts_over(cohort_dir, tmp_path):
    """Work done under one key is never mixed into a dataset pseudonymised with another."""
    first, second = tmp_path / "first.key", tmp_path / "second.key"
    first.write_bytes(KEY)
    second.write_bytes(KEY[::-1])
    home = _home(tmp_path / "zone" / "home")
    base = ["dataset", "add", "chest", cohort_dir, "--deidentify", "--quiet", "--key-file"]
    killed = _cli(home.root, *base, first, kill_after=20)
    assert killed.returncode == -signal.SIGKILL
    done = _cli(home.root, *base[:-2], "--json", "--key-file", second)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["resumed_files"] == 0
    reference_home = _home(tmp_path / "reference" / "home")
    assert _cli(reference_home.root, *base, second).returncode == 0
    assert _tree(home.dataset_dir("chest")) == _tree(reference_home.dataset_dir("chest"))


def test_one_worker_and_several_store_the_same_bytes(cohort_dir, tmp_path):
    from medzone_hub.db import connect

    trees = []
    for workers in (1, 3):
        zone = _home(tmp_path / f"w{workers}" / "home")
        store = connect(zone.db_url)
        report = ingest_dataset(zone, store, "chest", cohort_dir, deidentify=True,
                                pseudonym_key=KEY, actor="t", progress=False, workers=workers)
        store.engine.dispose()
        assert report.files > 100
        trees.append(_tree(zone.dataset_dir("chest")))
    assert trees[0] == trees[1]
    assert any(path.startswith("index/") for path in trees[0])
