"""Usage records and reports: every run is recorded once, in the transaction that ends it,
attributed to its user, its template and every dataset its sandbox mounted; ``medzone
usage`` groups and filters them; data providers see their datasets' usage and runs only
(403 everywhere else), through the service, the CLI and the real portal behind a real hub.

Runs are real (papermill inside the user's bubblewrap sandbox), and so is the server whose
session is recorded when the hub stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from medzone_hub import access, accounts, runner, usage
from medzone_hub.config import ENV_DB_URL, ENV_HOME, MedZoneHome
from medzone_hub.db import connect
from medzone_hub.errors import Conflict, InvalidInput, RuleViolation
from medzone_hub.models import AuditEvent, UsageRecord
from medzone_hub.sandbox import SandboxConfig

from .fixtures import add_tiny_dataset, sandbox_base
from .test_runner import PROBE


def _grant(session, user: str, datasets: list[str]) -> None:
    app = access.apply(session, user=user, dataset_ids=datasets, purpose="usage tests")
    session.flush()
    access.approve(session, app.id, reviewer="steward")


class UsageZone:
    def __init__(self, base):
        self.base = base
        self.home = MedZoneHome(base / "home").ensure()
        self.store = connect(self.home.db_url)

    def run(self, user: str, config=None, **params) -> int:
        run = runner.prepare_run(self.home, self.store, user, str(PROBE),
                                 [(k, str(v)) for k, v in params.items()], config=config)
        runner.execute_run(self.home, self.store, run.id, config=config)
        return run.id

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in (ENV_DB_URL, "MEDZONE_ACTOR")}
        env[ENV_HOME] = str(self.home.root)
        return subprocess.run([sys.executable, "-m", "medzone_hub.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120, cwd="/")


@pytest.fixture(scope="module")
def zone():
    """alice holds grants on ds-a and ds-b, bob on ds-b; pat supplied ds-a."""
    with sandbox_base("medzone-usage-") as base:
        z = UsageZone(base)
        with z.store.session() as session:
            for name in ("alice", "bob", "pat", "carol"):
                accounts.add_user(session, name, actor="test")
            accounts.add_user(session, "steward", roles=["data-steward"], actor="test")
            for dataset_id in ("ds-a", "ds-b"):
                add_tiny_dataset(session, z.home, dataset_id)
            _grant(session, "alice", ["ds-a", "ds-b"])
            _grant(session, "bob", ["ds-b"])
        z.runs = {"alice": z.run("alice", dataset="ds-a"), "bob": z.run("bob")}
        with pytest.raises(runner.RunFailed):
            z.run("bob", fail=True)
        with z.store.session() as session:
            z.runs["bob-failed"] = runner.list_runs(session, user="bob", state="failed")[0].id
        yield z
        z.store.close()


def _row(zone, run_id: int) -> dict:
    with zone.store.session() as session:
        row = session.scalar(select(UsageRecord).where(UsageRecord.run_id == run_id))
        return usage.record_summary(row)


def test_a_run_on_two_datasets_is_attributed_to_both(zone):
    row = _row(zone, zone.runs["alice"])
    assert row["kind"] == "run" and row["user"] == "alice"
    assert row["template"] == "runner_probe"
    assert row["datasets"] == ["ds-a", "ds-b"]  # both mounted in alice's sandbox
    assert row["wall_s"] > 0 and row["cpu_s"] > 0 and row["mem_peak_bytes"] > 0
    # No GPU here: not measured, never 0.
    assert row["gpu_s"] is None and row["gpu_mem_peak_bytes"] is None
    assert row["energy_j"] is None
    with zone.store.session() as session:
        by_dataset = {g["dataset"]: g for g in usage.usage_report(session, by="dataset")}
    assert by_dataset["ds-a"]["runs"] == 1 and by_dataset["ds-b"]["runs"] == 3
    assert by_dataset["ds-a"]["cpu_s"] == row["cpu_s"]
    assert by_dataset["ds-a"]["gpu_s"] is None and by_dataset["ds-a"]["energy_j"] is None


def test_each_run_is_recorded_once_with_its_end(zone):
    with zone.store.session() as session:
        run = runner.get_run(session, zone.runs["bob"])
        rows = session.scalars(select(UsageRecord).where(UsageRecord.run_id == run.id)).all()
        assert len(rows) == 1
        assert rows[0].ended_at <= run.finished_at + timedelta(seconds=1)
        assert [d.id for d in rows[0].datasets] == ["ds-b"]
        # Recording again (a second end path) adds nothing.
        assert usage.record_run_usage(session, run) is None


def test_a_failed_run_is_metered_too(zone):
    row = _row(zone, zone.runs["bob-failed"])
    assert row["cpu_s"] > 0 and row["datasets"] == ["ds-b"]


def test_reports_group_by_user_template_and_month(zone):
    with zone.store.session() as session:
        by_user = {g["user"]: g for g in usage.usage_report(session, by="user")}
        by_template = usage.usage_report(session, by="template")
        by_month = usage.usage_report(session, by="month")
        future = usage.usage_report(session, since=datetime.now(timezone.utc) + timedelta(days=1))
        with pytest.raises(InvalidInput, match="--by takes user, dataset, template, month"):
            usage.usage_report(session, by="colour")
    assert set(by_user) == {"alice", "bob"} and by_user["bob"]["runs"] == 2
    assert [g["template"] for g in by_template] == ["runner_probe"]
    assert by_template[0]["runs"] == 3
    assert [g["month"] for g in by_month] == [datetime.now(timezone.utc).strftime("%Y-%m")]
    assert future == []


def test_medzone_usage_prints_and_groups(zone):
    out = zone.cli("usage", "--by", "dataset", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["dataset"] for r in rows] == ["ds-a", "ds-b"]
    assert rows[0]["gpu_s"] is None
    table = zone.cli("usage")
    assert table.returncode == 0 and "runner_probe" in table.stdout
    assert "—" in table.stdout  # GPU columns: not measured
    assert zone.cli("usage", "--since", "2999-01-01", "--json").stdout.strip() == "[]"
    bad = zone.cli("usage", "--since", "last week")
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0
    assert "--since takes a date" in bad.stderr and "Traceback" not in bad.stderr


def test_a_provider_sees_only_their_datasets(zone):
    bound = zone.cli("dataset", "provider", "add", "ds-a", "pat", "--by", "steward")
    assert bound.returncode == 0, bound.stderr
    again = zone.cli("dataset", "provider", "add", "ds-a", "pat")
    assert again.returncode == 1 and "already a provider" in again.stderr
    refused = zone.cli("dataset", "provider", "add", "ds-b", "pat", "--by", "carol")
    assert refused.returncode == 1 and "only an admin or a data steward" in refused.stderr
    listed = zone.cli("dataset", "provider", "list", "--json")
    assert '"user": "pat"' in listed.stdout and '"dataset": "ds-a"' in listed.stdout
    with zone.store.session() as session:
        assert accounts.get_user(session, "pat").has_role("data-provider")
        assert usage.provider_datasets(session, "pat") == ["ds-a"]
        rows = usage.usage_report(session, viewer="pat")
        # alice's run (ds-a and ds-b) is visible, attributed to ds-a only; bob's (ds-b) not.
        assert [r["user"] for r in rows] == ["alice"] and rows[0]["datasets"] == ["ds-a"]
        assert [g["dataset"] for g in usage.usage_report(session, by="dataset",
                                                         viewer="pat")] == ["ds-a"]
        assert [r["run"] for r in usage.runs_on_datasets(session, viewer="pat")] == [
            zone.runs["alice"]]
        with pytest.raises(RuleViolation, match="not a provider of dataset ds-b"):
            usage.check_dataset_visible(session, "pat", "ds-b")
        for nobody in ("carol", "alice", "no-such-user"):
            with pytest.raises(RuleViolation, match="may not see usage"):
                usage.usage_report(session, viewer=nobody)
        # The steward sees everything.
        assert len(usage.usage_report(session, viewer="steward")) == 3
        actions = [e.action for e in session.scalars(select(AuditEvent))]
    assert "dataset.provider.add" in actions
    with zone.store.session() as session:
        usage.unbind_provider(session, "ds-a", "pat", actor="cli:test")
    with zone.store.session() as session:
        assert not accounts.get_user(session, "pat").has_role("data-provider")
        with pytest.raises(RuleViolation):
            usage.usage_report(session, viewer="pat")
        usage.bind_provider(session, "ds-a", "pat", actor="steward")
        with pytest.raises(Conflict):
            usage.bind_provider(session, "ds-a", "pat", actor="steward")


# --- the portal, behind a real hub -------------------------------------------------------

@pytest.fixture(scope="module")
def hub():
    from .hub_harness import PASSWORD, require_hub_tools, running_hub

    require_hub_tools()

    def setup(h):
        h.add_store_user("alice", grant=("prov-a", "prov-b"))
        h.add_store_user("carol", grant=("prov-b",))
        h.add_store_user("pat", grant=())
        with h.store.session() as session:
            usage.bind_provider(session, "prov-a", "pat", actor="steward")
        for name in ("alice", "carol", "pat", "steward"):
            accounts.set_password(h.home, name, PASSWORD, actor="test")

    with running_hub({"prov-a": "provided by pat\n", "prov-b": "provided by someone else\n"},
                     setup=setup) as h:
        config = SandboxConfig(uid_base=h.uid_base)
        run = runner.prepare_run(h.home, h.store, "alice", str(PROBE), [], config=config)
        runner.execute_run(h.home, h.store, run.id, config=config)
        h.alice_run = run.id
        yield h


def _browser(hub, name):
    from .hub_harness import PASSWORD, login

    session = login(hub, name, PASSWORD)
    assert session.login_response.status_code == 302, name
    return session


def test_a_server_session_is_metered_when_the_hub_stops_it(hub):
    from .hub_harness import wait_for

    r = hub.spawn("carol")
    assert r.status_code in (201, 202), r.text
    assert hub.api("DELETE", "/users/carol/server").status_code in (202, 204)

    def recorded():
        with hub.store.session() as session:
            return [usage.record_summary(r) for r in session.scalars(
                select(UsageRecord).where(UsageRecord.kind == "session"))]

    rows = wait_for(recorded, timeout=60)
    assert len(rows) == 1, hub.log()
    row = rows[0]
    assert row["user"] == "carol" and row["server"] == "" and row["datasets"] == ["prov-b"]
    assert row["wall_s"] > 0 and row["cpu_s"] > 0 and row["mem_peak_bytes"] > 0
    assert row["gpu_s"] is None and row["energy_j"] is None


def test_the_provider_page_shows_their_datasets_only(hub):
    pat = _browser(hub, "pat")
    page = pat.get(hub.portal_url + "provider", timeout=60)
    assert page.status_code == 200, page.text[-2000:]
    assert "<code>prov-a</code>" in page.text and "prov-b" not in page.text
    assert "runner_probe" in page.text and "—" in page.text
    api = pat.get(hub.portal_url + "api/usage", params={"by": "dataset"}, timeout=60)
    assert api.status_code == 200 and [r["dataset"] for r in api.json()] == ["prov-a"]
    runs = pat.get(hub.portal_url + "api/usage/runs", timeout=60).json()
    assert [r["run"] for r in runs] == [hub.alice_run] and runs[0]["datasets"] == ["prov-a"]
    # Everything else answers 403: another dataset, the stewards' page.
    other = pat.get(hub.portal_url + "api/usage", params={"dataset": "prov-b"}, timeout=60)
    assert other.status_code == 403
    assert pat.get(hub.portal_url + "usage", timeout=60).status_code == 403
    # The hub API answers the same, with the person's token.
    import requests

    def hub_api(name, **params):
        return requests.get(f"{hub.url}/hub/api/medzone/usage", params=params, timeout=60,
                            headers={"Authorization": f"token {hub.user_token(name)}"})

    answer = hub_api("pat", by="dataset")
    assert answer.status_code == 200 and [r["dataset"] for r in answer.json()] == ["prov-a"]
    assert hub_api("carol").status_code == 403
    assert hub_api("pat", by="colour").status_code == 400


def test_usage_pages_refuse_everyone_else(hub):
    carol = _browser(hub, "carol")
    for path in ("usage", "provider", "api/usage", "api/usage/runs"):
        assert carol.get(hub.portal_url + path, timeout=60).status_code == 403, path
    steward = _browser(hub, "steward")
    page = steward.get(hub.portal_url + "usage", params={"by": "dataset"}, timeout=60)
    assert page.status_code == 200
    assert "prov-a" in page.text and "prov-b" in page.text
    assert steward.get(hub.portal_url + "provider", timeout=60).status_code == 403
    everything = steward.get(hub.portal_url + "api/usage", timeout=60).json()
    assert {r["kind"] for r in everything} >= {"run"}
