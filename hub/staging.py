"""Staging: fill a private folder, seal it, publish it by one rename; sweep what a killed
process left.

A staged folder ``BASE/<name>`` is owned by the process holding an exclusive ``flock`` on
``BASE/<name>.lock`` (the kernel drops the lock when its owner dies, however it dies, so
no pid is ever guessed). The lock file is locked under a hidden name first and only then
given the name a sweeper looks for, so a sweeper never sees an unlocked lock of a live
owner. ``BASE`` must be on the same filesystem as where folders are published, so that
publishing is one ``rename()``.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
from pathlib import Path


def remove_tree(path: Path) -> None:
    """Remove a folder, sealed (read-only) or not: make it writable first."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        os.unlink(path)
        return
    for dirpath, _dirnames, _filenames in os.walk(path):
        os.chmod(dirpath, 0o700)
    shutil.rmtree(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(folder: Path, *, dir_mode: int, file_mode: int | None = None) -> None:
    """Make *folder* read-only all the way down (files *file_mode* when given, folders
    *dir_mode*) and flush its entries."""
    for dirpath, _dirnames, filenames in os.walk(folder, topdown=False):
        if file_mode is not None:
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), file_mode)
        fsync_dir(Path(dirpath))
        os.chmod(dirpath, dir_mode)


class StagedFolder:
    """``BASE/<label>-<random>``, private (0700) and owned by this process until
    :meth:`close`; use it as a context manager or call :meth:`close` in a ``finally``.

    With ``name``, the folder is ``BASE/<name>`` and may exist already: what a killed owner
    left there is taken over (``resumed`` is then True) once its lock is free; a live
    owner's folder raises :class:`Busy`."""

    def __init__(self, base: Path, label: str | None = None, *, name: str | None = None):
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(base, 0o700)
        self.resumed = False
        if name is not None:
            self._take_over(base, name)
            return
        name = f"{label or os.getpid()}-{secrets.token_hex(8)}"
        self.path = base / name
        hidden = base / f".{name}.locking"
        self._lock = open(hidden, "x")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._lock_path = base / f"{name}.lock"
        os.rename(hidden, self._lock_path)
        self.path.mkdir(mode=0o700)

    def _take_over(self, base: Path, name: str) -> None:
        self.path = base / name
        self._lock_path = base / f"{name}.lock"
        while True:
            lock = open(self._lock_path, "a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                raise Busy(f"{name} is being staged by a running process") from None
            try:
                same = os.stat(self._lock_path).st_ino == os.fstat(lock.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file a sweeper removed between our open and flock
                break
            lock.close()
        self._lock = lock
        self.resumed = self.path.is_dir()
        if not self.resumed:
            self.path.mkdir(mode=0o700)
        os.chmod(self.path, 0o700)

    def publish(self, final: Path, *, mode: int | None = None) -> Path:
        """Rename the folder to *final* (replacing what a crash left there: the caller
        knows nothing points to it) and flush the rename; *final*'s mode becomes *mode*."""
        if os.path.lexists(final):
            remove_tree(final)
        os.chmod(self.path, 0o700)  # a sealed folder cannot move to another parent
        os.rename(self.path, final)
        if mode is not None:
            os.chmod(final, mode)
        fsync_dir(final.parent)
        return final

    def close(self, *, keep: bool = False) -> None:
        """Remove what was not published, then release the folder's name; with ``keep``,
        leave the folder (and its lock file, now free) for a later owner to take over."""
        if not keep:
            remove_tree(self.path)
            self._lock_path.unlink(missing_ok=True)
        self._lock.close()

    def __enter__(self) -> "StagedFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Busy(RuntimeError):
    """A named staging folder whose owner is alive."""


def stage(base: Path, label: str | None = None, *, name: str | None = None) -> StagedFolder:
    """A new private folder under *base*, owned by this process (with ``name``: that folder,
    taken over if a dead owner left it; see :class:`StagedFolder`)."""
    return StagedFolder(base, label, name=name)


def sweep(base: Path, *, keep=None) -> list[str]:
    """Remove staged folders under *base* whose owner died before publishing them; their
    names. Folders of live owners are left alone, and so are dead owners' folders for which
    ``keep(path)`` is true (work a later run may resume)."""
    if not base.is_dir():
        return []
    swept = []
    for hidden in base.glob(".*.locking"):  # its owner died before naming its lock
        with open(hidden, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            hidden.unlink(missing_ok=True)
    for lock_path in sorted(base.glob("*.lock")):
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive and still staging
            if keep is not None and keep(base / lock_path.stem):
                continue
            remove_tree(base / lock_path.stem)
            lock_path.unlink(missing_ok=True)
            swept.append(lock_path.stem)
    for entry in sorted(base.iterdir()):
        # A live owner names its lock before making its folder and removes its folder
        # before its lock: a folder with no lock is an orphan (e.g. of an older release).
        if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith(".") \
                and not (base / f"{entry.name}.lock").exists():
            remove_tree(entry)
            swept.append(entry.name)
    return swept
