"""Database helpers shared by the API routes and the worker.

Reads take `owner_id` so another key's row is simply not found. The job life-cycle helpers
(`claim_job`, `update_progress`, `finish_job`, `fail_job`, `mark_cancelled`) are conditional
UPDATEs that commit at once, so a job redelivered by the broker, or a worker that lost its claim,
can never overwrite a newer state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import PurePosixPath
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Engine, Result, bindparam, delete, func, or_, select, update
from sqlalchemy.orm import Session

from kdiga_service import outbox, pipelines
from kdiga_service.models import (
    ACTIVE_STATES,
    CANCELLED,
    CANCELLING,
    FAILED,
    FINISHED_STATES,
    INVALID,
    QUEUED,
    READY,
    RUNNING,
    STOPPED,
    SUCCEEDED,
    ApiKey,
    Artifact,
    Base,
    ConsoleSession,
    Dataset,
    Job,
    Pipeline,
    Teacher,
    WebhookDelivery,
    WebhookEvent,
    WebhookSecret,
    derived_id,
    utcnow,
)
from kdiga_service.redact import redact_server_paths
from kdiga_service.storage import StoredObject
from kdiga_service.webhooks import new_secret

M = TypeVar("M", bound=Base)

CONTENT_TYPES = {".json": "application/json", ".html": "text/html; charset=utf-8"}


# -- generic owner-scoped reads ------------------------------------------------------------------
def updated_one_row(result: Result[Any]) -> bool:
    """Whether an UPDATE matched exactly one row (an UPDATE's result is a CursorResult at run time)."""
    return cast("CursorResult[Any]", result).rowcount == 1


def get_owned(session: Session, model: type[M], *, owner_id: str, id: str) -> M | None:
    """The row with this id if `owner_id` owns it, else None (another owner's row is 'not found')."""
    row = session.get(model, id)
    return row if row is not None and getattr(row, "owner_id", None) == owner_id else None


# The columns of a job-status read, in JobPublic's order: the hottest query of the service
# (clients poll it), so it is plain Core SELECTs, no ORM identity map.
_JOB_STATUS_COLUMNS = (
    Job.id, Job.kind, Job.name, Job.status, Job.spec, Job.progress, Job.metrics, Job.result, Job.error,
    Job.attempts, Job.cancel_requested, Job.created_at, Job.started_at, Job.finished_at,
    Job.labels, Job.pipeline_id, Job.pipeline_step,
)
_ARTIFACT_COLUMNS = (
    Artifact.id, Artifact.job_id, Artifact.name, Artifact.kind, Artifact.content_type, Artifact.size_bytes, Artifact.sha256,
    Artifact.created_at,
)
JOB_STATUS_KEYS = tuple(c.key for c in _JOB_STATUS_COLUMNS)
ARTIFACT_KEYS = tuple(c.key for c in _ARTIFACT_COLUMNS)
JOB_STATUS_QUERY = select(*_JOB_STATUS_COLUMNS).where(
    Job.id == bindparam("job_id"), Job.owner_id == bindparam("owner_id")
)
JOB_ARTIFACTS_QUERY = (
    select(*_ARTIFACT_COLUMNS).where(Artifact.job_id == bindparam("job_id")).order_by(Artifact.created_at, Artifact.id)
)


def job_status(engine: Engine, *, owner_id: str, job_id: str) -> dict[str, Any] | None:
    """A job as JobPublic's fields (artifacts as dicts), or None when `owner_id` does not own it.

    Two Core queries on a connection held only for the queries: on SQLite the API runs this inline
    in the event loop, and a connection held across an `await` by each of 64 concurrent requests
    would exhaust the pool and block the loop in the pool's checkout. (Not one JOIN: that would
    repeat, and decode, the job's four JSON columns once per artifact.)
    """
    with engine.connect() as conn:
        job = conn.execute(JOB_STATUS_QUERY, {"job_id": job_id, "owner_id": owner_id}).first()
        if job is None:
            return None
        artifacts = conn.execute(JOB_ARTIFACTS_QUERY, {"job_id": job_id}).all()
    fields = dict(zip(JOB_STATUS_KEYS, job, strict=True))
    fields["artifacts"] = [dict(zip(ARTIFACT_KEYS, a, strict=True)) for a in artifacts]
    return fields


def list_owned(
    session: Session, model: type[M], *, owner_id: str, limit: int = 50, offset: int = 0,
    labels: Mapping[str, str] | None = None, **filters: Any
) -> tuple[Sequence[M], int]:
    """One page of an owner's rows, newest first, and the total count (`labels`: all must match)."""
    conds = [model.owner_id == owner_id]  # type: ignore[attr-defined]
    conds += [getattr(model, k) == v for k, v in filters.items() if v is not None]
    conds += [model.labels[k].as_string() == v for k, v in (labels or {}).items()]  # type: ignore[attr-defined]
    count = session.scalar(select(func.count()).select_from(model).where(*conds)) or 0
    stmt = select(model).where(*conds).order_by(model.created_at.desc(), model.id)  # type: ignore[attr-defined]
    rows = session.scalars(stmt.limit(limit).offset(offset)).all()
    return rows, count


# -- teachers, datasets --------------------------------------------------------------------------
def create_teacher(
    session: Session,
    *,
    owner_id: str,
    name: str,
    format: str,
    stored: StoredObject,
    spec: dict[str, Any],
    status: str = "validating",
    source_job_id: str | None = None,
    id: str | None = None,
    labels: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Teacher:
    """Add a teacher row for an object already in the store (caller commits)."""
    teacher = Teacher(
        labels=dict(labels or {}),
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        owner_id=owner_id,
        name=name,
        format=format,
        storage_key=stored.key,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        spec=spec,
        status=status,
        source_job_id=source_job_id,
        validated_at=utcnow() if status == READY else None,
    )
    if id:
        teacher.id = id
    session.add(teacher)
    session.flush()
    return teacher


def set_teacher_validated(
    session: Session,
    teacher_id: str,
    *,
    spec: dict[str, Any] | None = None,
    format: str | None = None,
    error: str | None = None,
) -> bool:
    """Worker: mark a teacher ready (with its completed spec) or invalid (with one sentence); commits."""
    values: dict[str, Any] = {"status": INVALID if error else READY, "error": redact_server_paths(error),
                              "validated_at": utcnow()}
    if spec is not None:
        values["spec"] = spec
    if format is not None:
        values["format"] = format
    res = session.execute(update(Teacher).where(Teacher.id == teacher_id).values(**values))
    session.commit()
    return bool(res.rowcount)  # type: ignore[attr-defined]


def set_dataset_validated(
    session: Session, dataset_id: str, *, info: dict[str, Any] | None = None, error: str | None = None
) -> bool:
    """Worker: mark a dataset ready with `info` (num_classes, class_names, input_shape, train_size,
    test_size; a dataset by reference also its layout) or invalid with one sentence; commits."""
    allowed = {"num_classes", "class_names", "input_shape", "train_size", "test_size", "layout"}
    values: dict[str, Any] = {k: v for k, v in (info or {}).items() if k in allowed}
    if values.get("input_shape") is not None:  # None: a reference of mixed image sizes (the job's img_size decides)
        values["input_shape"] = list(values["input_shape"])
    if "class_names" in values and values["class_names"] is not None:
        values["class_names"] = list(values["class_names"])
    values.update(status=INVALID if error else READY, error=redact_server_paths(error), validated_at=utcnow())
    res = session.execute(update(Dataset).where(Dataset.id == dataset_id).values(**values))
    session.commit()
    return bool(res.rowcount)  # type: ignore[attr-defined]


def teacher_in_use(session: Session, *, teacher_id: str) -> bool:
    """True while an active job uses this teacher."""
    stmt = select(Job.id).where(Job.teacher_id == teacher_id, Job.status.in_(ACTIVE_STATES)).limit(1)
    return session.scalar(stmt) is not None


def dataset_in_use(session: Session, *, dataset_id: str) -> bool:
    """True while an active job uses this dataset."""
    stmt = select(Job.id).where(Job.dataset_id == dataset_id, Job.status.in_(ACTIVE_STATES)).limit(1)
    return session.scalar(stmt) is not None


# -- jobs: API side ------------------------------------------------------------------------------
def count_active_jobs(session: Session, *, owner_id: str) -> int:
    stmt = (
        select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.status.in_(ACTIVE_STATES))
    )
    return session.scalar(stmt) or 0


def get_job_by_idempotency_key(session: Session, *, owner_id: str, key: str) -> Job | None:
    return get_by_idempotency_key(session, Job, owner_id=owner_id, key=key)


def get_by_idempotency_key(session: Session, model: type[M], *, owner_id: str, key: str) -> M | None:
    """The owner's job, teacher or dataset created with this Idempotency-Key, or None."""
    owned = model.owner_id == owner_id, model.idempotency_key == key  # type: ignore[attr-defined]
    found: M | None = session.execute(select(model).where(*owned)).scalars().first()
    return found


def request_cancel(session: Session, *, job: Job) -> Job:
    """API: a queued job becomes cancelled at once; a running one becomes cancelling (caller commits)."""
    job.cancel_requested = True
    if job.status in (QUEUED, STOPPED):
        job.status, job.finished_at = CANCELLED, utcnow()
    elif job.status == RUNNING:
        job.status = CANCELLING
    else:
        return job
    session.flush()
    after_state_change(session, job.id, event=f"job.{job.status}")
    return job


def job_created(session: Session, job: Job) -> Job:
    """API: after `session.add(job)`, write the job's `queued` event with it (caller commits)."""
    session.flush()
    after_state_change(session, job.id, event="job.queued")
    return job


# -- the consequences of a job's state change, in its transaction --------------------------------
def after_state_change(session: Session, job_id: str, *, event: str | None) -> None:
    """Write the job's webhook event (if its notify wants it) and advance its pipeline (if any).

    Called by every helper here that changes a job's state, before its commit: the event, the
    next pipeline steps and the state change are one transaction (the transactional outbox).
    """
    row = session.execute(select(*outbox.JOB_EVENT_COLUMNS).where(Job.id == job_id)).mappings().first()
    if row is None:
        return
    job = dict(row)
    if event is not None:
        outbox.emit(session, job, event)
    if job["pipeline_id"] and job["status"] in FINISHED_STATES:
        advance_pipeline(session, job["pipeline_id"])


def advance_pipeline(session: Session, pipeline_id: str) -> Pipeline | None:
    """Create the pipeline's steps whose inputs are ready, or end it (caller commits).

    The pipeline row is locked (PostgreSQL; SQLite has one writer at a time anyway), so when two
    steps finish at once the second to commit sees the first and creates what both were waiting for.
    """
    pipe = session.execute(select(Pipeline).where(Pipeline.id == pipeline_id).with_for_update()
                           .execution_options(populate_existing=True)).scalar_one_or_none()
    if pipe is None or pipe.status in FINISHED_STATES:
        return pipe
    rows = session.execute(select(Job.pipeline_step, Job.status, Job.error).where(Job.pipeline_id == pipeline_id)).all()
    moves = pipelines.next_moves(pipe.spec.get("steps") or [], {str(r[0]): r[1] for r in rows},
                                 {str(r[0]): r[2] for r in rows}, cancel_requested=pipe.cancel_requested)
    for step in moves.create:
        _create_step_job(session, pipe, step)
    if moves.final_status is not None:
        pipe.status, pipe.error, pipe.finished_at = moves.final_status, moves.error, utcnow()
    return pipe


def _create_step_job(session: Session, pipe: Pipeline, step: Mapping[str, Any]) -> Job:
    # enqueued_at None: never sent; the API processes' pump publishes it within a poll (api/pump.py).
    job = Job(id=step["job_id"], owner_id=pipe.owner_id, kind=step["kind"], name=step.get("job_name"),
              queue=step["queue"], spec=step["spec"], dataset_id=step.get("dataset_id"),
              teacher_id=step.get("teacher_id"), labels=dict(step.get("labels") or {}), pipeline_id=pipe.id,
              pipeline_step=step["name"], progress={"phase": "queued", "percent": 0.0},
              expected_work=step.get("expected_work"))
    session.add(job)
    job_created(session, job)
    job.enqueued_at = None  # after the insert: the column's default would replace a None given to it
    session.flush()
    return job


def create_pipeline(session: Session, *, owner_id: str, name: str | None, steps: list[dict[str, Any]],
                    labels: Mapping[str, str] | None, id: str | None = None) -> Pipeline:
    """API: add a pipeline and create its first steps' jobs (caller commits)."""
    pipe = Pipeline(owner_id=owner_id, name=name, status=RUNNING, spec={"steps": steps},
                    labels=dict(labels or {}))
    if id:
        pipe.id = id
    session.add(pipe)
    session.flush()
    advance_pipeline(session, pipe.id)
    return pipe


def request_pipeline_cancel(session: Session, *, pipe: Pipeline) -> Pipeline:
    """API: no step starts any more; active (and stopped) steps are cancelled like jobs (caller commits)."""
    pipe.cancel_requested = True
    session.flush()
    active = session.scalars(select(Job).where(Job.pipeline_id == pipe.id,
                                               Job.status.in_((*ACTIVE_STATES, STOPPED)))).all()
    for job in active:
        request_cancel(session, job=job)
    advance_pipeline(session, pipe.id)
    return pipe


# -- jobs: worker side ---------------------------------------------------------------------------
def claim_job(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    stale_after_s: float = 300.0,
    max_attempts: int | None = None,
) -> Job | None:
    """Take a job for this worker, or return None if it is not ours to run.

    One conditional UPDATE: a `queued` job, or a `running`/`cancelling` one whose heartbeat is
    older than `stale_after_s` (its worker died and the broker redelivered the task). Increments
    `attempts`. With `max_attempts`, a stale job that already used them all is marked failed
    instead (and None is returned). Commits.
    """
    now = utcnow()
    stale = or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < now - timedelta(seconds=stale_after_s))
    claimable = or_(Job.status == QUEUED, (Job.status.in_((RUNNING, CANCELLING))) & stale)
    conds = [Job.id == job_id, claimable]
    if max_attempts is not None:
        conds.append(Job.attempts < max_attempts)
    res = session.execute(
        update(Job)
        .where(*conds)
        .values(
            status=RUNNING,
            worker_id=worker_id,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
        )
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:  # type: ignore[attr-defined]
        after_state_change(session, job_id, event="job.running")
    session.commit()
    if res.rowcount != 1:  # type: ignore[attr-defined]
        if max_attempts is not None:
            _fail_exhausted(session, job_id, stale, max_attempts)
        return None
    job = session.get(Job, job_id, populate_existing=True)
    if job is not None and job.cancel_requested:  # cancelled while it was being redelivered
        job.status = CANCELLING
        session.commit()
    return job


def interrupted_message(attempts: int) -> str:
    """The one sentence a job (or validation) gets when its worker died on every attempt."""
    return (f"The job was interrupted {attempts} times (the worker died each time, e.g. out of memory); "
            "giving up.")


def _fail_exhausted(session: Session, job_id: str, stale: Any, max_attempts: int) -> None:
    job = session.get(Job, job_id)
    attempts = job.attempts if job is not None else max_attempts
    res = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status.in_((QUEUED, RUNNING, CANCELLING)),
            Job.attempts >= max_attempts,
            stale,
        )
        .values(status=FAILED, error=interrupted_message(attempts), finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:  # type: ignore[attr-defined]
        after_state_change(session, job_id, event="job.failed")
    session.commit()


def _owned_running(job_id: str, worker_id: str | None) -> list[Any]:
    conds = [Job.id == job_id, Job.status.in_((RUNNING, CANCELLING))]
    if worker_id is not None:
        conds.append(Job.worker_id == worker_id)
    return conds


def update_progress(
    session: Session,
    job_id: str,
    *,
    progress: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    worker_id: str | None = None,
    milestone: bool = False,
) -> bool:
    """Store the latest progress (and metrics) and refresh the heartbeat; commits.

    `milestone`: this progress is worth a `job.progress` webhook event (a new phase, a quarter).
    Returns False when the job is no longer running under this worker (finished, or claimed by
    another after a redelivery): the caller should stop.
    """
    now = utcnow()
    values: dict[str, Any] = {"progress": {**progress, "updated_at": now.isoformat()}, "heartbeat_at": now}
    if metrics is not None:
        values["metrics"] = metrics
    res = session.execute(
        update(Job)
        .where(*_owned_running(job_id, worker_id))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if milestone and res.rowcount == 1:  # type: ignore[attr-defined]
        after_state_change(session, job_id, event=outbox.PROGRESS_EVENT)
    session.commit()
    return updated_one_row(res)


def heartbeat(session: Session, job_id: str, *, worker_id: str | None = None) -> bool:
    """Refresh the heartbeat only (long phases without progress); commits."""
    res = session.execute(
        update(Job)
        .where(*_owned_running(job_id, worker_id))
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return updated_one_row(res)


def is_cancel_requested(session: Session, job_id: str) -> bool:
    """True when the owner asked to cancel (or the job vanished)."""
    flag = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return True if flag is None else bool(flag)


def _finish(session: Session, job_id: str, worker_id: str | None, **values: Any) -> bool:
    res = session.execute(
        update(Job)
        .where(*_owned_running(job_id, worker_id))
        .values(finished_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:  # type: ignore[attr-defined]
        after_state_change(session, job_id, event=f"job.{values['status']}")
    session.commit()
    return updated_one_row(res)


def finish_job(
    session: Session,
    job_id: str,
    *,
    result: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
    worker_id: str | None = None,
) -> bool:
    """Mark a running job succeeded with its result (and final metrics/progress); commits."""
    values: dict[str, Any] = {"status": SUCCEEDED, "result": result, "error": None}
    if metrics is not None:
        values["metrics"] = metrics
    if progress is not None:
        values["progress"] = {**progress, "updated_at": utcnow().isoformat()}
    return _finish(session, job_id, worker_id, **values)


def fail_job(session: Session, job_id: str, *, error: str, worker_id: str | None = None,
             resumable: bool = False) -> bool:
    """Mark a running job failed with one sentence saying why; commits. `resumable`: it failed after
    its trained weights were stored, so `resume` may retry what came after training."""
    extra: dict[str, Any] = {"result": {"resumable": "evaluation"}} if resumable else {}
    return _finish(session, job_id, worker_id, status=FAILED, error=redact_server_paths(error), **extra)


def forget_resumable(session: Session, job_id: str) -> None:
    """A failed job whose checkpoints were deleted cannot resume after training any more; commits."""
    job = session.get(Job, job_id)
    if job is not None and (job.result or {}).get("resumable"):
        job.result = {k: v for k, v in job.result.items() if k != "resumable"}
        session.commit()


def stop_job(session: Session, job_id: str, *, reason: str, worker_id: str | None = None) -> bool:
    """Worker: the run reached its time budget at a safe point; `reason` says so (in `error`); commits."""
    return _finish(session, job_id, worker_id, status=STOPPED, error=redact_server_paths(reason))


def resume_job(session: Session, *, job: Job, spec: dict[str, Any] | None = None) -> Job:
    """API: queue a stopped job again (or one that failed after training), a fresh attempt count, its
    checkpoint kept (caller publishes its task, then commits). `spec`: the spec with a new budget."""
    job.status, job.error, job.finished_at, job.worker_id, job.heartbeat_at = QUEUED, None, None, None, None
    job.attempts, job.cancel_requested, job.enqueued_at = 0, False, utcnow()
    job.result = {k: v for k, v in (job.result or {}).items() if k != "resumable"}
    job.progress = {**(job.progress or {}), "phase": "queued", "eta_s": None}
    if spec is not None:
        job.spec = spec
    session.flush()
    after_state_change(session, job.id, event="job.queued")
    return job


def mark_cancelled(session: Session, job_id: str, *, worker_id: str | None = None) -> bool:
    """Worker: the job stopped because its owner cancelled it; commits."""
    return _finish(session, job_id, worker_id, status=CANCELLED)


# -- jobs on several hosts (a gang) ---------------------------------------------------------------
def open_gang(session: Session, job_id: str, *, worker_id: str, rendezvous_id: str, endpoint: str,
              size: int) -> bool:
    """The worker holding a job starts gathering its gang: a fresh rendezvous, itself as first member.

    Returns False when the job is no longer running under `worker_id`. Commits.
    """
    res = session.execute(
        update(Job)
        .where(*_owned_running(job_id, worker_id))
        .values(rendezvous_id=rendezvous_id, rendezvous_endpoint=endpoint, gang_size=size, gang_claims=1)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return updated_one_row(res)


def join_gang(session: Session, job_id: str, *, rendezvous_id: str) -> bool:
    """Count one more worker into the gang of this rendezvous, if it still has a free place.

    One conditional UPDATE, so however many workers race for the places, at most `gang_size`
    get one. Returns True for this worker's place. Commits.
    """
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == RUNNING, Job.rendezvous_id == rendezvous_id,
               Job.gang_claims < Job.gang_size)
        .values(gang_claims=Job.gang_claims + 1)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return updated_one_row(res)


def release_job(session: Session, job_id: str, *, worker_id: str, progress: dict[str, Any]) -> bool:
    """Put a running job back in the queue after an attempt that ended early (a rank died).

    Its attempts count stays, so the next claim counts against the same cap; the heartbeat is
    cleared so that `claim_job` fails a job whose attempts are used up. Commits.
    """
    res = session.execute(
        update(Job)
        .where(*_owned_running(job_id, worker_id), Job.status == RUNNING)
        .values(status=QUEUED, worker_id=None, heartbeat_at=None, rendezvous_id=None, rendezvous_endpoint=None,
                gang_claims=0, progress={**progress, "updated_at": utcnow().isoformat()})
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:  # type: ignore[attr-defined]
        after_state_change(session, job_id, event="job.queued")
    session.commit()
    return updated_one_row(res)


def get_job(session: Session, job_id: str) -> Job | None:
    """Worker: reload a job row (no owner check), fresh from the database."""
    return session.get(Job, job_id, populate_existing=True)


def is_finished(job: Job) -> bool:
    return job.status in FINISHED_STATES


# -- artifacts -----------------------------------------------------------------------------------
def add_artifact(
    session: Session,
    *,
    job: Job,
    name: str,
    kind: str,
    stored: StoredObject,
    content_type: str | None = None,
) -> Artifact:
    """Worker: record a file already in the store as `job`'s artifact `name`; a rerun replaces it. Commits.

    The id is derived from (job, name), so a redelivered job overwrites its own rows in place.
    """
    artifact_id = derived_id("artifact", job.id, name)
    session.execute(delete(Artifact).where(Artifact.job_id == job.id, Artifact.name == name,
                                           Artifact.id != artifact_id))
    artifact = session.merge(Artifact(
        id=artifact_id, owner_id=job.owner_id, job_id=job.id, name=name, kind=kind,
        storage_key=stored.key, size_bytes=stored.size_bytes, sha256=stored.sha256,
        content_type=content_type or CONTENT_TYPES.get(PurePosixPath(name).suffix, "application/octet-stream"),
    ))
    session.commit()
    return artifact


def find_artifact(session: Session, *, job_id: str, kind: str) -> Artifact | None:
    """The newest artifact of this kind for a job."""
    stmt = select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == kind)
    return session.scalar(stmt.order_by(Artifact.created_at.desc()).limit(1))


def artifact_uses_key(session: Session, *, storage_key: str) -> bool:
    """True when an artifact row points at this stored object."""
    return session.scalar(select(Artifact.id).where(Artifact.storage_key == storage_key).limit(1)) is not None


def get_api_key_by_hash(session: Session, *, key_hash: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))


# -- webhooks --------------------------------------------------------------------------------------
def rotate_webhook_secret(session: Session, *, owner_id: str, grace_s: float) -> tuple[WebhookSecret, datetime | None]:
    """A new signing secret for the key; the previous one keeps signing for `grace_s` more seconds.

    Returns the new row and when the previous secret stops (None when there was none). Commits.
    """
    now = utcnow()
    valid_until = now + timedelta(seconds=grace_s)
    current = session.scalars(select(WebhookSecret).where(
        WebhookSecret.owner_id == owner_id, or_(WebhookSecret.expires_at.is_(None), WebhookSecret.expires_at > now))
    ).all()
    for row in current:
        row.expires_at = min(row.expires_at or valid_until, valid_until)
    secret = new_secret()
    row = WebhookSecret(owner_id=owner_id, secret=secret, prefix=secret[:12], created_at=now)
    session.add(row)
    session.commit()
    return row, (valid_until if current else None)


def has_webhook_secret(session: Session, *, owner_id: str) -> bool:
    stmt = select(WebhookSecret.id).where(WebhookSecret.owner_id == owner_id, WebhookSecret.expires_at.is_(None))
    return session.scalar(stmt.limit(1)) is not None


def job_deliveries(session: Session, *, job_id: str) -> tuple[Sequence[WebhookEvent], list[dict[str, Any]]]:
    """A job's events in order, and every delivery attempt (oldest first) with its event's id and type."""
    events = session.scalars(select(WebhookEvent).where(WebhookEvent.job_id == job_id).order_by(WebhookEvent.seq)).all()
    rows = session.execute(
        select(WebhookDelivery, WebhookEvent.event_id, WebhookEvent.type)
        .join(WebhookEvent, WebhookEvent.seq == WebhookDelivery.event_seq)
        .where(WebhookDelivery.job_id == job_id)
        .order_by(WebhookDelivery.started_at, WebhookDelivery.attempt)
    ).all()
    attempts = [{**{c.key: getattr(d, c.key) for c in WebhookDelivery.__table__.columns},
                 "event_id": event_id, "event_type": event_type} for d, event_id, event_type in rows]
    return events, attempts


def record_job_export(session: Session, job_id: str, *, key: str, value: dict[str, Any]) -> bool:
    """Worker: note where a finished job's model was exported (`result[key]`); commits.

    Only the worker that finished the job writes its result afterwards, so read-modify-write is safe.
    """
    result = session.scalar(select(Job.result).where(Job.id == job_id))
    if result is None:
        return False
    session.execute(update(Job).where(Job.id == job_id).values(result={**result, key: value})
                    .execution_options(synchronize_session=False))
    session.commit()
    return True


# -- web console sessions --------------------------------------------------------------------------
def open_console_session(session: Session, *, owner_id: str, token_hash: str, csrf_token: str,
                         ttl_s: float) -> ConsoleSession:
    """A signed-in console session for the key (expired ones of every key are swept here); commits."""
    now = utcnow()
    session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))
    row = ConsoleSession(id=token_hash, owner_id=owner_id, csrf_token=csrf_token, created_at=now,
                         expires_at=now + timedelta(seconds=ttl_s))
    session.add(row)
    session.commit()
    return row


def console_session_key(session: Session, *, token_hash: str) -> tuple[ConsoleSession, ApiKey] | None:
    """The live session and its (unrevoked) key, or None."""
    row = session.get(ConsoleSession, token_hash)
    if row is None or row.expires_at < utcnow():
        return None
    key = session.get(ApiKey, row.owner_id)
    return (row, key) if key is not None and key.revoked_at is None else None


def close_console_session(session: Session, *, token_hash: str) -> None:
    """Sign out; commits."""
    session.execute(delete(ConsoleSession).where(ConsoleSession.id == token_hash))
    session.commit()
