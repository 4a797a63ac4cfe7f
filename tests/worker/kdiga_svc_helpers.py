"""Helpers shared by tests/worker, tests/e2e and tests/deploy: real databases, brokers and processes.

Each test run gets its own PostgreSQL database, Redis database number and queue names, so agents
and CI runs on the same machine do not see each other's work.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("KDIGA_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("KDIGA_TEST_REDIS", "redis://127.0.0.1:6379")

# A tiny, fast evaluation for tests: one short PGD, a one-point eps curve, nothing else.
TINY_EVAL: dict[str, Any] = {
    "attacks": [{"name": "pgd", "eps": 0.1, "steps": 2}], "max_points": 64, "eps_curve": [0.0, 0.1],
    "curve_attack_steps": 1, "alignment": False, "smoothing_sigma": 0.0, "latency": False, "batch_size": 64,
}


def tiny_job_request(dataset_id: str, teacher_id: str, *, epochs: int = 1, batch_size: int = 64,
                     method: str = "kdiga", name: str | None = None) -> dict[str, Any]:
    """A distill request (the POST /v1/jobs body) that runs in seconds on digits."""
    return {
        "kind": "distill", "name": name, "dataset_id": dataset_id, "teacher_id": teacher_id,
        "student": {"arch": "cnn_tiny"},
        "objective": {"method": method, "gamma": 1.0, "iga_mode": "finite_difference"},
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": 0.05, "device": "cpu"},
        "evaluation": TINY_EVAL,
    }


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2):
            return True
    except Exception:  # noqa: BLE001
        return False


def redis_available() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_BASE, socket_connect_timeout=2).ping())
    except Exception:  # noqa: BLE001
        return False


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database (SQLAlchemy URL), dropped afterwards."""
    import psycopg

    name = f"kdiga_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        from kdiga_service.db import dispose_engines

        dispose_engines()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_database() -> Iterator[str]:
    """A Redis URL on a randomly chosen database number (queue names are unique per run, see
    `unique_queues`, so runs sharing a number do not see each other's tasks)."""

    db = random.randint(1, 15)
    url = f"{REDIS_BASE}/{db}"
    yield url


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_queues() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"KDIGA_QUEUE_TRAIN": f"gpu-{tag}", "KDIGA_QUEUE_EVAL": f"cpu-{tag}", "KDIGA_QUEUE_VALIDATE": f"val-{tag}"}


def make_settings(home: Path, **overrides: Any):
    """A Settings object for a test (no environment variables needed)."""
    from kdiga_service.settings import Settings

    return Settings(home=home, **overrides)


def settings_env(settings, **extra: str) -> dict[str, str]:
    """The KDIGA_* environment that makes a subprocess use the same settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDIGA_")}
    env.update({
        "KDIGA_HOME": str(settings.home), "KDIGA_DATABASE_URL": settings.database_url,
        "KDIGA_BROKER_URL": settings.broker_url, "KDIGA_STORAGE_URL": settings.storage_url,
        "KDIGA_QUEUE_TRAIN": settings.queue_train, "KDIGA_QUEUE_EVAL": settings.queue_eval,
        "KDIGA_QUEUE_VALIDATE": settings.queue_validate,
        "KDIGA_PROGRESS_INTERVAL_S": str(settings.progress_interval_s),
        "KDIGA_HEARTBEAT_STALE_S": str(settings.heartbeat_stale_s),
        "KDIGA_VISIBILITY_TIMEOUT_S": str(settings.visibility_timeout_s),
        "KDIGA_TASK_MAX_RETRIES": str(settings.task_max_retries),
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    })
    env.update(extra)
    return env


def migrate(settings) -> None:
    from kdiga_service.migrate import upgrade_head

    upgrade_head(settings)


def create_owner(settings) -> tuple[str, str]:
    """A fresh API key: (key id, secret)."""
    from kdiga_service.admin import create_key
    from kdiga_service.db import get_sessionmaker

    with get_sessionmaker(settings)() as session:
        row, secret = create_key(session, name=f"test-{uuid.uuid4().hex[:6]}")
        return row.id, secret


def write_teacher_file(path: Path, *, arch: str = "cnn_tiny", seed: int = 0) -> Path:
    """A small digits model (1x8x8, 10 classes) as safetensors, made with kdiga_core."""
    import torch
    from safetensors.torch import save_file

    from kdiga_core.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, num_classes=10, in_chans=1, img_size=8)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


TEACHER_META = {"name": "tiny teacher", "arch": "cnn_tiny", "num_classes": 10, "in_chans": 1, "img_size": 8}


def seed_rows(settings, owner_id: str, teacher_file: Path) -> dict[str, str]:
    """A ready digits dataset and a ready teacher, written straight to the database and store."""
    from kdiga_service import crud
    from kdiga_service.db import get_sessionmaker
    from kdiga_service.models import READY, Dataset
    from kdiga_service.storage import get_storage

    store = get_storage(settings)
    stored = store.upload_file(teacher_file, f"teachers/{uuid.uuid4().hex}.safetensors")
    spec = {k: v for k, v in TEACHER_META.items() if k != "name"}
    with get_sessionmaker(settings)() as session:
        teacher = crud.create_teacher(session, owner_id=owner_id, name="teacher", format="safetensors",
                                      stored=stored, spec=spec, status=READY)
        dataset = Dataset(owner_id=owner_id, name="digits", kind="builtin", builtin="digits", status=READY,
                          num_classes=10, input_shape=[1, 8, 8])
        session.add(dataset)
        session.commit()
        return {"teacher_id": teacher.id, "dataset_id": dataset.id}


def create_job_row(settings, owner_id: str, request: dict[str, Any]) -> str:
    """A queued job row shaped like the API's (spec = the request plus defaults), on the API's queue."""
    from kdiga_service.db import get_sessionmaker
    from kdiga_service.models import Job
    from kdiga_service.queue import job_queue

    spec = {**request, "model": request.get("model")}
    devices = int((request.get("resources") or {}).get("devices_per_node", 1))
    with get_sessionmaker(settings)() as session:
        job = Job(owner_id=owner_id, kind=request["kind"], name=request.get("name"),
                  queue=job_queue(settings, request["kind"], devices),
                  spec=spec, dataset_id=request["dataset_id"], teacher_id=request.get("teacher_id"),
                  progress={"phase": "queued", "percent": 0.0}, labels=request.get("labels") or {})
        session.add(job)
        session.commit()
        return job.id


def job_row(settings, job_id: str):
    from kdiga_service.db import get_sessionmaker
    from kdiga_service.models import Job

    with get_sessionmaker(settings)() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def artifacts_of(settings, job_id: str) -> list[Any]:
    from sqlalchemy import select

    from kdiga_service.db import get_sessionmaker
    from kdiga_service.models import Artifact

    with get_sessionmaker(settings)() as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
        for row in rows:
            session.expunge(row)
        return list(rows)


def start_worker(env: dict[str, str], log_path: Path, *, queues: str | None = None,
                 pool: str = "prefork") -> subprocess.Popen:
    """A real worker process (`python -m worker`) in its own process group, logging to `log_path`."""
    cmd = [sys.executable, "-m", "worker", "--concurrency", "1", "--pool", pool,
           "--hostname", f"test-{uuid.uuid4().hex[:6]}@%h"]
    if queues:
        cmd += ["--queues", queues]
    out = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        out.close()


def stop_process(proc: subprocess.Popen, *, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Signal the whole process group; SIGKILL it if it does not exit in time."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


def wait_for(predicate: Callable[[], Any], timeout: float, *, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_worker_ready(log_path: Path, timeout: float = 60.0) -> None:
    wait_for(lambda: log_path.exists() and b" ready." in log_path.read_bytes(), timeout, what=f"worker ready ({log_path})")


def counting_store(settings: Any) -> Any:
    """The settings' real artifact store, recording every object written through it in `.written`
    as (key, bytes): what an upload sent, on file:// or S3 alike."""
    from kdiga_service.storage import ArtifactStore

    class CountingStore(ArtifactStore):
        written: list[tuple[str, int]]

        def write_stream(self, key: str, chunks: Any, *, max_bytes: int | None = None) -> Any:
            stored = super().write_stream(key, chunks, max_bytes=max_bytes)
            self.written.append((key, stored.size_bytes))
            return stored

    store = CountingStore.from_settings(settings)
    store.written = []
    return store
