"""The API processes' pump: deliver due webhook events and send the tasks of new pipeline steps.

Why here: the API processes always run (a deployment may scale workers to zero, and a worker busy
with a six-hour job must not hold events back), and they already hold the publisher. Every API
process runs the pump; conditional claims (the outbox's lease, the job row's `enqueued_at`) make
each event and each task go out once even so.

A pipeline step's job is created by crud in the transaction of the state change that made it ready
(kdiga_service.pipelines), with `enqueued_at` unset; `send_new_jobs` publishes it within one poll.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from anyio import to_thread
from fastapi import FastAPI
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.publish import QueueUnavailable, enqueue
from kdiga_service import outbox
from kdiga_service.models import QUEUED, Job, utcnow
from kdiga_service.queue import RUN_JOB
from kdiga_service.settings import Settings

log = logging.getLogger("kdiga.api.pump")


def send_new_jobs(session_factory: Callable[[], Session], settings: Settings) -> int:
    """Publish the task of every queued job that was never sent (pipeline steps); returns how many."""
    sent = 0
    with session_factory() as session:
        rows = session.execute(select(Job.id, Job.queue).where(Job.status == QUEUED, Job.enqueued_at.is_(None))
                               .order_by(Job.created_at).limit(100)).all()
        for job_id, queue in rows:
            taken = session.execute(update(Job).where(Job.id == job_id, Job.enqueued_at.is_(None))
                                    .values(enqueued_at=utcnow()))
            session.commit()
            if taken.rowcount != 1:  # type: ignore[attr-defined]
                continue  # another API process sends it
            try:
                enqueue(settings, RUN_JOB, job_id, queue=queue)
            except QueueUnavailable as exc:
                session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=None))  # next pass
                session.commit()
                log.warning("pump: broker unavailable (%s); job %s is sent on a later pass", exc, job_id)
                return sent
            sent += 1
            log.info("pump: sent pipeline step job %s on %s", job_id, queue)
    return sent


def pump_once(session_factory: Callable[[], Session], settings: Settings) -> int:
    """One pass: new jobs' tasks, then due webhook events; returns how much was done."""
    return send_new_jobs(session_factory, settings) + outbox.deliver_due(session_factory, settings)


async def pump_forever(app: FastAPI) -> None:
    """Run `pump_once` until cancelled: again at once after work, else after the poll interval."""
    settings = app.state.settings
    while True:
        try:
            done = await to_thread.run_sync(pump_once, app.state.sessionmaker, settings)
        except Exception:  # noqa: BLE001 - a failed pass (database down) must not stop the next one
            log.exception("pump: the pass failed; trying again in %.1f s", settings.webhook_poll_interval_s)
            done = 0
        if not done:
            await anyio.sleep(settings.webhook_poll_interval_s)
