"""`alembic upgrade head` then `alembic check` (models and revisions agree) on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from alembic import command
from sqlalchemy import create_engine, inspect

from kdiga_service.migrate import alembic_config
from kdiga_service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"alembic_version", "api_keys", "artifacts", "datasets", "jobs", "teachers", "pipelines",
          "webhook_secrets", "webhook_events", "webhook_deliveries", "console_sessions"}


def _upgrade_check_downgrade(settings: Settings) -> None:
    cfg = alembic_config(settings)
    command.upgrade(cfg, "head")
    command.check(cfg)  # raises if autogenerate would find a difference
    engine = create_engine(settings.database_url)
    assert set(inspect(engine).get_table_names()) == TABLES
    command.downgrade(cfg, "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    engine.dispose()


def test_sqlite(tmp_path):
    _upgrade_check_downgrade(Settings(home=tmp_path))


@pytest.mark.postgres
def test_postgres(pg_url):
    admin_url = pg_url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)[0] + "/postgres"
    name = f"kdiga_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        _upgrade_check_downgrade(Settings(database_url=pg_url.rsplit("/", 1)[0] + f"/{name}"))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_alembic_command_line(tmp_path):
    """The CLI reads KDIGA_DATABASE_URL through kdiga_service.settings (alembic.ini has no URL)."""
    env = {
        "KDIGA_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db",
        "KDIGA_HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    code = "from alembic.config import main; main(['upgrade', 'head']); main(['check'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "No new upgrade operations detected." in out.stdout + out.stderr
