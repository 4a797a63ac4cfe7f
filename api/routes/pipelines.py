"""Pipelines: several jobs in one request, each step fed by an earlier step's output.

The API plans every step when the pipeline is created (the same validation as POST /v1/jobs; ids an
earlier step will make are derived, so they are known already), and crud creates each step's job in
the transaction of the state change that made its inputs ready (kdiga_service.pipelines).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from anyio import to_thread
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import Owner
from api.deps import CurrentOwner, PageDep, SessionDep, SettingsDep, not_found
from api.errors import error_responses, pydantic_sentence
from api.labels import LabelFilterDep
from api.routes._common import owned_or_404
from api.routes.jobs import KEEPALIVE_S, plan_job, require_json
from api.routing import KdigaRoute
from api.schemas import JobCreate, Page
from api.schemas_mlops import PipelineCreate, PipelinePublic, PipelineStep, PipelineStepPublic, Ref, StepRef
from kdiga_service import crud, pipelines
from kdiga_service.models import FINISHED_STATES, ApiKey, Job, Pipeline, new_id
from kdiga_service.settings import Settings

router = APIRouter(prefix="/pipelines", tags=["pipelines"], route_class=KdigaRoute,
                   responses=error_responses(401, 404, 422))


def unprocessable(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail)


# -- planning --------------------------------------------------------------------------------------
class _Planner:
    """Plans the steps in order, resolving `{"step": name}` to the ids the named step will make."""

    def __init__(self, session: Session, owner_id: str, body: PipelineCreate, settings: Settings, pipeline_id: str):
        self.session, self.owner_id, self.body, self.settings = session, owner_id, body, settings
        self.pipeline_id = pipeline_id
        self.planned: dict[str, dict[str, Any]] = {}

    def resolve(self, step: PipelineStep, field: str, ref: Ref | None, wants: str, deps: list[str]) -> str | None:
        if not isinstance(ref, StepRef):
            return ref
        target = self.planned.get(ref.step)
        if target is None:
            raise unprocessable(f"Step '{step.name}': '{field}' refers to step '{ref.step}', "
                                "which is not an earlier step.")
        deps.append(ref.step)
        if wants == "teacher":
            if target["kind"] != "adversarial_train":
                raise unprocessable(f"Step '{step.name}': '{field}' needs a teacher, but step '{ref.step}' is a "
                                    f"{target['kind']} step; only adversarial_train steps make teachers.")
            return pipelines.produced_teacher_id(target["job_id"])
        if target["kind"] == "evaluate":
            raise unprocessable(f"Step '{step.name}': '{field}' needs a model, but step '{ref.step}' is an "
                                "evaluate step, which makes none.")
        return str(target["job_id"])

    def job_request(self, step: PipelineStep, deps: list[str]) -> JobCreate:
        raw = step.model_dump(exclude={"name", "job_name", "labels"}, exclude_none=True)
        raw["teacher_id"] = self.resolve(step, "teacher_id", step.teacher_id, "teacher", deps)
        if step.student is not None:
            raw["student"]["weights_id"] = self.resolve(step, "student.weights_id", step.student.weights_id,
                                                        "teacher", deps)
        if step.model is not None:
            raw["model"] = {"teacher_id": self.resolve(step, "model.teacher_id", step.model.teacher_id, "teacher", deps),
                            "job_id": self.resolve(step, "model.job_id", step.model.job_id, "model", deps)}
        prefix = self.body.name or "pipeline"
        raw.update(name=step.job_name or f"{prefix} / {step.name}"[:200],
                   labels={**(self.body.labels or {}), **(step.labels or {})},
                   notify=self.body.notify.model_dump() if self.body.notify else None)
        try:
            return JobCreate.model_validate(raw)
        except ValidationError as exc:
            raise unprocessable(f"Step '{step.name}': {pydantic_sentence(exc)}") from None

    def plan(self, step: PipelineStep) -> dict[str, Any]:
        if step.name in self.planned:
            raise unprocessable(f"Two steps are named '{step.name}'; step names must be unique.")
        deps: list[str] = []
        request = self.job_request(step, deps)
        made = frozenset(pipelines.produced_teacher_id(p["job_id"]) for p in self.planned.values()) | frozenset(
            p["job_id"] for p in self.planned.values())
        try:
            plan = plan_job(self.session, self.owner_id, request, self.settings, planned=made)
        except HTTPException as exc:
            raise HTTPException(exc.status_code, f"Step '{step.name}': {exc.detail}") from None
        planned = {"name": step.name, "kind": step.kind, "job_id": pipelines.step_job_id(self.pipeline_id, step.name),
                   "depends_on": sorted(set(deps)), "queue": plan.queue, "spec": plan.spec,
                   "dataset_id": plan.dataset_id, "teacher_id": plan.teacher_id, "labels": request.labels or {},
                   "job_name": request.name, "expected_work": plan.work.total}
        self.planned[step.name] = planned
        return planned


def _check_limit(session: Session, owner: Owner, settings: Settings, starting: int) -> None:
    # Lock the key's row (PostgreSQL) so two concurrent requests cannot both pass the count.
    session.execute(select(ApiKey.id).where(ApiKey.id == owner.id).with_for_update())
    limit = owner.max_concurrent_jobs or settings.max_concurrent_jobs_per_key
    active = crud.count_active_jobs(session, owner_id=owner.id)
    if active + starting > limit:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"This pipeline starts {starting} jobs at once and this API key already has {active} active jobs; "
            f"its limit is {limit}.",
            headers={"Retry-After": str(settings.retry_after_s)},
        )


# -- reading ---------------------------------------------------------------------------------------
def pipeline_public(session: Session, pipe: Pipeline) -> PipelinePublic:
    """The pipeline with each step's state (its job's, or waiting / skipped) and the overall percent."""
    rows = session.execute(select(Job.pipeline_step, Job.status, Job.progress, Job.error)
                           .where(Job.pipeline_id == pipe.id)).all()
    jobs = {r[0]: r for r in rows}
    steps_plan = pipe.spec.get("steps") or []
    states = pipelines.step_states(steps_plan, {k: r[1] for k, r in jobs.items()},
                                   cancel_requested=pipe.cancel_requested)
    states = {k: (pipelines.WAITING if v == pipelines.READY_TO_CREATE else v) for k, v in states.items()}
    steps = [PipelineStepPublic(name=s["name"], kind=s["kind"], status=states[s["name"]],
                                depends_on=s.get("depends_on") or [], job_id=s["job_id"],
                                progress=(jobs[s["name"]][2] or {}) if s["name"] in jobs else {},
                                error=jobs[s["name"]][3] if s["name"] in jobs else None) for s in steps_plan]
    percents = {s.name: float(s.progress.get("percent") or 0.0) for s in steps}
    return PipelinePublic(id=pipe.id, name=pipe.name, status=pipe.status, labels=pipe.labels or {},
                          cancel_requested=pipe.cancel_requested, error=pipe.error,
                          percent=pipelines.progress_percent(steps_plan, percents, states), steps=steps,
                          created_at=pipe.created_at, finished_at=pipe.finished_at)


def _owned(session: Session, owner_id: str, pipeline_id: str) -> Pipeline:
    return owned_or_404(session, Pipeline, owner_id, pipeline_id, "Pipeline")


# -- routes ----------------------------------------------------------------------------------------
@router.post("", status_code=status.HTTP_201_CREATED, response_model=PipelinePublic,
             dependencies=[Depends(require_json)], responses=error_responses(409, 413, 415, 429, 503))
def create_pipeline(body: PipelineCreate, owner: CurrentOwner, session: SessionDep,
                    settings: SettingsDep) -> PipelinePublic:
    """Create a pipeline: its first steps start now, each later one when the steps it refers to succeed."""
    pipeline_id = new_id()
    planner = _Planner(session, owner.id, body, settings, pipeline_id)
    steps = [planner.plan(step) for step in body.steps]
    _check_limit(session, owner, settings, starting=sum(1 for s in steps if not s["depends_on"]))
    pipe = crud.create_pipeline(session, owner_id=owner.id, name=body.name, steps=steps, labels=body.labels,
                                id=pipeline_id)
    session.commit()
    return pipeline_public(session, pipe)


@router.get("", response_model=Page[PipelinePublic])
def list_pipelines(owner: CurrentOwner, session: SessionDep, page: PageDep, labels: LabelFilterDep,
                   status_filter: Annotated[str | None, Query(alias="status")] = None) -> Page[PipelinePublic]:
    """List your pipelines, newest first (optionally by status or labels: `?label=key=value`)."""
    rows, count = crud.list_owned(session, Pipeline, owner_id=owner.id, limit=page.limit, offset=page.offset,
                                  labels=labels, status=status_filter)
    return Page(data=[pipeline_public(session, r) for r in rows], count=count)


@router.get("/{pipeline_id}", response_model=PipelinePublic)
def read_pipeline(pipeline_id: str, owner: CurrentOwner, session: SessionDep) -> PipelinePublic:
    """Read a pipeline: its status, each step's state and job, the overall percent."""
    return pipeline_public(session, _owned(session, owner.id, pipeline_id))


@router.post("/{pipeline_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=PipelinePublic,
             responses=error_responses(409, 503))
def cancel_pipeline(pipeline_id: str, owner: CurrentOwner, session: SessionDep) -> PipelinePublic:
    """Cancel a pipeline: no further step starts, and its running steps stop at their next step."""
    pipe = _owned(session, owner.id, pipeline_id)
    if pipe.status in FINISHED_STATES:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"Pipeline '{pipeline_id}' already finished (status {pipe.status}), so it cannot be "
                            "cancelled.")
    crud.request_pipeline_cancel(session, pipe=pipe)
    session.commit()
    return pipeline_public(session, pipe)


def _pipeline_json(sessionmaker: Any, owner_id: str, pipeline_id: str) -> tuple[str, bool] | None:
    with sessionmaker() as session:
        pipe = crud.get_owned(session, Pipeline, owner_id=owner_id, id=pipeline_id)
        if pipe is None:
            return None
        return pipeline_public(session, pipe).model_dump_json(), pipe.status in FINISHED_STATES


async def _events(request: Request, owner_id: str, pipeline_id: str, interval: float) -> AsyncIterator[str]:
    last, last_sent = None, time.monotonic()
    while True:
        loaded = await to_thread.run_sync(_pipeline_json, request.app.state.sessionmaker, owner_id, pipeline_id)
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


@router.get("/{pipeline_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."}})
async def stream_pipeline_events(pipeline_id: str, request: Request, owner: CurrentOwner,
                                 settings: SettingsDep) -> StreamingResponse:
    """Stream the pipeline as server-sent events (`progress` on each change, then `end`)."""
    if await to_thread.run_sync(_pipeline_json, request.app.state.sessionmaker, owner.id, pipeline_id) is None:
        raise not_found("Pipeline", pipeline_id)
    return StreamingResponse(_events(request, owner.id, pipeline_id, settings.sse_poll_interval_s),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


