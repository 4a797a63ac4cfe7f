"""Jobs: create (idempotent, bounded, rate-limited), list, read, events (SSE), cancel, resume, report."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Body, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.auth import Owner
from api.deps import (
    BEARER_SECURITY,
    CurrentOwner,
    PageDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    not_found,
    owner_from_request,
    run_query,
)
from api.errors import error_responses
from api.job_watch import JobWatcher
from api.labels import LabelFilterDep
from api.publish import QueueUnavailable
from api.redact import redact_server_paths
from api.routes._common import (
    IDEMPOTENCY_KEY_DOC,
    find_replay,
    insert_once,
    log,
    owned_or_404,
    publish,
    publish_or_undo,
    replay,
    request_digest,
)
from api.routes.webhooks import check_notify
from api.routing import KdigaRoute
from api.schemas import (
    JOB_EXAMPLES,
    EvalConfigSchema,
    JobCreate,
    JobKind,
    JobPublic,
    JobStatus,
    LimitsSchema,
    ObjectiveConfigSchema,
    Page,
    ResourcesSchema,
    ResumeRequest,
    SweepConfigSchema,
    ThreatModelSchema,
    TrainConfigSchema,
)
from kdiga_core import (
    defaults as sized,  # standard library only: no torch in the API (tests/test_import_direction.py)
)
from kdiga_service import crud
from kdiga_service.catalog import check_name, methods_by_kind
from kdiga_service.models import (
    ACTIVE_STATES,
    FAILED,
    FINISHED_STATES,
    READY,
    STOPPED,
    SUCCEEDED,
    ApiKey,
    Dataset,
    Job,
    Teacher,
)
from kdiga_service.queue import RUN_JOB, job_queue
from kdiga_service.settings import Settings
from kdiga_service.storage import StorageError
from kdiga_service.work_budget import JobLimits, WorkEstimate, budget_problem, check_parameters, estimate_work

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=KdigaRoute,
                   responses=error_responses(401, 404, 422))

MAX_REPORT_BYTES = 64 * 1024 * 1024
KEEPALIVE_S = 15.0
DEFAULT_METHOD = {"distill": "kdiga", "adversarial_train": "pgd_at"}


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
def _shown(error: str) -> str:
    """A stored error sentence as callers may see it: no server paths, no final period."""
    return (redact_server_paths(error) or "").rstrip(".")


def _ready_teacher(
    session: Session, owner_id: str, teacher_id: str, planned: frozenset[str] = frozenset()
) -> Teacher | None:
    if teacher_id in planned:  # made by an earlier pipeline step: checked when that step succeeds
        return None
    teacher = crud.get_owned(session, Teacher, owner_id=owner_id, id=teacher_id)
    if teacher is None:
        raise not_found("Teacher", teacher_id)
    if teacher.status != READY:
        why = f": {_shown(teacher.error)}." if teacher.error else "; wait until its validation finishes."
        raise conflict(f"Teacher '{teacher_id}' is not ready (status {teacher.status}){why}")
    return teacher


def _ready_dataset(session: Session, owner_id: str, dataset_id: str) -> Dataset:
    dataset = crud.get_owned(session, Dataset, owner_id=owner_id, id=dataset_id)
    if dataset is None:
        raise not_found("Dataset", dataset_id)
    if dataset.status != READY:
        why = f": {_shown(dataset.error)}." if dataset.error else "; wait until its validation finishes."
        raise conflict(f"Dataset '{dataset_id}' is not ready (status {dataset.status}){why}")
    return dataset


def _check_models(session: Session, owner_id: str, dataset: Dataset, body: JobCreate, slot: str | None,
                  planned: frozenset[str]) -> None:
    """Each uploaded model the job reads predicts the dataset's classes and takes its inputs (422 naming the
    mismatch), when both are known: a mismatch found here is not one the worker finds after queueing
    (`kdiga_core.jobs._check_compatible`). ``slot``: the model the worker loads as its teacher, whose input
    size a dataset read in place takes when ``train.img_size`` is not given."""
    refs = {"teacher": body.teacher_id, "student's initial weights": body.student.weights_id if body.student else None,
            "model": body.model.teacher_id if body.model else None}
    specs = {role: (model.id, model.spec or {}) for role, model_id in refs.items() if model_id
             and (model := _ready_teacher(session, owner_id, model_id, planned)) is not None}
    img_size = body.train.img_size if body.train is not None else None
    slot_spec = next((spec for model_id, spec in specs.values() if model_id == slot), None)
    for role, (model_id, spec) in specs.items():
        _check_classes(role, model_id, spec, dataset)
        is_slot = model_id == slot
        _check_shape(role, model_id, spec, dataset, img_size, None if is_slot else slot_spec, is_slot=is_slot)
    if dataset.uri and img_size is None and slot is None and body.kind == "adversarial_train":
        raise unprocessable(f"Dataset '{dataset.id}' is read in place, resized to train.img_size; give "
                            "train.img_size, the input size of the model to train.")


def _check_classes(role: str, model_id: str, spec: dict[str, Any], dataset: Dataset) -> None:
    theirs = spec.get("num_classes")
    if dataset.num_classes and theirs and theirs != dataset.num_classes:
        raise unprocessable(f"The {role} '{model_id}' predicts {theirs} classes but dataset "
                            f"'{dataset.id}' has {dataset.num_classes}; choose a model made for this dataset.")


def _shape(chans: Any, side: Any) -> str:
    return f"({chans}, {side}, {side})"


def _check_shape(role: str, model_id: str, spec: dict[str, Any], dataset: Dataset, img_size: int | None,
                 slot_spec: dict[str, Any] | None, *, is_slot: bool) -> None:
    """The model's (in_chans, img_size, img_size) against what the worker will feed it: an uploaded or builtin
    dataset's recorded shape; a dataset read in place decodes to RGB, resized to train.img_size, else to the
    teacher's input size (``slot_spec``; None when ``spec`` is that teacher's, ``is_slot``)."""
    chans, side = spec.get("in_chans"), spec.get("img_size")
    if not chans or not side:  # a row from before the spec was recorded: the worker checks it
        return
    takes = "take" if role.endswith("weights") else "takes"
    ours = f"The {role} '{model_id}' {takes} inputs of shape {_shape(chans, side)}"
    if not dataset.uri:
        data = list(dataset.input_shape or [])
        if len(data) == 3 and [chans, side, side] != data:
            raise unprocessable(f"{ours} but dataset '{dataset.id}' has ({data[0]}, {data[1]}, {data[2]}); "
                                "choose a model made for this dataset's inputs.")
        return
    data_chans = (dataset.input_shape or [3])[0]
    if chans != data_chans:
        raise unprocessable(f"{ours} but dataset '{dataset.id}' is read in place as {data_chans}-channel images; "
                            f"choose a model that takes {data_chans} channels.")
    teacher_side = (slot_spec or {}).get("img_size")
    data_side = img_size or teacher_side
    if not data_side or side == data_side:
        return
    if teacher_side and img_size in (None, teacher_side):  # the teacher sets the size: this model must match it
        fix, source = "choose one that takes the teacher's inputs", "the teacher's input size"
    else:  # train.img_size sets it (the teacher, checked first, only when it is this model)
        fix, source = f"set train.img_size to {side}" + (" or leave it out" if is_slot else ""), "train.img_size"
    raise unprocessable(f"{ours} but dataset '{dataset.id}' is read in place at "
                        f"{_shape(data_chans, data_side)} ({source}); {fix}.")


def _check_names(kind: str, names: list[str]) -> None:
    for name in names:
        if message := check_name(kind, name):
            raise unprocessable(message)


def objective_schema(body: JobCreate) -> ObjectiveConfigSchema:
    """The request's objective with the kind's default method filled in (None for evaluate jobs)."""
    default_method = DEFAULT_METHOD.get(body.kind, "kdiga")
    objective = body.objective or ObjectiveConfigSchema(method=default_method)  # type: ignore[arg-type]
    if "method" not in objective.model_fields_set:
        objective = objective.model_copy(update={"method": default_method})
    if objective.method == "kdiga" and objective.gamma == "auto" and objective.sweep is None:
        # written out, so the stored spec (and the work estimate) carries the sweep's budget
        objective = objective.model_copy(update={"sweep": SweepConfigSchema()})
    return objective


def _given(model: Any) -> dict[str, Any]:
    """What the request gave in one section (unset fields left out: they are sized to the data)."""
    return model.model_dump(exclude_unset=True) if model is not None else {}


def _facts(dataset: Dataset, img_size: int | None = None) -> sized.DataFacts:
    # a reference dataset of mixed image sizes has no input shape: the job's img_size decides it
    shape = dataset.input_shape or [3, img_size or 32, img_size or 32]
    return sized.DataFacts.from_summary({"input_shape": shape, "num_classes": dataset.num_classes,
                                         "train_size": dataset.train_size, "test_size": dataset.test_size,
                                         "streamed": dataset.uri is not None})


def _sized(body: JobCreate, dataset: Dataset, parts: dict[str, Any]) -> dict[str, Any]:
    """The job's threat model, objective, train and evaluation with every omitted data-sized value
    filled (`kdiga_core.defaults`), each then checked by its schema; ``defaulted`` names them."""
    facts = _facts(dataset, body.train.img_size if body.train is not None else None)
    given: dict[str, Any] = {"threat_model": _given(body.threat_model), "evaluation": _given(body.evaluation)}
    if body.kind != "evaluate":
        objective = objective_schema(body)
        given["objective"] = objective.model_dump(include=set(objective.model_fields_set))
        given["train"] = _given(body.train)
    out = sized.resolve(body.kind, given, facts)
    try:
        resolved = {"threat_model": ThreatModelSchema.model_validate(out["threat_model"]).model_dump(),
                    "evaluation": EvalConfigSchema.model_validate(out["evaluation"]).model_dump(),
                    "defaulted": out["defaulted"]}
        if body.kind != "evaluate":
            resolved["train"] = TrainConfigSchema.model_validate(out["train"]).model_dump()
            resolved["objective"] = _objective(ObjectiveConfigSchema.model_validate(out["objective"]), body.kind)
    except ValidationError as exc:  # a filled value outside a field's range (a tiny dataset, a huge ε)
        raise unprocessable(f"A default sized to this dataset is out of range: {exc.errors()[0]['msg']}.") from None
    if problem := sized.check_threat_model(resolved["threat_model"], facts):
        raise unprocessable(problem)
    return {**parts, **resolved}


def _objective(objective: ObjectiveConfigSchema, kind: str) -> dict[str, Any]:
    _check_names("methods", [objective.method])
    allowed = methods_by_kind()[kind]
    if objective.method not in allowed:
        raise unprocessable(
            f"Method '{objective.method}' cannot be used by a {kind} job; "
            f"valid methods are: {', '.join(allowed)}."
        )
    return objective.model_dump()


def _student(session: Session, owner_id: str, body: JobCreate, planned: frozenset[str]) -> dict[str, Any]:
    if body.student is None:
        raise unprocessable(f"A {body.kind} job needs 'student' with an 'arch'.")
    _check_names("architectures", [body.student.arch])
    if body.student.weights_id:
        weights = _ready_teacher(session, owner_id, body.student.weights_id, planned)
        arch = (weights.spec or {}).get("arch") if weights is not None else body.student.arch
        if weights is not None and arch != body.student.arch:
            raise unprocessable(
                f"Student weights '{weights.id}' are for architecture '{arch}', not '{body.student.arch}'; "
                f"set student.arch to '{arch}' or choose weights made for '{body.student.arch}'."
            )
    return body.student.model_dump()


def _plan_training(session: Session, owner_id: str, body: JobCreate,
                   planned: frozenset[str]) -> tuple[dict[str, Any], str | None]:
    if body.model is not None:
        raise unprocessable(f"A {body.kind} job takes no 'model'; use 'student' for the model to train.")
    if body.kind == "distill":
        if not body.teacher_id:
            raise unprocessable("A distill job needs 'teacher_id'.")
        _ready_teacher(session, owner_id, body.teacher_id, planned)
    elif body.teacher_id:
        raise unprocessable("An adversarial_train job takes no 'teacher_id'; it trains 'student' from data.")
    _objective(objective_schema(body), body.kind)  # the method, before the student is looked at
    parts = {"student": _student(session, owner_id, body, planned), "model": None}
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


@dataclass
class JobPlan:
    """A validated job request, ready to become a row."""

    spec: dict[str, Any]
    queue: str
    dataset: Dataset
    teacher_id: str | None
    work: WorkEstimate

    @property
    def dataset_id(self) -> str:
        return self.dataset.id


def plan_job(session: Session, owner_id: str, body: JobCreate, settings: Settings, *,
             planned: frozenset[str] = frozenset()) -> JobPlan:
    """Validate a job request against the caller's resources, the catalog and the operator's ceilings.

    `planned`: ids of teachers and jobs that earlier steps of a pipeline will make (not checked yet).
    """
    _check_names("job_kinds", [body.kind])
    dataset = _ready_dataset(session, owner_id, body.dataset_id)
    if body.evaluation is not None:
        _check_names("attacks", [a.name for a in body.evaluation.attacks])
    if body.kind == "evaluate":
        parts, teacher_id = _plan_evaluate(session, owner_id, body, planned)
    else:
        parts, teacher_id = _plan_training(session, owner_id, body, planned)
    spec = {
        "kind": body.kind,
        "name": body.name,
        "dataset_id": body.dataset_id,
        "teacher_id": body.teacher_id,
        **_sized(body, dataset, parts),
        "labels": body.labels or {},
        "notify": check_notify(session, owner_id, body.notify, settings),
    }
    _check_models(session, owner_id, dataset, body, teacher_id, planned)
    spec["resources"] = _resources(body, spec, settings)
    _check_shards(dataset, spec["resources"]["nodes"] * spec["resources"]["devices_per_node"])
    spec["limits"] = _limits(body.limits or LimitsSchema(), settings)
    if problem := check_parameters(spec, JobLimits.from_settings(settings)):
        raise unprocessable(problem)
    work = estimate_work(spec, train_size=dataset.train_size or 0, test_size=dataset.test_size or 0)
    queue = job_queue(settings, body.kind, spec["resources"]["devices_per_node"])
    return JobPlan(spec=spec, queue=queue, dataset=dataset, teacher_id=teacher_id, work=work)


SIZED_PARTS = ("threat_model", "objective", "train", "evaluation")


def normalised_request(body: JobCreate, spec: dict[str, Any]) -> dict[str, Any]:
    """The request with every default written out as the job's spec holds it (``spec``: the plan's),
    so that omitting a default and writing it out are the same request for `Idempotency-Key`."""
    data = body.model_dump(mode="json")
    for part in SIZED_PARTS:
        data[part] = spec.get(part)
    data["resources"] = (body.resources or ResourcesSchema()).model_dump(mode="json")
    data["limits"] = (body.limits or LimitsSchema()).model_dump(mode="json")
    normalised: dict[str, Any] = json.loads(json.dumps(data))
    return normalised


def _check_budget(budget: float | None, settings: Settings) -> None:
    if budget is not None and budget > settings.max_time_budget_s:
        raise unprocessable(f"limits.time_budget_s is {budget:g} seconds but this service allows at most "
                            f"{settings.max_time_budget_s} (KDIGA_MAX_TIME_BUDGET_S).")


def _limits(limits: LimitsSchema, settings: Settings) -> dict[str, Any]:
    """The job's time budget (within the operator's maximum) and checkpoint interval (default filled in)."""
    _check_budget(limits.time_budget_s, settings)
    every = limits.checkpoint_every_s if limits.checkpoint_every_s is not None else settings.checkpoint_every_s
    return {"time_budget_s": limits.time_budget_s, "checkpoint_every_s": every}


def _check_shards(dataset: Dataset, world_size: int) -> None:
    """WebDataset shards on several devices: each device reads whole shards (kdiga_core.data_stream), so
    there must be one per device at least, and the worker sizes every device's epoch from the shard
    sizes validation records (a reference validated before they were recorded has none)."""
    if world_size <= 1 or dataset.kind != "webdataset":
        return
    layout = dataset.layout or {}
    shards = int((layout.get("shards") or {}).get("train") or 0)
    if shards < world_size:
        raise unprocessable(f"Dataset '{dataset.id}' has {shards} training shard{'s' if shards != 1 else ''}, "
                            f"fewer than the job's {world_size} devices; each device reads whole shards, so use "
                            f"at most {shards} or split the set into more shards.")
    if "train_shard_sizes" not in layout:
        raise unprocessable(f"Dataset '{dataset.id}' was validated before its shard sizes were recorded; "
                            "register it again to train on several devices.")


def _resources(body: JobCreate, parts: dict[str, Any], settings: Settings) -> dict[str, int]:
    """The job's hosts × devices, within the operator's limits (422 with one sentence otherwise)."""
    resources = body.resources or ResourcesSchema()
    if resources.nodes > settings.max_nodes:
        raise unprocessable(f"resources.nodes is {resources.nodes} but this service allows at most "
                            f"{settings.max_nodes} hosts per job (KDIGA_MAX_NODES).")
    if resources.devices_per_node > settings.max_devices_per_node:
        raise unprocessable(f"resources.devices_per_node is {resources.devices_per_node} but this service "
                            f"allows at most {settings.max_devices_per_node} (KDIGA_MAX_DEVICES_PER_NODE).")
    if resources.world_size > 1 and body.kind == "evaluate":
        raise unprocessable("An evaluate job runs on one device; 'resources' applies to training jobs.")
    objective = parts.get("objective") or {}
    if resources.world_size > 1 and objective.get("method") == "kdiga":
        if objective.get("iga_reduction") == "author":
            raise unprocessable("iga_reduction 'author' divides one norm over the whole batch by its squared size, "
                                "which cannot be split across devices; use 'per_sample' for a job on several "
                                "devices.")
        if objective.get("gamma") == "auto":
            raise unprocessable("objective.gamma 'auto' (the default) chooses γ by a sweep that runs on one "
                                "device; give objective.gamma a number for a job on several devices, e.g. the γ "
                                "a one-device job chose.")
    return resources.model_dump()


def _too_many(settings: Settings, detail: str) -> HTTPException:
    return HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail,
                         headers={"Retry-After": str(settings.retry_after_s)})


MAX_BIGINT = 2**63 - 1


def _active(session: Session, owner_id: str) -> tuple[int, int]:
    """(count, expected passes) of the key's active jobs: one indexed aggregate query."""
    count, work = session.execute(
        select(func.count(), func.coalesce(func.sum(Job.expected_work), 0))
        .where(Job.owner_id == owner_id, Job.status.in_(ACTIVE_STATES))
    ).one()
    return int(count), int(work or 0)


def _check_limits(session: Session, owner: Owner, settings: Settings, work: WorkEstimate) -> None:
    """The key's active-job count and work budget (429 with Retry-After; 422 when the job alone is too big)."""
    # Lock the key's row (PostgreSQL) so two concurrent requests cannot both pass the count.
    session.execute(select(ApiKey.id).where(ApiKey.id == owner.id).with_for_update())
    limit = owner.max_concurrent_jobs or settings.max_concurrent_jobs_per_key
    active_count, active_work = _active(session, owner.id)
    if active_count >= limit:
        raise _too_many(settings, f"This API key already has {limit} active jobs, its limit; "
                                  "wait for one to finish or cancel one.")
    problem = budget_problem(work, active_work, active_count, JobLimits.from_settings(settings))
    if problem is not None:
        sentence, retry_later = problem
        raise _too_many(settings, sentence) if retry_later else unprocessable(sentence)


# -- routes --------------------------------------------------------------------------------------
@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    dependencies=[Depends(require_json)],
    responses={200: {"model": JobPublic, "description": "An earlier request with this Idempotency-Key."},
               **error_responses(409, 413, 415, 429, 503)},
)
def create_job(
    body: Annotated[JobCreate, Body(openapi_examples=JOB_EXAMPLES)],
    response: Response,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200, description=IDEMPOTENCY_KEY_DOC)] = None,
) -> Job:
    """Create a distill, adversarial_train or evaluate job and queue it.

    Parameters that multiply work have server-set maxima, and the job's expected work (forward and
    backward passes, estimated from the spec and the dataset's size) must fit the key's budget.
    """
    existing = find_replay(session, Job, owner.id, idempotency_key)
    plan = plan_job(session, owner.id, body, settings)  # its spec, defaults sized to the data, is what is hashed
    digest = request_digest(normalised_request(body, plan.spec))
    if existing is not None:
        return replay(existing, digest, idempotency_key or "", response)  # type: ignore[no-any-return]
    _check_limits(session, owner, settings, plan.work)
    new = Job(
        owner_id=owner.id, kind=body.kind, name=body.name, queue=plan.queue, spec=plan.spec,
        dataset_id=plan.dataset.id, teacher_id=plan.teacher_id, idempotency_key=idempotency_key,
        request_hash=digest, progress={"phase": "queued", "percent": 0.0}, labels=body.labels or {},
        expected_work=min(plan.work.total, MAX_BIGINT),
    )
    job = insert_once(session, new, before_commit=crud.job_created, on_duplicate=lambda: replay(
        find_replay(session, Job, owner.id, idempotency_key), digest, idempotency_key or "", response))
    if job is not new:  # a concurrent request with the same Idempotency-Key made it first: already queued
        return job
    publish_or_undo(session, settings, job, task=RUN_JOB, queue=plan.queue, what="job")
    log.info("job %s queued on %s (expected work %.3g passes)", job.id, plan.queue, plan.work.total)
    return job


@router.get("", response_model=Page[JobPublic])
def list_jobs(
    owner: CurrentOwner,
    session: SessionDep,
    page: PageDep,
    labels: LabelFilterDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    kind: Annotated[JobKind | None, Query()] = None,
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
    responses={304: {"description": "Not modified since the ETag sent in `If-None-Match`."},
               **error_responses(503)},
    openapi_extra=BEARER_SECURITY,
)
async def read_job(job_id: str, request: Request) -> Response:
    """Read a job: status, progress (with ETA), latest metrics, error, artifacts.

    The answer carries an `ETag`; a poller that sends it back in `If-None-Match` gets an empty
    304 until the job changes.
    """
    # The hottest route (clients poll it): one Core query, serialised once, no thread hop on SQLite,
    # and the key checked without the dependency machinery (deps.owner_from_request).
    owner = await owner_from_request(request)
    answer = await run_query(request, request.app.state.status_reader.answer, owner.id, job_id)
    if answer is None:
        raise not_found("Job", job_id)
    body, etag = answer
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(content=body, media_type="application/json", headers=headers)


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic,
             responses=error_responses(409, 503))
def cancel_job(job_id: str, owner: CurrentOwner, session: SessionDep) -> Job:
    """Cancel a job: a queued or stopped job never runs again; a running one stops at its next step."""
    job = _owned_job(session, owner.id, job_id)
    if job.status in FINISHED_STATES and job.status != STOPPED:  # a stopped job may be cancelled for good
        raise conflict(f"Job '{job_id}' already finished (status {job.status}), so it cannot be cancelled.")
    crud.request_cancel(session, job=job)
    session.commit()
    return job


def resumable(job: Job) -> bool:
    """A stopped job, or one that failed after its trained weights were stored (evaluation is retried)."""
    return job.status == STOPPED or (job.status == FAILED and bool((job.result or {}).get("resumable")))


@router.post("/{job_id}/resume", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic,
             responses=error_responses(409, 429, 503))
def resume_job(job_id: str, owner: CurrentOwner, session: SessionDep, settings: SettingsDep,
               body: Annotated[ResumeRequest | None, Body()] = None) -> Job:
    """Queue a `stopped` job again: it continues from its last checkpoint with a fresh time budget
    (or `time_budget_s` from the body). A job that failed after training (`result.resumable`) is
    resumed the same way and runs only its evaluation again, without retraining; an evaluation continues
    after the attack batches it had finished."""
    job = _owned_job(session, owner.id, job_id)
    if not resumable(job):
        raise conflict(f"Job '{job_id}' is {job.status}; only a stopped job, or one that failed after its "
                       "training was stored, can be resumed.")
    spec = None
    if body is not None and body.time_budget_s is not None:
        _check_budget(body.time_budget_s, settings)
        spec = {**job.spec, "limits": {**(job.spec.get("limits") or {}), "time_budget_s": body.time_budget_s}}
    session.execute(select(ApiKey.id).where(ApiKey.id == owner.id).with_for_update())
    limit = owner.max_concurrent_jobs or settings.max_concurrent_jobs_per_key
    if _active(session, owner.id)[0] >= limit:
        raise _too_many(settings, f"This API key already has {limit} active jobs, its limit; "
                                  "wait for one to finish or cancel one.")
    crud.resume_job(session, job=job, spec=spec)
    session.commit()
    try:
        publish(settings, RUN_JOB, job.id, queue=job.queue)
    except QueueUnavailable as exc:  # the row is queued: the sweeper sends its task once the broker is back
        log.warning("broker unavailable (%s); resumed job %s waits for the sweeper", exc, job.id)
    log.info("job %s resumed on %s", job.id, job.queue)
    return job


SSE_EVENT_SCHEMA = {
    "type": "object",
    "description": "One server-sent event; `data` is a JobPublic as JSON.",
    "properties": {"event": {"type": "string", "enum": ["progress", "end"]}, "data": {"type": "string"}},
}


async def _events(watcher: JobWatcher, owner_id: str, job_id: str) -> AsyncIterator[str]:
    """`progress` on each change, `end` when the job finishes; a comment line keeps idle proxies open.

    Waiting costs nothing: the process's one JobWatcher polls and wakes this stream on a change.
    A client that disconnects cancels this generator (Starlette), and `finally` stops the watch.
    """
    watch, last = watcher.watch(owner_id, job_id), None
    try:
        while True:
            with anyio.move_on_after(KEEPALIVE_S) as idle:
                await watch.changed.wait()
            if idle.cancelled_caught:
                yield ": keep-alive\n\n"
                continue
            watch.changed.clear()
            if watch.gone or watch.state is None:
                return
            data, finished = watch.state
            if data != last:
                yield f"event: progress\ndata: {data}\n\n"
                last = data
            if finished:
                yield f"event: end\ndata: {data}\n\n"
                return
    finally:
        watcher.unwatch(watch)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    # `itemSchema` (OpenAPI 3.2's word for one event of a stream) and no `schema`: a generator that
    # knows no streams then returns the raw body, and schemathesis checks every event against it.
    responses={200: {"content": {"text/event-stream": {"itemSchema": SSE_EVENT_SCHEMA}},
                     "description": "Server-sent events: `progress` (a JobPublic) on each change, then `end`."},
               **error_responses(503)},
)
async def stream_job_events(
    job_id: str, request: Request, owner: CurrentOwner
) -> StreamingResponse:
    """Stream the job as server-sent events (`progress` on each change, then `end`)."""
    if await run_query(request, request.app.state.status_reader.read, owner.id, job_id) is None:
        raise not_found("Job", job_id)
    return StreamingResponse(
        _events(request.app.state.job_watcher, owner.id, job_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _report_artifact(session: Session, job: Job, kind: str) -> str:
    artifact = crud.find_artifact(session, job_id=job.id, kind=kind)
    if artifact is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"Job '{job.id}' has no report yet.")
    return artifact.storage_key


def finite_json(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value


class FiniteJSONResponse(JSONResponse):
    """JSON where NaN and ±Infinity become null (reports hold them: an attack with no point, a ratio of 0)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(finite_json(content), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8")


@router.get("/{job_id}/report", responses={
    200: {"content": {"application/json": {"schema": {"type": "object"}}, "text/html": {"schema": {"type": "string"}}},
          "description": "The report (non-finite numbers are null)."},
    **error_responses(503)})
def read_job_report(
    job_id: str,
    owner: CurrentOwner,
    session: SessionDep,
    store: StorageDep,
    format: Annotated[Literal["json", "html"], Query(description="json (default) or html.")] = "json",
) -> Response:
    """The job's robustness report as JSON, or as an HTML page with `?format=html`."""
    job = _owned_job(session, owner.id, job_id)
    key = _report_artifact(session, job, "report_html" if format == "html" else "report_json")
    try:
        data = store.read_bytes(key, max_bytes=MAX_REPORT_BYTES)
    except StorageError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"Job '{job.id}' has no report yet.") from None
    if format == "html":
        return HTMLResponse(data.decode("utf-8", "replace"))
    return FiniteJSONResponse(json.loads(data))
