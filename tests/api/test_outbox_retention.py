"""The sweeper's outbox retention deletes webhook events that are done (delivered, or given up after
their retries) once their last attempt is older than KDIGA_WEBHOOK_RETENTION_DAYS, with their
delivery rows, in bounded batches, on both database backends; pending events of any age and recent
done ones stay. Each app here has its own database (so no other test's events count) and a pump and
sweep loop that never run during a test (poll and check intervals of an hour)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest
from api_helpers import make_settings, new_key
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.main import create_app
from api.sweeper import sweep_webhook_outbox
from kdiga_service import admin, outbox
from kdiga_service.db import get_sessionmaker
from kdiga_service.migrate import upgrade_head
from kdiga_service.models import DELIVERED, FAILED, PENDING, Job, WebhookDelivery, WebhookEvent, utcnow

HOUR_S = 3600.0


def _app(backend, request, tmp_path_factory, tag, **overrides):
    home = tmp_path_factory.mktemp(f"{tag}-{backend}")
    url = request.getfixturevalue("pg_database")(tag) if backend == "postgres" else f"sqlite:///{home}/kdiga.db"
    values = {"webhook_poll_interval_s": HOUR_S, "requeue_check_s": HOUR_S}
    return create_app(make_settings(home, url, **{**values, **overrides}))


@pytest.fixture(scope="module")
def app(backend, request, tmp_path_factory):
    with TestClient(_app(backend, request, tmp_path_factory, "outbox_retention",
                               webhook_retention_days=30.0)) as client:
        yield client


def _sessions(client):
    return client.app.state.sessionmaker


def _job(client, owner_id):
    with _sessions(client)() as session:
        job = Job(owner_id=owner_id, kind="distill", queue="q", spec={}, status="succeeded")
        session.add(job)
        session.commit()
        return job.id


def _days_ago(days: float) -> datetime:
    return utcnow() - timedelta(days=days)


def _event(client, owner_id, job_id, status, *, created: datetime, attempts: list[datetime],
           next_attempt_at: datetime | None = None, lease_until: datetime | None = None) -> int:
    """An event as the outbox leaves it: one delivery row per attempt (the last one ok if delivered);
    `next_attempt_at` is when its last attempt (or the next one) was due."""
    delivered = status == DELIVERED
    with _sessions(client)() as session:
        event = WebhookEvent(owner_id=owner_id, job_id=job_id, type="job.succeeded", url="https://hooks.example/x",
                             payload={}, status=status, attempts=len(attempts), created_at=created,
                             next_attempt_at=next_attempt_at or (attempts[-1] if attempts else created),
                             lease_until=lease_until, delivered_at=attempts[-1] if delivered else None,
                             last_error=None if delivered else "HTTP 503")
        session.add(event)
        session.flush()
        for n, started in enumerate(attempts, 1):
            ok = delivered and n == len(attempts)
            session.add(WebhookDelivery(event_seq=event.seq, job_id=job_id, attempt=n, url=event.url, ok=ok,
                                        status_code=200 if ok else 503, error=None if ok else "HTTP 503",
                                        duration_ms=1.0, started_at=started))
        session.commit()
        return event.seq


def _alive(client, seqs) -> set[int]:
    with _sessions(client)() as session:
        return set(session.scalars(select(WebhookEvent.seq).where(WebhookEvent.seq.in_(list(seqs)))).all())


def _event_ids(client, seqs) -> set[str]:
    with _sessions(client)() as session:
        return set(session.scalars(select(WebhookEvent.event_id).where(WebhookEvent.seq.in_(list(seqs)))).all())


def _attempts_of(client, seqs) -> int:
    with _sessions(client)() as session:
        return int(session.scalar(select(func.count()).select_from(WebhookDelivery)
                                  .where(WebhookDelivery.event_seq.in_(list(seqs)))) or 0)


def test_done_events_past_retention_go_with_their_deliveries_and_nothing_else(app):
    headers, owner = new_key(app, "outbox-retention")
    job, other_job = _job(app, owner), _job(app, owner)
    soon = utcnow() + timedelta(hours=1)
    done_old = {
        "delivered_old": _event(app, owner, job, DELIVERED, created=_days_ago(40), attempts=[_days_ago(40)]),
        "given_up_old": _event(app, owner, job, FAILED, created=_days_ago(45),
                               attempts=[_days_ago(45), _days_ago(44.9), _days_ago(44.5)]),
    }
    kept = {
        "delivered_recent": _event(app, owner, job, DELIVERED, created=_days_ago(2), attempts=[_days_ago(2)]),
        # due 40 days ago but only tried (and given up) 5 days ago, e.g. after a long outage: recent
        "given_up_late": _event(app, owner, job, FAILED, created=_days_ago(40), attempts=[_days_ago(5)],
                                next_attempt_at=_days_ago(40)),
    }
    pending = {  # never deleted, whatever their age
        "retrying_old": _event(app, owner, other_job, PENDING, created=_days_ago(60),
                               attempts=[_days_ago(60), _days_ago(59)], next_attempt_at=soon),
        "in_flight_old": _event(app, owner, other_job, PENDING, created=_days_ago(50), attempts=[],
                                next_attempt_at=_days_ago(50), lease_until=soon),
        "never_tried_old": _event(app, owner, other_job, PENDING, created=_days_ago(90), attempts=[]),
    }
    before = app.get(f"/v1/jobs/{job}/deliveries", headers=headers).json()
    assert len(before["events"]) == 4 and before["count"] == 6

    deleted = sweep_webhook_outbox(_sessions(app), app.app.state.settings)

    assert deleted == 2
    assert _alive(app, done_old.values()) == set()
    assert _attempts_of(app, done_old.values()) == 0
    assert _alive(app, kept.values()) == set(kept.values())
    assert _alive(app, pending.values()) == set(pending.values())
    assert _attempts_of(app, [pending["retrying_old"]]) == 2 and _attempts_of(app, kept.values()) == 2
    after = app.get(f"/v1/jobs/{job}/deliveries", headers=headers).json()
    assert after["count"] == 2 and len(after["events"]) == 2
    assert {e["event_id"] for e in after["events"]} == _event_ids(app, kept.values())
    assert len(app.get(f"/v1/jobs/{other_job}/deliveries", headers=headers).json()["events"]) == 3

    keep_none = app.app.state.settings.model_copy(update={"webhook_retention_days": 0})  # at the next sweep
    assert sweep_webhook_outbox(_sessions(app), keep_none) == 2
    assert _alive(app, kept.values()) == set() and _attempts_of(app, kept.values()) == 0
    assert _alive(app, pending.values()) == set(pending.values())
    assert app.get(f"/v1/jobs/{job}/deliveries", headers=headers).json() == {"events": [], "data": [], "count": 0}


def test_a_backlog_larger_than_a_batch_is_swept_in_batches(app):
    _, owner = new_key(app, "outbox-backlog")
    job = _job(app, owner)
    settings = app.app.state.settings

    def backlog(n):
        return [_event(app, owner, job, FAILED, created=_days_ago(31 + i), attempts=[_days_ago(31 + i)] * 2)
                for i in range(n)]

    first = backlog(7)
    assert sweep_webhook_outbox(_sessions(app), settings, batch=3, max_batches=1) == 3  # one batch, no more
    assert len(_alive(app, first)) == 4
    for _ in range(3):  # the next sweeps take the rest
        sweep_webhook_outbox(_sessions(app), settings, batch=3, max_batches=1)
    assert _alive(app, first) == set() and _attempts_of(app, first) == 0

    second = backlog(7)  # within one sweep: batches of 3 until none is left
    assert sweep_webhook_outbox(_sessions(app), settings, batch=3, max_batches=10) == 7
    assert _alive(app, second) == set() and _attempts_of(app, second) == 0
    assert sweep_webhook_outbox(_sessions(app), settings, batch=3, max_batches=10) == 0


def test_each_api_process_sweeps_the_outbox_in_the_background(backend, request, tmp_path_factory):
    """The app's lifespan runs the outbox pass every requeue_check_s, with the default retention."""
    app = _app(backend, request, tmp_path_factory, "outbox_loop", requeue_check_s=0.1)
    assert app.state.settings.webhook_retention_days == 30.0
    with TestClient(app) as client:
        _, owner = new_key(client, "outbox-loop")
        job = _job(client, owner)
        old = _event(client, owner, job, DELIVERED, created=_days_ago(31), attempts=[_days_ago(31)])
        recent = _event(client, owner, job, DELIVERED, created=_days_ago(29), attempts=[_days_ago(29)])
        deadline = time.monotonic() + 10
        while _alive(client, [old]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(client, [old, recent]) == {recent}


def test_events_the_outbox_itself_finished_are_swept_and_one_it_retries_is_not(backend, request, tmp_path_factory):
    """Rows written by the outbox's own claim and record_attempt (not built by hand): delivered and
    given up go at a retention of 0, the one in its backoff stays. No app here: its pump would race
    this test for the claims."""
    home = tmp_path_factory.mktemp(f"outbox_real-{backend}")
    url = request.getfixturevalue("pg_database")("outbox_real") if backend == "postgres" else f"sqlite:///{home}/kdiga.db"
    settings = make_settings(home, url)
    upgrade_head(settings)
    sessions = get_sessionmaker(settings)
    jobs = []
    with sessions() as session:
        owner = admin.create_key(session, name="outbox-real")[0].id
        for _ in range(3):  # one event per job: a job's events would go out one at a time
            job = Job(owner_id=owner, kind="distill", queue="q", status="succeeded",
                      spec={"notify": {"url": "https://hooks.example/x"}})
            session.add(job)
            session.flush()
            row = session.execute(select(*outbox.JOB_EVENT_COLUMNS).where(Job.id == job.id)).mappings().one()
            assert outbox.emit(session, row, "job.succeeded") is not None
            jobs.append(job.id)
        session.commit()
    with sessions() as session:
        claimed = {c.job_id: c for c in outbox.claim_due(session, settings)}
    assert set(claimed) == set(jobs)
    given_up, retrying, delivered = (claimed[j] for j in jobs)
    last_try = settings.model_copy(update={"webhook_max_attempts": 1})
    for event, ok, with_settings in ((given_up, False, last_try), (retrying, False, settings),
                                     (delivered, True, settings)):
        with sessions() as session:
            outbox.record_attempt(session, event, ok=ok, status_code=200 if ok else 503, error=None,
                                  excerpt=None, duration_ms=1.0, settings=with_settings)
    with sessions() as session:
        states = dict(session.execute(select(WebhookEvent.job_id, WebhookEvent.status)).tuples().all())
    assert states == {jobs[0]: FAILED, jobs[1]: PENDING, jobs[2]: DELIVERED}

    assert sweep_webhook_outbox(sessions, settings) == 0  # the default 30 days: all recent
    keep_none = settings.model_copy(update={"webhook_retention_days": 0})
    a_day_later = utcnow() + timedelta(days=1)  # the retry is overdue, nobody took it yet: still pending
    assert sweep_webhook_outbox(sessions, keep_none, now=a_day_later) == 2
    seqs = [given_up.seq, retrying.seq, delivered.seq]
    with sessions() as session:
        assert set(session.scalars(select(WebhookEvent.seq).where(WebhookEvent.seq.in_(seqs))).all()) == {retrying.seq}
        attempts = session.execute(select(WebhookDelivery.event_seq, func.count()).group_by(WebhookDelivery.event_seq)
                                   .where(WebhookDelivery.event_seq.in_(seqs))).tuples().all()
    assert dict(attempts) == {retrying.seq: 1}
