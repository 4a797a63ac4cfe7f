"""Prometheus metrics: request counts and latency by route template, jobs by status (read at scrape)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kdiga_service.models import Job

JOB_STATES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled", "stopped")


class JobsCollector(Collector):
    """`kdiga_jobs{status=...}`: a COUNT(*) GROUP BY status at each scrape."""

    def __init__(self, session_factory: Callable[[], Session]):
        self.session_factory = session_factory

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("kdiga_jobs", "Jobs by status.", labels=["status"])
        counts = dict.fromkeys(JOB_STATES, 0)
        try:
            with self.session_factory() as session:
                counts.update(
                    session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all()
                )
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is down
            return
        for state, n in counts.items():
            gauge.add_metric([state], n)
        yield gauge


class Metrics:
    """One registry per app (several apps can live in one test process)."""

    def __init__(self, session_factory: Callable[[], Session]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kdiga_http_requests", "HTTP requests.", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "kdiga_http_request_duration_seconds",
            "HTTP request latency.",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.neutral_registry = self._scrape_registry()
        self.scrape_registry = self._scrape_registry(JobsCollector(session_factory))

    def _scrape_registry(self, jobs: JobsCollector | None = None) -> CollectorRegistry:
        """What /metrics exposes: request metrics (this process's, or with several API processes
        all of theirs), plus the jobs gauge for the operator (`jobs`).

        Under `uvicorn --workers N` each process counts its own requests; prometheus_client's
        multiprocess mode (PROMETHEUS_MULTIPROC_DIR set before start-up) writes them to files
        that any process's scrape adds up. The jobs gauge is read from the database either way.
        """
        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
        else:
            registry.register(_Forward(self.registry))
        if jobs is not None:
            registry.register(jobs)
        return registry


class _Forward(Collector):
    """Exposes another registry's metrics (so two scrape registries share one set of counters)."""

    def __init__(self, source: CollectorRegistry):
        self.source = source

    def collect(self) -> Iterator[Any]:
        yield from self.source.collect()


class MetricsMiddleware:
    """Pure ASGI middleware (cheap): counts and times every HTTP request by its route template."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # FastAPI keeps the full template (with the /v1 prefix) on the effective route context.
            ctx = (scope.get("fastapi") or {}).get("effective_route_context")
            route = getattr(ctx, "path", None) or getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "GET")
            self.metrics.requests.labels(method, route, str(status[0])).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
