"""Root-side access to a user's home that never follows anything the user planted.

A user owns everything under ``MEDZONE_HOME/homes/<user>`` and can, from inside a sandbox,
swap any file or folder there for a symbolic link (to the store, another user's home, a
root-only host folder) or a hard link at any moment. Code running as root therefore never
opens, creates, chowns or unlinks a path in a home by name. Every such touch goes through
:class:`UserHome`, which

* opens the home itself with ``O_NOFOLLOW | O_DIRECTORY`` (its parent ``homes/`` is root's,
  so the walk starts on ground the user cannot change);
* walks every further component with ``openat(…, O_NOFOLLOW)`` from the previous folder's
  descriptor, so a link swapped in between a check and a use is refused, not followed;
* acts on descriptors (``fstat``, ``fchown``, ``fchmod``, ``unlinkat``), never on names;
* creates with ``O_CREAT | O_EXCL`` and hands what it created to the user's uid at once;
* refuses, when reading on a user's behalf, a file the user does not own (a hard link to
  someone else's file) and anything that is not a regular file (a FIFO would block root).

Folders and files the caller names are POSIX paths relative to the home (``runs/x/a.ipynb``);
``..``, absolute paths and empty components are refused before anything is opened.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .accounts import validate_user_name
from .errors import InvalidInput, NotFound, RuleViolation

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20


class FileTooLarge(RuleViolation):
    """A file (or a request) is over a size cap; the message names the cap."""


def parts_of(rel: str | os.PathLike) -> tuple[str, ...]:
    """The components of *rel*, a path relative to a home; :class:`RuleViolation` for
    ``..``, an absolute path or a NUL byte."""
    text = os.fspath(rel)
    if "\x00" in text:
        raise InvalidInput(f"invalid path {text!r}")
    path = PurePosixPath(text)
    if path.is_absolute():
        raise RuleViolation(f"refusing {text!r}: not a path inside the home")
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if ".." in parts:
        raise RuleViolation(f"refusing {text!r}: '..' is not allowed")
    return parts


@dataclass(frozen=True)
class UserHome:
    """One user's home folder on the host, as root (or the hub's user) may touch it.

    *path* is ``MEDZONE_HOME/homes/<user>``; *uid*/*gid* own what is created in it (``None``
    when the hub does not run as root: then the user is the hub's own account and nothing
    is chowned or owner-checked).
    """

    path: Path
    uid: int | None = None
    gid: int | None = None

    @classmethod
    def of(cls, home, user: str) -> "UserHome":
        """*user*'s home in the zone *home* (a :class:`~medzone_hub.config.MedZoneHome`),
        owned by whoever owns the home folder itself: ``homes/`` is root's, so the home
        folder's owner (read from its descriptor) is the user's uid as the host sees it."""
        validate_user_name(user)
        path = home.user_home(user)
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError:
            return cls(path)  # missing (or not a folder): every use says so in one line
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if os.getuid() != 0:
            return cls(path)
        return cls(path, st.st_uid, st.st_gid)

    @classmethod
    def for_policy(cls, policy) -> "UserHome":
        """The home of a :class:`~medzone_hub.sandbox.SandboxPolicy`, owned by its host uid."""
        if not policy.drop_to_uid:
            return cls(policy.home_host)
        return cls(policy.home_host, policy.host_uid, policy.host_gid)

    # --- descriptors ------------------------------------------------------------------

    @contextlib.contextmanager
    def root_fd(self) -> Iterator[int]:
        try:
            fd = os.open(self.path, _DIR_FLAGS)
        except FileNotFoundError:
            raise NotFound(f"{self.path.name} has no home folder yet") from None
        except OSError as err:
            raise RuleViolation(f"refusing the home {self.path}: {_why(err)}") from None
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def dir_fd(self, rel: str | os.PathLike = "", *, create: bool = False,
               mode: int = 0o700) -> Iterator[int]:
        """A descriptor of the folder *rel*, reached without following links; with
        *create*, missing folders are made (*mode*, owned by the user)."""
        parts = parts_of(rel)
        with self.root_fd() as root:
            fd = os.dup(root)
        try:
            for i, name in enumerate(parts):
                child = self._step(fd, name, create=create, mode=mode,
                                   shown="/".join(parts[:i + 1]))
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _step(self, parent: int, name: str, *, create: bool, mode: int, shown: str) -> int:
        """Open folder *name* under *parent*."""
        try:
            if create:
                try:
                    os.mkdir(name, mode, dir_fd=parent)
                    created = True
                except FileExistsError:
                    created = False
                child = os.open(name, _DIR_FLAGS, dir_fd=parent)
                if created:
                    self._give(child)
                    os.fchmod(child, mode)
            else:
                child = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            raise NotFound(f"{shown!r} does not exist in the home") from None
        except OSError as err:
            raise RuleViolation(f"refusing {shown!r}: {_why(err)}") from None
        return child

    def _give(self, fd: int) -> None:
        if self.uid is not None:
            os.fchown(fd, self.uid, self.gid if self.gid is not None else -1)

    @contextlib.contextmanager
    def open_file(self, rel: str | os.PathLike, *, owned: bool = True) -> Iterator[int]:
        """A read-only descriptor of the regular file *rel*. With *owned* (the default when
        reading on a user's behalf), a file the user does not own is refused."""
        parts = parts_of(rel)
        if not parts:
            raise InvalidInput("name a file, not the home itself")
        shown = "/".join(parts)
        with self.dir_fd("/".join(parts[:-1])) as parent:
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=parent)
            except FileNotFoundError:
                raise NotFound(f"{shown!r} does not exist in the home") from None
            except OSError as err:
                raise RuleViolation(f"refusing {shown!r}: {_why(err)}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RuleViolation(f"refusing {shown!r}: not a regular file")
            if owned and self.uid is not None and st.st_uid != self.uid:
                raise RuleViolation(f"refusing {shown!r}: it is not the user's own file")
            yield fd
        finally:
            os.close(fd)

    # --- reading ----------------------------------------------------------------------

    def lstat(self, rel: str | os.PathLike) -> os.stat_result | None:
        """The entry *rel* itself (a link is not followed), or ``None`` if it is missing."""
        parts = parts_of(rel)
        if not parts:
            with self.root_fd() as fd:
                return os.fstat(fd)
        try:
            with self.dir_fd("/".join(parts[:-1])) as parent:
                return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except (NotFound, FileNotFoundError, NotADirectoryError):
            return None

    def is_file(self, rel: str | os.PathLike) -> bool:
        st = self.lstat(rel)
        return st is not None and stat.S_ISREG(st.st_mode)

    def is_dir(self, rel: str | os.PathLike) -> bool:
        st = self.lstat(rel)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def read_bytes(self, rel: str | os.PathLike, *, max_bytes: int | None = None,
                   owned: bool = True) -> bytes:
        """The content of *rel*; :class:`FileTooLarge` past *max_bytes* (nothing more is read)."""
        with self.open_file(rel, owned=owned) as fd:
            chunks, size = [], 0
            while chunk := os.read(fd, _CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise FileTooLarge(f"refusing {os.fspath(rel)!r}: larger than {max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

    def read_text(self, rel: str | os.PathLike, **kwargs) -> str:
        return self.read_bytes(rel, **kwargs).decode("utf-8")

    def sha256(self, rel: str | os.PathLike, *, owned: bool = True) -> str:
        digest = hashlib.sha256()
        with self.open_file(rel, owned=owned) as fd:
            while chunk := os.read(fd, _CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def listdir(self, rel: str | os.PathLike = "") -> list[str]:
        with self.dir_fd(rel) as fd:
            return sorted(os.listdir(fd))

    def walk_files(self, rel: str | os.PathLike = "", *, skip_hidden: bool = False) -> list[str]:
        """Every regular file under folder *rel* (relative to the home, sorted); links and
        special files are skipped, never followed."""
        return [path for path, _st in self.walk_stats(rel, skip_hidden=skip_hidden)]

    def walk_stats(self, rel: str | os.PathLike = "", *,
                   skip_hidden: bool = False) -> list[tuple[str, os.stat_result]]:
        """:meth:`walk_files` with each file's own ``lstat``."""
        base = parts_of(rel)
        found: list[tuple[str, os.stat_result]] = []

        def visit(fd: int, prefix: tuple[str, ...]) -> None:
            with os.scandir(fd) as entries:
                names = sorted(e.name for e in entries)
            for name in names:
                if skip_hidden and name.startswith("."):
                    continue
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append(("/".join((*prefix, name)), st))
                elif stat.S_ISDIR(st.st_mode):
                    try:
                        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        continue  # swapped for a link or removed meanwhile
                    try:
                        visit(child, (*prefix, name))
                    finally:
                        os.close(child)

        with self.dir_fd(rel) as fd:
            visit(fd, base)
        return found

    def copy_out(self, rel: str | os.PathLike, dest_fd: int, *, max_bytes: int | None = None,
                 owned: bool = True) -> tuple[str, int]:
        """Stream *rel* into the open *dest_fd*: ``(sha256, size)``. Stops at *max_bytes*
        with :class:`FileTooLarge` (the caller discards what was written)."""
        digest = hashlib.sha256()
        size = 0
        with self.open_file(rel, owned=owned) as fd:
            while chunk := os.read(fd, _CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise FileTooLarge(
                        f"refusing {os.fspath(rel)!r}: larger than the limit of {max_bytes} bytes")
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dest_fd, view):]
        return digest.hexdigest(), size

    # --- writing ----------------------------------------------------------------------

    def makedirs(self, rel: str | os.PathLike, mode: int = 0o700) -> None:
        """Make folder *rel* and any missing parents, owned by the user."""
        with self.dir_fd(rel, create=True, mode=mode):
            pass

    def mkdir_unique(self, parent: str | os.PathLike, stem: str, mode: int = 0o700) -> str:
        """Make a new folder ``stem``, ``stem-2``, … under *parent*; its path relative to the home."""
        with self.dir_fd(parent, create=True) as fd:
            for n in range(1, 1000):
                name = stem if n == 1 else f"{stem}-{n}"
                try:
                    os.mkdir(name, mode, dir_fd=fd)
                except FileExistsError:
                    continue
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                try:
                    self._give(child)
                    os.fchmod(child, mode)
                finally:
                    os.close(child)
                return "/".join((*parts_of(parent), name))
        raise RuleViolation(f"cannot create a new folder {stem!r} under {os.fspath(parent)!r}")

    def write_bytes(self, rel: str | os.PathLike, data: bytes, *, mode: int = 0o600,
                    replace: bool = False) -> None:
        """Create file *rel* with *data*, owned by the user. An existing entry is an error,
        or with *replace* it is unlinked first (a link is removed, never followed)."""
        parts = parts_of(rel)
        if not parts:
            raise InvalidInput("name a file, not the home itself")
        with self.dir_fd("/".join(parts[:-1])) as parent:
            if replace:
                self._unlink_at(parent, parts[-1])
            try:
                fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, mode, dir_fd=parent)
            except FileExistsError:
                raise RuleViolation(f"refusing to overwrite {'/'.join(parts)!r}") from None
            try:
                self._give(fd)
                os.fchmod(fd, mode)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)

    def symlink(self, rel: str | os.PathLike, target: str) -> bool:
        """Create the symbolic link *rel* -> *target* (*target* is never looked at).
        ``False`` when an entry *rel* already exists (it is left as it is). The link stays
        the creator's: changing its owner would mean naming an entry the user can swap
        meanwhile (the user may still remove it: the folder is theirs)."""
        parts = parts_of(rel)
        if not parts:
            raise InvalidInput("name a link, not the home itself")
        with self.dir_fd("/".join(parts[:-1])) as parent:
            try:
                os.symlink(target, parts[-1], dir_fd=parent)
            except FileExistsError:
                return False
        return True

    def unlink(self, rel: str | os.PathLike) -> bool:
        """Remove the entry *rel* if it is not a folder (a link itself, never its target);
        ``False`` if it was not there."""
        parts = parts_of(rel)
        if not parts:
            raise InvalidInput("cannot remove the home itself")
        try:
            with self.dir_fd("/".join(parts[:-1])) as parent:
                return self._unlink_at(parent, parts[-1])
        except NotFound:
            return False

    @staticmethod
    def _unlink_at(parent: int, name: str) -> bool:
        try:
            os.unlink(name, dir_fd=parent)
            return True
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            raise RuleViolation(f"refusing to replace the folder {name!r}") from None


def _why(err: OSError) -> str:
    if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return "a symbolic link or not a folder (links in a home are never followed)"
    return err.strerror or str(err)


__all__ = ["FileTooLarge", "UserHome", "parts_of"]
