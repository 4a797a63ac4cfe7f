"""Engine and session factory, shared by the API and the worker.

SQLite (embedded default) gets WAL + busy_timeout so the API and one worker process can
write concurrently; PostgreSQL gets a sized connection pool. Engines are cached per URL;
a forked worker process must call `dispose_engines()` before first use.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from kdiga_service.settings import Settings, get_settings

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}


def make_engine(settings: Settings) -> Engine:
    """Build a new engine for `settings.database_url` (prefer `get_engine`, which caches)."""
    url = settings.database_url
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1].split("?")[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        pool = (
            {}
            if ":memory:" in url or url.rstrip("/") == "sqlite:"
            else {
                "pool_size": settings.db_pool_size,
                "max_overflow": settings.db_max_overflow,
                "pool_timeout": settings.db_pool_timeout_s,
            }
        )
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
        _install_sqlite_pragmas(engine, settings.sqlite_busy_timeout_ms)
        return engine
    return create_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_s,
        pool_pre_ping=True,
    )


def _install_sqlite_pragmas(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()


def get_engine(settings: Settings | None = None) -> Engine:
    """The cached engine for the given (or process-wide) settings."""
    settings = settings or get_settings()
    with _lock:
        engine = _engines.get(settings.database_url)
        if engine is None:
            engine = _engines[settings.database_url] = make_engine(settings)
        return engine


def get_sessionmaker(settings: Settings | None = None) -> sessionmaker[Session]:
    """The cached session factory (`expire_on_commit=False`) for the given settings."""
    settings = settings or get_settings()
    engine = get_engine(settings)
    with _lock:
        factory = _factories.get(settings.database_url)
        if factory is None:
            factory = _factories[settings.database_url] = sessionmaker(engine, expire_on_commit=False)
        return factory


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error (for workers and scripts)."""
    session = get_sessionmaker(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    """Drop every cached engine (call after fork, and in tests)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _factories.clear()
