"""The lab a new student meets: tutorials and a ``datasets`` link in the home (copied by
root without following links, never over the student's edits; a newer release offered,
not forced), MedZone's launcher section, Help > MedZone guide, no announcements, and
"request an export" with the open file — first as functions, then in a real hub with a
real sandboxed JupyterLab.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jsonschema
import pytest

from medzone_hub import onboarding, singleuser
from medzone_hub.errors import MedZoneError
from medzone_hub.homefs import UserHome

from .hub_harness import DATASET, require_hub_tools, running_hub, wait_for

require_hub_tools()

FILES = {"01_a.ipynb": b'{"cells": []}', onboarding.GUIDE: b"# guide\n"}
NEWER = {"01_a.ipynb": b'{"cells": [1]}', onboarding.GUIDE: b"# guide v2\n"}


@pytest.fixture
def home():
    base = Path(tempfile.mkdtemp(prefix="mz-onboard-", dir="/tmp"))
    (base / "alice").mkdir()
    try:
        yield base / "alice"
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- tutorials ----------------------------------------------------------------------

def test_shipped_tutorials_are_the_package_data_and_the_guide():
    files = onboarding.shipped_tutorials()
    assert "01_getting_started.ipynb" in files and onboarding.GUIDE in files
    assert json.loads(files["01_getting_started.ipynb"])["cells"]
    assert onboarding.release_of(files) == onboarding.release_of(dict(files))
    assert onboarding.release_of(files) != onboarding.release_of({**files, "x.ipynb": b"{}"})


def test_first_spawn_installs_once_and_never_overwrites_edits(home):
    fs = UserHome(home)
    assert onboarding.install_tutorials(fs, FILES) == "installed"
    tut = home / "tutorials"
    assert (tut / "01_a.ipynb").read_bytes() == FILES["01_a.ipynb"]
    marker = json.loads((tut / onboarding.MARKER).read_text())
    assert marker["release"] == onboarding.release_of(FILES)
    (tut / "01_a.ipynb").write_text("my edits")
    (tut / onboarding.GUIDE).unlink()  # removed by the student: stays removed
    assert onboarding.install_tutorials(fs, FILES) == "current"
    assert (tut / "01_a.ipynb").read_text() == "my edits"
    assert not (tut / onboarding.GUIDE).exists()


def test_a_newer_release_is_offered_beside_the_students_copies(home):
    fs = UserHome(home)
    onboarding.install_tutorials(fs, FILES)
    tut = home / "tutorials"
    (tut / "01_a.ipynb").write_text("my edits")
    assert onboarding.install_tutorials(fs, NEWER) == "offered"
    release = onboarding.release_of(NEWER)
    offered = tut / onboarding.UPDATES_DIR / release
    assert (offered / "01_a.ipynb").read_bytes() == NEWER["01_a.ipynb"]
    assert (tut / "01_a.ipynb").read_text() == "my edits"
    marker = json.loads((tut / onboarding.MARKER).read_text())
    assert marker["offered"] == release and marker["release"] == onboarding.release_of(FILES)
    assert release in marker["note"]
    # Offered once: the student may delete the offer and is not asked again.
    shutil.rmtree(offered)
    assert onboarding.install_tutorials(fs, NEWER) == "offered"
    assert not offered.exists()


def test_a_removed_tutorials_folder_comes_back(home):
    fs = UserHome(home)
    onboarding.install_tutorials(fs, FILES)
    shutil.rmtree(home / "tutorials")
    assert onboarding.install_tutorials(fs, FILES) == "installed"
    assert (home / "tutorials" / "01_a.ipynb").is_file()


def test_links_planted_in_the_home_are_never_followed(home, tmp_path):
    victim = Path(tempfile.mkdtemp(prefix="mz-victim-", dir="/tmp"))
    try:
        fs = UserHome(home)
        # tutorials -> another folder: skipped, nothing written there.
        (home / "tutorials").symlink_to(victim)
        assert onboarding.install_tutorials(fs, FILES) == "skipped"
        assert list(victim.iterdir()) == []
        (home / "tutorials").unlink()
        # A file of the release planted as a link to a root file: left as it is.
        (home / "tutorials").mkdir()
        target = victim / "root-file"
        target.write_text("root's")
        (home / "tutorials" / "01_a.ipynb").symlink_to(target)
        assert onboarding.install_tutorials(fs, FILES) == "offered"  # no marker: offered
        assert target.read_text() == "root's"
        assert (home / "tutorials" / "01_a.ipynb").is_symlink()
        # updates/ as a link: refused in one line, nothing written through it.
        shutil.rmtree(home / "tutorials" / onboarding.UPDATES_DIR)
        (home / "tutorials" / onboarding.MARKER).unlink()
        (home / "tutorials" / onboarding.UPDATES_DIR).symlink_to(victim)
        with pytest.raises(MedZoneError, match="link"):
            onboarding.install_tutorials(fs, NEWER)
        assert sorted(p.name for p in victim.iterdir()) == ["root-file"]
    finally:
        shutil.rmtree(victim, ignore_errors=True)


def test_a_forged_marker_is_only_the_students_own_business(home):
    fs = UserHome(home)
    onboarding.install_tutorials(fs, FILES)
    marker = home / "tutorials" / onboarding.MARKER
    marker.write_bytes(b"[" * 100)
    assert onboarding.install_tutorials(fs, FILES) == "offered"
    marker.unlink()
    os.mkfifo(marker)  # a FIFO would block a reader: never opened
    assert onboarding.install_tutorials(fs, NEWER) == "offered"


def test_datasets_link_is_made_when_the_name_is_free(home):
    fs = UserHome(home)
    assert onboarding.link_datasets(fs) is True
    assert os.readlink(home / "datasets") == "/data"
    assert onboarding.link_datasets(fs) is False
    (home / "datasets").unlink()
    (home / "datasets").write_text("mine")
    assert onboarding.link_datasets(fs) is False
    assert (home / "datasets").read_text() == "mine"


# --- the lab's settings -------------------------------------------------------------

ENV = {"JUPYTERHUB_SERVICE_PREFIX": "/user/alice/", "JUPYTERHUB_BASE_URL": "/"}


def test_launcher_cards_are_valid_app_launcher_entries():
    from jupyter_app_launcher.utils import SCHEMA

    cards = singleuser.launcher_cards(ENV)
    for card in cards:
        jsonschema.validate({**card, "id": "x"}, SCHEMA)
        assert card["catalog"] == "MedZone"
    by_title = {c["title"]: c for c in cards}
    assert set(by_title) == {"Tutorials", "Datasets", "Run a template", "Request an export",
                             "My datasets and grants", "MedZone portal"}
    assert by_title["Request an export"]["source"] == "/user/alice/medzone/request-export"
    assert by_title["Run a template"]["source"] == "/services/medzone-portal/run"
    assert by_title["MedZone portal"]["source"] == "/services/medzone-portal/"


def test_help_menu_links_the_guide_and_news_is_off():
    overrides = singleuser.lab_overrides(ENV)
    assert overrides["@jupyterlab/apputils-extension:notification"] == {
        "fetchNews": "false", "checkForUpdates": False}
    menus = {m["id"]: m for m in overrides["@jupyterlab/mainmenu-extension:plugin"]["menus"]}
    items = menus["jp-mainmenu-help"]["items"]
    urls = [i["args"]["url"] for i in items if i.get("command") == "help:open"]
    assert urls == ["/user/alice/medzone/guide", "/services/medzone-portal/"]
    medzone = [i["args"]["url"] for i in menus["jp-mainmenu-medzone"]["items"]]
    assert medzone[0] == "/user/alice/medzone/request-export"
    custom = singleuser.lab_overrides({**ENV, "MEDZONE_GUIDE_URL": "https://guide.example"})
    menus = {m["id"]: m for m in custom["@jupyterlab/mainmenu-extension:plugin"]["menus"]}
    assert menus["jp-mainmenu-help"]["items"][1]["args"]["url"] == "https://guide.example"
    assert "@jupyterlab/apputils-extension:announcements" in singleuser.DISABLED_LAB_PLUGINS


def test_current_document_of_a_saved_workspace():
    def ws(current):
        return {"data": {"layout-restorer:data": {"main": {"current": current}}}}

    exists = {"tutorials/01.ipynb", "out/fig.png"}.__contains__
    assert singleuser.current_document(ws("notebook:tutorials/01.ipynb"), exists) == \
        "tutorials/01.ipynb"
    assert singleuser.current_document(ws("imageviewer:out/fig.png"), exists) == "out/fig.png"
    assert singleuser.current_document(ws("launcher-0"), exists) is None
    assert singleuser.current_document(ws("editor:gone.py"), exists) is None
    launcher_current = {"data": {"layout-restorer:data": {"main": {
        "current": "launcher-0", "dock": {"type": "split-area", "children": [
            {"type": "tab-area", "widgets": ["notebook:tutorials/01.ipynb", "launcher-0"]}]}}}}}
    assert singleuser.current_document(launcher_current, exists) == "tutorials/01.ipynb"
    assert singleuser.current_document({}, exists) is None
    assert singleuser.current_document({"data": []}, exists) is None


# --- in a real hub --------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub():
    with running_hub({DATASET: "granted data\n"}) as h:
        yield h


def test_first_spawn_in_a_real_hub_gives_the_lab_its_onboarding(hub):
    hub.add_store_user("olga")
    assert hub.spawn("olga").status_code in (201, 202)
    home = hub.home.user_home("olga")
    assert (home / "tutorials" / "01_getting_started.ipynb").is_file()
    assert (home / "tutorials" / onboarding.GUIDE).is_file()
    assert os.readlink(home / "datasets") == "/data"
    st = (home / "tutorials" / "01_getting_started.ipynb").stat()
    assert st.st_uid == hub.user_uid("olga")
    token = hub.user_token("olga")

    # The file browser reaches the granted dataset through the link, read-only.
    r = hub.user_api("olga", token, "GET", f"/api/contents/datasets/{DATASET}")
    assert r.status_code == 200, r.text
    assert [e["name"] for e in r.json()["content"]] == ["readme.txt"]
    r = hub.user_api("olga", token, "PUT", f"/api/contents/datasets/{DATASET}/new.txt",
                     json={"type": "file", "format": "text", "content": "x"})
    assert r.status_code >= 400

    # The lab's page: announcements and server-proxy off, downloads still off.
    r = hub.user_api("olga", token, "GET", "/lab")
    assert r.status_code == 200
    assert "@jupyterlab/apputils-extension:announcements" in r.text
    assert '"news": {"disabled": true}' in r.text or '"disabled": true' in r.text

    # The launcher's MedZone section, as jupyter-app-launcher serves it.
    r = hub.user_api("olga", token, "POST", "/jupyterlab-app-launcher",
                     json={"method": "init_launcher"})
    assert r.status_code == 200, r.text
    titles = {c["title"] for c in r.json() if c.get("catalog") == "MedZone"}
    assert {"Tutorials", "Request an export", "Run a template", "MedZone portal",
            "My datasets and grants", "Datasets"} <= titles

    # The Help menu's guide and the settings overrides.
    r = hub.user_api("olga", token, "GET", "/medzone/guide")
    assert r.status_code == 200 and "MedZone" in r.text
    r = hub.user_api("olga", token, "GET",
                     "/lab/api/settings/@jupyterlab/mainmenu-extension:plugin")
    assert r.status_code == 200 and "MedZone guide" in r.text

    # Live memory/CPU (jupyter-resource-usage).
    r = hub.user_api("olga", token, "GET", "/api/metrics/v1")
    assert r.status_code == 200 and "rss" in r.json()

    # Nothing a kernel serves reaches the browser through a proxy route.
    r = hub.user_api("olga", token, "GET", "/proxy/8888/")
    assert r.status_code in (403, 404)


def test_request_export_opens_the_portal_form_with_the_current_file(hub):
    hub.add_store_user("pavel")
    assert hub.spawn("pavel").status_code in (201, 202)
    token = hub.user_token("pavel")
    r = hub.user_api("pavel", token, "GET", "/medzone/request-export")
    assert r.status_code == 302
    assert r.headers["Location"] == "/services/medzone-portal/exports"
    # What the lab saves when a notebook is the current tab.
    workspace = {"data": {"layout-restorer:data": {"main": {
        "current": "notebook:tutorials/01_getting_started.ipynb"}}},
        "metadata": {"id": "default"}}
    r = hub.user_api("pavel", token, "PUT", "/lab/api/workspaces/default", json=workspace)
    assert r.status_code in (200, 204), r.text
    r = hub.user_api("pavel", token, "GET", "/medzone/request-export")
    assert r.status_code == 302
    assert r.headers["Location"] == ("/services/medzone-portal/exports?path="
                                     "tutorials%2F01_getting_started.ipynb")


def test_edits_survive_the_next_spawn(hub):
    hub.add_store_user("quinn")
    assert hub.spawn("quinn").status_code in (201, 202)
    nb = hub.home.user_home("quinn") / "tutorials" / "01_getting_started.ipynb"
    token = hub.user_token("quinn")
    r = hub.user_api("quinn", token, "GET", "/api/contents/tutorials/01_getting_started.ipynb")
    model = r.json()
    model["content"]["cells"] = model["content"]["cells"][:1]
    r = hub.user_api("quinn", token, "PUT", "/api/contents/tutorials/01_getting_started.ipynb",
                     json={"type": "notebook", "content": model["content"]})
    assert r.status_code == 200, r.text
    edited = nb.read_bytes()
    hub.api("DELETE", "/users/quinn/server")
    assert wait_for(lambda: not hub.api("GET", "/users/quinn").json()["servers"], 60)
    assert hub.spawn("quinn").status_code in (201, 202)
    assert nb.read_bytes() == edited
