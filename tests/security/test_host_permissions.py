"""Sandbox ↔ host and user ↔ user through host file permissions.

The host's files enforce the zone's rules on their own, not only the sandboxes' mount
namespaces: the store, secrets and hub state are their owner's alone; a dataset is
``root:<its own group>`` (files 0440, folders 0550), its screening index root's alone, and a
sandbox gets a dataset's group only while its user holds a live grant. Checked three ways:
``os.stat`` on the host; a plain local account and the sandbox uids themselves reading host
paths with ``setpriv`` (no sandbox: only permissions stand in the way); and from inside real
sandboxes (``medzone sandbox exec``), where an ungranted dataset is not even visible and a
revoked grant takes its group away at the next start.

ds-a and ds-b are laid out the way datasets were published before they had groups (files
world-readable) and repaired by :func:`medzone_hub.hubapp.secure_home`, which the hub runs at
start; ds-c goes through a real ``ingest_dataset``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from medzone_hub import access, accounts
from medzone_hub.config import DATASET_GID_BASE, DATASET_GID_SPAN, ENV_DB_URL, ENV_HOME, MedZoneHome
from medzone_hub.sandbox import SandboxConfig, bwrap_argv
from medzone_hub.sessions import policy_for

from ..fixtures import add_tiny_dataset, sandbox_base

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="checks host uids and groups: run as root")

UID_BASE = SandboxConfig().uid_base
#: A local account with no business in the zone (no passwd entry needed).
STRANGER = 64123

PROBE = r"""
import json, os, sys
paths = json.loads(sys.argv[1])
out = {"exists": {}, "read": {}}
for p in paths:
    out["exists"][p] = os.path.exists(p)
    try:
        with open(p, "rb") as f:
            f.read(1)
        out["read"][p] = "ok"
    except OSError as e:
        out["read"][p] = os.strerror(e.errno)
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
out["groups"] = status["Groups"].split()
out["mounts"] = open("/proc/self/mountinfo").read()
print(json.dumps(out))
"""


class Zone:
    def __init__(self, base: Path, source: Path):
        from medzone_hub.db import connect
        from medzone_hub.hubapp import prepare_state
        from medzone_hub.ingest import ingest_dataset, screening_index_key

        self.base = base
        self.home = MedZoneHome(base / "home").ensure()
        self.store = connect(self.home.db_url)
        screening_index_key(self.home)
        self.hub = prepare_state(self.home)
        with self.store.session() as session:
            for name in ("alice", "bob"):
                accounts.add_user(session, name, actor="test")
            accounts.add_user(session, "steward", roles=["data-steward"], actor="test")
            add_tiny_dataset(session, self.home, "ds-a")
            add_tiny_dataset(session, self.home, "ds-b")
        self.legacy_mode = stat.S_IMODE(os.stat(self.file("ds-a")).st_mode)
        ingest_dataset(self.home, self.store, "ds-c", source, actor="test", progress=False)
        self.apps = {}
        with self.store.session() as session:
            for dataset_id in ("ds-a", "ds-c"):
                app = access.apply(session, user="alice", dataset_ids=[dataset_id],
                                   purpose="host permissions")
                session.flush()
                access.approve(session, app.id, reviewer="steward")
                self.apps[dataset_id] = app.id
            self.uids = {u.name: UID_BASE + u.id for u in accounts.list_users(session)}

    def file(self, dataset_id: str) -> Path:
        return self.home.dataset_dir(dataset_id) / "data" / "tables" / "labs.csv"

    def index_file(self, dataset_id: str) -> Path:
        index = self.home.dataset_dir(dataset_id) / "index"
        return sorted(p for p in index.rglob("*") if p.is_file())[0]

    def exec(self, user: str, *cmd) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
        env[ENV_HOME] = str(self.home.root)
        return subprocess.run(
            [sys.executable, "-m", "medzone_hub.cli", "sandbox", "exec", "--user", user, "--",
             *map(str, cmd)], env=env, capture_output=True, text=True, timeout=120, cwd="/")

    def probe(self, user: str, paths: list[str]) -> dict:
        done = self.exec(user, "python3", "-c", PROBE, json.dumps(paths))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def policy(self, user: str):
        with self.store.session() as session:
            return policy_for(self.home, session, user)


def as_account(uid: int, *cmd, groups: list[int] = ()) -> subprocess.CompletedProcess:
    """*cmd* on the host as *uid* (its own gid, *groups* only): permissions alone decide."""
    who = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", *who, "--", *cmd],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def zone():
    from medzone_hub.hubapp import secure_home

    with sandbox_base("medzone-perms-") as base:
        source = base / "source" / "tables"
        source.mkdir(parents=True)
        (source / "labs.csv").write_text("value,count\n7,12\n3,40\n")
        z = Zone(base, source.parent)
        z.repaired = secure_home(z.home)  # what the hub does at start
        yield z
        z.store.close()


def _gid(zone, dataset_id: str) -> int:
    return os.stat(zone.home.dataset_dir(dataset_id)).st_gid


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- on the host -------------------------------------------------------------------------

def test_each_dataset_is_sealed_to_a_group_of_its_own(zone):
    assert zone.legacy_mode == 0o444  # world-readable, as datasets used to be published
    assert zone.repaired == ["ds-a", "ds-b"]  # ds-c was sealed when it was published
    gids = {d: _gid(zone, d) for d in ("ds-a", "ds-b", "ds-c")}
    assert len(set(gids.values())) == 3
    assert all(DATASET_GID_BASE <= g < DATASET_GID_BASE + DATASET_GID_SPAN for g in gids.values())
    for dataset_id, gid in gids.items():
        root = zone.home.dataset_dir(dataset_id)
        for dirpath, dirnames, filenames in os.walk(root):
            index = Path(dirpath) == root / "index" or root / "index" in Path(dirpath).parents
            st = os.stat(dirpath)
            assert (st.st_uid, st.st_gid, _mode(dirpath)) == (
                (0, 0, 0o500) if index else (0, gid, 0o550)), dirpath
            for name in filenames:
                st = os.stat(os.path.join(dirpath, name))
                assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
                    (0, 0, 0o400) if index else (0, gid, 0o440)), (dirpath, name)
    # A second start finds nothing to repair.
    from medzone_hub.hubapp import secure_home

    assert secure_home(zone.home) == []


def test_store_secrets_and_hub_state_are_the_owners_alone(zone):
    home = zone.home
    assert _mode(home.root) == 0o711 and _mode(home.datasets_dir) == 0o711
    assert _mode(home.secrets_dir) == 0o700
    for f in home.secrets_dir.iterdir():
        assert _mode(f) == 0o600, f
    for f in home.root.glob("medzone.sqlite*"):
        assert _mode(f) == 0o600, f
    assert _mode(zone.hub.state_dir) == 0o700
    for f in (zone.hub.db_path, zone.hub.cookie_secret, zone.hub.proxy_token):
        assert _mode(f) == 0o600, f


def test_a_plain_local_account_reads_nothing(zone):
    secrets = [zone.home.sqlite_path, zone.home.secrets_dir / "screening-index.key",
               zone.hub.db_path, zone.hub.cookie_secret, zone.hub.proxy_token]
    data = [zone.file(d) for d in ("ds-a", "ds-b", "ds-c")]
    data += [zone.home.dataset_dir(d) / "manifest.json" for d in ("ds-a", "ds-c")]
    index = [zone.index_file(d) for d in ("ds-a", "ds-c")]
    # A stranger, bob's sandbox uid (no grant), and alice's uid without her groups.
    for uid in (STRANGER, zone.uids["bob"], zone.uids["alice"]):
        for path in (*secrets, *data, *index):
            done = as_account(uid, "cat", str(path))
            assert done.returncode != 0 and "Permission denied" in done.stderr, (uid, path)
            assert done.stdout == ""
        for folder in (zone.home.root, zone.home.datasets_dir):
            listing = as_account(uid, "ls", str(folder))
            assert "Permission denied" in listing.stderr and listing.stdout == "", (uid, folder)
    # Control: the dataset's group is what opens it, and only its own dataset.
    with_group = as_account(zone.uids["alice"], "cat", str(zone.file("ds-a")),
                            groups=[_gid(zone, "ds-a")])
    assert with_group.returncode == 0 and with_group.stdout.startswith("patient,value")
    other = as_account(zone.uids["alice"], "cat", str(zone.file("ds-b")),
                       groups=[_gid(zone, "ds-a")])
    assert "Permission denied" in other.stderr
    index_too = as_account(zone.uids["alice"], "cat", str(zone.index_file("ds-a")),
                           groups=[_gid(zone, "ds-a")])
    assert "Permission denied" in index_too.stderr  # the index is root's alone


# --- from inside sandboxes ---------------------------------------------------------------

def _routes(zone, dataset_id: str) -> list[str]:
    host = zone.home.dataset_dir(dataset_id)
    return [f"/data/{dataset_id}/tables/labs.csv", f"/run/medzone/manifests/{dataset_id}.json",
            str(host / "data" / "tables" / "labs.csv"), str(host / "manifest.json"),
            str(host), f"/proc/1/root{host}/data/tables/labs.csv",
            f"/proc/self/root/data/{dataset_id}/tables/labs.csv",
            str(zone.index_file(dataset_id))]


def test_an_ungranted_sandbox_sees_no_trace_of_the_dataset(zone):
    got = zone.probe("bob", _routes(zone, "ds-a") + _routes(zone, "ds-c"))
    assert not any(got["exists"].values()), got["exists"]
    assert set(got["read"].values()) == {"No such file or directory"}
    assert got["groups"] == []  # no dataset group at all
    assert "/datasets/" not in got["mounts"]  # nothing of any dataset is mounted


def test_a_granted_sandbox_reads_its_datasets_through_their_groups(zone):
    policy = zone.policy("alice")
    assert policy.groups == sorted([_gid(zone, "ds-a"), _gid(zone, "ds-c")])
    argv = bwrap_argv(policy, ["true"])
    assert f"--groups={','.join(map(str, policy.groups))}" in argv
    routes = _routes(zone, "ds-a")
    got = zone.probe("alice", routes + ["/data/ds-c/tables/labs.csv"])
    assert got["read"]["/data/ds-a/tables/labs.csv"] == "ok"
    assert got["read"]["/run/medzone/manifests/ds-a.json"] == "ok"
    assert got["read"]["/data/ds-c/tables/labs.csv"] == "ok"
    assert len(got["groups"]) == 2  # the two dataset groups (unmapped inside: overflow id)
    # The host paths, the index and other routes stay out of reach even for a holder.
    host_routes = [p for p in routes if not p.startswith(("/data/", "/run/", "/proc/self/"))]
    assert len(host_routes) == 5
    assert all(not got["exists"][p] for p in host_routes), got["exists"]
    # Control: bubblewrap's bind of ds-a is there, the ungranted ds-b is not.
    assert "/datasets/ds-a/data" in got["mounts"] and "/datasets/ds-b" not in got["mounts"]


def test_after_revocation_the_next_sandbox_cannot_read(zone):
    with zone.store.session() as session:
        access.revoke(session, zone.apps["ds-a"], actor="steward", reason="test")
    policy = zone.policy("alice")
    assert policy.groups == [_gid(zone, "ds-c")]  # ds-a's group is gone with the grant
    got = zone.probe("alice", _routes(zone, "ds-a") + ["/data/ds-c/tables/labs.csv"])
    assert got["read"]["/data/ds-c/tables/labs.csv"] == "ok"
    assert not any(got["exists"][p] for p in _routes(zone, "ds-a")), got["exists"]
    assert len(got["groups"]) == 1
    # The same uid with exactly that sandbox's groups, on the host: permission denied.
    done = as_account(zone.uids["alice"], "cat", str(zone.file("ds-a")), groups=policy.groups)
    assert "Permission denied" in done.stderr and done.stdout == ""
