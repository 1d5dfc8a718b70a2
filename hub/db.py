"""The governance store: one engine, sessions that commit or roll back, schema by Alembic.

SQLite (a file under ``MEDZONE_HOME``) is the default; PostgreSQL is used when
``MEDZONE_DB_URL`` names it (``postgresql+psycopg://…``). Service functions
(:mod:`medzone_hub.accounts`, :mod:`medzone_hub.registry`, :mod:`medzone_hub.access`,
:mod:`medzone_hub.audit`) take a :class:`~sqlalchemy.orm.Session`, make their change and
its audit row, and leave the commit to the caller::

    store = open_store(home)
    with store.session() as session:
        app = access.apply(session, user="alice", dataset_ids=["ct-demo"], purpose="…")
    # committed here, or rolled back if the block raised
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .config import MedZoneHome
from .errors import Conflict, InvalidInput, MedZoneError

if TYPE_CHECKING:
    from alembic.config import Config

#: Seconds a SQLite connection waits for another writer before giving up.
SQLITE_BUSY_TIMEOUT = 30


class Store:
    """An engine and the sessions made from it.

    Objects loaded in a session stay usable after it closes (``expire_on_commit=False``),
    so a face can print what a service function returned after the commit.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessionmaker = sessionmaker(bind=engine, expire_on_commit=False)

    @property
    def url(self) -> URL:
        return self.engine.url

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed if the block succeeds, else rolled back."""
        with self._sessionmaker.begin() as session:
            yield session

    def close(self) -> None:
        """Close pooled connections (a later session opens new ones)."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"<Store {self.url.render_as_string(hide_password=True)}>"


def connect(db_url: str | URL) -> Store:
    """Open the store at *db_url* and migrate its schema to the newest revision."""
    engine = make_engine(db_url)
    try:
        upgrade(engine)
    except OperationalError as err:
        engine.dispose()
        where = engine.url.render_as_string(hide_password=True)
        reason = str(err.orig).strip().splitlines()[0] if err.orig else type(err).__name__
        raise MedZoneError(f"cannot open the database {where}: {reason}") from None
    except Exception:
        engine.dispose()
        raise
    return Store(engine)


_stores: dict[tuple[Path, str], Store] = {}
_stores_lock = threading.Lock()


def open_store(home: MedZoneHome) -> Store:
    """The store of *home*: how the CLI, the hub (authenticator, spawner, hub API), the
    portal and the services open it.

    One store (engine) per home and database URL in this process, so the schema is migrated
    once and every face shares one connection pool; the home's folders are made (with their
    modes) the first time.
    """
    key = (home.root, home.db_url)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = connect(home.ensure().db_url)
        return store


def make_engine(db_url: str | URL) -> Engine:
    """An engine for *db_url*, set up the way the store relies on (no migration)."""
    url = _normalise_url(db_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            secure_sqlite_file(url.database)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT})
        _serialise_sqlite_writers(engine)
    else:
        # Timestamps come back as UTC and raw SQL output is UTC too, whatever the server's
        # TimeZone setting; models convert to UTC anyway, so this is for people reading.
        engine = create_engine(
            url, pool_pre_ping=True, connect_args={"options": "-c timezone=UTC"}
        )
    return engine


def secure_sqlite_file(path: str | os.PathLike) -> None:
    """Make the SQLite store readable by its owner only (0600): created so when missing
    (SQLite gives its -journal/-wal/-shm files the database file's mode), repaired when an
    older one is group- or world-readable."""
    path = Path(path)
    if not path.parent.is_dir():
        return  # SQLite will report the missing folder itself
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:
        return
    for f in (path, *(path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm"))):
        try:
            st = f.stat()
            if st.st_mode & 0o077 and st.st_uid == os.geteuid():
                os.chmod(f, 0o600)
        except OSError:
            pass


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic config for the packaged migrations; no ``alembic.ini`` needed.

    With *engine*, ``env.py`` migrates through it (and its SQLite event hooks).
    """
    from alembic.config import Config  # 0.1 s to import: only where migrations run

    config = Config()
    config.set_main_option("script_location", "medzone_hub:migrations")
    if engine is not None:
        config.set_main_option(
            "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
        )
        config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the migrations up to *revision* (default: the newest)."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def _normalise_url(db_url: str | URL) -> URL:
    try:
        url = make_url(db_url)
    except Exception as err:  # ArgumentError, ValueError: both mean "not a database URL"
        raise InvalidInput(f"not a database URL: {db_url!r} ({err})") from None
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise InvalidInput(
            f"unsupported database {backend!r}: use sqlite:/// or postgresql+psycopg://"
        )
    if url.drivername in ("postgresql", "postgres"):
        # Plain postgresql:// would select psycopg2, which MedZone does not install.
        url = url.set(drivername="postgresql+psycopg")
    return url


def _serialise_sqlite_writers(engine: Engine) -> None:
    """Begin every SQLite transaction with ``BEGIN IMMEDIATE``.

    With SQLite's default deferred transactions, two sessions may both read the audit
    head and then both try to write it; the second then fails with "database is locked"
    at once instead of waiting. Taking the write lock at BEGIN makes it wait its turn
    (up to :data:`SQLITE_BUSY_TIMEOUT`). This is SQLAlchemy's documented pysqlite recipe:
    stop the driver from issuing BEGIN itself and issue our own.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # Off by default in SQLite; the schema's foreign keys are meant to hold.
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def add_unique(session: Session, row, conflict: str) -> None:
    """Add *row*, whose key must be new, in a savepoint: losing a race with a concurrent
    insert of the same key leaves the caller's transaction usable and reads as
    :class:`Conflict` with the message *conflict*, as a key found earlier would."""
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        raise Conflict(conflict) from None
