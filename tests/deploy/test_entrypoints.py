"""Every image entrypoint command exists and starts outside a container (same scripts, local env)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, inspect, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))

import kdiga_svc_helpers as h  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.sh"
BOOTSTRAP_KEY = "kdg_" + "b" * 40


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDIGA_")}
    env.update({"PYTHON": sys.executable, "KDIGA_HOME": str(tmp_path / "home"), "HOSTNAME": f"t{uuid.uuid4().hex[:8]}",
                "KDIGA_STORAGE_URL": f"file://{tmp_path / 'artifacts'}"})
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout, cwd="/")


def test_scripts_are_executable():
    for script in (ENTRYPOINT, HEALTHCHECK, ROOT / "docker" / "wait_and_migrate.py"):
        assert script.exists()
    assert os.access(ENTRYPOINT, os.X_OK) and os.access(HEALTHCHECK, os.X_OK)


def _check_migrated(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"api_keys", "teachers", "datasets", "jobs", "artifacts", "alembic_version"} <= tables
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM api_keys WHERE is_admin")).scalar() == 1
    finally:
        engine.dispose()


def test_migrate_on_sqlite_is_idempotent(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'kdiga.db'}"
    env = base_env(tmp_path, KDIGA_DATABASE_URL=db_url, KDIGA_BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_KEY)
    for _ in range(2):  # a restarted one-shot must succeed again
        result = run([ENTRYPOINT, "migrate"], env)
        assert result.returncode == 0, result.stderr
        assert '{"migrated": true}' in result.stdout
    _check_migrated(db_url)


@pytest.mark.postgres
@pytest.mark.skipif(not h.postgres_available(), reason="needs the PostgreSQL server")
def test_migrate_on_postgres(tmp_path):
    with h.postgres_database() as db_url:
        env = base_env(tmp_path, KDIGA_DATABASE_URL=db_url, KDIGA_BOOTSTRAP_ADMIN_KEY=BOOTSTRAP_KEY)
        result = run([ENTRYPOINT, "migrate"], env)
        assert result.returncode == 0, result.stderr
        _check_migrated(db_url)


def test_migrate_waits_then_gives_up_on_an_unreachable_database(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    env = base_env(tmp_path, KDIGA_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{port}/x")
    result = run([ENTRYPOINT, "migrate", "--timeout", "2"], env)
    assert result.returncode == 1
    assert "waiting for the database" in result.stderr and "did not answer" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.skipif(not h.redis_available(), reason="needs the Redis server")
def test_api_entrypoint_serves_healthz(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'kdiga.db'}"
    port = _free_port()
    env = base_env(tmp_path, KDIGA_DATABASE_URL=db_url, KDIGA_BROKER_URL=f"{h.REDIS_BASE}/1",
                   KDIGA_API_HOST="127.0.0.1", KDIGA_API_PORT=str(port), KDIGA_API_WORKERS="1")
    assert run([ENTRYPOINT, "migrate"], env).returncode == 0
    proc = subprocess.Popen(["sh", str(ENTRYPOINT), "api"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        h.wait_for(lambda: _healthy(port) or proc.poll() is not None, 60, what="the API")
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
        assert run([HEALTHCHECK, "api"], env, timeout=30).returncode == 0
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    finally:
        h.stop_process(proc)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.skipif(not h.redis_available(), reason="needs the Redis server")
def test_worker_entrypoint_starts_and_answers_its_healthcheck(tmp_path):
    queues = h.unique_queues()
    env = base_env(tmp_path, KDIGA_DATABASE_URL=f"sqlite:///{tmp_path / 'kdiga.db'}",
                   KDIGA_BROKER_URL=f"{h.REDIS_BASE}/1", KDIGA_WORKER_QUEUES=queues["KDIGA_QUEUE_TRAIN"], **queues)
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(["sh", str(ENTRYPOINT), "worker"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        h.wait_worker_ready(log_path)
        text_ = log_path.read_text()
        assert f"kdiga@{env['HOSTNAME']} ready." in text_ and queues["KDIGA_QUEUE_TRAIN"] in text_
        check = run([HEALTHCHECK, "worker"], env, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "pong" in check.stdout
    finally:
        h.stop_process(proc)
    assert proc.returncode == 0  # SIGTERM: a clean warm shutdown
