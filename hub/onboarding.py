"""What a new student finds in their home on first spawn: the tutorials, a guide, and a
``datasets`` link to the read-only ``/data`` folder of the sandbox.

Everything here runs as root (or the hub's user) on the host, before the sandbox starts,
and touches the home only through :class:`~medzone_hub.homefs.UserHome`: nothing the user
planted (a link, a FIFO, a hard link) is ever followed, opened for writing or replaced.

* **Tutorials** (package data ``medzone_tutorials``) are copied into ``tutorials/`` once,
  with ``GUIDE.md`` and a marker file ``tutorials/.medzone-tutorials.json`` naming the
  release (a digest of the shipped files). The student's copies are theirs: nothing in
  ``tutorials/`` is ever overwritten. When the zone ships a different release, it is
  *offered*: written next to the student's copies into ``tutorials/updates/<release>/``
  (once), and the marker records the offer; the student compares and keeps what they like.
  A student who removes ``tutorials/`` entirely gets the current release again at their
  next spawn.
* **``datasets``** is a symbolic link to ``/data`` (inside the sandbox: the read-only
  folder with one entry per live grant), made when no entry of that name exists. Root never
  follows it (on the host it points at the host's ``/data``, which MedZone does not use);
  a student who removes it or puts something else there is left alone until the name is
  free again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import resources

from medzone_kernel import contract

from .errors import MedZoneError
from .homefs import UserHome

log = logging.getLogger(__name__)

TUTORIALS_DIR = "tutorials"
UPDATES_DIR = "updates"
MARKER = ".medzone-tutorials.json"
GUIDE = "GUIDE.md"
DATASETS_LINK = "datasets"
#: Largest marker file read back (it is the student's file: never trust its size).
MAX_MARKER_BYTES = 64 * 1024

GUIDE_TEXT = """\
# MedZone: a guide for the lab

Welcome. Your JupyterLab runs in a **sandbox**: your notebooks see your home folder, the
datasets you hold a live grant for (read-only) and nothing else. There is no network.

* **Your data**: the `datasets` folder in your home (it is `/data` inside the sandbox) has
  one folder per dataset granted to you. Ask for more in the portal ("My datasets and
  grants" in the launcher). A new grant appears when your server next starts.
* **Tutorials**: start with `tutorials/01_getting_started.ipynb`, then 02 to 04. They are
  your copies: change them as you like. When the zone ships newer tutorials they appear in
  `tutorials/updates/<release>/`; yours are never overwritten.
* **Templates**: "Run a template" in the launcher opens the portal's template runs
  (papermill notebooks run for you in the same sandbox, queued).
* **Getting results out**: files leave the zone only through the export airlock. Open the
  file you want to export, then "Request an export" in the launcher: the portal's export
  form opens with that file selected. Reviewers check every request; downloads from the lab
  are switched off.
* **Idle servers stop**: a server with no activity for a while (an hour by default) is
  stopped; your files stay. Start it again from the hub's home page.
"""


def shipped_tutorials() -> dict[str, bytes]:
    """The tutorials this release ships (``NAME.ipynb`` -> bytes) and the guide."""
    files = {entry.name: entry.read_bytes()
             for entry in resources.files("medzone_tutorials").iterdir()
             if entry.name.endswith(".ipynb")}
    files[GUIDE] = GUIDE_TEXT.encode()
    return dict(sorted(files.items()))


def release_of(files: dict[str, bytes]) -> str:
    """A short digest naming a set of tutorial files (their names and contents)."""
    digest = hashlib.sha256()
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()[:12]


def _read_marker(fs: UserHome) -> dict:
    rel = f"{TUTORIALS_DIR}/{MARKER}"
    if not fs.is_file(rel):
        return {}
    try:
        marker = json.loads(fs.read_bytes(rel, max_bytes=MAX_MARKER_BYTES))
    except (MedZoneError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _write_all(fs: UserHome, folder: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        rel = f"{folder}/{name}"
        if fs.lstat(rel) is None:  # never over anything that is there
            fs.write_bytes(rel, data, mode=0o644)


def install_tutorials(fs: UserHome, files: dict[str, bytes] | None = None) -> str:
    """Give the home the tutorials (see the module's docstring). What happened:
    ``"installed"``, ``"current"``, ``"offered"`` (a newer release written to
    ``tutorials/updates/<release>/``) or ``"skipped"`` (``tutorials`` is not a folder)."""
    files = shipped_tutorials() if files is None else files
    release = release_of(files)
    st = fs.lstat(TUTORIALS_DIR)
    if st is None:
        fs.makedirs(TUTORIALS_DIR, mode=0o755)
        _write_all(fs, TUTORIALS_DIR, files)
        fs.write_bytes(f"{TUTORIALS_DIR}/{MARKER}", _marker_bytes(release, None), mode=0o644,
                       replace=True)
        return "installed"
    if not fs.is_dir(TUTORIALS_DIR):
        return "skipped"
    marker = _read_marker(fs)
    if marker.get("release") == release:
        return "current"
    if marker.get("offered") == release:
        return "offered"
    folder = f"{TUTORIALS_DIR}/{UPDATES_DIR}/{release}"
    fs.makedirs(folder, mode=0o755)
    _write_all(fs, folder, files)
    fs.write_bytes(f"{TUTORIALS_DIR}/{MARKER}",
                   _marker_bytes(marker.get("release") or "", release), mode=0o644,
                   replace=True)
    return "offered"


def _marker_bytes(release: str, offered: str | None) -> bytes:
    marker = {"release": release,
              "note": "written by MedZone: the tutorial release in this folder"}
    if offered:
        marker["offered"] = offered
        marker["note"] = (f"a newer tutorial release is in {UPDATES_DIR}/{offered}/; "
                          "your copies here were not changed")
    return (json.dumps(marker, indent=1) + "\n").encode()


def link_datasets(fs: UserHome) -> bool:
    """Make ``datasets`` -> ``/data`` when the name is free; whether it was made."""
    if fs.lstat(DATASETS_LINK) is not None:
        return False
    return fs.symlink(DATASETS_LINK, contract.DATA_INSIDE)


def onboard(fs: UserHome, *, tutorials: bool = True, datasets_link: bool = True) -> dict:
    """Tutorials and the datasets link for the home *fs*; what was done, for the log."""
    done = {}
    if tutorials:
        done["tutorials"] = install_tutorials(fs)
    if datasets_link:
        done["datasets_link"] = link_datasets(fs)
    return done


__all__ = ["DATASETS_LINK", "GUIDE", "MARKER", "TUTORIALS_DIR", "UPDATES_DIR",
           "install_tutorials", "link_datasets", "onboard", "release_of", "shipped_tutorials"]
