"""Fixtures shared by the ingest, CLI and demo tests: a synthetic cohort, a zone, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from medzone_hub import registry
from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome


@contextlib.contextmanager
def sandbox_base(prefix: str) -> Iterator[Path]:
    """A fresh 0755 folder in /tmp for a zone whose sandboxes run (the sandbox uid must
    traverse it; pytest's ``tmp_path`` sits under a 0700 folder), with ``MEDZONE_DB_URL``
    unset while it lives (the zone uses its own SQLite store); removed afterwards."""
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))
    os.chmod(base, 0o755)
    saved = os.environ.pop(ENV_DB_URL, None)
    try:
        yield base
    finally:
        if saved is not None:
            os.environ[ENV_DB_URL] = saved
        subprocess.run(["chmod", "-R", "u+rwX", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


#: Enough patients for every X-ray class and a foreign patient with an English-only name.
COHORT_PATIENTS = 7


@pytest.fixture(scope="session")
def cohort_dir(tmp_path_factory) -> Path:
    """A small synthetic cohort with fake identities (generated once per test worker)."""
    from medzone_hub.demodata import generate_cohort

    out = tmp_path_factory.mktemp("cohort") / "source"
    generate_cohort(out, patients=COHORT_PATIENTS, seed=11, progress=False)
    return out


@dataclass
class Zone:
    home: MedZoneHome
    store: object

    def audit_actions(self) -> list[str]:
        from sqlalchemy import select

        from medzone_hub.models import AuditEvent

        with self.store.session() as session:
            return list(session.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)))


def _zone(root: Path) -> Zone:
    from medzone_hub.db import connect

    home = MedZoneHome(root).ensure()
    return Zone(home, connect(home.db_url))


@pytest.fixture
def env(tmp_path, monkeypatch) -> Zone:
    """A fresh zone on SQLite in a temporary MEDZONE_HOME."""
    monkeypatch.delenv(ENV_DB_URL, raising=False)
    zone = _zone(tmp_path / "home")
    yield zone
    zone.store.engine.dispose()


@pytest.fixture(scope="module")
def module_env(tmp_path_factory) -> Zone:
    saved = os.environ.pop(ENV_DB_URL, None)
    zone = _zone(tmp_path_factory.mktemp("zone") / "home")
    yield zone
    zone.store.engine.dispose()
    if saved is not None:
        os.environ[ENV_DB_URL] = saved


@dataclass
class CLI:
    """Runs the real ``medzone`` command in a subprocess against one MEDZONE_HOME."""

    home: Path

    def _argv(self, args) -> list[str]:
        return [sys.executable, "-m", "medzone_hub.cli", *map(str, args)]

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
        env[ENV_HOME] = str(self.home)
        return env

    def run(self, *args, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self._argv(args), env=self._env(), input=input,
                              capture_output=True, text=True, timeout=300)

    def popen(self, *args) -> subprocess.Popen:
        return subprocess.Popen(self._argv(args), env=self._env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


@pytest.fixture
def cli(tmp_path) -> CLI:
    return CLI(tmp_path / "home")


def add_tiny_dataset(session, home: MedZoneHome, dataset_id: str) -> None:
    """A tiny stored dataset laid out (and sealed) the way ingest leaves one."""
    root = home.dataset_dir(dataset_id)
    (root / "data" / "tables").mkdir(parents=True)
    (root / "data" / "tables" / "labs.csv").write_text(f"patient,value\n{dataset_id}-p1,7\n")
    (root / "index").mkdir()
    (root / "index" / "identifiers.bin").write_bytes(b"\x00" * 32)
    (root / "manifest.json").write_text(json.dumps({"dataset": dataset_id}))
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(dirpath, 0o555)
    registry.register_dataset(
        session, dataset_id=dataset_id, title=dataset_id, manifest_sha256="0" * 64,
        deidentified=True, n_files=1, n_bytes=20, n_patients=1, modalities=["CSV"], actor="test")
