"""Alembic environment: the URL comes from kdiga_service.settings (KDIGA_DATABASE_URL), or from a connection
handed over by kdiga_service.migrate; SQLite uses batch mode so ALTERs work."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import context

from kdiga_service.db import make_engine
from kdiga_service.models import Base, UTCDateTime
from kdiga_service.settings import get_settings

config = context.config
target_metadata = Base.metadata
PG_LOCK_ID = 0x6B64_6967  # "kdig": one migrator at a time on PostgreSQL


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:  # noqa: ARG001 - alembic hook signature
    """Render our UTCDateTime as a plain sa.DateTime(timezone=True) in revisions."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kw: Any) -> None:
    context.configure(target_metadata=target_metadata, render_item=render_item, compare_type=True, **kw)


def run_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or get_settings().database_url
    _configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_with(connection: sa.Connection) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
    _configure(connection=connection, render_as_batch=is_sqlite)
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": PG_LOCK_ID})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    settings = get_settings()
    url = config.get_main_option("sqlalchemy.url")
    if url:
        settings = settings.model_copy(update={"database_url": url})
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            _run_with(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
