"""The audit chain: appends link up, and verify names the first row that was tampered with.

Tampering is done the way someone with database access would do it: raw SQL on the
tables, bypassing the models.
"""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import datetime, timezone

import pytest
from sqlalchemy import bindparam, select, text

from medzone_hub import audit
from medzone_hub.db import connect
from medzone_hub.models import AuditEvent, AuditHead, UTCDateTime

T0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)


def append_events(store, n=5):
    for i in range(1, n + 1):
        with store.session() as session:
            audit.append(
                session,
                actor=f"user{i}",
                action="test.event",
                subject=f"thing:{i}",
                detail={"z": "last", "i": i, "a": "first", "text": "영상 판독"},
            )


def sql(store, statement, **params):
    with store.engine.begin() as conn:
        conn.execute(text(statement), params)


def verify(store):
    with store.session() as session:
        return audit.verify(session)


@pytest.fixture
def chain(store):
    """A store whose log holds five intact events."""
    append_events(store)
    return store


def test_appends_form_a_chain(chain):
    with chain.session() as session:
        events = audit.events(session)
        head = session.scalars(select(AuditHead)).one()
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_hash == audit.GENESIS_HASH
    for before, after in zip(events, events[1:]):
        assert after.prev_hash == before.hash
    assert (head.seq, head.hash) == (5, events[-1].hash)
    assert all(e.time.tzinfo == timezone.utc for e in events)


def test_several_appends_in_one_transaction(store):
    with store.session() as session:
        first = audit.append(session, actor="a", action="x", subject="s", detail={})
        second = audit.append(session, actor="a", action="y", subject="s", detail={})
    assert (first.seq, second.seq, second.prev_hash) == (1, 2, first.hash)
    assert verify(store).ok


def test_verify_passes_on_empty_and_untouched_logs(store):
    result = verify(store)
    assert (result.ok, result.rows, result.first_bad) == (True, 0, None)
    append_events(store)
    result = verify(store)
    assert (result.ok, result.rows, result.first_bad, result.reason) == (
        True,
        5,
        None,
        "audit chain intact",
    )


def test_detail_is_stored_as_canonical_text(chain):
    with chain.engine.connect() as conn:
        stored = conn.execute(text("SELECT detail FROM audit_events WHERE seq = 1")).scalar_one()
    assert stored == '{"a":"first","i":1,"text":"영상 판독","z":"last"}'


def test_hash_is_the_same_on_every_backend(store):
    # The hash covers strings only (ISO time, the detail's JSON text), never a backend's
    # rendering of its column types, so a fixed event hashes alike on SQLite and
    # PostgreSQL, and anyone can recompute it from the documented payload.
    detail = {"reason": "ok", "days": 30, "datasets": ["ct-demo"]}
    with store.session() as session:
        audit.append(session, actor="ada", action="access.approve", subject="application:1",
                     detail=detail, time=T0)
    with store.session() as session:
        (event,) = audit.events(session)
    payload = {
        "seq": 1,
        "time": "2030-01-02T03:04:05.678901+00:00",
        "actor": "ada",
        "action": "access.approve",
        "subject": "application:1",
        "detail": '{"datasets":["ct-demo"],"days":30,"reason":"ok"}',
        "prev_hash": "0" * 64,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert event.time == T0
    assert event.hash == hashlib.sha256(canonical.encode()).hexdigest()
    assert event.hash == "8e2374fcbc38f4e115e085d626116ed6820db279e988a6fdab02b12907fde523"


def test_rolled_back_append_leaves_no_trace(chain):
    with pytest.raises(RuntimeError):
        with chain.session() as session:
            audit.append(session, actor="a", action="x", subject="s", detail={})
            raise RuntimeError("abort")
    result = verify(chain)
    assert (result.ok, result.rows) == (True, 5)


@pytest.mark.parametrize(
    "column, value",
    [
        ("actor", "mallory"),
        ("action", "test.other"),
        ("subject", "thing:99"),
        ("detail", '{"a":"first","i":3,"text":"영상 판독","z":"changed"}'),
        ("prev_hash", "f" * 64),
        ("hash", "e" * 64),
    ],
)
def test_verify_names_an_edited_row(chain, column, value):
    sql(chain, f"UPDATE audit_events SET {column} = :value WHERE seq = 3", value=value)
    result = verify(chain)
    assert (result.ok, result.first_bad) == (False, 3)
    assert result.reason == "audit row 3 was edited: its contents do not match its hash"


def test_verify_names_a_row_whose_time_was_edited(chain):
    with chain.engine.begin() as conn:
        conn.execute(
            text("UPDATE audit_events SET time = :value WHERE seq = 2").bindparams(
                bindparam("value", type_=UTCDateTime())
            ),
            {"value": datetime(2020, 1, 1, tzinfo=timezone.utc)},
        )
    result = verify(chain)
    assert (result.ok, result.first_bad) == (False, 2)
    assert "audit row 2 was edited" in result.reason


def test_verify_names_a_row_edited_and_rehashed(chain):
    # Recomputing the edited row's own hash is not enough: the next row still points
    # at the old one.
    with chain.session() as session:
        row = session.get(AuditEvent, 3)
        forged = audit.event_hash(seq=3, time=row.time, actor="mallory", action=row.action,
                                  subject=row.subject, detail_json=row.detail_json,
                                  prev_hash=row.prev_hash)
    sql(chain, "UPDATE audit_events SET actor = 'mallory', hash = :h WHERE seq = 3", h=forged)
    result = verify(chain)
    assert (result.ok, result.first_bad) == (False, 4)
    assert result.reason.startswith("audit row 4 does not follow row 3")


@pytest.mark.parametrize("seq", [1, 3])
def test_verify_names_a_deleted_row(chain, seq):
    sql(chain, "DELETE FROM audit_events WHERE seq = :seq", seq=seq)
    result = verify(chain)
    assert (result.ok, result.rows, result.first_bad) == (False, 4, seq)
    assert result.reason == (
        f"audit row {seq} is missing: row {seq} removed before row {seq + 1}"
    )


def test_verify_names_the_deleted_last_row(chain):
    sql(chain, "DELETE FROM audit_events WHERE seq = 5")
    result = verify(chain)
    assert (result.ok, result.first_bad) == (False, 5)
    assert result.reason == (
        "audit row 5 is missing: the audit head records 5 rows but the log ends at row 4"
    )


def test_verify_names_the_first_of_several_deleted_rows(chain):
    sql(chain, "DELETE FROM audit_events WHERE seq >= 2 AND seq <= 3")
    result = verify(chain)
    assert (result.ok, result.first_bad) == (False, 2)
    assert result.reason == "audit row 2 is missing: rows 2 to 3 removed before row 4"


def test_verify_notices_a_deleted_head(chain):
    sql(chain, "DELETE FROM audit_head")
    result = verify(chain)
    assert (result.ok, result.first_bad) == (False, 6)
    assert "audit head row is missing" in result.reason


@pytest.mark.parametrize("a, b", [(2, 4), (3, 4)])
def test_verify_names_reordered_rows(chain, a, b):
    sql(chain, "UPDATE audit_events SET seq = -1 WHERE seq = :a", a=a)
    sql(chain, "UPDATE audit_events SET seq = :a WHERE seq = :b", a=a, b=b)
    sql(chain, "UPDATE audit_events SET seq = :b WHERE seq = -1", b=b)
    result = verify(chain)
    assert (result.ok, result.first_bad) == (False, a)
    assert result.reason == (
        f"audit row {a} is out of order: it holds the row written as {b} (rows reordered)"
    )


def test_verify_names_a_row_added_behind_the_heads_back(chain):
    with chain.session() as session:
        last = session.get(AuditEvent, 5)
        forged = dict(seq=6, time=T0, actor="mallory", action="test.event", subject="thing:6",
                      detail_json="{}", prev_hash=last.hash)
    forged_hash = audit.event_hash(**forged)
    with chain.engine.begin() as conn:
        conn.execute(
            AuditEvent.__table__.insert(),
            {**{k: v for k, v in forged.items() if k != "detail_json"},
             "detail": "{}", "hash": forged_hash},
        )
    result = verify(chain)
    assert (result.ok, result.first_bad) == (False, 6)
    assert result.reason == (
        "audit row 6 was not appended through the chain: the audit head records only 5 rows"
    )


def test_concurrent_appends_keep_the_chain_valid(db_url):
    # Two engines (as two hub processes would have), two threads on each, appending at
    # once. Without serialised appends, two of them would claim the same seq.
    stores = [connect(db_url), connect(db_url)]
    per_thread = 15
    threads_per_store = 2
    start = threading.Barrier(len(stores) * threads_per_store)
    errors = []

    def work(store, name):
        try:
            start.wait()
            for i in range(per_thread):
                with store.session() as session:
                    audit.append(session, actor=name, action="test.concurrent",
                                 subject=f"{name}:{i}", detail={"i": i})
        except Exception as err:  # reported below; a thread cannot fail the test itself
            errors.append(err)

    threads = [
        threading.Thread(target=work, args=(store, f"s{s}t{t}"))
        for s, store in enumerate(stores)
        for t in range(threads_per_store)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        result = verify(stores[0])
        total = len(threads) * per_thread
        assert (result.ok, result.rows) == (True, total)
        with stores[1].session() as session:
            seqs = session.scalars(select(AuditEvent.seq).order_by(AuditEvent.seq)).all()
        assert seqs == list(range(1, total + 1))
    finally:
        for store in stores:
            store.close()
