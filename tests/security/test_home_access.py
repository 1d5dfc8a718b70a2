"""Root in a user's home: nothing root does there follows a link the user planted.

The user owns their home and, from inside their sandbox, can swap any file or folder in it
for a symbolic link (to a root-only host file, to another user's home) at any moment. The
export airlock, the portal's run pages and the spawner run as root; each attack below is
planted from inside a real sandbox (``medzone sandbox exec``, or the user's own kernel) and
must fail in one line with no side effect: nothing read from where a link points, nothing
quarantined, nothing created, chowned or written outside the home.

The first tests pin :class:`medzone_hub.homefs.UserHome` itself, the one module every
root-side touch of a home goes through.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medzone_hub import airlock
from medzone_hub.errors import InvalidInput, MedZoneError, NotFound, RuleViolation
from medzone_hub.homefs import FileTooLarge, UserHome

from .home_zone import SECRET, drop_zone, make_zone, needs_root, owner_mode

pytestmark = needs_root

UID, GID = 54321, 54321


# --- homefs ------------------------------------------------------------------------------

@pytest.fixture
def fs(tmp_path) -> UserHome:
    homes = tmp_path / "homes"
    homes.mkdir()
    home = homes / "u"
    home.mkdir(mode=0o700)
    os.chown(home, UID, GID)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(SECRET)
    return UserHome(home, UID, GID)


def _own(path: Path) -> Path:
    os.lchown(path, UID, GID)
    return path


def test_homefs_refuses_a_link_on_any_component(fs, tmp_path):
    outside = tmp_path / "outside"
    (fs.path / "lnk").symlink_to(outside / "secret.txt")
    (fs.path / "dirlink").symlink_to(outside)
    for rel in ("lnk", "dirlink/secret.txt"):
        with pytest.raises(RuleViolation, match="symbolic link"):
            fs.read_bytes(rel)
    with pytest.raises(RuleViolation, match="symbolic link"):
        fs.listdir("dirlink")
    with pytest.raises(RuleViolation, match="symbolic link"):
        fs.makedirs("dirlink/new")
    with pytest.raises(RuleViolation, match="symbolic link"):
        fs.write_bytes("dirlink/new.txt", b"x")
    with pytest.raises(RuleViolation):
        fs.write_bytes("lnk", b"overwritten")
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert (outside / "secret.txt").read_bytes() == SECRET
    assert stat.S_ISLNK(fs.lstat("lnk").st_mode)
    assert not fs.is_file("lnk") and not fs.is_dir("dirlink")
    for bad in ("../outside/secret.txt", "/etc/passwd", "a/../../x"):
        with pytest.raises((RuleViolation, InvalidInput)):
            fs.read_bytes(bad)


def test_homefs_reads_only_the_users_own_regular_files(fs):
    (fs.path / "mine.txt").write_bytes(b"mine")
    _own(fs.path / "mine.txt")
    assert fs.read_bytes("mine.txt") == b"mine"
    (fs.path / "roots.txt").write_bytes(b"root's")  # owned by root: as a hard link would be
    with pytest.raises(RuleViolation, match="not the user's own"):
        fs.read_bytes("roots.txt")
    os.mkfifo(fs.path / "fifo")
    _own(fs.path / "fifo")
    with pytest.raises(RuleViolation, match="not a regular file"):
        fs.read_bytes("fifo")  # and it did not block
    (fs.path / "big.bin").write_bytes(b"x" * 5000)
    _own(fs.path / "big.bin")
    with pytest.raises(FileTooLarge):
        fs.read_bytes("big.bin", max_bytes=4096)


def test_homefs_creates_owned_entries_and_walks_without_following(fs, tmp_path):
    run = fs.mkdir_unique("runs", "r1")
    assert run == "runs/r1" and fs.mkdir_unique("runs", "r1") == "runs/r1-2"
    fs.write_bytes("runs/r1/parameters.json", b"{}")
    st = os.lstat(fs.path / "runs" / "r1" / "parameters.json")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID, GID, 0o600)
    assert os.lstat(fs.path / "runs").st_uid == UID
    (fs.path / "runs" / "r1" / "out").symlink_to(tmp_path / "outside")
    (fs.path / "runs" / "r1" / "leak").symlink_to(tmp_path / "outside" / "secret.txt")
    assert fs.walk_files("runs") == ["runs/r1/parameters.json"]
    assert [p for p, _st in fs.walk_stats("")] == ["runs/r1/parameters.json"]
    assert fs.unlink("runs/r1/leak") and (tmp_path / "outside" / "secret.txt").exists()


def test_homefs_of_a_zone_takes_the_owner_of_the_home_folder(tmp_path):
    from medzone_hub.config import MedZoneHome

    home = MedZoneHome(tmp_path)
    (tmp_path / "homes" / "ann").mkdir(parents=True)
    os.chown(tmp_path / "homes" / "ann", UID, GID)
    fs = UserHome.of(home, "ann")
    assert (fs.uid, fs.gid) == (UID, GID)
    with pytest.raises(MedZoneError):
        UserHome.of(home, "../ann")
    with pytest.raises(NotFound):
        UserHome.of(home, "nobody").listdir()


# --- the zone ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zone():
    z = make_zone("medzone-homeaccess-")
    assert z.sh("bob", "echo bob-private > ~/notes.txt").returncode == 0
    yield z
    drop_zone(z)


def _export(zone, *paths, user="alice"):
    return airlock.submit_export(zone.store, zone.home, user=user, paths=list(paths),
                                 reason="figures")


def _no_secret_quarantined(zone) -> None:
    for path in zone.quarantined():
        data = path.read_bytes()
        assert SECRET not in data and b"bob-private" not in data, path


def test_a_link_to_a_root_only_file_or_another_home_is_not_exported(zone):
    bob_home = zone.home_of("bob")
    done = zone.sh("alice", (
        f"ln -sfn {zone.rootonly}/secret.txt ~/x && ln -sfn {bob_home} ~/bobhome && "
        f"ln -sfn {zone.rootonly} ~/ro && ln -sfn {bob_home}/notes.txt ~/notes.csv"))
    assert done.returncode == 0, done.stderr
    before = zone.quarantine_folders()
    for path in ("x", "/home/alice/x", str(zone.home_of("alice") / "x"), "bobhome",
                 "bobhome/notes.txt", "ro/secret.txt", "notes.csv"):
        with pytest.raises(RuleViolation, match="symbolic link") as err:
            _export(zone, path)
        assert "\n" not in str(err.value)
    assert zone.quarantine_folders() == before
    assert zone.staging_entries() == []
    _no_secret_quarantined(zone)
    assert zone.audit_ok()


def test_a_link_inside_a_requested_folder_is_skipped(zone):
    done = zone.sh("alice", (
        "mkdir -p ~/out && printf 'group,n\\na,1200\\nb,1300\\n' > ~/out/ok.csv && "
        f"ln -sfn {zone.rootonly}/secret.txt ~/out/leak.csv && ln -sfn {zone.rootonly} ~/out/sub"))
    assert done.returncode == 0, done.stderr
    rid = _export(zone, "out")
    with zone.store.session() as s:
        assert [f.path for f in airlock.get_request(s, rid).files] == ["out/ok.csv"]
    _no_secret_quarantined(zone)
    assert zone.staging_entries() == []


def test_a_folder_swapped_for_a_link_during_requests_never_leaks(zone):
    """A sandbox process swaps ``~/race`` between a real folder and a link to the root-only
    folder as fast as it can while root requests it over and over (a bounded count)."""
    script = (
        "cd ~ && rm -rf race race.real race.link && mkdir race.real && "
        "printf 'group,n\\na,1200\\n' > race.real/secret.txt && "
        f"ln -s {zone.rootonly} race.link && touch race-started && i=0 && "
        "while [ ! -e stop-race ] && [ $i -lt 200000 ]; do "
        "mv -T race.real race; mv -T race race.real; "
        "mv -T race.link race; mv -T race race.link; i=$((i+1)); done; rm -f stop-race")
    assert zone.sh("alice", "rm -f ~/race-started ~/stop-race").returncode == 0
    started = zone.home_of("alice") / "race-started"
    swapper = subprocess.Popen(zone.sh_argv("alice", script), env=zone.env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    outcomes = {"ok": 0, "refused": 0}
    try:
        while not started.exists():
            assert swapper.poll() is None, swapper.communicate()
            time.sleep(0.05)
        for _ in range(40):
            for paths in (["race"], ["race/secret.txt"]):
                try:
                    _export(zone, *paths)
                    outcomes["ok"] += 1
                except MedZoneError as err:
                    assert "\n" not in str(err)
                    outcomes["refused"] += 1
    finally:
        (zone.home_of("alice") / "stop-race").touch()
        swapper.communicate(timeout=120)
    print("race outcomes:", outcomes)
    assert outcomes["refused"] > 0  # the swap was seen
    _no_secret_quarantined(zone)
    assert zone.staging_entries() == []
    assert zone.audit_ok()


def _record_run(store, user: str, name: str) -> None:
    """The store's row for run folder *name* of *user*, as ``prepare_run`` makes it: the
    portal shows runs the store records, so a planted folder must be a run's to be read."""
    from medzone_hub.accounts import get_user
    from medzone_hub.models import Run

    with store.session() as session:
        session.add(Run(user=get_user(session, user), template="demo",
                        template_sha256="0" * 64, parameters={}, state="done",
                        run_dir=f"runs/{name}", output=f"runs/{name}/demo.ipynb"))


def test_the_run_pages_never_read_through_links(zone):
    from medzone_hub.portal.runs import RunTracker

    notebook = {"cells": [{"cell_type": "code", "source": SECRET.decode(), "metadata": {},
                           "outputs": []}], "metadata": {}, "nbformat": 4,
                "nbformat_minor": 5}
    (zone.rootonly / "nb.ipynb").write_text(json.dumps(notebook))
    (zone.rootonly / "params.json").write_text(json.dumps({"secret": SECRET.decode()}))
    for f in ("nb.ipynb", "params.json"):
        os.chmod(zone.rootonly / f, 0o600)
    name = "20260101T000000Z-demo"
    done = zone.sh("alice", (
        f"mkdir -p ~/runs/{name} && ln -sfn {zone.rootonly}/nb.ipynb ~/runs/{name}/demo.ipynb"
        f" && ln -sfn {zone.rootonly}/params.json ~/runs/{name}/parameters.json"))
    assert done.returncode == 0, done.stderr
    _record_run(zone.store, "alice", name)

    class PortalState:
        home = zone.home
        store = zone.store

    tracker = RunTracker(PortalState())
    assert tracker.names("alice") == [name]
    progress = tracker.progress("alice", name)
    assert progress["parameters"] == {} and progress["notebook"] is None
    assert SECRET.decode() not in json.dumps(progress)

    # ~/runs itself a link to a root-only folder holding a run: nothing listed, 404.
    fake_runs = zone.base / "rootonly-runs"
    (fake_runs / name).mkdir(parents=True)
    (fake_runs / name / "parameters.json").write_text(json.dumps({"secret": SECRET.decode()}))
    os.chmod(fake_runs, 0o700)
    done = zone.sh("alice", f"rm -rf ~/runs && ln -s {fake_runs} ~/runs")
    assert done.returncode == 0, done.stderr
    # The run is the store's; nothing of its folder is read through the link.
    progress = tracker.progress("alice", name)
    assert progress["parameters"] == {} and progress["notebook"] is None
    assert progress["cells_total"] == 0 and SECRET.decode() not in json.dumps(progress)


def test_ensure_home_does_not_follow_a_home_swapped_for_a_link(zone):
    from medzone_hub.sandbox import SandboxError, ensure_home
    from medzone_hub.sessions import policy_for

    target = zone.base / "rootonly-home"
    target.mkdir(mode=0o700)
    before = owner_mode(target)
    with zone.store.session() as s:
        from medzone_hub import accounts

        accounts.add_user(s, "eve", actor="test")
    with zone.store.session() as s:
        policy = policy_for(zone.home, s, "eve")
    zone.home_of("eve").symlink_to(target)  # only root can do this (homes/ is root's)
    with pytest.raises(SandboxError, match="not a folder"):
        ensure_home(zone.home, policy)
    assert owner_mode(target) == before


# --- the spawner and the portal, in a real hub ---------------------------------------------

@pytest.fixture(scope="module")
def hub():
    from ..hub_harness import DATASET, require_hub_tools, running_hub

    require_hub_tools()

    def setup(h):
        from medzone_hub import accounts
        from medzone_hub.accounts import set_password

        from ..hub_harness import PASSWORD

        with h.store.session() as session:
            accounts.add_user(session, "pat", actor="test")
        set_password(h.home, "pat", PASSWORD, actor="test")

    with running_hub({DATASET: "granted\n"}, setup=setup) as h:
        yield h


def test_the_portal_run_page_returns_nothing_read_through_links(hub):
    """pat plants a run folder whose notebook and parameters are links to root-only files
    (from inside the sandbox); the portal's run page and its JSON show none of it."""
    from ..hub_harness import PASSWORD, login

    secret_dir = hub.base / "rootonly-run"
    secret_dir.mkdir(mode=0o700)
    nb = {"cells": [{"cell_type": "code", "source": SECRET.decode(), "metadata": {},
                     "outputs": []}], "metadata": {"papermill": {"end_time": "x"}},
          "nbformat": 4, "nbformat_minor": 5}
    (secret_dir / "nb.ipynb").write_text(json.dumps(nb))
    (secret_dir / "params.json").write_text(json.dumps({"secret": SECRET.decode()}))
    name = "20260101T000000Z-demo"
    env = {k: v for k, v in os.environ.items() if k != "MEDZONE_DB_URL"}
    env["MEDZONE_HOME"] = str(hub.home.root)
    done = subprocess.run(
        [sys.executable, "-m", "medzone_hub.cli", "sandbox", "exec", "--user", "pat", "--",
         "sh", "-c", f"mkdir -p ~/runs/{name} && "
         f"ln -s {secret_dir}/nb.ipynb ~/runs/{name}/demo.ipynb && "
         f"ln -s {secret_dir}/params.json ~/runs/{name}/parameters.json"],
        env=env, capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    _record_run(hub.store, "pat", name)
    browser = login(hub, "pat", PASSWORD)
    assert browser.login_response.status_code == 302
    assert browser.get(hub.portal_url + "catalog", timeout=60).status_code == 200
    xsrf = browser.cookies.get("_xsrf", path="/services/medzone-portal/")
    status = browser.get(hub.portal_url + f"runs/{name}.json", timeout=60,
                         headers={"X-XSRFToken": xsrf})
    assert status.status_code == 200, status.text[-1000:]
    assert status.json()["parameters"] == {} and status.json()["notebook"] is None
    page = browser.get(hub.portal_url + f"runs/{name}", timeout=60)
    assert page.status_code == 200
    for text in (status.text, page.text):
        assert SECRET.decode() not in text


def test_the_spawner_writes_nothing_where_links_in_the_home_point(hub):
    """mallory's kernel plants ``~/.medzone`` (where sockets and the secrets file used to
    live) as links to a root-only folder; the next spawn chowns, writes and unlinks
    nothing there, the route lives in the hub's own folder, and no secret is in the home."""
    from medzone_hub.hubapp import HubPaths

    from ..hub_harness import run_code

    hub.add_store_user("mallory")
    assert hub.spawn("mallory").status_code in (201, 202), hub.log()[-3000:]
    token = hub.user_token("mallory")
    target = hub.base / "rootonly-target"
    target.mkdir(mode=0o700)
    (target / "keep.txt").write_bytes(SECRET)
    os.chmod(target / "keep.txt", 0o600)
    watched = {p: owner_mode(p) for p in (target, target / "keep.txt")}
    out = run_code(hub, "mallory", token, (
        "import os\n"
        "home = os.path.expanduser('~')\n"
        "os.makedirs(home + '/.medzone', exist_ok=True)\n"
        "for name in ('jupyter.sock', 'server-env.json'):\n"
        "    p = home + '/.medzone/' + name\n"
        "    if os.path.lexists(p): os.unlink(p)\n"
        f"    os.symlink({str(target / 'keep.txt')!r}, p)\n"
        "os.rename(home + '/.medzone', home + '/.medzone-old')\n"
        f"os.symlink({str(target)!r}, home + '/.medzone')\n"
        "print('planted')\n"))
    assert "planted" in out
    assert hub.api("DELETE", "/users/mallory/server").status_code in (202, 204)
    hub_state = HubPaths(hub.home).server_socket_dir
    for _ in range(100):
        if not hub.server_state("mallory"):
            break
        time.sleep(0.2)
    assert hub.spawn("mallory").status_code in (201, 202), hub.log()[-3000:]
    token = hub.user_token("mallory")
    assert hub.user_api("mallory", token, "GET", "/api/status").status_code == 200
    state = hub.server_state("mallory")
    assert Path(state["socket_path"]).parent == hub_state
    assert {p: owner_mode(p) for p in watched} == watched
    assert sorted(os.listdir(target)) == ["keep.txt"]
    assert (target / "keep.txt").read_bytes() == SECRET
    home = hub.home.root / "homes" / "mallory"
    assert os.readlink(home / ".medzone") == str(target)
    for dirpath, _dirs, files in os.walk(home):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            assert b"JUPYTERHUB_API_TOKEN" not in path.read_bytes(), path
    assert stat.S_IMODE(os.stat(hub_state).st_mode) == 0o700
