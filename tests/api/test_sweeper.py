"""The sweeper re-sends tasks that nobody took, once, on both backends, to the real Redis."""

from __future__ import annotations

import json
from datetime import timedelta

from api_helpers import new_key
from sqlalchemy import update

from api.sweeper import resend_stale
from kdiga_service.models import Dataset, Job, Teacher, utcnow
from kdiga_service.queue import RUN_JOB, VALIDATE_DATASET


def _messages(redis_client, queue: str) -> list[dict]:
    return [json.loads(m) for m in redis_client.lrange(queue, 0, -1)]


def _tasks_for(redis_client, queue: str, object_id: str) -> list[str]:
    """Task names of the messages in `queue` whose argument is `object_id`."""
    out = []
    for message in _messages(redis_client, queue):
        headers = message.get("headers") or {}
        if object_id in str(headers.get("argsrepr", "")):
            out.append(headers.get("task"))
    return out


def _add(client, row):
    with client.app.state.sessionmaker() as session:
        session.add(row)
        session.commit()
        return row.id


def test_a_job_nobody_took_is_sent_again_once(client, settings, redis_client):
    _, owner_id = new_key(client, "sweep")
    long_ago = utcnow() - timedelta(seconds=settings.requeue_after_s + 60)
    stale = _add(client, Job(owner_id=owner_id, kind="distill", queue=settings.queue_train, spec={},
                             created_at=long_ago, enqueued_at=long_ago))
    fresh = _add(client, Job(owner_id=owner_id, kind="distill", queue=settings.queue_train, spec={}))
    running = _add(client, Job(owner_id=owner_id, kind="distill", queue=settings.queue_train, spec={},
                               status="running", created_at=long_ago, enqueued_at=long_ago))
    legacy = _add(client, Job(owner_id=owner_id, kind="distill", queue=settings.queue_train, spec={},
                              created_at=long_ago))
    with client.app.state.sessionmaker() as session:  # a row from before the column: NULL
        session.execute(update(Job).where(Job.id == legacy).values(enqueued_at=None))
        session.commit()

    sent = resend_stale(client.app.state.sessionmaker, settings)
    assert stale in sent and legacy in sent
    assert fresh not in sent and running not in sent
    assert _tasks_for(redis_client, settings.queue_train, stale) == [RUN_JOB]
    assert _tasks_for(redis_client, settings.queue_train, fresh) == []

    again = resend_stale(client.app.state.sessionmaker, settings)  # another process, right after
    assert stale not in again and legacy not in again
    assert _tasks_for(redis_client, settings.queue_train, stale) == [RUN_JOB]  # still one message
    with client.app.state.sessionmaker() as session:
        assert session.get(Job, stale).enqueued_at > long_ago


def test_validations_nobody_took_are_sent_again(client, settings, redis_client):
    _, owner_id = new_key(client, "sweep-validate")
    long_ago = utcnow() - timedelta(seconds=settings.requeue_after_s + 60)
    dataset = _add(client, Dataset(owner_id=owner_id, name="d", kind="builtin", builtin="digits",
                                   created_at=long_ago, enqueued_at=long_ago))
    ready = _add(client, Teacher(owner_id=owner_id, name="t", format="safetensors", storage_key="k",
                                 size_bytes=1, sha256="0" * 64, spec={}, status="ready",
                                 created_at=long_ago, enqueued_at=long_ago))
    sent = resend_stale(client.app.state.sessionmaker, settings)
    assert dataset in sent and ready not in sent
    assert _tasks_for(redis_client, settings.queue_validate, dataset) == [VALIDATE_DATASET]


def test_each_api_process_sweeps_in_the_background(client, settings, redis_client):
    """The app's lifespan runs the sweep every requeue_check_s (here: fast settings, same database)."""
    import time

    from fastapi.testclient import TestClient

    from api.main import create_app

    fast = settings.model_copy(update={"requeue_after_s": 0.2, "requeue_check_s": 0.1, "run_migrations": False})
    _, owner_id = new_key(client, "sweep-loop")
    job = _add(client, Job(owner_id=owner_id, kind="distill", queue=settings.queue_train, spec={}))
    with TestClient(create_app(fast)):
        deadline = time.monotonic() + 10
        while not _tasks_for(redis_client, settings.queue_train, job) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert RUN_JOB in _tasks_for(redis_client, settings.queue_train, job)
