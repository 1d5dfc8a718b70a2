"""Access rules: each test below fails if the rule it names is removed from access.py."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from medzone_hub import access, audit
from medzone_hub.accounts import add_user
from medzone_hub.errors import Conflict, InvalidInput, NotFound, RuleViolation
from medzone_hub.registry import register_dataset

T0 = datetime(2030, 3, 1, 9, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)
DATASETS = ("ct-demo", "xr-demo", "mr-demo", "pet-demo", "us-demo")


@pytest.fixture
def zone(store):
    """A store with people in every role and a few datasets.

    ada: admin; sam: data steward; rex: export reviewer only; alice, bob: users;
    pat: signed up, not approved; dan: admin, not approved.
    """
    with store.session() as session:
        add_user(session, "ada", admin=True, actor="root")
        add_user(session, "sam", roles=["data-steward"], actor="root")
        add_user(session, "rex", roles=["export-reviewer"], actor="root")
        add_user(session, "alice", actor="root")
        add_user(session, "bob", actor="root")
        add_user(session, "pat", approved=False, actor="root")
        add_user(session, "dan", admin=True, approved=False, actor="root")
        for dataset_id in DATASETS:
            register_dataset(
                session, dataset_id=dataset_id, title=dataset_id, manifest_sha256="0" * 64,
                deidentified=True, n_files=1, n_bytes=1, n_patients=1, modalities=["CT"],
                actor="root",
            )
    return store


def apply(store, user="alice", datasets=("ct-demo",), days=30, now=T0, purpose="train a model"):
    with store.session() as session:
        return access.apply(
            session, user=user, dataset_ids=list(datasets), purpose=purpose, days=days, now=now
        ).id


def approve(store, app_id, reviewer="sam", now=T0, **kwargs):
    with store.session() as session:
        return access.approve(session, app_id, reviewer=reviewer, now=now, **kwargs)


def reject(store, app_id, reviewer="sam", now=T0, **kwargs):
    with store.session() as session:
        return access.reject(session, app_id, reviewer=reviewer, now=now, **kwargs)


def revoke(store, app_id, actor="ada", now=T0, **kwargs):
    with store.session() as session:
        return access.revoke(session, app_id, actor=actor, now=now, **kwargs)


def grants(store, user="alice", now=T0):
    with store.session() as session:
        return access.live_grants(session, user, now=now)


def last_event(store, app_id):
    with store.session() as session:
        return audit.events(session, subject=f"application:{app_id}")[-1]


# --- applying -----------------------------------------------------------------------


def test_apply_creates_a_pending_application(zone):
    app_id = apply(zone, datasets=["xr-demo", "ct-demo", "xr-demo"], days=45)
    with zone.session() as session:
        app = access.get_application(session, app_id)
        assert (app.user.name, app.status, app.requested_days) == ("alice", "pending", 45)
        assert app.dataset_ids == ["ct-demo", "xr-demo"]
        assert (app.purpose, app.created_at) == ("train a model", T0)
        assert access.application_state(app, T0) == "pending"
    event = last_event(zone, app_id)
    assert (event.actor, event.action, event.time) == ("alice", "access.apply", T0)
    assert event.detail == {
        "user": "alice", "datasets": ["xr-demo", "ct-demo"], "purpose": "train a model", "days": 45,
    }


def test_default_duration_is_90_days(zone):
    with zone.session() as session:
        app = access.apply(session, user="alice", dataset_ids=["ct-demo"], purpose="p")
    assert app.requested_days == 90


def test_applicant_must_exist(zone):
    with pytest.raises(NotFound, match="user 'zed' does not exist"):
        apply(zone, user="zed")


def test_applicant_must_be_approved(zone):
    with pytest.raises(RuleViolation, match="user 'pat' is not approved"):
        apply(zone, user="pat")


def test_datasets_must_exist(zone):
    with pytest.raises(NotFound, match="dataset 'lung-ct' does not exist"):
        apply(zone, datasets=["ct-demo", "lung-ct"])
    with zone.session() as session:
        assert access.list_applications(session) == []


@pytest.mark.parametrize("datasets", [[], ["CT demo"]])
def test_dataset_list_must_be_valid(zone, datasets):
    with pytest.raises(InvalidInput):
        apply(zone, datasets=datasets)


@pytest.mark.parametrize("purpose", ["", "   \n", None])
def test_purpose_must_not_be_empty(zone, purpose):
    with pytest.raises(InvalidInput, match="purpose"):
        apply(zone, purpose=purpose)


@pytest.mark.parametrize("days", [0, -1, 3651, 1.5, True, "30"])
def test_days_must_be_1_to_3650(zone, days):
    with pytest.raises(InvalidInput, match="days"):
        apply(zone, days=days)


def test_days_bounds_are_inclusive(zone):
    apply(zone, days=1)
    apply(zone, days=3650)


# --- deciding -----------------------------------------------------------------------


@pytest.mark.parametrize("reviewer", ["ada", "sam"])
def test_admins_and_data_stewards_approve(zone, reviewer):
    app_id = apply(zone, days=30)
    app = approve(zone, app_id, reviewer=reviewer, now=T0 + DAY)
    assert app.status == "approved"
    assert (app.decided_by, app.decided_at, app.decision_reason) == (reviewer, T0 + DAY, access.NO_REASON)
    assert (app.granted_days, app.expires_at) == (30, T0 + 31 * DAY)
    event = last_event(zone, app_id)
    assert (event.actor, event.action, event.time) == (reviewer, "access.approve", T0 + DAY)
    assert event.detail == {
        "user": "alice", "datasets": ["ct-demo"], "days": 30,
        "expires_at": "2030-04-01T09:00:00.000000+00:00", "reason": access.NO_REASON,
    }


def test_approval_can_shorten_the_grant_and_give_a_reason(zone):
    app_id = apply(zone, days=90)
    app = approve(zone, app_id, days=7, reason="  pilot only  ")
    assert (app.granted_days, app.expires_at, app.decision_reason) == (7, T0 + 7 * DAY, "pilot only")
    assert last_event(zone, app_id).detail["reason"] == "pilot only"


@pytest.mark.parametrize("days", [0, 3651])
def test_approved_days_must_be_1_to_3650(zone, days):
    app_id = apply(zone)
    with pytest.raises(InvalidInput, match="days"):
        approve(zone, app_id, days=days)


def test_reject_records_who_when_why(zone):
    app_id = apply(zone)
    app = reject(zone, app_id, reviewer="ada", reason="purpose too vague", now=T0 + DAY)
    assert (app.status, app.decided_by, app.decided_at) == ("rejected", "ada", T0 + DAY)
    assert (app.decision_reason, app.expires_at) == ("purpose too vague", None)
    event = last_event(zone, app_id)
    assert (event.actor, event.action, event.time) == ("ada", "access.reject", T0 + DAY)
    assert event.detail == {"user": "alice", "datasets": ["ct-demo"], "reason": "purpose too vague"}
    assert reject(zone, apply(zone)).decision_reason == access.NO_REASON


@pytest.mark.parametrize("decide", [approve, reject])
def test_reviewer_must_exist(zone, decide):
    with pytest.raises(NotFound, match="user 'zed' does not exist"):
        decide(zone, apply(zone), reviewer="zed")


@pytest.mark.parametrize("decide", [approve, reject])
@pytest.mark.parametrize("reviewer", ["bob", "rex"])
def test_reviewer_must_be_admin_or_data_steward(zone, decide, reviewer):
    app_id = apply(zone)
    with pytest.raises(RuleViolation, match=f"'{reviewer}' may not review access applications"):
        decide(zone, app_id, reviewer=reviewer)
    with zone.session() as session:
        assert access.get_application(session, app_id).status == "pending"


@pytest.mark.parametrize("decide", [approve, reject])
def test_reviewer_must_be_approved(zone, decide):
    with pytest.raises(RuleViolation, match="reviewer 'dan' is not an approved user"):
        decide(zone, apply(zone), reviewer="dan")


@pytest.mark.parametrize("decide", [approve, reject])
@pytest.mark.parametrize("reviewer", ["ada", "sam"])
def test_nobody_decides_their_own_application(zone, decide, reviewer):
    app_id = apply(zone, user=reviewer)
    with pytest.raises(RuleViolation, match=f"'{reviewer}' may not decide their own application {app_id}"):
        decide(zone, app_id, reviewer=reviewer)


def _in_state(zone, state):
    """An application of alice's in *state* at T0 + 10 days."""
    app_id = apply(zone, days=5 if state == "expired" else 30)
    if state in ("approved", "revoked", "expired"):
        approve(zone, app_id)
    if state == "rejected":
        reject(zone, app_id)
    if state == "revoked":
        revoke(zone, app_id, now=T0 + DAY)
    return app_id


@pytest.mark.parametrize("decide", [approve, reject])
@pytest.mark.parametrize("state", ["approved", "rejected", "revoked", "expired"])
def test_only_pending_applications_are_decided(zone, decide, state):
    app_id = _in_state(zone, state)
    with pytest.raises(Conflict, match=f"application {app_id} is {state}: only pending"):
        decide(zone, app_id, reviewer="ada", now=T0 + 10 * DAY)


@pytest.mark.parametrize("act", [approve, reject, revoke])
def test_unknown_application(zone, act):
    with pytest.raises(NotFound, match="access application 999 does not exist"):
        act(zone, 999)


def race(store, first, second):
    """Run *second* in its own session while *first*'s transaction is still open.

    *second* starts once *first* has made its change but not committed, and is given a
    moment to reach the row *first* holds; then *first* commits. Returns what *second*
    returned or raised.
    """
    outcome = {}

    def run_second():
        try:
            with store.session() as session:
                outcome["result"] = second(session)
        except Exception as err:
            outcome["result"] = err

    with store.session() as session:
        first(session)
        thread = threading.Thread(target=run_second)
        thread.start()
        thread.join(timeout=0.3)  # now waiting on our lock, unless nothing stopped it
    thread.join(timeout=30)
    return outcome["result"]


def test_two_reviewers_at_once_decide_once(zone):
    # Both load the pending application; only the one that decides first may.
    app_id = apply(zone)
    second = race(
        zone,
        lambda session: access.approve(session, app_id, reviewer="ada", now=T0),
        lambda session: access.reject(session, app_id, reviewer="sam", now=T0),
    )
    assert isinstance(second, Conflict), second
    with zone.session() as session:
        assert access.get_application(session, app_id).decided_by == "ada"
        decisions = [e.action for e in audit.events(session, subject=f"application:{app_id}")]
        assert decisions == ["access.apply", "access.approve"]


def test_expiry_recorded_once_when_run_twice_at_once(zone):
    app_id = apply(zone, days=1)
    approve(zone, app_id)
    later = T0 + 2 * DAY
    second = race(
        zone,
        lambda session: access.expire_due(session, now=later),
        lambda session: access.expire_due(session, now=later),
    )
    assert second == []
    with zone.session() as session:
        expiries = [e for e in audit.events(session) if e.action == "access.expire"]
        assert len(expiries) == 1


# --- grants: revocation, expiry, what is live -----------------------------------------


def test_revoke_ends_a_live_grant(zone):
    app_id = apply(zone)
    approve(zone, app_id)
    assert grants(zone, now=T0 + DAY) == ["ct-demo"]
    app = revoke(zone, app_id, actor="ada", reason="left the project", now=T0 + 2 * DAY)
    assert (app.status, app.revoked_by, app.revoked_at) == ("revoked", "ada", T0 + 2 * DAY)
    assert app.revoke_reason == "left the project"
    assert grants(zone, now=T0 + 2 * DAY) == []
    event = last_event(zone, app_id)
    assert (event.actor, event.action, event.time) == ("ada", "access.revoke", T0 + 2 * DAY)
    assert event.detail == {"user": "alice", "datasets": ["ct-demo"], "reason": "left the project"}


def test_revoke_without_reason_stores_default(zone):
    app_id = apply(zone)
    approve(zone, app_id)
    assert revoke(zone, app_id).revoke_reason == access.NO_REASON


@pytest.mark.parametrize("state", ["pending", "rejected", "revoked", "expired"])
def test_only_live_grants_are_revoked(zone, state):
    app_id = _in_state(zone, state)
    with pytest.raises(Conflict, match=f"application {app_id} is {state}: only a live approved grant"):
        revoke(zone, app_id, now=T0 + 10 * DAY)


def test_a_revoked_grant_is_never_live_whatever_its_status_says(zone):
    # If the status column alone decided, setting it back by hand would restore access.
    app_id = apply(zone)
    approve(zone, app_id)
    revoke(zone, app_id)
    with zone.engine.begin() as conn:
        conn.execute(
            text("UPDATE access_applications SET status = 'approved' WHERE id = :id"), {"id": app_id}
        )
    assert grants(zone, now=T0 + DAY) == []
    with zone.session() as session:
        assert access.application_state(access.get_application(session, app_id), T0 + DAY) == "revoked"


def test_grant_expires_at_its_time_even_before_expire_due(zone):
    app_id = apply(zone, days=10)
    approve(zone, app_id)
    just_before = T0 + 10 * DAY - timedelta(microseconds=1)
    assert grants(zone, now=just_before) == ["ct-demo"]
    assert grants(zone, now=T0 + 10 * DAY) == []
    with zone.session() as session:
        app = access.get_application(session, app_id)
        # Nothing recorded the expiry yet: live_grants goes by the time, not the column.
        assert app.status == "approved"
        assert access.application_state(app, just_before) == "approved"
        assert access.application_state(app, T0 + 10 * DAY) == "expired"
    with pytest.raises(Conflict, match="is expired"):
        revoke(zone, app_id, now=T0 + 10 * DAY)


def test_expire_due_records_each_expiry_once(zone):
    short = apply(zone, days=5)
    long = apply(zone, days=50)
    pending = apply(zone, days=1)
    rejected = apply(zone, days=1)
    revoked = apply(zone, days=1, datasets=["xr-demo"])
    for app_id in (short, long, revoked):
        approve(zone, app_id)
    reject(zone, rejected)
    revoke(zone, revoked, now=T0 + DAY / 2)

    with zone.session() as session:
        assert access.expire_due(session, now=T0 + 5 * DAY - timedelta(seconds=1)) == []
    with zone.session() as session:
        expired = access.expire_due(session, now=T0 + 6 * DAY)
        assert [app.id for app in expired] == [short]
    with zone.session() as session:
        assert access.expire_due(session, now=T0 + 7 * DAY) == []
        app = access.get_application(session, short)
        assert (app.status, app.expired_at) == ("expired", T0 + 6 * DAY)
        states = {i: access.get_application(session, i).status for i in (long, pending, rejected, revoked)}
        assert states == {long: "approved", pending: "pending", rejected: "rejected", revoked: "revoked"}
        expiries = [e for e in audit.events(session) if e.action == "access.expire"]
        assert [(e.subject, e.actor, e.time) for e in expiries] == [
            (f"application:{short}", audit.SYSTEM_ACTOR, T0 + 6 * DAY)
        ]
        assert expiries[0].detail == {
            "user": "alice", "datasets": ["ct-demo"], "expires_at": "2030-03-06T09:00:00.000000+00:00",
        }


def test_live_grants_hold_only_approved_unexpired_unrevoked(zone):
    now = T0 + 10 * DAY
    live = apply(zone, datasets=["ct-demo", "us-demo"], days=30)
    pending = apply(zone, datasets=["xr-demo"])
    rejected = apply(zone, datasets=["mr-demo"])
    revoked = apply(zone, datasets=["pet-demo"])
    expired = apply(zone, datasets=["xr-demo", "mr-demo"], days=5)
    approve(zone, live)
    reject(zone, rejected)
    approve(zone, revoked)
    revoke(zone, revoked, now=T0 + DAY)
    approve(zone, expired)
    assert grants(zone, now=now) == ["ct-demo", "us-demo"]
    # Recording the expiry changes nothing about what is live.
    with zone.session() as session:
        access.expire_due(session, now=now)
    assert grants(zone, now=now) == ["ct-demo", "us-demo"]
    assert pending  # pending stays pending and grants nothing
    assert grants(zone, user="bob", now=now) == []


def test_live_grants_of_unknown_or_unapproved_accounts_are_empty(zone):
    assert grants(zone, user="zed") == []
    assert grants(zone, user="pat") == []


def test_list_applications_with_states(zone):
    first = apply(zone, days=5)
    second = apply(zone, user="bob")
    approve(zone, first)
    with zone.session() as session:
        everyone = access.list_applications(session, now=T0 + 10 * DAY)
        bobs = access.list_applications(session, user="bob", now=T0 + 10 * DAY)
        with pytest.raises(NotFound):
            access.list_applications(session, user="zed")
    assert [(a.id, a.state) for a in everyone] == [(first, "expired"), (second, "pending")]
    assert [a.id for a in bobs] == [second]


def test_every_step_is_in_the_audit_log(zone):
    granted = apply(zone, days=3)
    refused = apply(zone, user="bob")
    cut = apply(zone, datasets=["xr-demo"])
    approve(zone, granted, reviewer="ada")
    reject(zone, refused, reviewer="sam")
    approve(zone, cut, reviewer="sam")
    revoke(zone, cut, actor="ada", now=T0 + DAY)
    with zone.session() as session:
        access.expire_due(session, now=T0 + 4 * DAY)
    with zone.session() as session:
        trail = {
            app_id: [(e.actor, e.action) for e in audit.events(session, subject=f"application:{app_id}")]
            for app_id in (granted, refused, cut)
        }
        assert audit.verify(session).ok
    assert trail == {
        granted: [("alice", "access.apply"), ("ada", "access.approve"), ("system", "access.expire")],
        refused: [("bob", "access.apply"), ("sam", "access.reject")],
        cut: [("alice", "access.apply"), ("sam", "access.approve"), ("ada", "access.revoke")],
    }
