"""A grant that ends does not turn the screen off.

Data saved in the home while a grant was live stays there after the grant is revoked or
expires, so an export request is screened against every dataset the requester ever held
a grant on, and every dataset their runs' recorded parameters name, whatever the grant's
state now (:func:`medzone_hub.access.screening_datasets`).
"""

from __future__ import annotations

import csv
from datetime import timedelta

import pytest

from medzone_hub import access, airlock, audit
from medzone_hub.accounts import add_user
from medzone_hub.models import utcnow


@pytest.fixture(scope="module")
def demo(module_env, cohort_dir):
    from medzone_hub.ingest import ingest_dataset

    ingest_dataset(module_env.home, module_env.store, "demo", cohort_dir, deidentify=True,
                   pseudonym_key=b"ended-grant-tests-provider-key-01", actor="steward",
                   progress=False)
    with module_env.store.session() as s:
        add_user(s, "steward", roles=["data-steward"], actor="test")
    with open(module_env.home.dataset_dir("demo") / "data" / "clinical.csv", newline="") as f:
        pseudonym = next(csv.DictReader(f))["patient_id"]
    return module_env, pseudonym


def _grant(env, user: str, days: int = 30) -> int:
    with env.store.session() as s:
        add_user(s, user, actor="test")
        app = access.apply(s, user=user, dataset_ids=["demo"], purpose="study", days=days)
        s.flush()
        access.approve(s, app.id, reviewer="steward", days=days)
        return app.id


def _slice(env, user: str, pseudonym: str) -> None:
    home = airlock.user_home(env.home, user)
    home.mkdir(parents=True, exist_ok=True)
    (home / "slice.csv").write_text(f"patient,value\n{pseudonym},7\n")


def _request(env, user: str, now=None):
    rid = airlock.submit_export(env.store, env.home, user=user, paths=["slice.csv"],
                                reason="after the grant", now=now)
    with env.store.session() as s:
        request = airlock.get_request(s, rid)
        return request.verdict, list(request.dataset_ids)


def test_a_revoked_grant_still_screens(demo):
    env, pseudonym = demo
    app_id = _grant(env, "rita")
    _slice(env, "rita", pseudonym)
    assert _request(env, "rita") == ("block", ["demo"])
    with env.store.session() as s:
        access.revoke(s, app_id, actor="steward", reason="study over")
    with env.store.session() as s:
        assert access.live_grants(s, "rita") == []
        assert access.screening_datasets(s, "rita") == ["demo"]
    assert _request(env, "rita") == ("block", ["demo"])


def test_an_expired_grant_still_screens(demo):
    env, pseudonym = demo
    _grant(env, "ezra", days=1)
    _slice(env, "ezra", pseudonym)
    later = utcnow() + timedelta(days=3)
    with env.store.session() as s:
        access.expire_due(s, now=later)
        assert access.live_grants(s, "ezra", now=later) == []
    assert _request(env, "ezra", now=later) == ("block", ["demo"])


def test_the_datasets_a_run_recorded_are_screened_too(demo):
    env, pseudonym = demo
    with env.store.session() as s:
        add_user(s, "rune", actor="test")
        # What run_template records for a run over a dataset (its parameters included).
        audit.append(s, actor="rune", action="run.execute", subject="template:cohort",
                     detail={"template": "cohort", "parameters": {"dataset": "demo",
                                                                   "other_dataset": "gone"}})
    with env.store.session() as s:
        assert access.screening_datasets(s, "rune") == ["demo"]  # "gone" is not registered
    _slice(env, "rune", pseudonym)
    assert _request(env, "rune") == ("block", ["demo"])
    with env.store.session() as s:
        assert audit.verify(s).ok
