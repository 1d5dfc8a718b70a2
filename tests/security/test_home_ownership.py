"""A home whose user's sandbox uid changed (a new ``uid_base``, a restored backup).

Root gives the files inside to the new uid before the sandbox starts, so the user's server
and runs do not fail with ``PermissionError``. The user owned the home under the old uid
and may have planted links in it: root follows none of them, and nothing outside the
home changes owner.
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from medzone_hub.sandbox import SandboxConfig

from .home_zone import drop_zone, make_zone, needs_root, owner_mode

pytestmark = needs_root

OLD_BASE = SandboxConfig().uid_base
NEW_BASE = OLD_BASE + 7000


@pytest.fixture
def zone():
    z = make_zone("medzone-homeowner-")
    yield z
    drop_zone(z)


def _config(zone, uid_base: int):
    path = zone.base / f"hub_config_{uid_base}.py"
    path.write_text("from medzone_hub.hubapp import DEFAULT_CONFIG\n"
                    "load_subconfig(str(DEFAULT_CONFIG))\n"
                    f"c.SafeZoneSpawner.uid_base = {uid_base}\n")
    return path


def _sh(zone, config, script):
    argv = zone.sh_argv("alice", script)
    argv[argv.index("exec") + 1:argv.index("exec") + 1] = ["--hub-config", str(config)]
    return subprocess.run(argv, env=zone.env(), capture_output=True, text=True, timeout=120,
                          cwd="/")


def test_a_changed_uid_gets_its_files_back_and_nothing_outside_the_home_changes(zone):
    old_cfg, new_cfg = _config(zone, OLD_BASE), _config(zone, NEW_BASE)
    made = _sh(zone, old_cfg, "mkdir -p ~/proj/deep/er && echo work > ~/proj/deep/er/notes.txt"
                              " && echo top > ~/top.txt && chmod 4755 ~/top.txt; id -u")
    assert made.returncode == 0, made.stderr
    old_uid = int(made.stdout.split()[-1])
    home = zone.home_of("alice")
    assert os.stat(home).st_uid == old_uid

    # What an attacker leaves behind, as the old uid: a link to a host file root owns,
    # a link to a host file the old uid owns outside the home, a link to a host folder,
    # and (planted by root here: a user cannot link root's files) a hard link to a host
    # file root owns.
    victim_root = zone.base / "host-root-file"
    victim_root.write_text("root's")
    victim_old = zone.base / "host-file-of-old-uid"
    victim_old.write_text("someone else's now")
    os.chown(victim_old, old_uid, old_uid)
    host_dir = zone.base / "host-folder"
    host_dir.mkdir()
    (host_dir / "inside.txt").write_text("x")
    os.chown(host_dir / "inside.txt", old_uid, old_uid)
    for name, target in [("to-root", victim_root), ("to-old", victim_old), ("to-dir", host_dir)]:
        os.symlink(target, home / "proj" / name)
        os.lchown(home / "proj" / name, old_uid, old_uid)
    os.link(zone.rootonly / "secret.txt", home / "proj" / "hardlink")
    outside = {p: owner_mode(p) for p in (victim_root, victim_old, host_dir,
                                          host_dir / "inside.txt", zone.rootonly / "secret.txt")}

    # The same user, another uid: the sandbox starts and can write to its old files.
    after = _sh(zone, new_cfg, "echo more >> ~/proj/deep/er/notes.txt && cat ~/proj/deep/er/"
                               "notes.txt && echo new > ~/proj/new.txt && id -u")
    assert after.returncode == 0, after.stderr
    new_uid = int(after.stdout.split()[-1])
    assert new_uid == old_uid + (NEW_BASE - OLD_BASE)
    assert "work\nmore" in after.stdout

    for path in [home, home / "proj", home / "proj" / "deep", home / "proj" / "deep" / "er",
                 home / "proj" / "deep" / "er" / "notes.txt", home / "top.txt",
                 home / "proj" / "to-root", home / "proj" / "to-old", home / "proj" / "to-dir"]:
        assert os.lstat(path).st_uid == new_uid, path
    # chown by root clears set-uid bits: nothing of the old uid's privileges carries over.
    assert not os.stat(home / "top.txt").st_mode & stat.S_ISUID
    assert os.stat(home / "proj" / "hardlink").st_uid == 0
    assert {p: owner_mode(p) for p in outside} == outside
