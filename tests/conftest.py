"""Shared fixtures: a fresh database on each backend, and a migrated store on it.

Tests that use ``db_url`` or ``store`` run twice: on a SQLite file and on PostgreSQL.
PostgreSQL comes from ``MEDZONE_TEST_PG_URL``, a URL of a role allowed to create
databases; start a local server and get the URL with::

    export "$(sudo .ci/postgres)"

Without it, the PostgreSQL variants fail rather than skip, so a green run always means
both backends were tested.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url

from medzone_hub.db import Store, connect

# Fixtures for command-line and ingest tests (a medzone home, a demo cohort).
pytest_plugins = ["tests.fixtures"]

PG_URL_ENV = "MEDZONE_TEST_PG_URL"
PG_HOWTO = (
    'Start the local server and export its URL with:  export "$(sudo .ci/postgres)"  '
    f'(as root: export "$(.ci/postgres)"), or point {PG_URL_ENV} at a role with CREATEDB.'
)


def pytest_report_header(config):
    url = os.environ.get(PG_URL_ENV)
    if not url:
        return f"postgresql: {PG_URL_ENV} not set; postgresql tests will fail"
    return f"postgresql: {make_url(url).render_as_string(hide_password=True)}"


class PgDatabases:
    """Fresh PostgreSQL databases for tests, created a few ahead in background threads.

    CREATE DATABASE waits for its files to reach the disk, a tenth of a second or more
    on a busy machine. Done ahead of need, and several at a time (the server
    then shares the flushes), it mostly overlaps with tests running instead of adding
    to them. Every test still gets a database nobody used before, dropped afterwards.
    """

    ahead = 4

    def __init__(self, admin: Engine):
        self._admin = admin
        self._executor = ThreadPoolExecutor(max_workers=self.ahead, thread_name_prefix="pg-db")
        self._ready: deque[Future[str]] = deque()
        self._dropping: list[Future[None]] = []

    def _create(self) -> str:
        name = f"medzone_test_{secrets.token_hex(6)}"
        with self._admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            # A throwaway database needs no durable commits. Visibility and locking are
            # the same either way, so nothing the tests check depends on it.
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        return name

    def _drop(self, name: str) -> None:
        # FORCE: a connection a failed test left open must not keep the database. An
        # autovacuum worker starting in it at that moment can still make the drop fail once
        # (.ci/postgres grants pg_signal_backend for that): try again before giving up.
        for attempt in range(3):
            try:
                with self._admin.connect() as conn:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except Exception:
                if attempt == 2:
                    raise
                time.sleep(1)

    def take(self) -> str:
        """The name of a new, empty database."""
        while len(self._ready) <= self.ahead:
            self._ready.append(self._executor.submit(self._create))
        return self._ready.popleft().result()

    def url(self, name: str) -> str:
        """The URL of database *name*, with the admin URL's role and password."""
        return self._admin.url.set(database=name).render_as_string(hide_password=False)

    def drop(self, name: str) -> None:
        self._dropping.append(self._executor.submit(self._drop, name))

    def close(self) -> None:
        """Drop every database made, used or not, and wait until they are gone."""
        while self._ready:
            future = self._ready.popleft()
            if not future.cancel():
                try:
                    self.drop(future.result())
                except Exception:  # it was never created; nothing to drop
                    pass
        for future in self._dropping:
            future.result()
        self._executor.shutdown()


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    url = os.environ.get(PG_URL_ENV)
    if not url:
        pytest.fail(f"{PG_URL_ENV} is not set, so the PostgreSQL tests cannot run. {PG_HOWTO}",
                    pytrace=False)
    url = make_url(url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    admin = create_engine(url, isolation_level="AUTOCOMMIT", pool_size=PgDatabases.ahead)
    try:
        with admin.connect():
            pass
    except Exception as err:
        admin.dispose()
        pytest.fail(f"cannot connect to {PG_URL_ENV}: {err}\n{PG_HOWTO}", pytrace=False)
    databases = PgDatabases(admin)
    try:
        yield databases
    finally:
        databases.close()
        admin.dispose()


@pytest.fixture
def pg_database_url(pg_databases: PgDatabases) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    name = pg_databases.take()
    try:
        yield pg_databases.url(name)
    finally:
        pg_databases.drop(name)


@pytest.fixture(
    params=[
        pytest.param("sqlite"),
        pytest.param("postgresql", marks=pytest.mark.postgres),
    ]
)
def db_url(request, tmp_path) -> str:
    """A URL of an empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'medzone.sqlite'}"
    return request.getfixturevalue("pg_database_url")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A store connected (and so migrated) on ``db_url``."""
    store = connect(db_url)
    yield store
    store.close()
