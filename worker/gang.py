"""Gang placement: a job on several hosts starts only when that many workers of its queue hold it.

The worker that claimed the row (the leader) opens a rendezvous on it (`crud.open_gang`: a fresh
id per attempt, its c10d endpoint, the gang's size, itself as the first claim) and sends one
``kdiga.join_job`` task per other host to the job's queue, i.e. to workers of the same device
class. Each worker that takes one counts itself in with a conditional UPDATE (`crud.join_gang`),
so however many race, exactly ``nodes`` hold places. When the count is full every member
launches its torchrun. If it is not full within KDIGA_GANG_TIMEOUT_S the leader fails the job
with a sentence saying so, and the members waiting for it see that and return, free again.

The row's owner and heartbeat stay the leader's: it covers the whole gang. A leader that dies
stops beating, its ranks die with it (PR_SET_PDEATHSIG), the members' ranks then fail at their
next collective, and the redelivered task opens a new rendezvous: members of the old one see the
id change and stop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kdiga_service import crud
from kdiga_service.models import CANCELLING, FINISHED_STATES, RUNNING, SUCCEEDED, Job
from kdiga_service.queue import JOIN_JOB
from kdiga_service.settings import Settings
from worker.common import Outcome, session_for

log = logging.getLogger(__name__)

POLL_S = 0.5
MEMBER_GRACE_S = 60.0  # a member waits this much longer than the leader before giving up by itself


def publish_joins(job: Job, s: Settings, rendezvous_id: str, count: int) -> None:
    """Ask `count` more workers of the job's queue to join this rendezvous."""
    from worker.celery_app import make_celery

    app = make_celery(s)
    try:
        for _ in range(count):
            app.send_task(JOIN_JOB, args=[job.id, rendezvous_id], queue=job.queue)
    finally:
        app.close()


def gather(job: Job, s: Settings, me: str, rendezvous_id: str, size: int) -> Outcome | None:
    """Leader: wait until `size` workers hold the job; None when they do, else why not.

    The job fails with one sentence when the gang is not complete in time; a cancel is honoured.
    """
    publish_joins(job, s, rendezvous_id, size - 1)
    deadline, claims = time.monotonic() + s.gang_timeout_s, 0
    while True:
        row = _reload(job.id, s)
        if row is None or row.worker_id != me or row.status in FINISHED_STATES:
            return Outcome("skipped", "the job is no longer ours")
        if row.cancel_requested:
            with session_for(s) as session:
                crud.mark_cancelled(session, job.id, worker_id=me)
            return Outcome("cancelled")
        if row.gang_claims >= size:
            log.info("gang complete", extra={"job_id": job.id, "workers": size, "rendezvous": rendezvous_id})
            return None
        if row.gang_claims != claims:
            claims = row.gang_claims
            _report(job.id, s, me, claims, size)
        if time.monotonic() > deadline:
            return _give_up(job, s, me, claims, size)
        time.sleep(POLL_S)


def _report(job_id: str, s: Settings, me: str, claims: int, size: int) -> None:
    progress = {"phase": "gathering", "percent": 0.0, "workers": claims, "workers_needed": size}
    with session_for(s) as session:
        crud.update_progress(session, job_id, progress=progress, worker_id=me)


def _give_up(job: Job, s: Settings, me: str, claims: int, size: int) -> Outcome:
    error = (f"The job needs {size} workers of queue '{job.queue}' at once but only {claims} claimed it "
             f"within {s.gang_timeout_s:g} s (KDIGA_GANG_TIMEOUT_S); it was given up and its workers released.")
    with session_for(s) as session:
        crud.fail_job(session, job.id, error=error, worker_id=me)
    log.error("gang incomplete, job given up", extra={"job_id": job.id, "claims": claims, "needed": size})
    return Outcome("failed", error)


def join(job_id: str, rendezvous_id: str, s: Settings) -> Job | None:
    """Member: take a place in the gang and wait until it is complete; the row then, else None."""
    with session_for(s) as session:
        if not crud.join_gang(session, job_id, rendezvous_id=rendezvous_id):
            log.info("no place in the gang (complete, or another attempt)", extra={"job_id": job_id})
            return None
    log.info("joined the gang", extra={"job_id": job_id, "rendezvous": rendezvous_id})
    deadline = time.monotonic() + s.gang_timeout_s + MEMBER_GRACE_S
    while time.monotonic() < deadline:
        row = _reload(job_id, s)
        if not is_current(row, rendezvous_id):
            return None
        assert row is not None
        if row.gang_claims >= row.gang_size:
            return row
        time.sleep(POLL_S)
    return None


def is_current(row: Job | None, rendezvous_id: str) -> bool:
    """The job still runs this rendezvous (not finished, given up, or retried under a new one)."""
    return row is not None and row.status in (RUNNING, CANCELLING) and row.rendezvous_id == rendezvous_id


def still_current(job_id: str, rendezvous_id: str, s: Settings, every_s: float = 2.0) -> Callable[[], bool]:
    """A `keep_going` callback for a member's torchrun (the row read every `every_s`): the job still
    runs this rendezvous, or has just succeeded in it (torchrun then exits by itself)."""
    last, answer = -float("inf"), True

    def check() -> bool:
        nonlocal last, answer
        if time.monotonic() - last >= every_s:
            row = _reload(job_id, s)
            done = row is not None and row.status == SUCCEEDED and row.rendezvous_id == rendezvous_id
            last, answer = time.monotonic(), done or is_current(row, rendezvous_id)
        return answer

    return check


def _reload(job_id: str, s: Settings) -> Job | None:
    with session_for(s) as session:
        row = crud.get_job(session, job_id)
        if row is not None:
            session.expunge(row)
        return row
