"""/healthz, /readyz (database + broker), /metrics."""

from __future__ import annotations

from api_helpers import new_key
from fastapi.testclient import TestClient

from api.main import create_app
from api.routes.health import METRICS_TOKEN_NEEDED
from kdiga_service.settings import Settings


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}


def test_readyz_broker_down_503(tmp_path):
    settings = Settings(home=tmp_path, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as client:
        r = client.get("/readyz")
    assert r.status_code == 503 and r.headers["retry-after"] == str(settings.retry_after_s)
    assert r.json() == {
        "detail": "Not ready: the broker is unreachable.",
        "checks": {"database": "ok", "broker": "unreachable"},
    }


def test_readyz_database_down_503(tmp_path, redis_client):
    settings = Settings(
        home=tmp_path,
        run_migrations=False,
        broker_url="redis://127.0.0.1:6379/0",
        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
    )
    with TestClient(create_app(settings)) as client:
        r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {
        "detail": "Not ready: the database is unreachable.",
        "checks": {"database": "unreachable", "broker": "ok"},
    }


def test_metrics_without_token_are_tenant_neutral(client):
    headers, _ = new_key(client)
    client.get("/v1/jobs", headers=headers)
    client.get("/v1/jobs/nope", headers=headers)
    text = client.get("/metrics").text
    assert 'kdiga_http_requests_total{method="GET",route="/v1/jobs",status="200"}' in text
    assert 'kdiga_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"}' in text
    assert "kdiga_http_request_duration_seconds_bucket" in text
    assert "kdiga_jobs" not in text and "nope" not in text


def test_metrics_behind_the_operator_token(tmp_path, redis_client):
    settings = Settings(home=tmp_path, broker_url="redis://127.0.0.1:6379/0", metrics_token="op-secret")
    with TestClient(create_app(settings)) as client:
        refused = client.get("/metrics")
        wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})
        text = client.get("/metrics", headers={"Authorization": "Bearer op-secret"}).text
    assert refused.status_code == wrong.status_code == 401
    assert refused.json() == {"detail": METRICS_TOKEN_NEEDED} and refused.headers["www-authenticate"] == "Bearer"
    assert 'kdiga_jobs{status="queued"}' in text and "kdiga_http_requests_total" in text


def test_openapi_lists_v1_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/teachers",
        "/v1/datasets",
        "/v1/jobs",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/report",
        "/v1/artifacts/{artifact_id}",
        "/v1/catalog",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    assert "multipart/form-data" in paths["/v1/teachers"]["post"]["requestBody"]["content"]
    # one body per operation: generated clients cannot build an operation with two (issue 17)
    assert list(paths["/v1/datasets"]["post"]["requestBody"]["content"]) == ["multipart/form-data"]
    assert list(paths["/v1/datasets/builtin"]["post"]["requestBody"]["content"]) == ["application/json"]
