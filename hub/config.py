"""Where MedZone keeps its state: ``MEDZONE_HOME`` and the database URL."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput

ENV_HOME = "MEDZONE_HOME"
ENV_DB_URL = "MEDZONE_DB_URL"

#: Host group ids of datasets: ``DATASET_GID_BASE + n``, where n (1, 2, 3…, never reused)
#: is given to a dataset when it is published and recorded as its folder's group
#: (:func:`medzone_hub.ingest.seal_dataset`). A sandbox gets a dataset's group only while
#: the user holds a live grant on it. Pick a range no host group and no sandbox uid uses
#: (sandbox uids start at 200000); no /etc/group entry is needed.
DATASET_GID_BASE = 300000
DATASET_GID_SPAN = 1 << 20

#: The longest path a unix socket may have on Linux (``sun_path`` is 108 bytes).
MAX_SOCKET_PATH = 107

#: A dataset's folder (published, or staged by ingest): the stored copy, its screening
#: index (root only) and its manifest.
DATASET_DATA, DATASET_INDEX, DATASET_MANIFEST = "data", "index", "manifest.json"


@dataclass(frozen=True)
class MedZoneHome:
    """The state directory; every path MedZone writes is derived from here: this class is
    the one map of the zone's host paths (what a sandbox sees inside is
    :mod:`medzone_kernel.contract`)."""

    root: Path

    @property
    def sqlite_path(self) -> Path:
        return self.root / "medzone.sqlite"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def staging_dir(self) -> Path:
        """Ingest's staging (:mod:`medzone_hub.staging`): same filesystem as datasets_dir
        so that publishing is one rename()."""
        return self.datasets_dir / ".staging"

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    # people's homes ----------------------------------------------------------------------

    @property
    def homes_dir(self) -> Path:
        """Root's folder of homes: each sandbox sees its own as ``/home/<user>``."""
        return self.root / "homes"

    def user_home(self, user: str) -> Path:
        """*user*'s home as the host sees it (read it only through
        :class:`~medzone_hub.homefs.UserHome`)."""
        return self.homes_dir / user

    # the export airlock ------------------------------------------------------------------

    @property
    def airlock_dir(self) -> Path:
        return self.root / "airlock"

    @property
    def airlock_staging_dir(self) -> Path:
        # Same filesystem as the quarantine folders, so publishing is one rename().
        return self.airlock_dir / ".staging"

    def quarantine_dir(self, request_id: int) -> Path:
        """An export request's quarantine: ``files/`` (what may leave) and the screen report."""
        return self.airlock_dir / str(int(request_id))

    # the hub, its sandboxes and its runs -------------------------------------------------

    @property
    def hub_state_dir(self) -> Path:
        """JupyterHub's database, secrets, the proxy's files and the servers' sockets."""
        return self.root / "hub"

    @property
    def hub_db_path(self) -> Path:
        return self.hub_state_dir / "jupyterhub.sqlite"

    @property
    def hub_cookie_secret_path(self) -> Path:
        return self.hub_state_dir / "jupyterhub_cookie_secret"

    @property
    def portal_cookie_secret_path(self) -> Path:
        return self.hub_state_dir / "portal_cookie_secret"

    @property
    def proxy_token_path(self) -> Path:
        return self.hub_state_dir / "proxy_token"

    @property
    def server_socket_dir(self) -> Path:
        """Single-user servers' sockets: the hub's, outside every home."""
        return self.hub_state_dir / "servers"

    @property
    def proxy_api_socket(self) -> Path:
        return self.hub_state_dir / "proxy-api.sock"

    @property
    def run_dir(self) -> Path:
        """Sockets that sandboxes reach (the hub API's folder is bound into each)."""
        return self.root / "run"

    @property
    def hub_socket_dir(self) -> Path:
        return self.run_dir / "hub"

    @property
    def hub_socket(self) -> Path:
        return self.hub_socket_dir / "hub.sock"

    @property
    def sandbox_state_dir(self) -> Path:
        return self.root / "sandbox"

    @property
    def run_templates_dir(self) -> Path:
        """The hub's copy of each template version run (root only; never in a sandbox)."""
        return self.root / "run-templates"

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.datasets_dir / dataset_id

    def dataset_data_dir(self, dataset_id: str) -> Path:
        """The stored copy: what a sandbox sees as ``/data/<dataset_id>``."""
        return self.dataset_dir(dataset_id) / DATASET_DATA

    def dataset_index_dir(self, dataset_id: str) -> Path:
        """The dataset's screening index (root only)."""
        return self.dataset_dir(dataset_id) / DATASET_INDEX

    def dataset_manifest_path(self, dataset_id: str) -> Path:
        return self.dataset_dir(dataset_id) / DATASET_MANIFEST

    @property
    def screening_index_key_path(self) -> Path:
        return self.secrets_dir / "screening-index.key"

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


def ensure_hub_state(home: MedZoneHome) -> MedZoneHome:
    """Create the hub's folders and secrets with their modes; idempotent: ``hub/`` 0700 with
    the proxy token, cookie secret and JupyterHub's database 0600; ``run/`` and
    ``run/hub/`` 0755 (a sandbox reaches the hub's socket through them)."""
    home.ensure()
    home.hub_state_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(home.hub_state_dir, 0o700)
    for d in (home.run_dir, home.hub_socket_dir):
        d.mkdir(mode=0o755, exist_ok=True)
        os.chmod(d, 0o755)
    if len(str(home.proxy_api_socket).encode()) > MAX_SOCKET_PATH:
        raise InvalidInput(f"MEDZONE_HOME {home.root} is too long for unix sockets: "
                           "use a shorter path")
    for path in (home.proxy_token_path, home.hub_cookie_secret_path):
        if not path.exists():
            # JupyterHub reads the cookie secret as hex.
            write_secret(path, secrets.token_hex(32))
    db_path = home.hub_db_path
    if not db_path.exists():
        # Created 0600 here so that SQLite gives JupyterHub's -journal/-wal files 0600 too.
        os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for f in (home.proxy_token_path, home.hub_cookie_secret_path, db_path,
              *(db_path.with_name(db_path.name + s) for s in ("-journal", "-wal", "-shm"))):
        if f.exists():
            os.chmod(f, 0o600)
    return home


def write_secret(path: Path, value: str) -> None:
    """Write a new secret file, 0600 from its creation."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def resolve_home(explicit: str | os.PathLike | None = None) -> MedZoneHome:
    """``--home`` wins over ``MEDZONE_HOME``, which wins over ``~/.medzone``."""
    raw = explicit or os.environ.get(ENV_HOME) or Path.home() / ".medzone"
    return MedZoneHome(Path(raw).expanduser().resolve())
