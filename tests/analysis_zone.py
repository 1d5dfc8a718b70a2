"""A zone for the template and tutorial tests: the synthetic cohort ingested (de-identified)
as dataset ``demo`` into a 0755 temporary MEDZONE_HOME, granted to ``alice``; runs go
through the real ``medzone run`` (papermill inside alice's sandbox)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome

ROOT = Path(__file__).resolve().parent.parent
DATASET = "demo"
USER = "alice"


@dataclass
class Run:
    notebook: Path
    seconds: float
    stderr: str

    @property
    def dir(self) -> Path:
        return self.notebook.parent

    def metrics(self) -> dict:
        return json.loads((self.dir / "metrics.json").read_text())


@dataclass
class AnalysisZone:
    base: Path
    home: MedZoneHome
    store: object
    manifest_sha256: str
    timings: dict = field(default_factory=dict)

    def run(self, template: str, *params: tuple[str, object], timeout: float = 600) -> Run:
        env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
        env[ENV_HOME] = str(self.home.root)
        argv = [sys.executable, "-m", "medzone_hub.cli", "run", template, "--user", USER]
        for name, value in params:
            argv += ["-p", name, value if isinstance(value, str) else json.dumps(value)]
        started = time.monotonic()
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd="/")
        seconds = time.monotonic() - started
        assert done.returncode == 0, (f"{template} failed after {seconds:.0f} s:\n"
                                      f"{done.stderr[-3000:]}")
        self.timings[Path(template).stem] = round(seconds, 1)
        return Run(Path(done.stdout.strip()), seconds, done.stderr)

    def inside(self, path: Path) -> str:
        """*path* (in alice's home on the host) as alice sees it."""
        return "/home/alice/" + path.relative_to(self.home.root / "homes" / USER).as_posix()

    def close(self) -> None:
        self.store.close()
        subprocess.run(["chmod", "-R", "u+rwX", str(self.base)], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def make_zone(cohort_dir: Path) -> AnalysisZone:
    from medzone_hub import access, accounts
    from medzone_hub.db import connect
    from medzone_hub.ingest import ingest_dataset
    from medzone_hub.registry import get_dataset

    # pytest's tmp_path sits under a 0700 folder the sandbox uid cannot traverse.
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="medzone-analysis-"))
    os.chmod(base, 0o755)
    home = MedZoneHome(base / "home").ensure()
    store = connect(home.db_url)
    ingest_dataset(home, store, DATASET, cohort_dir, deidentify=True,
                   pseudonym_key=b"analysis-tests-provider-key-0001", actor="steward",
                   progress=False)
    with store.session() as session:
        accounts.add_user(session, USER, actor="test")
        accounts.add_user(session, "steward", roles=["data-steward"], actor="test")
        app = access.apply(session, user=USER, dataset_ids=[DATASET], purpose="analysis tests")
        session.flush()
        access.approve(session, app.id, reviewer="steward")
        sha = get_dataset(session, DATASET).manifest_sha256
    return AnalysisZone(base, home, store, sha)


def pseudonyms(zone: AnalysisZone) -> list[str]:
    """The stored dataset's patient pseudonyms (what no output may carry)."""
    import pandas as pd

    clinical = zone.home.dataset_dir(DATASET) / "data" / "clinical.csv"
    return list(pd.read_csv(clinical, dtype=str)["patient_id"])


def assert_no_identifiers(zone: AnalysisZone, run: Run) -> None:
    ids = pseudonyms(zone)
    for path in run.dir.rglob("*"):
        if path.is_file() and path.name not in ("template.ipynb",):
            data = path.read_bytes()
            for pid in ids:
                assert pid.encode() not in data, f"{path.name} carries a patient pseudonym"


def assert_clean_notebook(run: Run) -> None:
    import nbformat

    nb = nbformat.read(run.notebook, as_version=4)
    assert nb.metadata["papermill"]["exception"] is None
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
