"""A new student in the real lab, in a real browser (Debian's Chromium driven by
playwright) against a real hub: log in → the spawn form (profiles; stand-in GPU nodes) →
the lab opens with no announcement prompt → the launcher's MedZone section → the datasets
and the tutorials in the file browser → tutorial 01 runs to the end on a synthetic cohort
ingested for real → MedZone > "Request an export of this file" opens the portal's export
form with the notebook ticked.

Screenshots go to ``docs/screenshots/`` (lab-*.png): the spawn form, the launcher, the lab
home with the tutorials.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest

from .hub_harness import PASSWORD, require_hub_tools, running_hub

CHROMIUM = "/usr/bin/chromium"
require_hub_tools(browser=CHROMIUM)

from playwright import sync_api  # noqa: E402

from medzone_hub import access, accounts  # noqa: E402
from medzone_hub.accounts import set_password  # noqa: E402

from .test_idle_culling import make_fake_gpu_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "screenshots"
WIDE = {"width": 1280, "height": 800}
DATASET = "chest-ct"
STUDENT = "nina"
PATIENTS = 3
SLOW_MS = 300_000
TUTORIAL = "tutorials/01_getting_started.ipynb"


def _setup(hub):
    from medzone_hub.demodata import generate_cohort
    from medzone_hub.ingest import ingest_dataset

    source = Path(tempfile.mkdtemp(prefix="mzcohort-", dir="/tmp"))
    try:
        generate_cohort(source / "cohort", patients=PATIENTS, seed=29, progress=False)
        ingest_dataset(hub.home, hub.store, DATASET, source / "cohort",
                       title="Chest CT and X-ray (synthetic cohort)", deidentify=True,
                       pseudonym_key=b"lab-story-provider-key-000000001", actor="steward",
                       progress=False)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    with hub.store.session() as session:
        accounts.add_user(session, STUDENT, roles=["gpu"], actor="test")
    with hub.store.session() as session:
        app_id = access.apply(session, user=STUDENT, dataset_ids=[DATASET],
                              purpose="first steps in the lab").id
    with hub.store.session() as session:
        access.approve(session, app_id, reviewer="steward")
    set_password(hub.home, STUDENT, PASSWORD, actor="test")


@pytest.fixture(scope="module")
def hub():
    fake = make_fake_gpu_dir(("nvidia0", "nvidia1", "nvidiactl"))
    extra = (f"c.SafeZoneSpawner.gpu_device_dir = {str(fake)!r}\n"
             "c.SafeZoneSpawner.mig_slices = [\n"
             "    {'parent': 1, 'uuid': 'MIG-5c1e0a3b-1g10gb-0', 'name': '1g.10gb', 'slot': 0},\n"
             "    {'parent': 1, 'uuid': 'MIG-5c1e0a3b-1g10gb-1', 'name': '1g.10gb', 'slot': 1}]\n")
    try:
        with running_hub({}, setup=_setup, extra_config=extra) as h:
            yield h
    finally:
        shutil.rmtree(fake, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def test_a_new_student_in_the_lab(hub, browser):
    context = browser.new_context(viewport=WIDE)
    context.set_default_timeout(120_000)
    page = context.new_page()
    try:
        # --- log in: the spawn form offers the profiles the student's roles allow ---------
        page.goto(f"{hub.url}/hub/login")
        page.fill("#username_input", STUDENT)
        page.fill("#password_input", PASSWORD)
        page.click("#login_submit")
        page.goto(f"{hub.url}/hub/spawn")
        page.wait_for_selector("input[name=profile][value=cpu]")
        labels = page.inner_text("form")
        assert "CPU only" in labels and "One whole GPU" in labels
        assert "MIG-5c1e0a3b-1g10gb-0" in labels
        shot(page, "lab-01-spawn-form")
        page.check("input[name=profile][value=cpu]")
        page.click("form [type=submit]")
        page.wait_for_url(f"**/user/{STUDENT}/lab**", timeout=SLOW_MS, wait_until="commit")

        # --- the lab: the MedZone section of the launcher, no news prompt ---------------
        page.wait_for_selector(".jp-Launcher-sectionTitle:has-text('MedZone')", timeout=SLOW_MS)
        page.wait_for_selector(".jp-LauncherCard:has-text('Request an export')")
        page.wait_for_timeout(2000)  # the news prompt, if any, shows right after start
        assert "official Jupyter news" not in page.inner_text("body")
        assert page.locator("text=Would you like to get notified").count() == 0
        page.locator(".jp-Launcher-sectionTitle:has-text('MedZone')").scroll_into_view_if_needed()
        shot(page, "lab-02-launcher")

        # --- the datasets and the tutorials in the file browser, from the launcher -------
        page.click(".jp-LauncherCard:has-text('Datasets')")
        page.wait_for_selector(f".jp-DirListing-itemText:has-text('{DATASET}')")
        page.click(".jp-LauncherCard:has-text('Tutorials')")
        page.wait_for_selector(".jp-DirListing-itemText:has-text('01_getting_started.ipynb')")
        page.wait_for_selector(".jp-RenderedMarkdown h1:has-text('MedZone: a guide for the lab')")
        shot(page, "lab-03-home")

        # --- tutorial 01 runs to the end in the real lab ---------------------------------
        page.dblclick(".jp-DirListing-itemText:has-text('01_getting_started.ipynb')")
        page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell")
        page.wait_for_selector(".jp-StatusBar-TextItem:has-text('MedZone')", timeout=SLOW_MS)
        page.click(".lm-MenuBar-itemLabel:text-is('Run')")
        page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
        page.wait_for_function(
            """() => {
                const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
                if (!panel) return false;
                const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
                return prompts.length > 0 &&
                       prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
            }""", timeout=SLOW_MS)
        errors = page.evaluate(
            """() => [...document.querySelectorAll(
                   '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')]
                   .map(e => e.textContent).filter(t => /Traceback|Error:/.test(t))""")
        assert errors == [], errors[:2]
        page.keyboard.press("Control+s")
        page.wait_for_timeout(1500)  # the lab saves its layout (the open notebook) after a change

        # --- request an export from the lab: the portal's form, the notebook ticked ------
        page.click(".lm-MenuBar-itemLabel:text-is('MedZone')")
        with context.expect_page() as opened:
            page.click(".lm-Menu-itemLabel:has-text('Request an export of this file')")
        form = opened.value
        form.wait_for_load_state()
        form.wait_for_selector(f"input[name=path][value='{TUTORIAL}']", timeout=SLOW_MS)
        assert re.search(r"/services/medzone-portal/exports\?path=tutorials%2F01", form.url)
        assert form.is_checked(f"input[name=path][value='{TUTORIAL}']")
        form.set_viewport_size(WIDE)
        shot(form, "lab-04-request-export")
    finally:
        context.close()
