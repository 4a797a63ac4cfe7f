"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import SettingsDep
from api.errors import ERROR_DESCRIPTIONS, RETRY_AFTER_HEADER, NotReadyPublic, error_responses
from api.publish import ping_broker
from api.routing import KdigaRoute
from api.schemas import HealthPublic

router = APIRouter(tags=["health"], route_class=KdigaRoute, responses=error_responses(422))

METRICS_TOKEN_NEEDED = "This server's /metrics needs its operator token: 'Authorization: Bearer <KDIGA_METRICS_TOKEN>'."


@router.get("/healthz", response_model=HealthPublic)
def read_health() -> HealthPublic:
    """Liveness: the process answers."""
    return HealthPublic(status="ok")


def _database_ok(request: Request) -> bool:
    try:
        with request.app.state.sessionmaker() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return False


@router.get("/readyz", response_model=HealthPublic, responses={
    503: {"model": NotReadyPublic, "description": ERROR_DESCRIPTIONS[503], "headers": RETRY_AFTER_HEADER}})
def read_ready(request: Request, settings: SettingsDep) -> Response | HealthPublic:
    """Readiness: the database answers SELECT 1 and the broker answers a ping (each bounded in time)."""
    checks = {
        "database": "ok" if _database_ok(request) else "unreachable",
        "broker": "ok" if ping_broker(settings) else "unreachable",
    }
    failed = [name for name, state in checks.items() if state != "ok"]
    if failed:
        detail = (
            f"Not ready: the {' and the '.join(failed)} {'is' if len(failed) == 1 else 'are'} unreachable."
        )
        return JSONResponse(status_code=503, content={"detail": detail, "checks": checks},
                            headers={"Retry-After": str(settings.retry_after_s)})
    return HealthPublic(status="ready", checks=checks)


def _check_metrics_token(request: Request, settings: SettingsDep) -> bool:
    """True when the caller may see the tenant-wide jobs gauge (the operator's token was sent)."""
    if settings.metrics_token is None:
        return False
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = settings.metrics_token.get_secret_value()
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, METRICS_TOKEN_NEEDED, headers={"WWW-Authenticate": "Bearer"})
    return True


@router.get("/metrics", include_in_schema=False)
def read_metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus metrics.

    With `KDIGA_METRICS_TOKEN` set, only that bearer token reads them, and they include the jobs
    gauge (job counts by status over all keys). Unset, /metrics is open and tenant-neutral: request
    counts and latency by route template (no ids), no job counts.
    """
    metrics = request.app.state.metrics
    registry = metrics.scrape_registry if _check_metrics_token(request, settings) else metrics.neutral_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
