"""Import from a PACS against a real Orthanc, over DICOMweb and over DIMSE (C-GET, C-MOVE).

The Orthanc is the one ``.ci/orthanc`` starts (``make test`` exports its settings). Without
``MEDZONE_TEST_ORTHANC_URL`` this module starts it itself with ``.ci/orthanc`` and stops it
afterwards. It is loaded with a synthetic demo cohort of its own seed through Orthanc's REST
API (``POST /instances``); every import selects that cohort's studies only, so other content
of the same Orthanc does not matter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests

from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome
from medzone_hub.demodata import CtGrid
from medzone_hub.ingest import ingest_dataset
from medzone_hub.errors import InvalidInput
from medzone_hub.pacs import PacsCredentials, PacsError, import_from_pacs

from .fixtures import _zone

ROOT = Path(__file__).resolve().parent.parent
CI_ORTHANC = ROOT / ".ci" / "orthanc"
HOWTO = ("Start the test PACS and export its settings with:  export $(.ci/orthanc)  "
         "(Debian 12 packages: orthanc orthanc-dicomweb).")
#: The cohort uploaded to Orthanc: its own seed, so its studies are this module's alone.
SEED, PATIENTS = 182, 3
#: Smaller CT series than the demo's (the module stays fast): 32 slices of 64x64.
CT_GRID = CtGrid(cols=64, rows=64, slices=32, pixel_mm=4.0, slice_mm=3.0)
KEY = b"pacs-test-pseudonym-key-0123456789"


# --- the PACS and its content ----------------------------------------------------------

@pytest.fixture(scope="module")
def orthanc() -> dict:
    """The test Orthanc's settings (``MEDZONE_TEST_ORTHANC_*``) and its credentials."""
    settings = {k: v for k, v in os.environ.items() if k.startswith("MEDZONE_TEST_ORTHANC_")}
    started = False
    if "MEDZONE_TEST_ORTHANC_URL" not in settings:
        done = subprocess.run(["bash", str(CI_ORTHANC)], capture_output=True, text=True,
                              timeout=180, check=False)
        if done.returncode != 0:
            pytest.fail(f"no Orthanc: .ci/orthanc failed ({done.stderr.strip()}). {HOWTO}")
        settings = dict(line.split("=", 1) for line in done.stdout.split())
        started = "starting Orthanc" in done.stderr
    cred = json.loads(Path(settings["MEDZONE_TEST_ORTHANC_CREDENTIALS"]).read_text())
    settings["credentials"] = PacsCredentials(cred["username"], cred["password"])
    try:
        requests.get(settings["MEDZONE_TEST_ORTHANC_URL"] + "/system", timeout=10,
                     auth=(cred["username"], cred["password"])).raise_for_status()
    except requests.RequestException as err:
        pytest.fail(f"Orthanc does not answer ({err}). {HOWTO}")
    yield settings
    if started and not os.environ.get("PYTEST_XDIST_WORKER"):
        subprocess.run(["bash", str(CI_ORTHANC), "stop"], capture_output=True, check=False)


def _rest(orthanc) -> requests.Session:
    session = requests.Session()
    session.auth = (orthanc["credentials"].username, orthanc["credentials"].password)
    return session


@pytest.fixture(scope="module")
def cohort(orthanc, tmp_path_factory) -> dict:
    """The demo cohort, uploaded to Orthanc: per patient its id, folder, and per modality
    folder its study's accession number and UID."""
    from medzone_hub import demodata

    out = tmp_path_factory.mktemp("pacs-cohort") / "source"
    demodata._generate(out, patients=PATIENTS, seed=SEED, progress=False, ct_grid=CT_GRID,
                       cxr_size=128)
    rest = _rest(orthanc)
    patients = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        studies = {}
        for series in sorted(p for p in folder.iterdir() if p.is_dir()):
            for f in sorted(series.glob("*.dcm")):
                rest.post(orthanc["MEDZONE_TEST_ORTHANC_URL"] + "/instances",
                          data=f.read_bytes(), timeout=60).raise_for_status()
            ds = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
            studies[series.name] = {"accession": str(ds.AccessionNumber),
                                    "uid": str(ds.StudyInstanceUID),
                                    "files": len(list(series.glob("*.dcm")))}
        patients.append({"id": folder.name, "folder": folder, "studies": studies})
    return {"dir": out, "patients": patients}


def _stored(home: MedZoneHome, dataset_id: str) -> dict[str, dict]:
    """The published dataset's DICOM files by (remapped) SOP instance UID."""
    manifest = json.loads((home.dataset_dir(dataset_id) / "manifest.json").read_text())
    data = home.dataset_dir(dataset_id) / "data"
    out = {}
    for entry in manifest["files"]:
        if entry["kind"] != "dicom":
            continue
        ds = pydicom.dcmread(data / entry["path"])
        out[str(ds.SOPInstanceUID)] = {"patient": entry["path"].split("/")[0],
                                       "modality": entry["modality"],
                                       "sha256": entry["sha256"], "dataset": ds}
    return out


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> dict:
    """An ingest of the cohort's DICOM files from a folder, de-identified with KEY: what
    every import must publish (restricted to the studies it selects)."""
    src = tmp_path_factory.mktemp("pacs-reference") / "source"
    for f in cohort["dir"].rglob("*.dcm"):
        out = src / f.relative_to(cohort["dir"])
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out)
    saved = os.environ.pop(ENV_DB_URL, None)
    zone = _zone(tmp_path_factory.mktemp("pacs-ref-zone") / "home")
    try:
        ingest_dataset(zone.home, zone.store, "reference", src, deidentify=True,
                       pseudonym_key=KEY, actor="test", progress=False)
        stored = _stored(zone.home, "reference")
    finally:
        zone.store.engine.dispose()
        if saved is not None:
            os.environ[ENV_DB_URL] = saved
    # Each patient's folder is named by the pseudonym of the original patient id.
    from medzone_hub.deid.pseudonym import Pseudonymizer

    by_original = {p["id"]: Pseudonymizer(KEY).patient_pseudonym(p["id"])
                   for p in cohort["patients"]}
    assert sorted(by_original.values()) == sorted({f["patient"] for f in stored.values()})
    return {"files": stored, "pseudonym": by_original}


def _expected(reference, patient_ids, modalities=None) -> dict[str, dict]:
    keep = {reference["pseudonym"][p] for p in patient_ids}
    return {uid: f for uid, f in reference["files"].items()
            if f["patient"] in keep and (modalities is None or f["modality"] in modalities)}


@pytest.fixture
def zone(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_DB_URL, raising=False)
    z = _zone(tmp_path / "home")
    yield z
    z.store.engine.dispose()


def _import(zone, orthanc, tmp_path, source, **kw):
    return import_from_pacs(zone.home, zone.store, "from-pacs", source=source,
                            credentials=orthanc["credentials"], download_root=tmp_path / "dl",
                            deidentify=True, pseudonym_key=KEY, actor="test",
                            progress=False, **kw)


def _dicomweb(orthanc) -> str:
    return orthanc["MEDZONE_TEST_ORTHANC_DICOMWEB"]


def _dimse(orthanc, aet=None) -> str:
    node = orthanc["MEDZONE_TEST_ORTHANC_DICOM"]
    return node if aet is None else f"{aet}@{node.split('@', 1)[1]}"


# --- imports ---------------------------------------------------------------------------

def test_dicomweb_import_by_accession_numbers_publishes_what_an_ingest_of_the_files_does(
        zone, orthanc, cohort, reference, tmp_path):
    accessions = [s["accession"] for p in cohort["patients"][:2] for s in p["studies"].values()]
    report = _import(zone, orthanc, tmp_path, _dicomweb(orthanc), accessions=accessions)
    expected = _expected(reference, [p["id"] for p in cohort["patients"][:2]])
    stored = _stored(zone.home, "from-pacs")
    # Byte for byte: WADO-RS hands back the instances as they were stored.
    assert {u: f["sha256"] for u, f in stored.items()} == \
        {u: f["sha256"] for u, f in expected.items()}
    assert report.instances == report.downloaded == len(expected) and report.skipped == 0
    assert report.studies == 4 and report.ingest.patients == 2
    assert not list((tmp_path / "dl").glob("from-pacs-*/")), "the identifying download stays"


def test_dicomweb_import_by_query(zone, orthanc, cohort, reference, tmp_path):
    patient = cohort["patients"][2]
    report = _import(zone, orthanc, tmp_path, _dicomweb(orthanc),
                     query={"PatientID": patient["id"], "ModalitiesInStudy": "CT"})
    stored = _stored(zone.home, "from-pacs")
    expected = _expected(reference, [patient["id"]], {"CT"})
    assert expected and {u: f["sha256"] for u, f in stored.items()} == \
        {u: f["sha256"] for u, f in expected.items()}
    assert report.studies == 1


def _same_datasets(stored: dict, expected: dict) -> None:
    # Over DIMSE the file meta header is written by the receiving side (its implementation
    # UID); every data element is what the ingest of the original files stores.
    assert stored.keys() == expected.keys()
    for uid, f in stored.items():
        assert f["dataset"] == expected[uid]["dataset"], uid
        assert f["patient"] == expected[uid]["patient"]


def test_dimse_c_get_import_by_accession_numbers(zone, orthanc, cohort, reference, tmp_path):
    patient = cohort["patients"][1]
    report = _import(zone, orthanc, tmp_path, _dimse(orthanc),
                     accessions=[s["accession"] for s in patient["studies"].values()],
                     calling_aet=orthanc["MEDZONE_TEST_ORTHANC_CLIENT_AET"])
    assert report.transport == "DIMSE C-GET"
    _same_datasets(_stored(zone.home, "from-pacs"), _expected(reference, [patient["id"]]))


def test_dimse_c_move_import_by_query(zone, orthanc, cohort, reference, tmp_path):
    patient = cohort["patients"][0]
    report = _import(zone, orthanc, tmp_path, _dimse(orthanc),
                     query={"PatientID": patient["id"]},
                     calling_aet=orthanc["MEDZONE_TEST_ORTHANC_CLIENT_AET"],
                     move_to=("127.0.0.1", int(orthanc["MEDZONE_TEST_ORTHANC_MOVE_PORT"])))
    assert report.transport == "DIMSE C-MOVE" and report.studies == 2
    _same_datasets(_stored(zone.home, "from-pacs"), _expected(reference, [patient["id"]]))


# --- the command line: resume, secrets, errors -----------------------------------------

def _cli_env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != ENV_DB_URL}
    env[ENV_HOME] = str(home)
    env.update(extra)
    return env


def _cli(home: Path, *args, env_extra=None, **kw):
    return subprocess.run([sys.executable, "-m", "medzone_hub.cli", *map(str, args)],
                          env=_cli_env(home, **(env_extra or {})), capture_output=True,
                          text=True, timeout=300, **kw)


@pytest.fixture
def key_file(tmp_path) -> Path:
    path = tmp_path / "provider.key"
    path.write_bytes(KEY)
    return path


def _kill_mid_download(argv: list, home: Path, downloads: Path, total: int) -> int:
    """Start the CLI, SIGKILL it once some (not all) instances are downloaded; how many."""
    proc = subprocess.Popen([sys.executable, "-m", "medzone_hub.cli", *map(str, argv)],
                            env=_cli_env(home), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            done = len(list(downloads.glob("*/files/*/*/*.dcm")))
            if done >= 5:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the import ended before it could be killed"
    done = len(list(downloads.glob("*/files/*/*/*.dcm")))
    assert 0 < done < total
    return done


def test_a_killed_import_resumes_and_publishes_all_or_nothing(orthanc, cohort, reference,
                                                             tmp_path, key_file):
    home, downloads = tmp_path / "home", tmp_path / "dl"
    patients = cohort["patients"][:2]
    argv = ["dataset", "add", "from-pacs", "--from-pacs", _dicomweb(orthanc), "--deidentify",
            "--key-file", key_file, "--pacs-credentials",
            orthanc["MEDZONE_TEST_ORTHANC_CREDENTIALS"], "--download-dir", downloads,
            "--accession", ",".join(s["accession"] for p in patients
                                    for s in p["studies"].values())]
    expected = _expected(reference, [p["id"] for p in patients])
    done = _kill_mid_download(argv, home, downloads, len(expected))
    listed = _cli(home, "dataset", "list", "--json")
    assert json.loads(listed.stdout) == []
    assert not (home / "datasets" / "from-pacs").exists()

    again = _cli(home, *argv, "--json", "--quiet")
    assert again.returncode == 0, again.stderr
    pacs = json.loads(again.stdout)["pacs"]
    assert pacs["skipped"] >= done and pacs["skipped"] + pacs["downloaded"] == len(expected)
    stored = _stored(MedZoneHome(home), "from-pacs")
    assert {u: f["sha256"] for u, f in stored.items()} == \
        {u: f["sha256"] for u, f in expected.items()}


def test_credentials_never_reach_the_store_the_audit_log_or_the_output(orthanc, cohort,
                                                                       tmp_path, key_file):
    from sqlalchemy import select

    from medzone_hub.db import connect
    from medzone_hub.models import AuditEvent

    home = tmp_path / "home"
    cred = orthanc["credentials"]
    xray = cohort["patients"][0]["studies"]["CXR"]["accession"]
    done = _cli(home, "dataset", "add", "from-env", "--from-pacs", _dicomweb(orthanc),
                "--accession", xray, "--deidentify", "--key-file", key_file,
                "--download-dir", tmp_path / "dl", "--json",
                env_extra={"MEDZONE_PACS_USERNAME": cred.username,
                           "MEDZONE_PACS_PASSWORD": cred.password})
    assert done.returncode == 0, done.stderr
    secret = cred.password.encode()
    assert secret not in done.stdout.encode() and secret not in done.stderr.encode()
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name == "medzone.sqlite" for p in files)
    for path in files:
        assert secret not in path.read_bytes(), path
    store = connect(MedZoneHome(home).db_url)
    try:
        with store.session() as session:
            rows = session.scalars(select(AuditEvent)).all()
            text = " ".join(f"{r.actor} {r.action} {r.subject} {r.detail_json}" for r in rows)
    finally:
        store.engine.dispose()
    assert "dataset" in text and cred.password not in text and cred.username not in text


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medzone: error: "), done.stderr
    return lines[0]


def test_errors_are_one_line_and_never_show_the_password(zone, orthanc, cohort, tmp_path):
    cred = orthanc["credentials"]
    accession = cohort["patients"][0]["studies"]["CT"]["accession"]

    def refusal(source, accessions=(accession,), credentials=cred, **kw) -> str:
        with pytest.raises(PacsError) as caught:
            import_from_pacs(zone.home, zone.store, "x", source=source, accessions=accessions,
                             credentials=credentials, download_root=tmp_path / "dl",
                             actor="test", progress=False, **kw)
        text = str(caught.value)
        assert "\n" not in text and cred.password not in text
        return text

    assert refusal("http://127.0.0.1:9/dicom-web") == \
        "cannot reach the PACS at http://127.0.0.1:9/dicom-web (connection refused) while " \
        "searching for studies"
    assert "cannot reach the DICOM node MEDZONE-PACS@127.0.0.1:9 (connection refused)" in \
        refusal("MEDZONE-PACS@127.0.0.1:9")
    assert "asks for credentials (HTTP 401)" in refusal(_dicomweb(orthanc), credentials=None)
    assert "refused the association" in refusal(_dimse(orthanc, "NOT-THE-PACS"),
                                                calling_aet=orthanc["MEDZONE_TEST_ORTHANC_CLIENT_AET"])
    assert "refused the association" in refusal(_dimse(orthanc), calling_aet="STRANGER")
    assert refusal(_dicomweb(orthanc), accessions=[accession, "NO-SUCH-0001"]) == \
        f"1 of 2 accession numbers match no study on {_dicomweb(orthanc)}; nothing was imported"
    assert "no study on" in refusal(_dimse(orthanc), accessions=["NO-SUCH-0001"],
                                    calling_aet=orthanc["MEDZONE_TEST_ORTHANC_CLIENT_AET"])
    with pytest.raises(InvalidInput, match="must not hold credentials"):
        refusal(_dicomweb(orthanc).replace("http://", f"http://{cred.username}:{cred.password}@"))

    # What the command prints: that one line, and nothing is stored.
    home = tmp_path / "home"
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"username": cred.username, "password": "not-" + cred.password}))
    for args, message in (
            (["--pacs-credentials", wrong], "refused the credentials (HTTP 401)"),
            (["--accession", "NO-SUCH-0001", "--pacs-credentials",
              orthanc["MEDZONE_TEST_ORTHANC_CREDENTIALS"]],
             "1 of 2 accession numbers match no study")):
        done = _cli(home, "dataset", "add", "x", "--from-pacs", _dicomweb(orthanc), "--quiet",
                    "--accession", accession, "--download-dir", tmp_path / "dl", *args)
        assert message in _one_line_error(done)
        assert cred.password not in done.stderr + done.stdout
    assert _cli(home, "dataset", "list", "--json").stdout.strip() == "[]"


def test_a_study_that_fails_mid_way_stops_with_one_line_and_resumes_once_fixed(
        orthanc, cohort, tmp_path, key_file):
    home, downloads = tmp_path / "home", tmp_path / "dl"
    patient = cohort["patients"][2]
    ct = patient["studies"]["CT"]
    argv = ["dataset", "add", "mid-way", "--from-pacs", _dicomweb(orthanc), "--deidentify",
            "--key-file", key_file, "--pacs-credentials",
            orthanc["MEDZONE_TEST_ORTHANC_CREDENTIALS"], "--download-dir", downloads,
            "--accession", ct["accession"]]
    _kill_mid_download(argv, home, downloads, ct["files"])
    # An instance not downloaded yet disappears from the PACS before the next run.
    plan = json.loads(next(downloads.glob("*/plan.json")).read_text())
    missing = next(i for i in plan if not next(downloads.glob("*/files")).joinpath(i["rel"]).exists())
    rest, url = _rest(orthanc), orthanc["MEDZONE_TEST_ORTHANC_URL"]
    found = rest.post(url + "/tools/lookup", data=missing["sop"], timeout=30).json()
    source = next(cohort["dir"].rglob(f"{patient['id']}/CT/*.dcm"))
    original = next(f for f in source.parent.glob("*.dcm")
                    if str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                    == missing["sop"])
    rest.delete(url + found[0]["Path"], timeout=30).raise_for_status()
    try:
        line = _one_line_error(_cli(home, *argv, "--quiet"))
        assert "answered HTTP 404 while downloading an instance" in line
        assert f"of {ct['files']} instances, nothing was published" in line
        assert _cli(home, "dataset", "list", "--json").stdout.strip() == "[]"
    finally:
        rest.post(url + "/instances", data=original.read_bytes(), timeout=30).raise_for_status()
    done = _cli(home, *argv, "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"] == ct["files"]


def test_selection_and_source_are_checked_before_anything_is_contacted(zone, tmp_path):
    # The URL names a closed port: any contact would fail with another message.
    with pytest.raises(Exception, match="say which studies"):
        import_from_pacs(zone.home, zone.store, "x", source="http://127.0.0.1:9/dicom-web",
                         actor="t", download_root=tmp_path / "dl")
    with pytest.raises(Exception, match="AET@host:port"):
        import_from_pacs(zone.home, zone.store, "x", source="pacs.example:104",
                         accessions=["A1"], actor="t", download_root=tmp_path / "dl")
    with pytest.raises(Exception, match="outside MEDZONE_HOME"):
        import_from_pacs(zone.home, zone.store, "x", source="http://127.0.0.1:9/dicom-web",
                         accessions=["A1"], actor="t", download_root=zone.home.root / "dl")
