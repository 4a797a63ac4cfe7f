"""Fixtures: one app per database backend (SQLite file, and a throw-away PostgreSQL database),
both publishing to the real Redis on per-run queue names that no worker consumes.

Tests isolate themselves by owner: every test gets fresh API keys, so the apps (and their
migrated databases) are shared across the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from api_helpers import REDIS_URL, RUN_ID, make_settings, new_key
from fastapi.testclient import TestClient

from api.main import create_app
from kdiga_service.db import dispose_engines
from kdiga_service.settings import Settings

PG_ADMIN_URL = os.environ.get("KDIGA_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


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


@pytest.fixture(scope="session")
def pg_database(pg_url: str) -> Iterator[Any]:
    """`pg_database(tag)`: one more fresh database (URL), for an app that must not share `pg_url`'s
    (its background work, e.g. webhook deliveries, would meet the shared app's); dropped at the end."""
    made: list[str] = []

    def create(tag: str) -> str:
        name = f"kdiga_test_{RUN_ID}_{tag}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return pg_url.rsplit("/", 1)[0] + f"/{name}"

    yield create
    dispose_engines()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
