"""The portal over HTTP, behind a real hub: login through the hub (OAuth), role checks
(403 for every role-gated page and POST without the role), XSRF on every POST, and the
service functions reached (the store changes exactly as with the CLI).

One hub per module (tests/hub_harness.py); each test uses its own users and requests, so
the tests do not depend on their order.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import nbformat
import pytest
import requests

from .hub_harness import (
    DATASET,
    PASSWORD,
    login,
    proxied_session,
    require_hub_tools,
    running_hub,
    wait_for,
    xsrf_from,
)

require_hub_tools()

from medzone_hub import access, accounts, airlock, audit  # noqa: E402
from medzone_hub.accounts import set_password  # noqa: E402
from medzone_hub.runner import TEMPLATES_DIR, find_run  # noqa: E402
from medzone_hub.sandbox import proc_start_time  # noqa: E402

#: Small pages, so a handful of rows already paginates.
PAGE_SIZE = 3
REVIEWERS = ("rita", "ray")
USERS = {
    "alice": {},
    "bob": {},
    "carol": {},
    "dora": {},
    "rita": {"roles": ["export-reviewer"]},
    "ray": {"roles": ["export-reviewer"]},
    "stew": {"roles": ["data-steward"]},
}


def _setup(hub):
    with hub.store.session() as session:
        for name, kw in USERS.items():
            accounts.add_user(session, name, actor="test", **kw)
    for name in (*USERS, "steward"):
        set_password(hub.home, name, PASSWORD, actor="test")


def _wait_template(path: Path) -> None:
    """A template whose second cell runs until its sandbox is stopped: a run in progress
    when the portal restarts."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Wait\n\nRuns until its sandbox is stopped.\n"),
        nbformat.v4.new_code_cell('note = ""', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import time\nwhile True:\n    time.sleep(0.5)"),
        nbformat.v4.new_code_cell('print("never reached")'),
    ]
    nbformat.write(nb, str(path))


@pytest.fixture(scope="module")
def templates_dir():
    """The project's templates, the runner's probe (quick) and one that waits."""
    folder = Path(tempfile.mkdtemp(prefix="mzportal-templates-", dir="/tmp"))
    folder.chmod(0o755)
    for template in TEMPLATES_DIR.glob("*.ipynb"):
        shutil.copy(template, folder / template.name)
    shutil.copy(Path(__file__).with_name("runner_probe.ipynb"), folder / "runner_probe.ipynb")
    _wait_template(folder / "wait_probe.ipynb")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def hub(templates_dir):
    extra = (f"c.PortalApp.page_size = {PAGE_SIZE}\n"
             f"c.PortalApp.templates_dir = {str(templates_dir)!r}\n")
    with running_hub({DATASET: "portal test data\n"}, setup=_setup, extra_config=extra) as h:
        yield h


class Portal:
    """A person's browser session on the portal (logged in at the hub, OAuth done)."""

    def __init__(self, hub, name: str):
        self.hub, self.name = hub, name
        self.session = login(hub, name, PASSWORD)
        assert self.session.login_response.status_code == 302, name
        r = self.get("catalog")
        assert r.status_code == 200, r.text[-2000:]

    @property
    def xsrf(self) -> str:
        return self.session.cookies.get("_xsrf", path="/services/medzone-portal/")

    def get(self, path: str, **kw) -> requests.Response:
        return self.session.get(self.hub.portal_url + path, timeout=60, **kw)

    def post(self, path: str, data=None, *, xsrf: bool = True, **kw) -> requests.Response:
        data = dict(data or {})
        if xsrf:
            data["_xsrf"] = self.xsrf
        return self.session.post(self.hub.portal_url + path, data=data, timeout=120,
                                 allow_redirects=False, **kw)


@pytest.fixture(scope="module")
def people(hub):
    cache = {}

    def person(name):
        if name not in cache:
            cache[name] = Portal(hub, name)
        return cache[name]

    return person


def _apply(hub, user: str, purpose: str = "portal test") -> int:
    with hub.store.session() as session:
        return access.apply(session, user=user, dataset_ids=[DATASET], purpose=purpose).id


def _state(hub, app_id: int) -> str:
    with hub.store.session() as session:
        return access.application_state(access.get_application(session, app_id))


def _home_file(hub, user: str, rel: str, data: bytes) -> Path:
    path = hub.home.root / "homes" / user / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _export(hub, user: str, rel: str, data: bytes) -> int:
    _home_file(hub, user, rel, data)
    return airlock.submit_export(hub.store, hub.home, user=user, paths=[rel], reason="test")


def _export_state(hub, request_id: int) -> str:
    with hub.store.session() as session:
        return airlock.get_request(session, request_id).state


# --- login ------------------------------------------------------------------------------

def test_pages_send_anonymous_visitors_to_the_hub_login(hub):
    r = requests.get(hub.portal_url + "catalog", timeout=30)
    assert r.status_code == 200
    assert r.url.startswith(f"{hub.url}/hub/login"), r.url
    # A POST without a login is refused outright (no redirect to follow).
    r = requests.post(hub.portal_url + "apply", data={"dataset": DATASET, "purpose": "x"},
                      timeout=30, allow_redirects=False)
    assert r.status_code == 403


def test_hub_home_links_to_the_portal(hub, people):
    home = people("alice").session.get(f"{hub.url}/hub/home", timeout=30)
    assert 'id="medzone-portal-link"' in home.text
    assert 'href="/services/medzone-portal/"' in home.text


def test_an_account_unapproved_in_the_store_is_refused_at_once(hub, people):
    dora = people("dora")
    assert dora.get("access").status_code == 200
    with hub.store.session() as session:
        accounts.get_user(session, "dora").approved = False
    try:
        for path in ("catalog", "access", "run", "exports"):
            assert dora.get(path).status_code == 403, path
    finally:
        with hub.store.session() as session:
            accounts.get_user(session, "dora").approved = True


# --- roles ------------------------------------------------------------------------------

ROLE_PAGES = {
    "steward": "data-steward",
    "review": "export-reviewer",
    "review/{request}": "export-reviewer",
    "review/{request}/files/figure.png": "export-reviewer",
    "audit": "audit",
}


@pytest.fixture(scope="module")
def bob_request(hub):
    """An export request (with a figure) that nobody of the role tests filed."""
    return _export(hub, "bob", "figure.png", _small_png())


def _small_png() -> bytes:
    """A well-formed plain figure (the screen reads every byte, so it must be a real PNG)."""
    from PIL import Image

    image = Image.new("RGB", (64, 48), "white")
    for x in range(8, 56, 12):
        image.paste((31, 119, 180), (x, 48 - 4 * (x // 6), x + 8, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("page", sorted(ROLE_PAGES))
def test_role_pages_refuse_people_without_the_role(hub, people, bob_request, page):
    path = page.format(request=bob_request)
    role = ROLE_PAGES[page]
    allowed = {"alice": False, "carol": False,
               "stew": role in ("data-steward", "audit"),
               "rita": role in ("export-reviewer", "audit")}
    for name, ok in allowed.items():
        r = people(name).get(path)
        assert r.status_code == (200 if ok else 403), (name, path, r.status_code)
        if not ok:
            assert "role" in r.text
    # Each page names in the navigation only what the person may open.
    nav = people("alice").get("catalog").text
    assert "Steward queue" not in nav and "Review queue" not in nav and ">Audit<" not in nav
    assert "Steward queue" in people("stew").get("catalog").text


def test_role_posts_refuse_people_without_the_role(hub, people, bob_request):
    app_id = _apply(hub, "carol")
    for name in ("alice", "rita"):  # neither is a data steward
        for action in ("approve", "reject"):
            r = people(name).post(f"steward/applications/{app_id}/{action}", {"days": "5"})
            assert r.status_code == 403, (name, action, r.text[-500:])
    assert _state(hub, app_id) == "pending"

    for name in ("alice", "stew"):  # neither is an export reviewer
        r = people(name).post(f"review/{bob_request}", {"decision": "approve"})
        assert r.status_code == 403, (name, r.text[-500:])
    assert _export_state(hub, bob_request) == "pending"
    with hub.store.session() as session:
        assert not airlock.get_request(session, bob_request).reviews

    # Revoking a live grant is a steward's page too.
    with hub.store.session() as session:
        access.approve(session, app_id, reviewer="steward")
    r = people("alice").post(f"steward/applications/{app_id}/revoke", {"reason": "x"})
    assert r.status_code == 403
    assert _state(hub, app_id) == "approved"


# --- XSRF -------------------------------------------------------------------------------

def test_posts_without_the_xsrf_token_are_refused(hub, people, bob_request):
    stew, carol, rita = people("stew"), people("carol"), people("rita")
    app_id = _apply(hub, "carol", "xsrf check")
    with hub.store.session() as session:
        before = len(access.list_applications(session, user="carol"))

    assert stew.post(f"steward/applications/{app_id}/approve", xsrf=False).status_code == 403
    assert carol.post("apply", {"dataset": DATASET, "purpose": "forged"},
                      xsrf=False).status_code == 403
    r = rita.post(f"review/{bob_request}", {"decision": "approve"}, xsrf=False)
    assert r.status_code == 403
    # A token that is not the session's own is no better than none.
    assert stew.post(f"steward/applications/{app_id}/approve",
                     {"_xsrf": "2|deadbeef|00|0"}, xsrf=False).status_code == 403
    assert _state(hub, app_id) == "pending"
    assert _export_state(hub, bob_request) == "pending"
    with hub.store.session() as session:
        assert len(access.list_applications(session, user="carol")) == before

    # The same requests with the token (form field or X-XSRFToken header) go through.
    r = stew.post(f"steward/applications/{app_id}/approve", {"days": "7"}, xsrf=False,
                  headers={"X-XSRFToken": stew.xsrf})
    assert r.status_code == 302, r.text[-500:]
    assert _state(hub, app_id) == "approved"


# --- the service functions behind the pages -----------------------------------------------

def test_apply_and_steward_decisions_reach_the_access_functions(hub, people):
    alice, stew = people("alice"), people("stew")
    form = alice.get(f"apply?dataset={DATASET}")
    assert form.status_code == 200 and f'value="{DATASET}" checked' in form.text

    # Bad input: one line from the service function, nothing stored.
    r = alice.post("apply", {"dataset": DATASET, "purpose": "  ", "days": "30"})
    assert r.status_code == 400 and "purpose" in r.text and "Traceback" not in r.text
    r = alice.post("apply", {"dataset": DATASET, "purpose": "study", "days": "many"})
    assert r.status_code == 400 and "days must be a whole number" in r.text

    r = alice.post("apply", {"dataset": DATASET, "purpose": "nodule study", "days": "30"})
    assert r.status_code == 302
    app_id = int(re.search(r"applied=(\d+)", r.headers["Location"]).group(1))
    with hub.store.session() as session:
        app = access.get_application(session, app_id)
        assert (app.user.name, app.purpose, app.requested_days, app.dataset_ids) == (
            "alice", "nodule study", 30, [DATASET])
    assert "nodule study" in alice.get("access").text

    queue = stew.get("steward")
    assert f'id="application-{app_id}"' in queue.text
    # A steward cannot decide their own application: the rule of access.approve, shown.
    own = _apply(hub, "stew", "my own")
    r = stew.post(f"steward/applications/{own}/approve", {"days": "3"})
    assert r.status_code == 403 and "their own application" in r.text
    assert _state(hub, own) == "pending"

    r = stew.post(f"steward/applications/{app_id}/approve", {"days": "12", "reason": "ok"})
    assert r.status_code == 302
    with hub.store.session() as session:
        app = access.get_application(session, app_id)
        assert access.application_state(app) == "approved"
        assert app.decided_by == "stew" and app.granted_days == 12
        assert access.live_grants(session, "alice") == [DATASET]
    (event,) = [e for e in _events(hub, f"application:{app_id}") if e.action == "access.approve"]
    assert event.actor == "stew"
    page = alice.get("access").text
    assert "approved" in page and app.expires_at.strftime("%Y-%m-%d") in page
    assert alice.get("catalog").text.count("state-approved") == 1

    # Reject with a reason; revoke a live grant.
    other = _apply(hub, "alice", "second look")
    assert stew.post(f"steward/applications/{other}/reject",
                     {"reason": "duplicate"}).status_code == 302
    with hub.store.session() as session:
        assert access.get_application(session, other).decision_reason == "duplicate"
    assert stew.post(f"steward/applications/{app_id}/revoke",
                     {"reason": "study ended"}).status_code == 302
    assert _state(hub, app_id) == "revoked"
    # Deciding twice is the service function's conflict, not a crash.
    r = stew.post(f"steward/applications/{app_id}/approve")
    assert r.status_code == 409 and "only pending applications" in r.text


def _events(hub, subject):
    with hub.store.session() as session:
        return audit.events(session, subject=subject)


def test_export_review_and_download_reach_the_airlock(hub, people):
    carol, rita, ray, alice = people("carol"), people("rita"), people("ray"), people("alice")
    data = f"Mean Dice over the validation set: 0.91 (run {os.urandom(4).hex()})\n".encode()
    _home_file(hub, "carol", "out/results.txt", data)
    page = carol.get("exports")
    assert "out/results.txt" in page.text  # the picker lists the home's files

    r = carol.post("exports", {"path": "out/results.txt", "reason": ""})
    assert r.status_code == 400 and "reason" in r.text
    r = carol.post("exports", {"path": "../alice/secret", "reason": "x"})
    assert r.status_code == 403 and "'..' is not allowed" in html.unescape(r.text)

    r = carol.post("exports", {"path": "out/results.txt", "reason": "thesis figure"})
    assert r.status_code == 302, r.text[-1000:]
    request_id = int(r.headers["Location"].rstrip("/").rsplit("/", 1)[1])
    with hub.store.session() as session:
        request = airlock.get_request(session, request_id)
        assert request.user.name == "carol" and request.reason == "thesis figure"
        assert [f.path for f in request.files] == ["out/results.txt"]
        needed = request.approvals_required
    assert carol.get(f"exports/{request_id}").status_code == 200
    assert alice.get(f"exports/{request_id}").status_code == 404  # not hers

    # Not downloadable before approval (the airlock's rule).
    r = carol.post(f"exports/{request_id}/download", {"path": "out/results.txt"})
    assert r.status_code == 403 and "only approved requests" in r.text

    # A reviewer's own request is not offered to them, and the airlock refuses it anyway.
    own = _export(hub, "rita", "mine.txt", b"rita's numbers\n")
    queue = rita.get("review").text
    assert f'id="request-{request_id}"' in queue
    assert f'id="request-{own}"' not in queue
    detail = rita.get(f"review/{own}").text
    assert 'id="own-request"' in detail and 'value="approve"' not in detail
    r = rita.post(f"review/{own}", {"decision": "approve"})
    assert r.status_code == 403 and "their own export request" in r.text
    assert _export_state(hub, own) == "pending"

    # Review page: the screen report for every file.
    detail = rita.get(f"review/{request_id}").text
    assert "out/results.txt" in detail and 'value="approve"' in detail
    for reviewer in (rita, ray)[:needed]:
        r = reviewer.post(f"review/{request_id}", {"decision": "approve", "comment": "fine"})
        assert r.status_code == 302, r.text[-1000:]
    assert _export_state(hub, request_id) == "approved"
    with hub.store.session() as session:
        reviews = airlock.get_request(session, request_id).reviews
        assert sorted(r.reviewer.name for r in reviews) == sorted(REVIEWERS[:needed])

    # Only the requester downloads, only with the token; the bytes are the reviewed ones.
    assert alice.post(f"exports/{request_id}/download",
                      {"path": "out/results.txt"}).status_code == 403
    assert carol.post(f"exports/{request_id}/download", {"path": "out/results.txt"},
                      xsrf=False).status_code == 403
    r = carol.post(f"exports/{request_id}/download", {"path": "out/results.txt"})
    assert r.status_code == 200 and r.content == data
    assert "attachment" in r.headers["Content-Disposition"]
    assert _export_state(hub, request_id) == "released"
    # Without a path: every file and the release record, in a zip (downloaded again, audited).
    r = carol.post(f"exports/{request_id}/download")
    assert r.status_code == 200
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert sorted(z.namelist()) == ["out/results.txt", f"release-{request_id}.json"]
        assert z.read("out/results.txt") == data
        assert json.loads(z.read(f"release-{request_id}.json"))["request"] == request_id
    releases = [e for e in _events(hub, f"export:{request_id}") if e.action == "export.release"]
    assert [(e.actor, e.detail["first"]) for e in releases] == [("carol", True), ("carol", False)]

    # Her next request shows reviewers this release, to compare against (differencing).
    later = _export(hub, "carol", "out/results-v2.txt", b"Mean Dice: 0.92\n")
    earlier = rita.get(f"review/{later}").text
    section = earlier[earlier.index("Earlier releases"):]
    assert f'href="/services/medzone-portal/review/{request_id}"' in section
    assert "out/results.txt" in section


def test_audit_page_searches_and_shows_the_chain_status(hub, people, bob_request):
    rita = people("rita")
    page = rita.get("audit", params={"q": "export.request"})
    assert page.status_code == 200
    assert 'id="chain"' in page.text and "Hash chain intact" in page.text
    actions = re.findall(r'data-label="Action">([^<]+)<', page.text)
    assert actions and set(actions) == {"export.request"}
    # Long lists paginate: PAGE_SIZE rows a page, links to the next.
    everything = rita.get("audit").text
    assert len(re.findall(r'data-label="Action">', everything)) == PAGE_SIZE
    assert 'rel="next"' in everything
    second = rita.get("audit", params={"page": "2"}).text
    assert 'rel="prev"' in second


def test_run_form_is_made_from_the_template_parameters(hub, people):
    alice = people("alice")
    listing = alice.get("run").text
    assert "ct_nodule_analysis" in listing
    form = alice.get("run/ct_nodule_analysis")
    assert form.status_code == 200
    from medzone_hub.runner import TEMPLATES_DIR, template_parameters

    specs = template_parameters(TEMPLATES_DIR / "ct_nodule_analysis.ipynb")
    for name in specs:
        assert f'name="{name}"' in form.text, name
    # A value of the wrong type is refused before anything runs.
    number = next(n for n, s in specs.items() if s.type == "int")
    r = alice.post("run/ct_nodule_analysis", {number: "three"})
    assert r.status_code == 400 and "takes an int" in r.text
    assert alice.get("run/no_such_template").status_code == 404


def test_script_requests_need_the_xsrf_header(hub, people):
    """JupyterHub checks XSRF on script (fetch) GETs too; the progress page sends the header."""
    alice = people("alice")
    fetch = {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin"}
    r = alice.get("runs/0123abcd.json", headers=fetch, allow_redirects=False)
    assert r.status_code == 302 and "/hub/api/oauth2/authorize" in r.headers["Location"]
    r = alice.get("runs/0123abcd.json", headers={**fetch, "X-XSRFToken": alice.xsrf},
                  allow_redirects=False)
    assert r.status_code == 404 and "no run 0123abcd of yours" in r.text


# --- account approvals in the steward queue -------------------------------------------------

def _sign_up(hub, name: str) -> None:
    anon = proxied_session()
    page = anon.get(f"{hub.url}/hub/signup", timeout=30)
    r = anon.post(f"{hub.url}/hub/signup", data={
        "username": name, "signup_password": PASSWORD,
        "signup_password_confirmation": PASSWORD, "_xsrf": xsrf_from(page.text)}, timeout=30)
    assert r.status_code == 200 and "sent to the admin" in r.text, r.text[-2000:]


def _approved(hub, name: str) -> bool:
    with hub.store.session() as session:
        return accounts.get_user(session, name).approved


def test_stewards_approve_sign_ups_in_the_queue_and_the_person_can_log_in(hub, people):
    stew, alice, rita = people("stew"), people("alice"), people("rita")
    _sign_up(hub, "newt")
    assert _approved(hub, "newt") is False
    assert login(hub, "newt", PASSWORD).login_response.status_code == 200  # not yet

    queue = stew.get("steward").text
    row = queue[queue.index('id="account-newt"'):]
    row = row[:row.index("</tr>")]
    assert 'steward/accounts/newt/approve"' in row and 'steward/accounts/newt/discard"' in row

    # Without the role: 403, here and on the hub's own accounts page (one rule for both).
    for person in (alice, rita):
        r = person.post("steward/accounts/newt/approve")
        assert r.status_code == 403 and "role" in r.text, person.name
        r = person.session.get(f"{hub.url}/hub/authorize", timeout=30)
        assert r.status_code == 403, person.name
    assert stew.session.get(f"{hub.url}/hub/authorize", timeout=30).status_code == 200
    # Without the XSRF token: 403.
    assert stew.post("steward/accounts/newt/approve", xsrf=False).status_code == 403
    # Nobody decides about their own account.
    r = stew.post("steward/accounts/stew/discard")
    assert r.status_code == 403 and "their own account" in r.text
    assert _approved(hub, "newt") is False

    r = stew.post("steward/accounts/newt/approve")
    assert r.status_code == 302, r.text[-1000:]
    assert r.headers["Location"].endswith("steward?account=approve%3Anewt#accounts")
    assert _approved(hub, "newt") is True
    (event,) = [e for e in _events(hub, "user:newt") if e.action == "user.approve"]
    assert (event.actor, event.detail) == ("stew", {"via": "portal"})
    assert login(hub, "newt", PASSWORD).login_response.status_code == 302
    assert 'id="account-newt"' not in stew.get("steward").text
    # Deciding again is the same function's answer, in one line.
    r = stew.post("steward/accounts/newt/discard")
    assert r.status_code == 409 and "withdraw the approval" in r.text


def test_stewards_discard_a_sign_up(hub, people):
    stew = people("stew")
    _sign_up(hub, "nora")
    r = stew.post("steward/accounts/nora/discard")
    assert r.status_code == 302, r.text[-1000:]
    # The sign-up is gone (no password to log in with); the store keeps the name, unapproved.
    assert _approved(hub, "nora") is False
    refused = login(hub, "nora", PASSWORD).login_response
    assert "Invalid username or password" in refused.text, (
        re.findall(r"(?s)<p class=\"login_error\">\s*(.*?)\s*</p>", refused.text), hub.log())
    assert [e.actor for e in _events(hub, "user:nora") if e.action == "user.discard"] == ["stew"]
    row = stew.get("steward").text.split('id="account-nora"', 1)[1].split("</tr>", 1)[0]
    assert "discard" not in row  # nothing left to discard; approving still offered
    r = stew.post("steward/accounts/nora/discard")
    assert r.status_code == 404 and "no sign-up named" in html.unescape(r.text)


# --- long lists on the steward page ----------------------------------------------------------

def test_live_grants_paginate(hub, people):
    stew = people("stew")
    for name in ("alice", "bob", "carol", "dora"):
        app_id = _apply(hub, name, "pagination")
        with hub.store.session() as session:
            access.approve(session, app_id, reviewer="steward")
    with hub.store.session() as session:
        live = [a.id for a in reversed(access.list_applications(session))
                if access.application_state(a) == "approved"]
    assert len(live) > PAGE_SIZE

    seen, number = [], 1
    while True:
        page = stew.get("steward", params={"grants": str(number)}).text
        rows = [int(i) for i in re.findall(r'id="grant-(\d+)"', page)]
        assert 0 < len(rows) <= PAGE_SIZE
        seen += rows
        pager = page.split('data-pager="grants"', 1)[1].split("</nav>", 1)[0]
        if f"grants={number + 1}" not in pager:
            break
        assert f"grants={number + 1}" in pager and "#grants" in pager
        number += 1
    assert seen == live and number == -(-len(live) // PAGE_SIZE)
    # The grants' pages keep the other lists' pages.
    assert "page=1" in pager and "accounts=1" in pager


# --- runs survive a portal restart -----------------------------------------------------------

def _run_status(person, name: str) -> dict:
    r = person.get(f"runs/{name}.json", headers={"X-XSRFToken": person.xsrf})
    assert r.status_code == 200, r.text[-1000:]
    return r.json()


def test_runs_are_read_from_their_folders_so_a_restarted_portal_shows_them(hub, people):
    bob = people("bob")
    r = bob.post("run/runner_probe", {"message": "before the restart", "count": "3"})
    assert r.status_code == 302, r.text[-1000:]
    finished = r.headers["Location"].rsplit("/", 1)[1]
    assert finished.endswith("-runner_probe")
    status = wait_for(lambda: (s := _run_status(bob, finished))["state"] != "running" and s,
                      180, step=0.5)
    assert status["state"] == "ok", status
    # Its four code cells and the one papermill injects with the parameters.
    assert status["cells_done"] == status["cells_total"] == 5

    r = bob.post("run/runner_probe", {"fail": "on"})
    assert r.status_code == 302, r.text[-1000:]
    failed = r.headers["Location"].rsplit("/", 1)[1]
    status = wait_for(lambda: (s := _run_status(bob, failed))["state"] != "running" and s,
                      180, step=0.5)
    failure = "cell 3 `if fail:` failed: RuntimeError: probe failure requested"
    assert (status["state"], status["error"]) == ("failed", failure), status

    r = bob.post("run/wait_probe", {"note": "in progress"})
    assert r.status_code == 302, r.text[-1000:]
    waiting = r.headers["Location"].rsplit("/", 1)[1]
    status = wait_for(lambda: (s := _run_status(bob, waiting))["current_cell"] == 3 and s,
                      180, step=0.5)
    assert status and status["state"] == "running" and status["cells_done"] == 2, status

    hub.restart_portal()
    # The hub's worker executes the run, not the portal: it outlives the portal's restart.
    assert _run_status(bob, waiting)["state"] == "running"
    with hub.store.session() as session:
        run = find_run(session, "bob", f"runs/{waiting}")
    os.kill(run.runner_pid, 9)  # the process executing it dies: the run is interrupted
    wait_for(lambda: proc_start_time(run.sandbox_pid) != run.sandbox_start, 60, step=0.2)

    page = bob.get(f"runs/{finished}")
    assert page.status_code == 200
    assert 'id="run-state" class="state state-ok"' in page.text
    assert "cell 5 of 5" in page.text
    assert f"runs/{finished}/runner_probe.ipynb</a>" in page.text
    assert "before the restart" in html.unescape(page.text)  # its parameters, from the folder
    status = _run_status(bob, failed)  # the same line, now read from the notebook alone
    assert (status["state"], status["error"]) == ("failed", failure), status
    status = _run_status(bob, waiting)
    assert (status["state"], status["cells_done"], status["cells_total"]) == (
        "interrupted", 2, 4)
    assert "stopped before it finished" in status["error"]
    listing = bob.get("run").text
    for name, state in ((finished, "ok"), (failed, "failed"), (waiting, "interrupted")):
        row = listing.split(f'id="run-{name}"', 1)[1].split("</tr>", 1)[0]
        assert f"state-{state}" in row, (name, row)
    # Runs are the person's own.
    assert people("alice").get(f"runs/{finished}").status_code == 404
