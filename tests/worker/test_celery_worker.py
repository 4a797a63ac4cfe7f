"""The tasks through a real Celery worker process on PostgreSQL + Redis, enqueued like the API does."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import kdiga_svc_helpers as h
import pytest
from sqlalchemy import update

from api.publish import close_all, enqueue
from kdiga_service.db import get_sessionmaker
from kdiga_service.models import Job, utcnow
from kdiga_service.queue import RUN_JOB, VALIDATE_DATASET, VALIDATE_TEACHER
from kdiga_service.storage import get_storage
from worker.runner import checkpoint_prefix

ROOT = Path(__file__).resolve().parents[2]
needs_services = pytest.mark.skipif(not (h.postgres_available() and h.redis_available()),
                                    reason="needs the PostgreSQL and Redis servers")


def test_worker_modules_import_no_torch():
    code = ("import sys, json, worker.celery_app, worker.tasks, worker.runner, worker.launcher; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "torch" not in loaded and "kdiga_core" not in loaded


def test_celery_configuration():
    from worker.celery_app import celery_config, restore_interval_s

    s = h.make_settings(Path("/tmp/unused"), visibility_timeout_s=7200, job_soft_time_limit_s=3000,
                        job_hard_time_limit_s=3600)
    conf = celery_config(s)
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_soft_time_limit"] < conf["task_time_limit"] < conf["broker_transport_options"]["visibility_timeout"]
    assert conf["broker_transport_options"]["unacked_restore_throttle"] == 1
    assert conf["task_routes"]["kdiga.run_job"]["queue"] == s.queue_train
    assert conf["task_routes"]["kdiga.validate_teacher"]["queue"] == s.queue_validate
    assert restore_interval_s(5) == 1 and restore_interval_s(43200) == 60


@pytest.fixture(scope="module")
def backend(tmp_path_factory, teacher_file):
    """PostgreSQL + Redis settings, an owner, ready rows, and one worker process on both queues."""
    if not (h.postgres_available() and h.redis_available()):
        pytest.skip("needs the PostgreSQL and Redis servers")
    home = tmp_path_factory.mktemp("pg")
    with h.postgres_database() as db_url, h.redis_database() as broker_url:
        queues = h.unique_queues()
        s = h.make_settings(home, database_url=db_url, broker_url=broker_url, progress_interval_s=0.3,
                            task_max_retries=2, queue_train=queues["KDIGA_QUEUE_TRAIN"],
                            queue_eval=queues["KDIGA_QUEUE_EVAL"], queue_validate=queues["KDIGA_QUEUE_VALIDATE"])
        h.migrate(s)
        owner = h.create_owner(s)[0]
        rows = h.seed_rows(s, owner, teacher_file)
        log_path = home / "worker.log"
        proc = h.start_worker(h.settings_env(s), log_path)
        try:
            h.wait_worker_ready(log_path)
            yield {"settings": s, "owner": owner, **rows, "log": log_path, "proc": proc}
        finally:
            h.stop_process(proc)
            close_all()


def _set(s, job_id, **values):
    with get_sessionmaker(s)() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def _enqueue(s, task, object_id, queue=None):
    enqueue(s, task, object_id, queue=queue or (s.queue_train if task == RUN_JOB else s.queue_validate))


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@needs_services
def test_validation_and_bookkeeping_through_a_worker(backend, teacher_file):
    from kdiga_service import crud
    from kdiga_service.models import Dataset, Teacher

    s = backend["settings"]
    store = get_storage(s)
    with get_sessionmaker(s)() as session:
        stored = store.upload_file(teacher_file, "teachers/through-worker.safetensors")
        spec = {k: v for k, v in h.TEACHER_META.items() if k != "name"}
        teacher = crud.create_teacher(session, owner_id=backend["owner"], name="t", format="safetensors",
                                      stored=stored, spec=spec)
        dataset = Dataset(owner_id=backend["owner"], name="digits", kind="builtin", builtin="digits")
        session.add(dataset)
        session.commit()
        teacher_id, dataset_id = teacher.id, dataset.id
    request = h.tiny_job_request(backend["dataset_id"], backend["teacher_id"])
    cancelled = h.create_job_row(s, backend["owner"], request)
    _set(s, cancelled, status="cancelled", cancel_requested=True, finished_at=utcnow())
    exhausted = h.create_job_row(s, backend["owner"], request)
    _set(s, exhausted, status="running", attempts=3, heartbeat_at=utcnow(),
         worker_id=f"{socket.gethostname()}:4000000")
    bad = h.create_job_row(s, backend["owner"], {**request, "objective": {"method": "trades"}})

    _enqueue(s, VALIDATE_TEACHER, teacher_id)
    _enqueue(s, VALIDATE_DATASET, dataset_id)
    for job_id in (cancelled, cancelled, exhausted, bad):
        _enqueue(s, RUN_JOB, job_id)

    def settled():
        with get_sessionmaker(s)() as session:
            states = [session.get(Teacher, teacher_id).status, session.get(Dataset, dataset_id).status]
            states += [session.get(Job, j).status for j in (exhausted, bad)]
            return states if "validating" not in states and "running" not in states and "queued" not in states else None

    assert h.wait_for(settled, 180, what="the worker to process every task") == ["ready", "ready", "failed", "failed"]
    assert h.job_row(s, cancelled).status == "cancelled" and h.job_row(s, cancelled).attempts == 0
    assert h.job_row(s, exhausted).error.startswith("The job was interrupted 3 times")
    assert "trades" in h.job_row(s, bad).error and h.job_row(s, bad).error.endswith(".")


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@needs_services
def test_pool_process_killed_mid_training_is_redelivered_and_resumes(backend):
    """The out-of-memory case: the pool child dies, the worker's main process survives; the task is
    rejected back to the queue (reject_on_worker_lost) and the job resumes from its checkpoint."""
    s = backend["settings"]
    request = h.tiny_job_request(backend["dataset_id"], backend["teacher_id"], epochs=2, method="kd")
    job_id = h.create_job_row(s, backend["owner"], request)
    _enqueue(s, RUN_JOB, job_id)
    store = get_storage(s)
    pointer = f"{checkpoint_prefix(job_id)}/latest.json"
    h.wait_for(lambda: store.exists(pointer), 240, what="the first epoch checkpoint")
    child = int(h.job_row(s, job_id).worker_id.split(":")[1])  # host:pid:thread
    assert child != backend["proc"].pid
    os.kill(child, signal.SIGKILL)
    done = h.wait_for(lambda: (r := h.job_row(s, job_id)).status in ("succeeded", "failed") and r, 300,
                      what="the job to finish after the pool process died")
    assert done.status == "succeeded", done.error
    assert done.attempts == 2
    assert len(h.artifacts_of(s, job_id)) == 5
    assert backend["proc"].poll() is None  # the worker itself lived on
    assert "resuming from checkpoint" in backend["log"].read_text()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@needs_services
def test_redelivery_of_a_job_still_running_does_not_run_it_twice(backend, tmp_path):
    """celery#5935: a task running past the visibility timeout is delivered again; the second worker
    sees a live owner, leaves the job alone and only looks again later."""
    h.stop_process(backend["proc"])  # only this test's workers
    s = backend["settings"]
    env = {**h.settings_env(s), "KDIGA_VISIBILITY_TIMEOUT_S": "3", "KDIGA_HEARTBEAT_STALE_S": "2",
           "KDIGA_JOB_SOFT_TIME_LIMIT_S": "600", "KDIGA_JOB_HARD_TIME_LIMIT_S": "660"}
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [h.start_worker(env, path) for path in logs]
    try:
        for path in logs:
            h.wait_worker_ready(path)
        # training that outlasts the redelivery: the 3 s visibility timeout, Redis's 1 s restore tick and
        # the second worker's look at the row. A kd epoch of cnn_tiny takes 0.024 s on an idle 2-core host,
        # so 2 epochs ended ~1 s before the second worker looked and nothing was set aside; 200 take ~5 s.
        request = h.tiny_job_request(backend["dataset_id"], backend["teacher_id"], epochs=200, method="kd")
        job_id = h.create_job_row(s, backend["owner"], request)
        _enqueue(s, RUN_JOB, job_id)
        done = h.wait_for(lambda: (r := h.job_row(s, job_id)).status in ("succeeded", "failed") and r, 300,
                          what="the job")
    finally:
        for proc in workers:
            h.stop_process(proc)
    assert done.status == "succeeded", done.error
    assert done.attempts == 1
    text = "".join(p.read_text(errors="replace") for p in logs)
    assert text.count('"job claimed"') == 1
    assert "looking again later" in text  # the duplicate delivery was seen and set aside
