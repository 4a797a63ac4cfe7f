"""Helpers for tests/api (imported as `api_helpers`; tests/ has no packages)."""

from __future__ import annotations

import json
import os
import struct
import uuid
from typing import Any

from fastapi.testclient import TestClient

from kdiga_service import admin, crud
from kdiga_service.settings import Settings
from kdiga_service.storage import get_storage

MAX_UPLOAD = 64 * 1024
REDIS_URL = os.environ.get("KDIGA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:10]


def make_settings(home: Any, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        home=home,
        database_url=database_url,
        broker_url=REDIS_URL,
        storage_url=f"file://{home}/artifacts",
        queue_train=f"kdiga_test_{RUN_ID}_train",
        queue_eval=f"kdiga_test_{RUN_ID}_eval",
        max_upload_bytes=MAX_UPLOAD,
        max_concurrent_jobs_per_key=2,
        sse_poll_interval_s=0.05,
        auth_cache_ttl_s=0,
    )
    values.update(overrides)
    return Settings(**values)


def new_key(client: TestClient, name: str = "user", **kw: Any) -> tuple[dict[str, str], str]:
    """Create a key directly (as `kdiga admin keys create` does); returns (headers, key id)."""
    with client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        row, secret = admin.create_key(session, name=name, **kw)
        return {"Authorization": f"Bearer {secret}"}, row.id


def safetensors_bytes(n: int = 4) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * (4 * n)


def upload_teacher(
    client: TestClient,
    headers: dict[str, str],
    data: bytes | None = None,
    meta: dict[str, Any] | None = None,
    filename: str = "teacher.safetensors",
) -> Any:
    metadata = json.dumps(meta if meta is not None else {"arch": "cnn_tiny", "num_classes": 10, "name": "t"})
    return client.post(
        "/v1/teachers",
        headers=headers,
        files={"file": (filename, data or safetensors_bytes())},
        data={"metadata": metadata},
    )


def ready_teacher(client: TestClient, headers: dict[str, str]) -> str:
    """Upload a teacher and mark it validated, as the worker would."""
    r = upload_teacher(client, headers)
    assert r.status_code == 202, r.text
    with client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        assert crud.set_teacher_validated(session, r.json()["id"], spec=r.json()["spec"])
    return str(r.json()["id"])


def ready_dataset(client: TestClient, headers: dict[str, str], builtin: str = "digits") -> str:
    r = client.post("/v1/datasets", headers=headers, json={"builtin": builtin})
    assert r.status_code == 202, r.text
    info = {
        "num_classes": 10,
        "class_names": [str(i) for i in range(10)],
        "input_shape": [1, 8, 8],
        "train_size": 1000,
        "test_size": 797,
    }
    with client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        assert crud.set_dataset_validated(session, r.json()["id"], info=info)
    return str(r.json()["id"])


def distill_body(dataset_id: str, teacher_id: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "distill",
        "dataset_id": dataset_id,
        "teacher_id": teacher_id,
        "student": {"arch": "cnn_tiny"},
        "train": {"epochs": 1},
    }
    body.update(extra)
    return body


def finish(client: TestClient, job_id: str, *, artifacts: dict[str, bytes] | None = None) -> None:
    """Run a job's life cycle through the worker-side helpers: claim, store artifacts, succeed."""
    store = get_storage(client.app.state.settings)  # type: ignore[attr-defined]
    with client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        job = crud.claim_job(session, job_id, "test-worker")
        assert job is not None
        for kind, data in (artifacts or {}).items():
            stored = store.write_bytes(f"jobs/{job_id}/{kind}", data)
            crud.add_artifact(session, job=job, name=f"{kind}.bin", kind=kind, stored=stored)
        assert crud.finish_job(session, job_id, result={"ok": True}, worker_id="test-worker")
