"""Schemas of the MLOps features: labels, webhook `notify`, deliveries, signing secrets, pipelines."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from api.arch_kwargs import ArchKwargs
from kdiga_service.outbox import EVENT_TYPES
from kdiga_service.webhooks import MAX_URL_LENGTH

# Kubernetes-like labels, so that a commit, a branch, a run id or a URL path fits in a value.
LABEL_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^[A-Za-z0-9._:/@+=-]{0,256}$")
MAX_LABELS = 32
RESERVED_PREFIXES = ("kdiga.", "mlflow.")  # label keys become MLflow tags, beside ours
LABEL_RULES = (f"at most {MAX_LABELS} labels; keys of 1-63 letters, digits and . _ / - (starting and ending "
               "with a letter or digit); values of at most 256 letters, digits and . _ : / @ + = -")

EventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """The labels unchanged, or ValueError with the first problem."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels are allowed")
    for key, value in labels.items():
        if not LABEL_KEY.match(key):
            raise ValueError(f"label key '{key[:80]}' is not valid ({LABEL_RULES})")
        if key.lower().startswith(RESERVED_PREFIXES):
            raise ValueError(f"label key '{key}' uses a reserved prefix ({', '.join(RESERVED_PREFIXES)})")
        if not LABEL_VALUE.match(value):
            raise ValueError(f"the value of label '{key}' is not valid ({LABEL_RULES})")
    return labels


Labels = Annotated[dict[str, str], AfterValidator(check_labels)]
# Rows from before labels existed hold NULL: read as no labels.
LabelsOut = Annotated[dict[str, str], BeforeValidator(lambda v: v or {})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NotifySpec(_Strict):
    """Where to POST the job's events, and which (default: every state change).

    Events: job.queued, job.running, job.cancelling, job.succeeded, job.failed, job.cancelled, job.stopped, and
    job.progress (at each new phase and each quarter of the work). Each request is signed with the
    API key's webhook secret (`Kdiga-Signature: t=...,v1=...`); see the README.
    """

    url: str = Field(max_length=MAX_URL_LENGTH)
    events: list[EventType] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> NotifySpec:
        if self.events is not None:
            self.events = list(dict.fromkeys(self.events))
        return self


class WebhookSecretCreated(BaseModel):
    secret: str = Field(description="The signing secret; shown once, here.")
    prefix: str
    created_at: datetime
    previous_valid_until: datetime | None = Field(
        description="The previous secret also signs every event until then (rotation without a gap)."
    )


class WebhookSecretPublic(BaseModel):
    prefix: str
    created_at: datetime
    expires_at: datetime | None


class WebhookSecretsPublic(BaseModel):
    data: list[WebhookSecretPublic]


class DeliveryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    event_id: str
    event_type: str
    attempt: int
    url: str
    ok: bool
    status_code: int | None
    error: str | None
    response_excerpt: str | None
    duration_ms: float | None
    started_at: datetime


class EventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    event_id: str
    type: str
    status: str = Field(description="pending | delivered | failed (given up)")
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class DeliveriesPublic(BaseModel):
    events: list[EventPublic] = Field(description="The job's events, in order.")
    data: list[DeliveryPublic] = Field(description="Every delivery attempt, oldest first.")
    count: int


# -- pipelines -------------------------------------------------------------------------------------
class StepRef(_Strict):
    """The output of an earlier step: its job (`model.job_id`) or the teacher it made (`teacher_id`)."""

    step: str


Ref = str | StepRef
STEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"


class PipelineStudent(_Strict):
    arch: str
    mean: list[float] | None = None
    std: list[float] | None = None
    kwargs: ArchKwargs = None
    weights_id: Ref | None = None


class PipelineModelRef(_Strict):
    teacher_id: Ref | None = None
    job_id: Ref | None = None


class PipelineStep(_Strict):
    """One step: a job request whose ids may be `{"step": "<earlier step>"}` instead."""

    name: str = Field(pattern=STEP_NAME)
    kind: Literal["distill", "adversarial_train", "evaluate"]
    job_name: str | None = Field(default=None, max_length=200)
    dataset_id: str
    teacher_id: Ref | None = None
    student: PipelineStudent | None = None
    model: PipelineModelRef | None = None
    objective: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    labels: Labels | None = None


class PipelineCreate(_Strict):
    """Steps run in order of their references; each is an ordinary job, created when its inputs are ready."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "name": "teacher-then-student", "labels": {"project": "digits"},
        "steps": [
            {"name": "teacher", "kind": "adversarial_train", "dataset_id": "3f2b1c9e-5d4a-4e8b-9c1d-2a7e6f0b8c41",
             "student": {"arch": "cnn_medium"}, "objective": {"method": "pgd_at"}},
            {"name": "student", "kind": "distill", "dataset_id": "3f2b1c9e-5d4a-4e8b-9c1d-2a7e6f0b8c41",
             "teacher_id": {"step": "teacher"}, "student": {"arch": "cnn_small"},
             "objective": {"method": "kdiga", "gamma": 5.0}},
            {"name": "check", "kind": "evaluate", "dataset_id": "3f2b1c9e-5d4a-4e8b-9c1d-2a7e6f0b8c41",
             "teacher_id": {"step": "teacher"}, "model": {"job_id": {"step": "student"}}}]}]})

    name: str | None = Field(default=None, max_length=200)
    labels: Labels | None = None
    notify: NotifySpec | None = None
    steps: list[PipelineStep] = Field(min_length=1, max_length=20)


class PipelineStepPublic(BaseModel):
    name: str
    kind: str
    status: str = Field(description="waiting | skipped | the job's status")
    depends_on: list[str]
    job_id: str = Field(description="The step's job (it exists once the step started).")
    progress: dict[str, Any]
    error: str | None


class PipelinePublic(BaseModel):
    id: str
    name: str | None
    status: str
    labels: LabelsOut
    cancel_requested: bool
    error: str | None
    percent: float
    steps: list[PipelineStepPublic]
    created_at: datetime
    finished_at: datetime | None
