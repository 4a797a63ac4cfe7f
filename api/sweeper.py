"""Periodic maintenance in each API process: re-send tasks that nobody took (jobs still `queued`,
teachers and datasets still `validating`), delete checkpoints of ended jobs after their
retention period (`Retention`, below), and delete webhook events that are done (delivered or given
up), with their delivery attempts, after theirs (`sweep_webhook_outbox`). Scratch folders of dead attempts live on worker hosts, so
the workers sweep those (worker/leftovers.py).

The API commits a row, then publishes its task; a crash between the two, or a broker that lost
its data (a Redis restarted without persistence), leaves a row that no worker will ever see.
Every `KDIGA_REQUEUE_CHECK_S` each API process looks for rows whose task was last sent more than
`KDIGA_REQUEUE_AFTER_S` ago and sends it again. A conditional UPDATE of `enqueued_at` decides which
process re-sends a row, so several API processes send one message, not one each. A duplicate
message is harmless: the worker claims the row conditionally and skips a row that is no longer
waiting (worker/runner.py), so re-sending a task whose first message is merely waiting in a long
queue costs one no-op delivery per period.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from api.publish import QueueUnavailable, enqueue
from kdiga_service import crud
from kdiga_service.models import (
    CANCELLED,
    DELIVERED,
    FAILED,
    QUEUED,
    SUCCEEDED,
    VALIDATING,
    Dataset,
    Job,
    Teacher,
    WebhookDelivery,
    WebhookEvent,
    utcnow,
)
from kdiga_service.queue import RUN_JOB, VALIDATE_DATASET, VALIDATE_TEACHER, validation_queue
from kdiga_service.settings import Settings
from kdiga_service.storage import ArtifactStore, checkpoint_prefix

log = logging.getLogger("kdiga.api.sweeper")

BATCH = 100  # rows per table and sweep: a backlog drains over several sweeps, never in one burst


@dataclass(frozen=True)
class Waiting:
    """A kind of row that waits for a worker: its model, the waiting status and its task."""

    model: Any
    status: str
    task: str
    queue: Callable[[Any, Settings], str]


WAITING = (
    Waiting(Job, QUEUED, RUN_JOB, lambda row, _s: row.queue),
    Waiting(Teacher, VALIDATING, VALIDATE_TEACHER, lambda _row, s: validation_queue(s)),
    Waiting(Dataset, VALIDATING, VALIDATE_DATASET, lambda _row, s: validation_queue(s)),
)


def resend_stale(session_factory: Callable[[], Session], settings: Settings, *,
                 now: datetime | None = None) -> list[str]:
    """One sweep: re-send every stale waiting row's task; returns the ids re-sent."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.requeue_after_s)
    sent: list[str] = []
    with session_factory() as session:
        for kind in WAITING:
            model = kind.model
            last_sent = func.coalesce(model.enqueued_at, model.created_at)
            rows = session.execute(
                select(model).where(model.status == kind.status, last_sent < cutoff).order_by(last_sent).limit(BATCH)
            ).scalars().all()
            for row in rows:
                if _take(session, model, row, kind.status, now):
                    try:
                        enqueue(settings, kind.task, row.id, queue=kind.queue(row, settings))
                    except QueueUnavailable as exc:
                        log.warning("sweeper: broker unavailable (%s); will retry next sweep", exc)
                        return sent
                    sent.append(row.id)
                    log.warning("sweeper: re-sent a task nobody took",
                                extra={"task": kind.task, "id": row.id, "waiting_since": str(row.enqueued_at)})
    return sent


def _take(session: Session, model: Any, row: Any, status: str, now: datetime) -> bool:
    """Mark `row` as sent now, unless another process (or the worker) changed it meanwhile."""
    same = model.enqueued_at.is_(None) if row.enqueued_at is None else model.enqueued_at == row.enqueued_at
    result = session.execute(
        update(model).where(model.id == row.id, model.status == status, same).values(enqueued_at=now)
    )
    session.commit()
    return crud.updated_one_row(result)


# -- retention of checkpoints ---------------------------------------------------------------------
ENDED = (SUCCEEDED, FAILED, CANCELLED)  # not `stopped` or anything resumable: those keep theirs
RETENTION_BATCH = 500


@dataclass
class Retention:
    """Deletes the store's checkpoints of jobs that ended more than `checkpoint_retention_days` ago.

    A succeeded job deletes its own at the end; a failed or cancelled one keeps them for the
    retention period (a failed evaluation can be retried from them: after it, `resume` answers 409
    instead of silently training again), and a killed worker may leave
    some behind. Each sweep takes the next `RETENTION_BATCH` ended jobs past a watermark (the
    `finished_at` reached so far, kept per API process): after a start the whole history is walked
    once, a batch per sweep, then only the jobs whose period just ran out. Deleting is idempotent,
    so API processes sweeping the same jobs do no harm.
    """

    watermark: datetime | None = None

    def sweep(self, session_factory: Callable[[], Session], settings: Settings, store: ArtifactStore, *,
              now: datetime | None = None) -> list[str]:
        cutoff = (now or utcnow()) - timedelta(days=settings.checkpoint_retention_days)
        query = select(Job.id, Job.finished_at).where(Job.status.in_(ENDED), Job.finished_at.is_not(None),
                                                      Job.finished_at <= cutoff)
        if self.watermark is not None:
            query = query.where(Job.finished_at >= self.watermark)  # >=: ties at the watermark again
        with session_factory() as session:
            rows = session.execute(query.order_by(Job.finished_at).limit(RETENTION_BATCH)).all()
        purged = []
        for job_id, finished_at in rows:
            store.delete_prefix(checkpoint_prefix(job_id))
            with session_factory() as session:  # without its checkpoint a failed job can no longer resume
                crud.forget_resumable(session, job_id)
            purged.append(job_id)
            self.watermark = finished_at
        if purged:
            log.info("sweeper: checkpoints of ended jobs deleted", extra={"jobs": len(purged)})
        return purged


# -- retention of the webhook outbox ---------------------------------------------------------------
DONE_EVENTS = (DELIVERED, FAILED)  # failed: given up after webhook_max_attempts; never `pending`
OUTBOX_BATCH = 500  # events (and their attempts) per transaction
OUTBOX_MAX_BATCHES = 20  # per sweep: a backlog of millions drains over several sweeps


def sweep_webhook_outbox(session_factory: Callable[[], Session], settings: Settings, *, now: datetime | None = None,
                         batch: int = OUTBOX_BATCH, max_batches: int = OUTBOX_MAX_BATCHES) -> int:
    """Delete webhook events that are done (delivered or given up) and whose last attempt was more
    than `webhook_retention_days` ago, with their delivery attempts; returns how many events.

    An event's last attempt is its newest delivery row (record_attempt writes one for every attempt,
    the last one included), so an event is old enough when none of its attempts is newer than the
    cutoff. `next_attempt_at <= cutoff` narrows the candidates first through the index on
    (status, next_attempt_at): a done event's last attempt was claimed at or after its
    `next_attempt_at`. A `pending` event (waiting, in its backoff, or being sent) is never touched,
    whatever its age. Each batch is its own short transaction; on PostgreSQL `FOR UPDATE SKIP LOCKED`
    keeps API processes that sweep at the same time off each other's rows (no waits, no deadlocks).
    """
    cutoff = (now or utcnow()) - timedelta(days=settings.webhook_retention_days)
    # OFFSET 0 keeps PostgreSQL from turning this into an anti-join, which reads every delivery row
    # up to the first recent one, batch after batch (216 ms a batch with 1.9 M old rows); as a
    # subplan it is one index lookup per candidate (0.7 ms). SQLite ignores it.
    newer_attempt = (select(WebhookDelivery.id).where(WebhookDelivery.event_seq == WebhookEvent.seq,
                                                      WebhookDelivery.started_at > cutoff).offset(0).exists())
    done_and_old = (WebhookEvent.status.in_(DONE_EVENTS), WebhookEvent.next_attempt_at <= cutoff,
                    WebhookEvent.delivered_at.is_(None) | (WebhookEvent.delivered_at <= cutoff), ~newer_attempt)
    deleted = 0
    for _ in range(max_batches):
        with session_factory() as session:
            seqs = session.scalars(select(WebhookEvent.seq).where(*done_and_old).limit(batch)
                                   .with_for_update(skip_locked=True)).all()
            if not seqs:
                break
            session.execute(delete(WebhookDelivery).where(WebhookDelivery.event_seq.in_(seqs))
                            .execution_options(synchronize_session=False))
            result = session.execute(delete(WebhookEvent).where(WebhookEvent.seq.in_(seqs), *done_and_old)
                                     .execution_options(synchronize_session=False))
            session.commit()
        deleted += result.rowcount  # type: ignore[attr-defined]
        if len(seqs) < batch:
            break
    if deleted:
        log.info("sweeper: done webhook events deleted", extra={"events": deleted})
    return deleted


__all__ = ["WAITING", "Retention", "resend_stale", "sweep_webhook_outbox"]
