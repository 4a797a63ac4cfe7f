"""The FastAPI application factory: `uvicorn --factory api.main:create_app`."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio import to_thread
from fastapi import FastAPI

from api.auth import AuthCache
from api.docs import install_docs
from api.errors import RetryAfterMiddleware, install_error_handlers
from api.job_watch import JobWatcher
from api.metrics import Metrics, MetricsMiddleware
from api.openapi import install_openapi
from api.pump import pump_forever
from api.request_id import RequestIdMiddleware
from api.routes import artifacts, catalog, console, datasets, health, jobs, pipelines, teachers, webhooks
from api.status_reader import StatusReader
from api.sweeper import Retention, resend_stale, sweep_webhook_outbox
from kdiga_service import admin
from kdiga_service.db import get_engine, get_sessionmaker
from kdiga_service.settings import Settings, get_settings
from kdiga_service.storage import get_storage

log = logging.getLogger("kdiga.api")


def _start_up(settings: Settings) -> None:
    if settings.run_migrations:
        from kdiga_service.migrate import upgrade_head  # alembic is only needed here

        upgrade_head(settings)
    if settings.bootstrap_admin_key is not None:
        with get_sessionmaker(settings)() as session:
            admin.ensure_key(session, secret=settings.bootstrap_admin_key.get_secret_value())


async def _sweep_forever(app: FastAPI) -> None:
    """Every `requeue_check_s`, re-send the tasks that nobody took, delete the checkpoints of jobs
    ended longer ago than their retention, and the webhook events done longer ago than theirs
    (api/sweeper.py)."""
    settings = app.state.settings
    retention = Retention()
    while True:
        await anyio.sleep(settings.requeue_check_s)
        try:
            if settings.requeue_after_s > 0:
                await to_thread.run_sync(resend_stale, app.state.sessionmaker, settings)
            # the outbox before the store's pass: an S3 outage must not stop it
            await to_thread.run_sync(sweep_webhook_outbox, app.state.sessionmaker, settings)
            await to_thread.run_sync(retention.sweep, app.state.sessionmaker, settings, app.state.storage)
        except Exception:  # noqa: BLE001 - a failed sweep (database down) must not stop the next one
            log.exception("sweeper: the sweep failed; trying again in %.0f s", settings.requeue_check_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for `settings` (default: the environment's)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await to_thread.run_sync(_start_up, settings)
        # Move everything loaded so far (FastAPI, SQLAlchemy, pydantic: ~10^5 objects) out of the
        # collector's reach, so that full collections under load do not rescan them (cheap; it made
        # no measurable difference to the p99 of status reads, BENCHMARKS.md).
        gc.collect()
        gc.freeze()
        log.info("kdiga api ready (database %s)", settings.database_url.split("@")[-1])
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_sweep_forever, app)
            tasks.start_soon(pump_forever, app)  # webhook events and pipeline steps (api/pump.py)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()
                await app.state.job_watcher.close()
                app.state.status_reader.close()

    app = FastAPI(
        title="kdiga",
        summary="Compress an adversarially robust teacher into a small student that keeps its robustness.",
        version="1.0.0",
        lifespan=lifespan,
        # operationId = the route function's name (create_job, read_job, ...): generated clients get
        # readable names (FastAPI's default appends the path and method).
        generate_unique_id_function=lambda route: route.name,
        docs_url=None,  # served from the fastapi-offline package's assets (api/docs.py), never a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.status_reader = StatusReader(get_engine(settings))
    app.state.sessionmaker = get_sessionmaker(settings)
    app.state.storage = get_storage(settings)
    app.state.metrics = Metrics(app.state.sessionmaker)
    app.state.auth_cache = AuthCache(settings.auth_cache_ttl_s)
    app.state.job_watcher = JobWatcher(get_engine(settings), settings.sse_poll_interval_s, inline=settings.is_sqlite)
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RetryAfterMiddleware, seconds=settings.retry_after_s)
    # Outside Starlette's ServerErrorMiddleware (which answers 500s), so even a 500 has its id.
    build_stack = app.build_middleware_stack
    app.build_middleware_stack = lambda: RequestIdMiddleware(build_stack())  # type: ignore[method-assign,assignment,return-value]
    # Jobs first: routes are matched in order, and job-status polls are most of the traffic.
    for module in (jobs, teachers, datasets, artifacts, catalog, webhooks, pipelines):
        app.include_router(module.router, prefix="/v1")
    app.include_router(health.router)
    console.install(app)
    install_docs(app)
    install_openapi(app)
    return app
