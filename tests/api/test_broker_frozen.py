"""A frozen broker (a real redis-server stopped with SIGSTOP: it accepts connections, never answers):
every POST that publishes and /readyz answer 503 with Retry-After within seconds, and nothing is
left behind (no row, no file). Both database backends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from api_helpers import distill_body, make_settings, new_key, ready_dataset, ready_teacher, safetensors_bytes
from fastapi.testclient import TestClient

from api.main import create_app
from api.publish import close_all
from api.routes._common import QUEUE_DOWN

BOUND_S = 6.0  # KDIGA_PUBLISH_TIMEOUT_S is 2 s: a publish gives up in about that (one retry); slack for load


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def own_redis() -> Iterator[tuple[str, subprocess.Popen]]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if redis.Redis.from_url(url, socket_timeout=0.5).ping():
                break
        except redis.RedisError:
            time.sleep(0.05)
    yield url, proc
    os.kill(proc.pid, signal.SIGCONT)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def frozen_client(backend, request, tmp_path, own_redis) -> Iterator[TestClient]:
    url = request.getfixturevalue("pg_url") if backend == "postgres" else f"sqlite:///{tmp_path}/f.db"
    settings = make_settings(tmp_path, url, broker_url=own_redis[0], requeue_after_s=0)
    with TestClient(create_app(settings)) as client:
        yield client
    close_all()


def _timed(call):
    start = time.monotonic()
    response = call()
    return response, time.monotonic() - start


def _files(client, kind: str) -> int:
    root = Path(client.app.state.settings.home) / "artifacts" / kind
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def test_a_frozen_broker_is_a_503_with_retry_after_and_nothing_half_written(frozen_client, own_redis):
    client, proc = frozen_client, own_redis[1]
    owner, _ = new_key(client)
    dataset_id, teacher_id = ready_dataset(client, owner), ready_teacher(client, owner)  # broker still answers
    jobs_before = client.get("/v1/jobs", headers=owner).json()["count"]
    teachers_before, files_before = client.get("/v1/teachers", headers=owner).json()["count"], _files(client, "teachers")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        calls = {
            "job": lambda: client.post("/v1/jobs", headers={**owner, "Idempotency-Key": "k1"},
                                       json=distill_body(dataset_id, teacher_id)),
            "teacher": lambda: client.post("/v1/teachers", headers=owner,
                                           files={"file": ("t.safetensors", safetensors_bytes())},
                                           data={"metadata": json.dumps({"arch": "cnn_tiny", "num_classes": 10})}),
            "builtin": lambda: client.post("/v1/datasets/builtin", headers=owner, json={"builtin": "digits"}),
        }
        for what, call in calls.items():
            r, took = _timed(call)
            assert r.status_code == 503, (what, r.text)
            assert r.json() == {"detail": QUEUE_DOWN} and r.headers["retry-after"].isdigit(), what
            assert took < BOUND_S, (what, took)
        r, took = _timed(lambda: client.get("/readyz"))
        assert r.status_code == 503 and r.json()["checks"]["broker"] == "unreachable" and took < BOUND_S
        assert "retry-after" in r.headers
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # nothing was created: no job, no teacher row or file, one dataset (the one made before)
    assert client.get("/v1/jobs", headers=owner).json()["count"] == jobs_before
    assert client.get("/v1/teachers", headers=owner).json()["count"] == teachers_before
    assert _files(client, "teachers") == files_before
    assert client.get("/v1/datasets", headers=owner).json()["count"] == 1
    # the broker is back: the same Idempotency-Key creates the job now (the 503 kept nothing)
    r = client.post("/v1/jobs", headers={**owner, "Idempotency-Key": "k1"}, json=distill_body(dataset_id, teacher_id))
    assert r.status_code == 201, r.text
