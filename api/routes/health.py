"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import SettingsDep
from api.publish import ping_broker
from api.schemas import HealthPublic

router = APIRouter(tags=["health"])


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


@router.get("/readyz", response_model=HealthPublic, responses={503: {"description": "A dependency is down."}})
def read_ready(request: Request, settings: SettingsDep) -> Response | HealthPublic:
    """Readiness: the database answers SELECT 1 and the broker answers a ping."""
    checks = {
        "database": "ok" if _database_ok(request) else "unreachable",
        "broker": "ok" if ping_broker(settings) else "unreachable",
    }
    failed = [name for name, state in checks.items() if state != "ok"]
    if failed:
        detail = (
            f"Not ready: the {' and the '.join(failed)} {'is' if len(failed) == 1 else 'are'} unreachable."
        )
        return JSONResponse(status_code=503, content={"detail": detail, "checks": checks})
    return HealthPublic(status="ready", checks=checks)


@router.get("/metrics", include_in_schema=False)
def read_metrics(request: Request) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(request.app.state.metrics.scrape_registry), media_type=CONTENT_TYPE_LATEST)
