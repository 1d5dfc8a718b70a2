"""Where MedZone keeps its state: ``MEDZONE_HOME`` and the database URL."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_HOME = "MEDZONE_HOME"
ENV_DB_URL = "MEDZONE_DB_URL"


@dataclass(frozen=True)
class MedZoneHome:
    """The state directory; every path MedZone writes is derived from here."""

    root: Path

    @property
    def sqlite_path(self) -> Path:
        return self.root / "medzone.sqlite"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def staging_dir(self) -> Path:
        # Same filesystem as datasets_dir so that publishing is one rename().
        return self.datasets_dir / ".staging"

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.datasets_dir / dataset_id

    @property
    def db_url(self) -> str:
        return os.environ.get(ENV_DB_URL) or f"sqlite:///{self.sqlite_path}"

    def ensure(self) -> "MedZoneHome":
        self.root.mkdir(parents=True, exist_ok=True)
        self.datasets_dir.mkdir(exist_ok=True)
        self.secrets_dir.mkdir(mode=0o700, exist_ok=True)
        return self


def resolve_home(explicit: str | os.PathLike | None = None) -> MedZoneHome:
    """``--home`` wins over ``MEDZONE_HOME``, which wins over ``~/.medzone``."""
    raw = explicit or os.environ.get(ENV_HOME) or Path.home() / ".medzone"
    return MedZoneHome(Path(raw).expanduser().resolve())
