"""Jobs: create (idempotent, rate-limited), list, read, events (SSE), cancel, report."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
from anyio import to_thread
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.auth import Owner
from api.deps import CurrentOwner, PageDep, SessionDep, SettingsDep, StorageDep, not_found, run_query
from api.labels import LabelFilterDep
from api.routes._common import QueueUnavailable, log, owned_or_404, publish, queue_down
from api.routes.webhooks import check_notify
from api.schemas import (
    EvalConfigSchema,
    JobCreate,
    JobPublic,
    ObjectiveConfigSchema,
    Page,
    TrainConfigSchema,
)
from kdiga_service import crud
from kdiga_service.catalog import check_name, methods_by_kind
from kdiga_service.models import FINISHED_STATES, READY, SUCCEEDED, ApiKey, Dataset, Job, Teacher
from kdiga_service.queue import RUN_JOB, job_queue
from kdiga_service.settings import Settings
from kdiga_service.storage import ArtifactStore, StorageError

router = APIRouter(prefix="/jobs", tags=["jobs"])

MAX_REPORT_BYTES = 64 * 1024 * 1024
KEEPALIVE_S = 15.0


def unprocessable(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail)


def conflict(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, detail)


def require_json(request: Request) -> None:
    """415 unless the body is declared as JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "Send the job as JSON with 'Content-Type: application/json'.",
        )


# -- validation ----------------------------------------------------------------------------------
@dataclass
class JobPlan:
    """A validated job request, ready to become a row."""

    spec: dict[str, Any]
    queue: str
    dataset_id: str
    teacher_id: str | None


def _ready_teacher(
    session: Session, owner_id: str, teacher_id: str, planned: frozenset[str] = frozenset()
) -> Teacher | None:
    if teacher_id in planned:  # made by an earlier pipeline step: checked when that step succeeds
        return None
    teacher = crud.get_owned(session, Teacher, owner_id=owner_id, id=teacher_id)
    if teacher is None:
        raise not_found("Teacher", teacher_id)
    if teacher.status != READY:
        why = f": {teacher.error.rstrip('.')}." if teacher.error else "; wait until its validation finishes."
        raise conflict(f"Teacher '{teacher_id}' is not ready (status {teacher.status}){why}")
    return teacher


def _ready_dataset(session: Session, owner_id: str, dataset_id: str) -> Dataset:
    dataset = crud.get_owned(session, Dataset, owner_id=owner_id, id=dataset_id)
    if dataset is None:
        raise not_found("Dataset", dataset_id)
    if dataset.status != READY:
        why = f": {dataset.error.rstrip('.')}." if dataset.error else "; wait until its validation finishes."
        raise conflict(f"Dataset '{dataset_id}' is not ready (status {dataset.status}){why}")
    return dataset


def _check_names(kind: str, names: list[str]) -> None:
    for name in names:
        if message := check_name(kind, name):
            raise unprocessable(message)


def _objective(body: JobCreate, default_method: str) -> dict[str, Any]:
    objective = body.objective or ObjectiveConfigSchema(method=default_method)  # type: ignore[arg-type]
    if "method" not in objective.model_fields_set:
        objective = objective.model_copy(update={"method": default_method})
    _check_names("methods", [objective.method])
    allowed = methods_by_kind()[body.kind]
    if objective.method not in allowed:
        raise unprocessable(
            f"Method '{objective.method}' cannot be used by a {body.kind} job; "
            f"valid methods are: {', '.join(allowed)}."
        )
    return objective.model_dump()


def _student(session: Session, owner_id: str, body: JobCreate, planned: frozenset[str]) -> dict[str, Any]:
    if body.student is None:
        raise unprocessable(f"A {body.kind} job needs 'student' with an 'arch'.")
    _check_names("architectures", [body.student.arch])
    if body.student.weights_id:
        _ready_teacher(session, owner_id, body.student.weights_id, planned)
    return body.student.model_dump()


def _plan_training(session: Session, owner_id: str, body: JobCreate,
                   planned: frozenset[str]) -> tuple[dict[str, Any], str | None]:
    if body.model is not None:
        raise unprocessable(f"A {body.kind} job takes no 'model'; use 'student' for the model to train.")
    if body.kind == "distill":
        if not body.teacher_id:
            raise unprocessable("A distill job needs 'teacher_id'.")
        _ready_teacher(session, owner_id, body.teacher_id, planned)
        objective = _objective(body, "kdiga")
    else:
        if body.teacher_id:
            raise unprocessable(
                "An adversarial_train job takes no 'teacher_id'; it trains 'student' from data."
            )
        objective = _objective(body, "pgd_at")
    parts = {
        "student": _student(session, owner_id, body, planned),
        "model": None,
        "objective": objective,
        "train": (body.train or TrainConfigSchema()).model_dump(),
    }
    return parts, body.teacher_id


def _plan_evaluate(session: Session, owner_id: str, body: JobCreate,
                   planned: frozenset[str]) -> tuple[dict[str, Any], str | None]:
    if body.model is None:
        raise unprocessable("An evaluate job needs 'model' with a 'teacher_id' or a 'job_id'.")
    if body.student is not None or body.objective is not None or body.train is not None:
        raise unprocessable("An evaluate job takes no 'student', 'objective' or 'train'.")
    if body.model.teacher_id:
        _ready_teacher(session, owner_id, body.model.teacher_id, planned)
    if body.model.job_id and body.model.job_id not in planned:
        source = crud.get_owned(session, Job, owner_id=owner_id, id=body.model.job_id)
        if source is None:
            raise not_found("Job", body.model.job_id)
        if source.status != SUCCEEDED or source.kind == "evaluate":
            raise conflict(f"Job '{source.id}' has not produced a model (status {source.status}).")
    if body.teacher_id:
        _ready_teacher(session, owner_id, body.teacher_id, planned)
    parts = {"student": None, "model": body.model.model_dump(), "objective": None, "train": None}
    return parts, body.model.teacher_id or body.teacher_id


def plan_job(session: Session, owner_id: str, body: JobCreate, settings: Settings, *,
             planned: frozenset[str] = frozenset()) -> JobPlan:
    """Validate a job request against the caller's resources and the catalog (4xx on any problem).

    `planned`: ids of teachers and jobs that earlier steps of a pipeline will make (not checked yet).
    """
    _check_names("job_kinds", [body.kind])
    _ready_dataset(session, owner_id, body.dataset_id)
    evaluation = body.evaluation or EvalConfigSchema()
    _check_names("attacks", [a.name for a in evaluation.attacks])
    if body.kind == "evaluate":
        parts, teacher_id = _plan_evaluate(session, owner_id, body, planned)
    else:
        parts, teacher_id = _plan_training(session, owner_id, body, planned)
    spec = {
        "kind": body.kind,
        "name": body.name,
        "dataset_id": body.dataset_id,
        "teacher_id": body.teacher_id,
        **parts,
        "evaluation": evaluation.model_dump(),
        "labels": body.labels or {},
        "notify": check_notify(session, owner_id, body.notify, settings),
    }
    queue = job_queue(settings, body.kind)
    return JobPlan(spec=spec, queue=queue, dataset_id=body.dataset_id, teacher_id=teacher_id)


def request_hash(body: JobCreate) -> str:
    canonical = json.dumps(
        body.model_dump(mode="json", exclude_unset=True), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(job: Job, digest: str, key: str, response: Response) -> Job:
    if job.request_hash != digest:
        raise conflict(f"Idempotency-Key '{key}' was already used with a different request body.")
    response.status_code = status.HTTP_200_OK
    return job


def _check_limit(session: Session, owner: Owner, settings: Settings) -> None:
    # Lock the key's row (PostgreSQL) so two concurrent requests cannot both pass the count.
    session.execute(select(ApiKey.id).where(ApiKey.id == owner.id).with_for_update())
    limit = owner.max_concurrent_jobs or settings.max_concurrent_jobs_per_key
    if crud.count_active_jobs(session, owner_id=owner.id) >= limit:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"This API key already has {limit} active jobs, its limit; wait for one to finish or cancel one.",
        )


# -- routes --------------------------------------------------------------------------------------
@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    dependencies=[Depends(require_json)],
    responses={200: {"model": JobPublic, "description": "An earlier request with this Idempotency-Key."}},
)
def create_job(
    body: JobCreate,
    response: Response,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Job:
    """Create a distill, adversarial_train or evaluate job and queue it."""
    digest = request_hash(body)
    if idempotency_key and (
        existing := crud.get_job_by_idempotency_key(session, owner_id=owner.id, key=idempotency_key)
    ):
        return _replay(existing, digest, idempotency_key, response)
    plan = plan_job(session, owner.id, body, settings)
    _check_limit(session, owner, settings)
    job = Job(
        owner_id=owner.id,
        kind=body.kind,
        name=body.name,
        queue=plan.queue,
        spec=plan.spec,
        dataset_id=plan.dataset_id,
        teacher_id=plan.teacher_id,
        idempotency_key=idempotency_key,
        request_hash=digest,
        progress={"phase": "queued", "percent": 0.0},
        labels=body.labels or {},
    )
    session.add(job)
    try:
        crud.job_created(session, job)
        session.commit()
    except IntegrityError:  # the same Idempotency-Key raced in from a concurrent request
        session.rollback()
        existing = crud.get_job_by_idempotency_key(session, owner_id=owner.id, key=idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, digest, idempotency_key or "", response)
    try:
        publish(settings, RUN_JOB, job.id, queue=plan.queue)
    except QueueUnavailable:
        log.warning("broker unavailable; job %s removed", job.id)
        session.delete(job)
        session.commit()
        raise queue_down() from None
    log.info("job %s queued on %s", job.id, plan.queue)
    return job


@router.get("", response_model=Page[JobPublic])
def list_jobs(
    owner: CurrentOwner,
    session: SessionDep,
    page: PageDep,
    labels: LabelFilterDep,
    status_filter: Annotated[str | None, Query(alias="status")] = None,
    kind: Annotated[str | None, Query()] = None,
) -> Page[JobPublic]:
    """List your jobs, newest first (optionally by status, kind or labels: `?label=key=value`)."""
    rows, count = crud.list_owned(
        session, Job, owner_id=owner.id, limit=page.limit, offset=page.offset, labels=labels,
        status=status_filter, kind=kind,
    )
    return Page(data=[JobPublic.model_validate(r) for r in rows], count=count)


def _owned_job(session: Session, owner_id: str, job_id: str) -> Job:
    return owned_or_404(session, Job, owner_id, job_id, "Job")


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    responses={304: {"description": "Not modified since the ETag sent in `If-None-Match`."}},
)
async def read_job(job_id: str, request: Request, owner: CurrentOwner) -> Response:
    """Read a job: status, progress (with ETA), latest metrics, error, artifacts.

    The answer carries an `ETag`; a poller that sends it back in `If-None-Match` gets an empty
    304 until the job changes.
    """
    # The hottest route (clients poll it): one Core query, serialised once, no thread hop on SQLite.
    fields = await run_query(request, request.app.state.status_reader.read, owner.id, job_id)
    if fields is None:
        raise not_found("Job", job_id)
    body = JobPublic.model_validate(fields).model_dump_json().encode()
    etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(content=body, media_type="application/json", headers=headers)


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic)
def cancel_job(job_id: str, owner: CurrentOwner, session: SessionDep) -> Job:
    """Cancel a job: a queued job never starts; a running one stops at its next step."""
    job = _owned_job(session, owner.id, job_id)
    if job.status in FINISHED_STATES:
        raise conflict(f"Job '{job_id}' already finished (status {job.status}), so it cannot be cancelled.")
    crud.request_cancel(session, job=job)
    session.commit()
    return job


def _job_json(sessionmaker: Any, owner_id: str, job_id: str) -> tuple[str, bool] | None:
    with sessionmaker() as session:
        job = crud.get_owned(session, Job, owner_id=owner_id, id=job_id)
        if job is None:
            return None
        return JobPublic.model_validate(job).model_dump_json(), job.status in FINISHED_STATES


async def _events(request: Request, owner_id: str, job_id: str, interval: float) -> AsyncIterator[str]:
    sessionmaker, last, last_sent = request.app.state.sessionmaker, None, time.monotonic()
    while True:
        loaded = await to_thread.run_sync(_job_json, sessionmaker, owner_id, job_id)
        if loaded is None:
            return
        data, finished = loaded
        if data != last:
            yield f"event: progress\ndata: {data}\n\n"
            last, last_sent = data, time.monotonic()
        if finished:
            yield f"event: end\ndata: {data}\n\n"
            return
        if time.monotonic() - last_sent > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        if await request.is_disconnected():
            return
        await anyio.sleep(interval)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."}},
)
async def stream_job_events(
    job_id: str, request: Request, owner: CurrentOwner, settings: SettingsDep
) -> StreamingResponse:
    """Stream the job as server-sent events (`progress` on each change, then `end`)."""
    if await to_thread.run_sync(_job_json, request.app.state.sessionmaker, owner.id, job_id) is None:
        raise not_found("Job", job_id)
    return StreamingResponse(
        _events(request, owner.id, job_id, settings.sse_poll_interval_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _report_artifact(session: Session, job: Job, kind: str, store: ArtifactStore) -> str:
    artifact = crud.find_artifact(session, job_id=job.id, kind=kind)
    if artifact is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"Job '{job.id}' has no report yet.")
    return artifact.storage_key


@router.get("/{job_id}/report", responses={200: {"content": {"application/json": {}, "text/html": {}}}})
def read_job_report(
    job_id: str,
    owner: CurrentOwner,
    session: SessionDep,
    store: StorageDep,
    format: Annotated[Literal["json", "html"], Query()] = "json",
) -> Response:
    """The job's robustness report as JSON, or as an HTML page with `?format=html`."""
    job = _owned_job(session, owner.id, job_id)
    key = _report_artifact(session, job, "report_html" if format == "html" else "report_json", store)
    try:
        data = store.read_bytes(key, max_bytes=MAX_REPORT_BYTES)
    except StorageError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"Job '{job.id}' has no report yet.") from None
    if format == "html":
        return HTMLResponse(data.decode("utf-8", "replace"))
    return JSONResponse(json.loads(data))
