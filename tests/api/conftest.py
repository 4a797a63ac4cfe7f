"""Fixtures: one app per database backend (SQLite file, and a throw-away PostgreSQL database),
both publishing to the real Redis on per-run queue names that no worker consumes.

Tests isolate themselves by owner: every test gets fresh API keys, so the apps (and their
migrated databases) are shared across the session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from api_helpers import MAX_UPLOAD, REDIS_URL, new_key
from fastapi.testclient import TestClient

from api.main import create_app
from kdiga_service.db import dispose_engines
from kdiga_service.settings import Settings

PG_ADMIN_URL = os.environ.get("KDIGA_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
RUN_ID = uuid.uuid4().hex[:10]


def _redis_ok() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _pg_ok() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    if not _redis_ok():
        pytest.skip(f"Redis is not reachable at {REDIS_URL}")
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    keys = list(client.scan_iter(f"kdiga_test_{RUN_ID}*"))
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    if not _pg_ok():
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}")
    name = f"kdiga_test_{RUN_ID}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    dispose_engines()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_settings(home: Any, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        home=home,
        database_url=database_url,
        broker_url=REDIS_URL,
        storage_url=f"file://{home}/artifacts",
        queue_train=f"kdiga_test_{RUN_ID}_train",
        queue_eval=f"kdiga_test_{RUN_ID}_eval",
        max_upload_bytes=MAX_UPLOAD,
        max_concurrent_jobs_per_key=2,
        sse_poll_interval_s=0.05,
        auth_cache_ttl_s=0,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def app_client(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    redis_client: redis.Redis,
) -> Iterator[TestClient]:
    home = tmp_path_factory.mktemp(f"home-{backend}")
    url = request.getfixturevalue("pg_url") if backend == "postgres" else f"sqlite:///{home}/kdiga.db"
    app = create_app(make_settings(home, url))
    with TestClient(app) as client:
        yield client


@pytest.fixture
def client(app_client: TestClient) -> TestClient:
    return app_client


@pytest.fixture
def settings(client: TestClient) -> Settings:
    return client.app.state.settings  # type: ignore[attr-defined,no-any-return]


@pytest.fixture
def owner(client: TestClient) -> dict[str, str]:
    return new_key(client, "owner")[0]


@pytest.fixture
def other(client: TestClient) -> dict[str, str]:
    return new_key(client, "other")[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that publish to the broker carry the `redis` marker (select with -m)."""
    for item in items:
        if "redis_client" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.redis)
