"""Alembic environment for the governance store.

:func:`medzone_hub.db.connect` runs the migrations programmatically and hands its own
engine over in ``config.attributes["engine"]``, so SQLite transactions begin the same way
as everywhere else in the store. Run from the ``alembic`` command (e.g. to autogenerate
a new revision), the URL comes from ``sqlalchemy.url`` or else from ``MEDZONE_HOME`` /
``MEDZONE_DB_URL``.
"""

from alembic import context
from sqlalchemy import text

from medzone_hub.config import resolve_home
from medzone_hub.db import make_engine
from medzone_hub.models import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata

#: Key of the PostgreSQL advisory lock held while migrating, so hubs and commands that
#: start at the same time do not race to create the same tables.
MIGRATION_LOCK_KEY = 0x4D5A_0001


def render_item(type_, obj, autogen_context):
    """Write store-specific column types as plain SQLAlchemy ones in new revisions, so a
    revision keeps meaning what it meant when the models change."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or resolve_home().db_url


def run_migrations_offline() -> None:
    """Write the SQL to stdout instead of running it (``alembic upgrade --sql``)."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    owns_engine = engine is None
    if owns_engine:
        engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
                render_as_batch=connection.dialect.name == "sqlite",
                render_item=render_item,
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                    )
                context.run_migrations()
    finally:
        if owns_engine:
            engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
