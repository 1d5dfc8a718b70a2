"""Where MedZone keeps its state: ``MEDZONE_HOME`` and the database URL."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_HOME = "MEDZONE_HOME"
ENV_DB_URL = "MEDZONE_DB_URL"

#: Host group ids of datasets: ``DATASET_GID_BASE + n``, where n (1, 2, 3…, never reused)
#: is given to a dataset when it is published and recorded as its folder's group
#: (:func:`medzone_hub.ingest.seal_dataset`). A sandbox gets a dataset's group only while
#: the user holds a live grant on it. Pick a range no host group and no sandbox uid uses
#: (sandbox uids start at 200000); no /etc/group entry is needed.
DATASET_GID_BASE = 300000
DATASET_GID_SPAN = 1 << 20


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
        """Create the home with its modes: MEDZONE_HOME and ``datasets/`` 0711 (a sandbox
        uid traverses them to its binds but lists nothing), ``secrets/`` 0700."""
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.datasets_dir.mkdir(mode=0o711, exist_ok=True)
        self.secrets_dir.mkdir(mode=0o700, exist_ok=True)
        for path, mode in ((self.root, 0o711), (self.datasets_dir, 0o711),
                           (self.secrets_dir, 0o700)):
            try:
                if path.stat().st_mode & 0o777 != mode:
                    os.chmod(path, mode)
            except PermissionError:
                pass  # not ours to change (another account's home): leave it as it is
        return self


def resolve_home(explicit: str | os.PathLike | None = None) -> MedZoneHome:
    """``--home`` wins over ``MEDZONE_HOME``, which wins over ``~/.medzone``."""
    raw = explicit or os.environ.get(ENV_HOME) or Path.home() / ".medzone"
    return MedZoneHome(Path(raw).expanduser().resolve())
