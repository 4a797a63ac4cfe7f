"""Helpers for tests/api (imported as `api_helpers`; tests/ has no packages)."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi.testclient import TestClient

from kdiga_service import admin, crud
from kdiga_service.settings import Settings
from kdiga_service.storage import get_storage

MAX_UPLOAD = 64 * 1024
RUN_ID = uuid.uuid4().hex[:10]  # this test session's queue and database names
REDIS_URL = os.environ.get("KDIGA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def make_settings(home: Any, database_url: str, **overrides: Any) -> Settings:
    """Test settings: the real Redis on this run's queue names, small limits."""
    values: dict[str, Any] = {
        "home": home,
        "database_url": database_url,
        "broker_url": REDIS_URL,
        "storage_url": f"file://{home}/artifacts",
        "queue_train": f"kdiga_test_{RUN_ID}_train",
        "queue_eval": f"kdiga_test_{RUN_ID}_eval",
        "queue_validate": f"kdiga_test_{RUN_ID}_validate",
        "max_upload_bytes": MAX_UPLOAD,
        "max_concurrent_jobs_per_key": 2,
        "sse_poll_interval_s": 0.05,
        "auth_cache_ttl_s": 0,
    }
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


# a teacher for `ready_dataset`'s digits: 10 classes of 1×8×8 images (the API checks the shape at submit)
DIGITS_TEACHER = {"arch": "cnn_tiny", "num_classes": 10, "in_chans": 1, "img_size": 8, "name": "t"}


def ready_teacher(client: TestClient, headers: dict[str, str], meta: dict[str, Any] | None = None) -> str:
    """Upload a teacher (`DIGITS_TEACHER` unless ``meta``) and mark it validated, as the worker would."""
    r = upload_teacher(client, headers, meta=meta or DIGITS_TEACHER)
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


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run `app` under a real uvicorn server on a free loopback port (in a thread); yields its URL."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
