"""Run Alembic migrations from code (API start-up, `kdiga serve`, tests)."""

from __future__ import annotations

import fcntl
from pathlib import Path

from alembic import command
from alembic.config import Config

from kdiga_service.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(settings: Settings | None = None) -> Config:
    """An Alembic Config pointing at our migrations and at `settings.database_url`."""
    settings = settings or get_settings()
    cfg = Config(str(ROOT / "alembic.ini")) if (ROOT / "alembic.ini").exists() else Config()
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", settings.database_url.replace("%", "%%"))
    return cfg


def upgrade_head(settings: Settings | None = None) -> None:
    """`alembic upgrade head` for these settings; one process at a time (API workers may start together)."""
    settings = settings or get_settings()
    if not settings.is_sqlite:  # PostgreSQL: migrations/env.py takes an advisory lock
        command.upgrade(alembic_config(settings), "head")
        return
    settings.home.mkdir(parents=True, exist_ok=True)
    with open(settings.home / ".migrate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            command.upgrade(alembic_config(settings), "head")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
