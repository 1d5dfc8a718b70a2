"""The store itself: migrations, sessions, time handling; accounts and the dataset registry."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, select, text

from medzone_hub import access, audit
from medzone_hub.accounts import add_user, get_user, list_users, validate_user_name
from medzone_hub.db import alembic_config, connect, make_engine, upgrade
from medzone_hub.errors import Conflict, InvalidInput, NotFound
from medzone_hub.models import AuditHead, Base
from medzone_hub.registry import (
    dataset_exists,
    get_dataset,
    list_datasets,
    register_dataset,
    validate_dataset_id,
)

SHA = "ab" * 32


def downgrade(engine, revision):
    command.downgrade(alembic_config(engine), revision)
TABLES = {
    "users",
    "datasets",
    "access_applications",
    "access_application_datasets",
    "audit_events",
    "audit_head",
}


def register(session, dataset_id="ct-demo", **overrides):
    fields = dict(
        dataset_id=dataset_id,
        title="Demo CT",
        manifest_sha256=SHA,
        deidentified=True,
        n_files=120,
        n_bytes=5 * 2**32,  # beyond 32 bits: n_bytes is a BIGINT
        n_patients=10,
        modalities=["CT", "tabular"],
        actor="steward",
    )
    fields.update(overrides)
    return register_dataset(session, **fields)


# --- migrations ---------------------------------------------------------------------


def test_connect_creates_schema_by_migration_and_is_idempotent(db_url):
    engine = create_engine(db_url)
    assert inspect(engine).get_table_names() == []
    engine.dispose()

    store = connect(db_url)
    again = connect(db_url)  # already at head: nothing to do, nothing breaks
    try:
        with store.engine.connect() as conn:
            assert TABLES <= set(inspect(conn).get_table_names())
            heads = ScriptDirectory.from_config(alembic_config()).get_heads()
            assert MigrationContext.configure(conn).get_current_heads() == tuple(heads)
        with again.session() as session:
            head = session.scalars(select(AuditHead)).one()
            assert (head.id, head.seq, head.hash) == (1, 0, audit.GENESIS_HASH)
    finally:
        store.close()
        again.close()


def test_migrated_schema_matches_models(store):
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_migrations_downgrade_and_upgrade_again(store):
    downgrade(store.engine, "base")
    with store.engine.connect() as conn:
        assert TABLES.isdisjoint(inspect(conn).get_table_names())
    upgrade(store.engine)
    with store.session() as session:
        add_user(session, "alice", actor="root")
        assert audit.verify(session).ok


def test_schema_comparison_notices_a_difference(store):
    # Guards the test above against passing vacuously.
    with store.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_audit_events_subject"))
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [entry[0] for entry in diff] == ["add_index"]


def test_unsupported_urls_are_refused():
    with pytest.raises(InvalidInput, match="unsupported database"):
        connect("mysql://root@localhost/medzone")
    with pytest.raises(InvalidInput, match="not a database URL"):
        connect("no url at all")


def test_plain_postgresql_url_uses_psycopg():
    engine = make_engine("postgresql://medzone:secret@127.0.0.1/medzone")
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


# --- sessions and time --------------------------------------------------------------


def test_session_commits_on_success_and_rolls_back_on_error(store):
    with store.session() as session:
        add_user(session, "alice", actor="root")
    with pytest.raises(RuntimeError):
        with store.session() as session:
            add_user(session, "bob", actor="root")
            raise RuntimeError("boom")
    with store.session() as session:
        assert [user.name for user in list_users(session)] == ["alice"]
        # bob's audit row went with him; the chain is whole.
        result = audit.verify(session)
        assert (result.ok, result.rows) == (True, 1)


def test_times_come_back_aware_in_utc(store):
    seoul = timezone(timedelta(hours=9))
    applied = datetime(2030, 1, 1, 9, 30, 15, 123456, tzinfo=seoul)
    with store.session() as session:
        add_user(session, "alice", actor="root")
        register(session)
        app_id = access.apply(
            session, user="alice", dataset_ids=["ct-demo"], purpose="study", now=applied
        ).id
    with store.session() as session:
        app = access.get_application(session, app_id)
        assert app.created_at == applied
        assert app.created_at.tzinfo == timezone.utc
        assert app.created_at.hour == 0
        assert get_user(session, "alice").created_at.tzinfo == timezone.utc


def test_naive_datetimes_are_refused(store):
    with store.session() as session:
        add_user(session, "alice", actor="root")
        register(session)
        with pytest.raises(ValueError, match="naive"):
            access.apply(
                session, user="alice", dataset_ids=["ct-demo"], purpose="p", now=datetime(2030, 1, 1)
            )


def test_results_are_usable_after_the_session_closes(store):
    with store.session() as session:
        add_user(session, "alice", actor="root")
        register(session)
        app = access.apply(session, user="alice", dataset_ids=["ct-demo"], purpose="p")
    # What a CLI prints after the commit: no lazy load on a closed session.
    assert (app.id, app.user.name, app.dataset_ids, app.status) == (1, "alice", ["ct-demo"], "pending")


# --- accounts -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "a", "bob-2", "data_steward", "x" * 64])
def test_valid_user_names(name):
    assert validate_user_name(name) == name


@pytest.mark.parametrize("name", ["", "Alice", "a b", "ali.ce", "x" * 65, "élodie", "a/b", None])
def test_invalid_user_names(name):
    with pytest.raises(InvalidInput, match="invalid user name"):
        validate_user_name(name)


def test_add_and_get_user(store):
    with store.session() as session:
        add_user(session, "ada", admin=True, roles=["data-steward"], actor="root")
        add_user(session, "pat", approved=False, actor="root")
    with store.session() as session:
        ada = get_user(session, "ada")
        assert (ada.admin, ada.approved, ada.roles) == (True, True, ["data-steward"])
        assert ada.has_role("data-steward") and not ada.has_role("export-reviewer")
        pat = get_user(session, "pat")
        assert (pat.admin, pat.approved, pat.roles) == (False, False, [])
        (event, _) = audit.events(session)
        assert (event.actor, event.action, event.subject) == ("root", "user.add", "user:ada")
        assert event.detail == {"admin": True, "approved": True, "roles": ["data-steward"]}


def test_roles_changed_in_place_are_saved(store):
    with store.session() as session:
        add_user(session, "sam", actor="root")
    with store.session() as session:
        sam = get_user(session, "sam")
        sam.roles.append("export-reviewer")
    with store.session() as session:
        assert get_user(session, "sam").roles == ["export-reviewer"]


def test_user_errors(store):
    with store.session() as session:
        add_user(session, "alice", actor="root")
    with store.session() as session:
        with pytest.raises(Conflict, match="user 'alice' already exists"):
            add_user(session, "alice", actor="root")
        with pytest.raises(NotFound, match="user 'nobody' does not exist"):
            get_user(session, "nobody")
        with pytest.raises(InvalidInput, match="reserved"):
            add_user(session, audit.SYSTEM_ACTOR, actor="root")
        with pytest.raises(InvalidInput, match="invalid user name"):
            add_user(session, "Alice", actor="root")
        with pytest.raises(InvalidInput, match="invalid role"):
            add_user(session, "bob", roles=["Data Steward"], actor="root")


# --- dataset registry ---------------------------------------------------------------


@pytest.mark.parametrize("dataset_id", ["ct-demo", "a", "0-cohort", "lidc-idri-2024", "x" * 64])
def test_valid_dataset_ids(dataset_id):
    assert validate_dataset_id(dataset_id) == dataset_id


@pytest.mark.parametrize(
    "dataset_id", ["", "-ct", "CT", "ct_demo", "ct.demo", "ct demo", "../ct", "ct/x", "x" * 65, None]
)
def test_invalid_dataset_ids(dataset_id):
    with pytest.raises(InvalidInput, match="invalid dataset id"):
        validate_dataset_id(dataset_id)


def test_register_get_list_and_exists(store):
    with store.session() as session:
        register(session, "xr-demo", modalities=["CR"], title="")
        register(session, "ct-demo")
    with store.session() as session:
        assert [d.id for d in list_datasets(session)] == ["ct-demo", "xr-demo"]
        ct = get_dataset(session, "ct-demo")
        assert (ct.title, ct.manifest_sha256, ct.deidentified) == ("Demo CT", SHA, True)
        assert (ct.n_files, ct.n_bytes, ct.n_patients) == (120, 5 * 2**32, 10)
        assert ct.modalities == ["CT", "tabular"]
        assert ct.registered_by == "steward"
        assert ct.created_at.tzinfo == timezone.utc
        assert get_dataset(session, "xr-demo").title == "xr-demo"
        assert dataset_exists(session, "ct-demo")
        assert not dataset_exists(session, "mr-demo")
        assert not dataset_exists(session, "../etc")
        event = audit.events(session, subject="dataset:ct-demo")[0]
        assert (event.actor, event.action) == ("steward", "dataset.register")
        assert event.detail["manifest_sha256"] == SHA


def test_dataset_errors(store):
    with store.session() as session:
        register(session, "ct-demo")
    with store.session() as session:
        with pytest.raises(Conflict, match="dataset 'ct-demo' is already registered"):
            register(session, "ct-demo")
        with pytest.raises(NotFound, match="dataset 'mr-demo' does not exist"):
            get_dataset(session, "mr-demo")
        with pytest.raises(InvalidInput, match="invalid dataset id"):
            register(session, "CT")
        with pytest.raises(InvalidInput, match="manifest_sha256"):
            register(session, "mr-demo", manifest_sha256="abc")
        with pytest.raises(InvalidInput, match="n_files"):
            register(session, "mr-demo", n_files=-1)
