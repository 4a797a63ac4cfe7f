"""The job life-cycle helpers the worker calls: conditional claims, progress, finish/fail/cancel."""

from __future__ import annotations

from datetime import timedelta

import pytest
from api_helpers import new_key

from kdiga_service import crud
from kdiga_service.models import Job, utcnow


@pytest.fixture
def session_job(client):
    _, owner_id = new_key(client)
    with client.app.state.sessionmaker() as session:
        job = Job(owner_id=owner_id, kind="distill", queue="q", spec={"kind": "distill"})
        session.add(job)
        session.commit()
        yield session, job.id


def test_claim_is_exclusive(session_job):
    session, job_id = session_job
    job = crud.claim_job(session, job_id, "w1")
    assert job is not None and job.status == "running" and job.worker_id == "w1" and job.attempts == 1
    assert job.started_at is not None and job.heartbeat_at is not None
    assert crud.claim_job(session, job_id, "w2") is None  # fresh heartbeat: a duplicate delivery is skipped
    assert crud.claim_job(session, "no-such-job", "w2") is None


def test_stale_running_job_is_reclaimed(session_job):
    session, job_id = session_job
    crud.claim_job(session, job_id, "w1")
    job = crud.claim_job(session, job_id, "w2", stale_after_s=0)
    assert job is not None and job.worker_id == "w2" and job.attempts == 2
    assert not crud.update_progress(
        session, job_id, progress={"step": 1}, worker_id="w1"
    )  # w1 lost its claim
    assert crud.update_progress(session, job_id, progress={"step": 1}, worker_id="w2")


def test_attempt_cap_fails_the_job(session_job):
    session, job_id = session_job
    crud.claim_job(session, job_id, "w1", max_attempts=2)
    crud.claim_job(session, job_id, "w2", stale_after_s=0, max_attempts=2)
    assert crud.claim_job(session, job_id, "w3", stale_after_s=0, max_attempts=2) is None
    job = crud.get_job(session, job_id)
    assert job.status == "failed"
    assert (
        job.error
        == crud.interrupted_message(2)
    )


def test_progress_heartbeat_and_finish(session_job):
    session, job_id = session_job
    crud.claim_job(session, job_id, "w1")
    session.execute(
        Job.__table__.update().where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1))
    )
    session.commit()
    assert crud.update_progress(
        session, job_id, progress={"epoch": 1, "percent": 10.0}, metrics={"loss": 1.5}, worker_id="w1"
    )
    job = crud.get_job(session, job_id)
    assert job.progress["percent"] == 10.0 and "updated_at" in job.progress and job.metrics == {"loss": 1.5}
    assert utcnow() - job.heartbeat_at < timedelta(seconds=30)
    assert crud.heartbeat(session, job_id, worker_id="w1")
    assert not crud.is_cancel_requested(session, job_id)
    assert crud.finish_job(session, job_id, result={"student": "a"}, worker_id="w1")
    job = crud.get_job(session, job_id)
    assert job.status == "succeeded" and job.finished_at is not None and job.result == {"student": "a"}
    assert not crud.fail_job(session, job_id, error="late", worker_id="w1")  # finished rows never change
    assert crud.get_job(session, job_id).status == "succeeded"


def test_fail_and_cancel(client, session_job):
    session, job_id = session_job
    crud.claim_job(session, job_id, "w1")
    assert crud.fail_job(session, job_id, error="The teacher needs 3 input channels.")
    job = crud.get_job(session, job_id)
    assert job.status == "failed" and job.error == "The teacher needs 3 input channels."
    assert crud.claim_job(session, job_id, "w2", stale_after_s=0) is None


def test_cancel_requested_while_redelivered(session_job):
    session, job_id = session_job
    crud.claim_job(session, job_id, "w1")
    job = crud.get_job(session, job_id)
    crud.request_cancel(session, job=job)
    session.commit()
    assert job.status == "cancelling" and crud.is_cancel_requested(session, job_id)
    again = crud.claim_job(session, job_id, "w2", stale_after_s=0)
    assert again is not None and again.status == "cancelling"
    assert crud.mark_cancelled(session, job_id, worker_id="w2")
    assert crud.get_job(session, job_id).status == "cancelled"
