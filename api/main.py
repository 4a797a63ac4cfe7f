"""The FastAPI application factory: `uvicorn --factory api.main:create_app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI

from api import admin
from api.auth import AuthCache
from api.db import get_sessionmaker
from api.errors import install_error_handlers
from api.metrics import Metrics, MetricsMiddleware
from api.routes import artifacts, catalog, datasets, health, jobs, teachers
from api.settings import Settings, get_settings
from api.storage import get_storage

log = logging.getLogger("kdiga.api")


def _start_up(settings: Settings) -> None:
    if settings.run_migrations:
        from api.migrate import upgrade_head  # alembic is only needed here

        upgrade_head(settings)
    if settings.bootstrap_admin_key is not None:
        with get_sessionmaker(settings)() as session:
            admin.ensure_key(session, secret=settings.bootstrap_admin_key.get_secret_value())


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for `settings` (default: the environment's)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await to_thread.run_sync(_start_up, settings)
        log.info("kdiga api ready (database %s)", settings.database_url.split("@")[-1])
        yield

    app = FastAPI(
        title="kdiga",
        summary="Compress an adversarially robust teacher into a small student that keeps its robustness.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.sessionmaker = get_sessionmaker(settings)
    app.state.storage = get_storage(settings)
    app.state.metrics = Metrics(app.state.sessionmaker)
    app.state.auth_cache = AuthCache(settings.auth_cache_ttl_s)
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.include_router(health.router)
    for module in (teachers, datasets, jobs, artifacts, catalog):
        app.include_router(module.router, prefix="/v1")
    return app
