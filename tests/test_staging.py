"""The staging helper: stage, seal, publish by rename, sweep what a killed owner left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from medzone_hub import staging

OWNER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from medzone_hub import staging
    folder = staging.stage(Path(sys.argv[1]), "owner")
    (folder.path / "half-written").write_bytes(b"x" * 10)
    print(folder.path.name, flush=True)
    time.sleep(60)
""")


def _owner(base):
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(base)], stdout=subprocess.PIPE,
                            text=True)
    name = proc.stdout.readline().strip()
    assert name, "the owner never staged its folder"
    return proc, name


def test_stage_seal_publish_and_close(tmp_path):
    base = tmp_path / ".staging"
    with staging.stage(base, "req") as folder:
        assert folder.path.parent == base and folder.path.name.startswith("req-")
        assert os.stat(base).st_mode & 0o777 == 0o700
        assert os.stat(folder.path).st_mode & 0o777 == 0o700
        (folder.path / "files").mkdir()
        (folder.path / "files" / "a.csv").write_text("n\n1\n")
        staging.seal(folder.path, dir_mode=0o555, file_mode=0o444)
        assert os.stat(folder.path / "files" / "a.csv").st_mode & 0o777 == 0o444
        assert os.stat(folder.path / "files").st_mode & 0o777 == 0o555
        (tmp_path / "1").mkdir()  # what a crash left under the final name
        final = folder.publish(tmp_path / "1", mode=0o555)
        assert (final / "files" / "a.csv").read_text() == "n\n1\n"
        assert os.stat(final).st_mode & 0o777 == 0o555
        assert not folder.path.exists()
    assert list(base.iterdir()) == []  # the lock went with the owner's close
    assert (tmp_path / "1" / "files" / "a.csv").exists()  # published folders stay


def test_close_removes_an_unpublished_sealed_folder(tmp_path):
    base = tmp_path / ".staging"
    folder = staging.stage(base)
    (folder.path / "x").write_text("x")
    staging.seal(folder.path, dir_mode=0o500, file_mode=0o400)
    folder.close()
    assert list(base.iterdir()) == []


def test_sweep_removes_a_killed_owners_folder_and_spares_a_live_one(tmp_path):
    base = tmp_path / ".staging"
    killed, killed_name = _owner(base)
    live, live_name = _owner(base)
    mine = staging.stage(base, "mine")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert (base / killed_name).is_dir()
        assert staging.sweep(base) == [killed_name]
        assert not (base / killed_name).exists()
        assert not (base / f"{killed_name}.lock").exists()
        assert (base / live_name / "half-written").exists()  # its owner is alive
        assert mine.path.is_dir()
        assert staging.sweep(base) == []
    finally:
        live.kill()
        live.wait()
        mine.close()
    assert staging.sweep(base) == [live_name]
    assert list(base.iterdir()) == []


def test_sweep_removes_orphans_without_a_lock(tmp_path):
    base = tmp_path / ".staging"
    (base / "old-1234" / "data").mkdir(parents=True)
    os.chmod(base / "old-1234" / "data", 0o500)  # sealed, as an interrupted ingest leaves it
    (base / ".x.locking").write_text("")  # an owner killed before naming its lock
    assert staging.sweep(base) == ["old-1234"]
    assert list(base.iterdir()) == []


@pytest.mark.parametrize("missing", [True, False])
def test_sweep_of_an_empty_or_missing_base(tmp_path, missing):
    base = tmp_path / ".staging"
    if not missing:
        base.mkdir()
    assert staging.sweep(base) == []
