"""A zone whose users plant things in their homes from inside a real sandbox.

Shared by the security suites that attack what root does in a home: ``sh(user, script)``
runs *script* through ``medzone sandbox exec`` (the user's uid, the user's home as
``/home/<user>``); ``rootonly`` is a host folder only root may read, holding
:data:`SECRET`, which no user must ever get a byte of.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from medzone_hub import accounts, airlock, audit
from medzone_hub.accounts import ROLE_EXPORT_REVIEWER
from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome

SECRET = b"ROOT-ONLY-SECRET-7f3a9c"
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="attacks what root does: run as root")


@dataclasses.dataclass
class HomeZone:
    base: Path
    home: MedZoneHome
    store: object

    def sh(self, user: str, script: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run *script* with ``sh -c`` in *user*'s real sandbox."""
        return subprocess.run(self.sh_argv(user, script), env=self.env(), capture_output=True,
                              text=True, timeout=timeout, cwd="/")

    def sh_argv(self, user: str, script: str) -> list[str]:
        return [sys.executable, "-m", "medzone_hub.cli", "sandbox", "exec", "--user", user,
                "--", "sh", "-c", script]

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
        env[ENV_HOME] = str(self.home.root)
        return env

    def cli(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "medzone_hub.cli", *map(str, args)],
                              env=self.env(), capture_output=True, text=True, timeout=timeout,
                              cwd="/")

    @property
    def rootonly(self) -> Path:
        return self.base / "rootonly"

    def home_of(self, user: str) -> Path:
        return self.home.root / "homes" / user

    def quarantined(self) -> list[Path]:
        """Every file under the airlock (quarantine folders and staging)."""
        root = airlock.airlock_dir(self.home)
        return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))

    def quarantine_folders(self) -> list[str]:
        root = airlock.airlock_dir(self.home)
        return sorted(p.name for p in root.iterdir() if p.name != ".staging") if root.is_dir() else []

    def staging_entries(self) -> list[str]:
        root = airlock.staging_dir(self.home)
        return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) \
            if root.is_dir() else []

    def audit_ok(self) -> bool:
        with self.store.session() as s:
            return audit.verify(s).ok


def make_zone(prefix: str) -> HomeZone:
    from medzone_hub.db import connect

    # pytest's tmp_path sits under a 0700 folder the sandbox uid cannot traverse.
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))
    os.chmod(base, 0o755)
    home = MedZoneHome(base / "home").ensure()
    store = connect(f"sqlite:///{home.sqlite_path}")
    with store.session() as session:
        for name in ("alice", "bob"):
            accounts.add_user(session, name, actor="test")
        accounts.add_user(session, "rev", roles=[ROLE_EXPORT_REVIEWER], actor="test")
    rootonly = base / "rootonly"
    rootonly.mkdir(mode=0o700)
    (rootonly / "secret.txt").write_bytes(SECRET + b"\n")
    os.chmod(rootonly / "secret.txt", 0o600)
    return HomeZone(base, home, store)


def drop_zone(zone: HomeZone) -> None:
    zone.store.close()
    subprocess.run(["chmod", "-R", "u+rwX", str(zone.base)], check=False)
    shutil.rmtree(zone.base, ignore_errors=True)


def owner_mode(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, st.st_mode
