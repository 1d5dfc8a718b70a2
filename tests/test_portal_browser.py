"""The whole story in a real browser (Debian's Chromium driven by playwright) against a real
hub: sign up → a data steward approves the account in the portal → log in → apply for a
dataset → the steward approves → start the server → run the real ``ct_nodule_analysis``
template from the form on a synthetic cohort ingested for real → request export of its
notebook, a table and a figure → the requester cannot approve → two reviewers approve
(with the real screen report and nbdime diff) → the requester downloads exactly the
reviewed bytes. Plus role checks (403) and XSRF from the browser.

Every page is photographed into ``docs/screenshots/`` (1280×800, and two at 375×800): the
README shows them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from .hub_harness import (
    PASSWORD,
    add_dataset,
    require_hub_tools,
    running_hub,
    wait_for,
)

CHROMIUM = "/usr/bin/chromium"
require_hub_tools(browser=CHROMIUM)

from playwright import sync_api  # noqa: E402

from medzone_hub import access, accounts, airlock  # noqa: E402
from medzone_hub.accounts import set_password  # noqa: E402
from medzone_hub.runner import TEMPLATES_DIR, template_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "screenshots"
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 375, "height": 800}
DATASET = "chest-ct"
STUDENT = "sam"
TEMPLATE = "ct_nodule_analysis"
#: Three patients: every output of the template, in seconds (tests/test_templates.py runs
#: the templates on the larger test cohort).
PATIENTS = 3
#: What the export request carries: the executed notebook, a table and a figure it writes.
#: A negative block leeway: a figure that draws a dataset image is reviewed, never blocked.
REVIEW_FIGURES = "c.ScreenConfig.figure_block_leeway = -1.0\n"
EXPORTED = (f"{TEMPLATE}.ipynb", "cohort_summary.csv", "figures/measurements.png")
#: Generous limits for a busy 2-core machine (waits end as soon as the page is ready).
SLOW_MS = 180_000


def _setup(hub):
    from medzone_hub.demodata import generate_cohort
    from medzone_hub.ingest import ingest_dataset

    # The cohort a data provider would hand over (fake identities), ingested de-identified.
    source = Path(tempfile.mkdtemp(prefix="mzcohort-", dir="/tmp"))
    try:
        generate_cohort(source / "cohort", patients=PATIENTS, seed=23, progress=False)
        ingest_dataset(hub.home, hub.store, DATASET, source / "cohort",
                       title="Chest CT and X-ray (synthetic cohort)", deidentify=True,
                       pseudonym_key=b"portal-story-provider-key-00001", actor="steward",
                       progress=False)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    add_dataset(hub, "knee-mr", "knee MR demo\n", title="Knee MR (demo)", n_patients=12,
                modalities=["MR"])
    with hub.store.session() as session:
        accounts.add_user(session, "boss", admin=True, actor="test")
        accounts.add_user(session, "stew", roles=["data-steward"], actor="test")
        accounts.add_user(session, "rita", roles=["export-reviewer"], actor="test")
        accounts.add_user(session, "ray", roles=["export-reviewer"], actor="test")
        # Earlier history for the steward's and the catalog's pages.
        accounts.add_user(session, "kim", actor="test")
    with hub.store.session() as session:
        app = access.apply(session, user="kim", dataset_ids=["knee-mr"],
                           purpose="cartilage thickness course project", days=30)
        session.flush()
        access.approve(session, app.id, reviewer="stew")
    for name in ("boss", "stew", "rita", "ray"):
        set_password(hub.home, name, PASSWORD, actor="test")


@pytest.fixture(scope="module")
def hub():
    # This zone's reviewers judge figures that draw scans (by default such a figure is
    # blocked like a copy of the scan): the story shows two reviewers at work.
    with running_hub({}, setup=_setup, extra_config=REVIEW_FIGURES) as h:
        yield h


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


class Person:
    """One person's browser (a context of their own: their own cookies)."""

    def __init__(self, browser, hub, name: str, viewport=WIDE):
        self.hub, self.name = hub, name
        self.context = browser.new_context(viewport=viewport, accept_downloads=True)
        self.context.set_default_timeout(60_000)
        self.page = self.context.new_page()

    def login(self):
        page = self.page
        page.goto(f"{self.hub.url}/hub/login")
        page.fill("#username_input", self.name)
        page.fill("#password_input", PASSWORD)
        page.click("#login_submit")
        page.wait_for_url(lambda url: "/hub/login" not in url)
        return self

    def wait_for_url(self, pattern: str, **kw):
        """Wait for *pattern*; on a timeout, fail with what the page says instead."""
        try:
            self.page.wait_for_url(pattern, **kw)
        except sync_api.TimeoutError:
            raise AssertionError(f"{self.page.url}:\n{self.page.inner_text('main')}\n"
                                 f"{self.hub.log()}") from None

    def portal(self, path: str = ""):
        self.page.goto(self.hub.portal_url + path)
        return self.page

    def shot(self, name: str, *, full_page: bool = True):
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)

    def close(self):
        self.context.close()


def _store(hub, fn):
    with hub.store.session() as session:
        return fn(session)


def _manifest_counts(hub) -> tuple[int, int]:
    manifest = json.loads((hub.home.dataset_dir(DATASET) / "manifest.json").read_text())
    return len(manifest["series"]), sum(s["images"] for s in manifest["series"])


def test_the_whole_story_in_a_browser(hub, browser):
    # --- sign up; a data steward approves the account in the portal -----------------------
    sam = Person(browser, hub, STUDENT)
    page = sam.page
    page.goto(f"{hub.url}/hub/signup")
    page.fill("#username_input", STUDENT)
    page.fill("#password_input", PASSWORD)
    page.fill("#password_confirmation_input", PASSWORD)
    sam.shot("01-sign-up")
    page.click("#signup_submit")
    page.wait_for_selector("text=sent to the admin")
    assert _store(hub, lambda s: accounts.get_user(s, STUDENT).approved) is False

    stew = Person(browser, hub, "stew").login()
    # The hub's own accounts page: stewards may open it too (the same rule as the portal).
    stew.page.goto(f"{hub.url}/hub/authorize")
    assert stew.page.locator(f"tr#{STUDENT}").is_visible()
    stew.shot("02-hub-accounts", full_page=False)
    stew.portal("steward#accounts")
    account = stew.page.locator(f"#account-{STUDENT}")
    assert account.locator("[data-label='Signed up']").inner_text() == "yes"
    account.scroll_into_view_if_needed()
    stew.shot("02-accounts-to-approve", full_page=False)
    account.locator("button[value=approve]").click()
    stew.wait_for_url("**/steward?account=*")
    assert "Done: approve account sam" in stew.page.inner_text("main")
    assert _store(hub, lambda s: accounts.get_user(s, STUDENT).approved) is True

    # --- log in; the hub's home links to the portal ---------------------------------------
    sam.login()
    page.goto(f"{hub.url}/hub/home")
    sam.shot("03-hub-home", full_page=False)
    page.click("#medzone-portal-link")
    sam.wait_for_url("**/services/medzone-portal/catalog")
    row = page.locator(f"#dataset-{DATASET}")
    series, images = _manifest_counts(hub)  # what ingest stored, as the catalog shows it
    assert row.locator("[data-label=Series]").inner_text() == str(series)
    assert row.locator("[data-label=Images]").inner_text() == str(images)
    sam.shot("04-catalog")

    # --- apply; the steward approves -------------------------------------------------------
    page.click(f"#dataset-{DATASET} a.button")
    page.fill("#purpose", "Lung nodule detection for my MSc thesis (supervisor: Dr. Lee)")
    page.fill("#days", "60")
    sam.shot("05-apply")
    page.click("form button[type=submit]")
    sam.wait_for_url("**/access?applied=*")
    sam.shot("06-my-access-pending")
    (app,) = _store(hub, lambda s: access.list_applications(s, user=STUDENT))
    assert app.state == "pending" and app.requested_days == 60

    # Role pages refuse the student.
    assert sam.portal("steward") is page and "403" in page.title()
    sam.shot("17-forbidden-without-role", full_page=False)
    for path in ("review", "audit"):
        response = page.goto(hub.portal_url + path)
        assert response.status == 403, path

    stew.portal("steward")
    card = stew.page.locator(f"#application-{app.id}")
    assert "kim" not in card.inner_text()  # the history shown is the applicant's own
    stew.shot("07-steward-queue")
    card.locator("input[name=days]").fill("45")
    card.locator("button:has-text('Approve')").click()
    stew.wait_for_url("**/steward?done=*")
    assert _store(hub, lambda s: access.live_grants(s, STUDENT)) == [DATASET]
    stew.close()
    sam.portal("access")
    assert page.locator(f"#application-{app.id} .state-approved").is_visible()
    sam.shot("06-my-access")

    # --- start the server -------------------------------------------------------------------
    page.goto(f"{hub.url}/hub/spawn", wait_until="commit")
    page.wait_for_url(f"**/user/{STUDENT}/lab**", timeout=SLOW_MS, wait_until="commit")
    assert hub.api("GET", f"/users/{STUDENT}").json()["servers"][""]["ready"]

    # --- run the template from the form -----------------------------------------------------
    sam.portal("run")
    sam.shot("08-run-templates")
    page.click(f"a[href$='run/{TEMPLATE}']")
    assert page.locator("#p-dataset option").all_inner_texts() == [
        "(the one dataset granted)", DATASET]  # only granted datasets are offered
    specs = template_parameters(TEMPLATES_DIR / f"{TEMPLATE}.ipynb")
    for name, spec in specs.items():  # a field per parameter, its default filled in
        if name != "dataset":
            assert float(page.input_value(f"#p-{name}")) == spec.default_value, name
    page.select_option("#p-dataset", DATASET)
    page.fill("#p-figure_patients", "2")
    sam.shot("09-run-form")
    page.click("form.params button[type=submit]")
    sam.wait_for_url("**/runs/*")
    try:
        page.wait_for_selector("#run-done:not([hidden]), #run-error:not([hidden])",
                               timeout=SLOW_MS)
    except sync_api.TimeoutError:
        raise AssertionError(f"{page.inner_text('main')}\n{hub.log()}") from None
    assert page.inner_text("#run-state") == "ok", page.inner_text("#run-error")
    done, total = re.match(r"cell (\d+) of (\d+)", page.inner_text("#run-cells")).groups()
    assert done == total and int(total) > 5
    sam.shot("10-run-finished")
    notebook = page.inner_text("#run-notebook")
    assert notebook.startswith("runs/") and notebook.endswith(f"{TEMPLATE}.ipynb")
    link = page.get_attribute("#run-notebook", "href")
    assert link == f"/user/{STUDENT}/lab/tree/{notebook}"
    # The link's notebook is there in the person's own server (its contents API).
    contents = page.request.get(f"{hub.url}/user/{STUDENT}/api/contents/{notebook}?content=0")
    assert contents.status == 200 and contents.json()["type"] == "notebook"
    run_dir = hub.home.root / "homes" / STUDENT / Path(notebook).parent
    params = json.loads((run_dir / "parameters.json").read_text())
    assert params["dataset"] == DATASET and params["figure_patients"] == 2
    assert set(params) == set(specs)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["scans"] == PATIENTS and metrics["dataset"] == DATASET

    # --- request export of its output -------------------------------------------------------
    page.click("#run-export")
    sam.wait_for_url("**/exports?path=*")
    rel = Path(notebook).parent.as_posix()
    for name in EXPORTED:
        box = page.locator(f"input[name=path][value='{rel}/{name}']")
        box.check()
        assert box.is_checked()
    page.fill("#reason", "Nodule detection results for chapter 3 of my thesis")
    sam.shot("11-my-exports")
    page.click("form button:has-text('Request export')")
    sam.wait_for_url("**/exports/*")
    request_id = int(page.url.rsplit("/", 1)[1])
    sam.shot("12-export-pending")
    request = _store(hub, lambda s: airlock.status(airlock.get_request(s, request_id)))
    # The real screen asks for review (the notebook draws dataset images): two reviewers.
    assert request["verdict"] == "review" and request["approvals_required"] == 2
    assert request["state"] == "pending"
    assert sorted(f["path"] for f in request["files"]) == sorted(f"{rel}/{n}" for n in EXPORTED)

    # --- the requester cannot approve; two reviewers approve ------------------------------
    response = page.goto(hub.portal_url + f"review/{request_id}")
    assert response.status == 403
    # A forged POST from the browser without the XSRF token changes nothing either.
    forged = page.request.post(hub.portal_url + f"review/{request_id}",
                               form={"decision": "approve"}, max_redirects=0)
    assert forged.status == 403
    assert _store(hub, lambda s: airlock.get_request(s, request_id).reviews) == []

    from PIL import Image

    with Image.open(run_dir / "figures" / "measurements.png") as figure:
        figure_width = figure.width
    rules = {f["rule"] for entry in request["files"] for f in entry["findings"]}
    for i, name in enumerate(("rita", "ray")):
        reviewer = Person(browser, hub, name).login()
        reviewer.portal("review")
        assert reviewer.page.locator(f"#request-{request_id}").is_visible()
        if i == 0:
            reviewer.shot("13-review-queue")
        reviewer.page.click(f"#request-{request_id} a")
        review = reviewer.page
        for rule in rules:  # the screen report, finding by finding
            assert review.locator(f"table.findings >> text={rule}").first.is_visible(), rule
        assert review.locator("pre.diff").first.is_visible()  # nbdime diff of the notebook
        image = review.locator("img.preview")
        assert image.evaluate("img => img.decode().then(() => img.naturalWidth)") == figure_width
        if i == 0:
            reviewer.shot("14-review")
        review.fill("#comment", f"Aggregate results, counts suppressed below 10; fine ({name})")
        review.click("button[value=approve]")
        reviewer.wait_for_url(f"**/review/{request_id}")
        if i == 1:
            reviewer.portal("audit?q=export")
            assert "Hash chain intact" in reviewer.page.inner_text("#chain")
            reviewer.shot("16-audit")
            narrow = Person(browser, hub, name, viewport=NARROW).login()
            narrow.portal(f"review/{request_id}")
            narrow.shot("narrow-review", full_page=False)
            narrow.close()
        reviewer.close()
    assert _store(hub, lambda s: airlock.get_request(s, request_id).state) == "approved"

    # --- the requester downloads exactly the reviewed bytes ---------------------------------
    sam.portal(f"exports/{request_id}")
    sam.shot("15-export-approved")
    quarantine = airlock.quarantine_dir(hub.home, request_id) / "files"
    files = {f["path"]: f["sha256"] for f in request["files"]}
    for name in EXPORTED[1:]:
        path = f"{rel}/{name}"
        row = page.locator("tr", has=page.locator(f"input[value='{path}']"))
        with page.expect_download() as info:
            row.locator("button.download").click()
        saved = Path(info.value.path()).read_bytes()
        assert saved == (quarantine / path).read_bytes() == (run_dir / name).read_bytes()
        assert hashlib.sha256(saved).hexdigest() == files[path]
    assert _store(hub, lambda s: airlock.get_request(s, request_id).state) == "released"

    # A narrow screen: the catalog as a phone shows it.
    phone = Person(browser, hub, STUDENT, viewport=NARROW).login()
    phone.portal("catalog")
    assert phone.page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"]
    phone.shot("narrow-catalog", full_page=False)
    phone.close()
    sam.close()
    wait_for(lambda: hub.api("DELETE", f"/users/{STUDENT}/server").status_code in (202, 204), 30)
