"""The webhook outbox: events written with the state change that causes them, delivered later.

`emit` adds an event row to the caller's transaction (crud's state-change helpers call it before
they commit), so an event exists exactly when its state change does: a worker or API process that
dies can lose neither. `deliver_due` is run by every API process (api/pump.py): it claims due
events with a conditional UPDATE of `lease_until` (so two processes never send one event at the
same time), signs and POSTs each (kdiga_service.webhooks), records the attempt, and schedules a
retry with exponential backoff or gives up after `webhook_max_attempts`.

Order: a job's events go out one at a time in `seq` order; an event waits while an earlier event
of its job is still pending (in its backoff too), so a receiver sees `running` before `succeeded`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session, aliased

from kdiga_service.models import (
    DELIVERED,
    FAILED,
    PENDING,
    Job,
    WebhookDelivery,
    WebhookEvent,
    WebhookSecret,
    new_id,
    utcnow,
)
from kdiga_service.settings import Settings
from kdiga_service.webhooks import Attempt, Resolver, UrlPolicy, deliver, resolve_host, signature_header

log = logging.getLogger("kdiga.webhooks")

STATE_EVENTS = ("job.queued", "job.running", "job.cancelling", "job.succeeded", "job.failed", "job.cancelled",
                "job.stopped")
PROGRESS_EVENT = "job.progress"
EVENT_TYPES = (*STATE_EVENTS, PROGRESS_EVENT)
BATCH = 32  # events claimed per pass and process
SENDERS = 8  # deliveries in flight per process (different jobs)

# What an event says about its job (a snapshot taken in the state change's transaction).
JOB_EVENT_COLUMNS = (
    Job.id, Job.owner_id, Job.kind, Job.name, Job.status, Job.spec, Job.labels, Job.progress, Job.result,
    Job.error, Job.pipeline_id, Job.pipeline_step, Job.created_at, Job.started_at, Job.finished_at,
)


def event_types_for(notify: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The events a job's `notify` asks for (every state change when it names none)."""
    if not notify:
        return ()
    return tuple(notify.get("events") or STATE_EVENTS)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def job_payload(job: Mapping[str, Any]) -> dict[str, Any]:
    """The `data.job` of an event: what a pipeline needs to act without reading the job back."""
    result = job["result"] or {}
    return {
        "id": job["id"], "kind": job["kind"], "name": job["name"], "status": job["status"],
        "labels": job["labels"] or {}, "progress": job["progress"] or {}, "error": job["error"],
        "metrics": result.get("metrics"), "artifacts": result.get("artifacts"),
        "teacher_id": result.get("teacher_id"),
        "pipeline": {"id": job["pipeline_id"], "step": job["pipeline_step"]} if job["pipeline_id"] else None,
        "created_at": _iso(job["created_at"]), "started_at": _iso(job["started_at"]),
        "finished_at": _iso(job["finished_at"]),
    }


def emit(session: Session, job: Mapping[str, Any], event_type: str) -> WebhookEvent | None:
    """Add `event_type` for `job` (a JOB_EVENT_COLUMNS row) to the session, if its notify wants it.

    The caller commits: the event and the state change are one transaction.
    """
    notify = (job["spec"] or {}).get("notify")
    if notify is None or event_type not in event_types_for(notify):
        return None
    event_id, now = new_id(), utcnow()
    payload = {"id": event_id, "type": event_type, "created_at": now.isoformat(), "data": {"job": job_payload(job)}}
    event = WebhookEvent(event_id=event_id, owner_id=job["owner_id"], job_id=job["id"], type=event_type,
                         url=notify["url"], payload=payload, status=PENDING, attempts=0, next_attempt_at=now,
                         created_at=now)
    session.add(event)
    return event


# -- delivery --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claimed:
    """An event this process holds until `lease_until`."""

    seq: int
    event_id: str
    owner_id: str
    job_id: str
    type: str
    url: str
    payload: dict[str, Any]
    attempt: int
    lease_until: datetime


def backoff_s(attempt: int, settings: Settings) -> float:
    """The wait after failed attempt number `attempt` (1-based): base, 2×base, 4×base, ... capped."""
    return float(min(settings.webhook_backoff_s * 2 ** (attempt - 1), settings.webhook_backoff_max_s))


def _due(now: datetime) -> Any:
    earlier = aliased(WebhookEvent)
    blocked = exists().where(earlier.job_id == WebhookEvent.job_id, earlier.seq < WebhookEvent.seq,
                             earlier.status == PENDING)
    free = or_(WebhookEvent.lease_until.is_(None), WebhookEvent.lease_until < now)
    return (select(WebhookEvent.seq)
            .where(WebhookEvent.status == PENDING, WebhookEvent.next_attempt_at <= now, free, ~blocked)
            .order_by(WebhookEvent.seq).limit(BATCH))


def claim_due(session: Session, settings: Settings, *, now: datetime | None = None) -> list[Claimed]:
    """Claim the due events no other process holds (one conditional UPDATE each); commits."""
    now = now or utcnow()
    lease_until = now + timedelta(seconds=settings.webhook_timeout_s + 30)
    claimed = []
    for seq in session.scalars(_due(now)).all():
        free = or_(WebhookEvent.lease_until.is_(None), WebhookEvent.lease_until < now)
        res = session.execute(
            update(WebhookEvent).where(WebhookEvent.seq == seq, WebhookEvent.status == PENDING, free)
            .values(lease_until=lease_until, attempts=WebhookEvent.attempts + 1)
            .execution_options(synchronize_session=False))
        session.commit()
        if res.rowcount == 1:  # type: ignore[attr-defined]
            row = session.execute(select(WebhookEvent).where(WebhookEvent.seq == seq)
                                  .execution_options(populate_existing=True)).scalar_one()
            claimed.append(Claimed(row.seq, row.event_id, row.owner_id, row.job_id, row.type, row.url,
                                   row.payload, row.attempts, lease_until))
    return claimed


def signing_secrets(session: Session, owner_id: str, *, now: datetime | None = None) -> list[str]:
    """The owner's current secret and any rotated-out one still inside its grace period, newest first."""
    now = now or utcnow()
    rows = session.scalars(
        select(WebhookSecret).where(WebhookSecret.owner_id == owner_id,
                                    or_(WebhookSecret.expires_at.is_(None), WebhookSecret.expires_at > now))
        .order_by(WebhookSecret.created_at.desc())
    ).all()
    return [r.secret for r in rows]


def request_for(event: Claimed, secrets_: list[str]) -> tuple[bytes, dict[str, str]]:
    """The exact body and headers of one attempt (signed now: a retry gets a fresh timestamp)."""
    body = json.dumps(event.payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {"Kdiga-Event-Id": event.event_id, "Kdiga-Event-Type": event.type,
               "Kdiga-Delivery-Attempt": str(event.attempt)}
    if secrets_:
        headers["Kdiga-Signature"] = signature_header(secrets_, body)
    return body, headers


def record_attempt(session: Session, event: Claimed, *, ok: bool, status_code: int | None, error: str | None,
                   excerpt: str | None, duration_ms: float, settings: Settings) -> None:
    """Log the attempt and move the event on: delivered, retried after a backoff, or given up; commits."""
    now = utcnow()
    session.add(WebhookDelivery(event_seq=event.seq, job_id=event.job_id, attempt=event.attempt, url=event.url,
                                status_code=status_code, ok=ok, error=error, response_excerpt=excerpt,
                                duration_ms=round(duration_ms, 2), started_at=now))
    if ok:
        values: dict[str, Any] = {"status": DELIVERED, "delivered_at": now, "last_error": None}
    elif event.attempt >= settings.webhook_max_attempts:
        values = {"status": FAILED, "last_error": error}
        log.warning("webhook event given up", extra={"event_id": event.event_id, "job_id": event.job_id,
                                                       "attempts": event.attempt, "error": error})
    else:
        values = {"next_attempt_at": now + timedelta(seconds=backoff_s(event.attempt, settings)),
                  "last_error": error}
    session.execute(update(WebhookEvent)
                    .where(WebhookEvent.seq == event.seq, WebhookEvent.lease_until == event.lease_until)
                    .values(lease_until=None, **values).execution_options(synchronize_session=False))
    session.commit()


def _send_one(session_factory: Callable[[], Session], settings: Settings, policy: UrlPolicy,
              event: Claimed, resolve: Resolver) -> bool:
    with session_factory() as session:
        secrets_ = signing_secrets(session, event.owner_id)
    if secrets_:
        body, headers = request_for(event, secrets_)
        result = deliver(event.url, body, headers, policy=policy, timeout_s=settings.webhook_timeout_s,
                         resolve=resolve)
    else:  # every secret expired (rotated with a grace period and no new one): nothing to sign with
        result = Attempt(ok=False, error="The API key has no valid webhook signing secret.")
    with session_factory() as session:
        record_attempt(session, event, ok=result.ok, status_code=result.status_code, error=result.error,
                       excerpt=result.excerpt, duration_ms=result.duration_ms, settings=settings)
    return result.ok


def deliver_due(session_factory: Callable[[], Session], settings: Settings, *,
                resolve: Resolver = resolve_host) -> int:
    """One pass: claim due events and deliver them (different jobs in parallel); returns how many."""
    with session_factory() as session:
        claimed = claim_due(session, settings)
    if not claimed:
        return 0
    policy = UrlPolicy.from_settings(settings)
    # One job's events are never claimed together (order), so the threads never race on a job.
    with ThreadPoolExecutor(max_workers=min(SENDERS, len(claimed))) as pool:
        list(pool.map(lambda e: _send_one(session_factory, settings, policy, e, resolve), claimed))
    return len(claimed)
