"""The database schema (SQLAlchemy 2.0 typed models). Changed only through Alembic revisions.

Every resource has an `owner_id` (the API key that created it). Timestamps are timezone-aware
UTC on every backend (`UTCDateTime`). JSON columns are replaced, never mutated in place.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Job states (design.md §3).
QUEUED, RUNNING, CANCELLING = "queued", "running", "cancelling"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
# A run that reached its time budget (or the service's time limit) at a safe point: not a failure;
# its checkpoint is kept and POST /v1/jobs/{id}/resume queues it again. It holds no worker, so it is
# not active; it ends a wait like the other finished states, but `resume` can reopen it.
STOPPED = "stopped"
ACTIVE_STATES = (QUEUED, RUNNING, CANCELLING)
FINISHED_STATES = (SUCCEEDED, FAILED, CANCELLED, STOPPED)
# Teacher / dataset states.
VALIDATING, READY, INVALID = "validating", "ready", "invalid"
# Webhook outbox states (kdiga_service.outbox).
PENDING, DELIVERED = "pending", "delivered"


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


# Ids derived from the job make a rerun of a job replace its rows instead of duplicating them.
ID_NAMESPACE = uuid.UUID("6b646967-612d-4b44-8000-000000000001")


def derived_id(*parts: str) -> str:
    """A deterministic id for a row made by a job (e.g. `derived_id("artifact", job_id, name)`)."""
    return str(uuid.uuid5(ID_NAMESPACE, ":".join(parts)))


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime; SQLite stores it naive, and we add UTC back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: ARG002 - SQLAlchemy TypeDecorator signature
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class ApiKey(Base):
    """A bearer API key; only its sha256 is stored. `prefix` is shown in listings."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Teacher(Base):
    """An uploaded model (safetensors/ONNX), validated by the worker, or produced by a job."""

    __tablename__ = "teachers"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_teachers_owner_id_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=VALIDATING)
    format: Mapped[str] = mapped_column(String(16))
    storage_key: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    source_job_id: Mapped[str | None] = mapped_column(String(36), default=None)
    labels: Mapped[dict[str, Any] | None] = mapped_column(default=dict)  # {key: value}, api/labels.py
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When its task was last sent to the broker: the sweeper re-sends a task that nobody took
    # (an API crash between commit and publish, a broker that lost its data).
    enqueued_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    validated_at: Mapped[datetime | None] = mapped_column(default=None)
    # Deliveries of its validation task; past KDIGA_VALIDATION_MAX_DELIVERIES it ends invalid
    # (a validation that kills its worker, e.g. out of memory, must not loop: worker/deliveries.py).
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # An upload's `Idempotency-Key` and the hash of what was sent (file sha256 + metadata).
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)


class Dataset(Base):
    """An uploaded dataset (npz or image-folder zip) or a registered built-in."""

    __tablename__ = "datasets"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_datasets_owner_id_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))  # npz | image_folder_zip | builtin | image_folder | webdataset
    builtin: Mapped[str | None] = mapped_column(String(64), default=None)
    status: Mapped[str] = mapped_column(String(16), default=VALIDATING)
    storage_key: Mapped[str | None] = mapped_column(String(512), default=None)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    num_classes: Mapped[int | None] = mapped_column(Integer, default=None)
    class_names: Mapped[list[Any] | None] = mapped_column(default=None)
    input_shape: Mapped[list[Any] | None] = mapped_column(default=None)
    train_size: Mapped[int | None] = mapped_column(Integer, default=None)
    test_size: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    labels: Mapped[dict[str, Any] | None] = mapped_column(default=dict)  # {key: value}, api/labels.py
    # A dataset by reference (image_folder, webdataset): where it is read from, nothing copied, and
    # what validation found there (counts per split and class, image sizes, corrupt files).
    uri: Mapped[str | None] = mapped_column(Text, default=None)
    layout: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When its task was last sent to the broker: the sweeper re-sends a task that nobody took
    # (an API crash between commit and publish, a broker that lost its data).
    enqueued_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    validated_at: Mapped[datetime | None] = mapped_column(default=None)
    # Deliveries of its validation task; past KDIGA_VALIDATION_MAX_DELIVERIES it ends invalid
    # (a validation that kills its worker, e.g. out of memory, must not loop: worker/deliveries.py).
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # An upload's `Idempotency-Key` and the hash of what was sent (file sha256 + metadata).
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)


class Job(Base):
    """A distill / adversarial_train / evaluate job; the row is the single source of truth."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_id_idempotency_key"),
        # Covers the budget check's COUNT and SUM(expected_work) over a key's active jobs (index only).
        Index("ix_jobs_owner_id_status_work", "owner_id", "status", "expected_work"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    queue: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    teacher_id: Mapped[str | None] = mapped_column(String(36), default=None, index=True)
    dataset_id: Mapped[str | None] = mapped_column(String(36), default=None, index=True)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    # The API's estimate of the job's work in passes (kdiga_service/work_budget.py), summed over a
    # key's active jobs to check its budget.
    expected_work: Mapped[int | None] = mapped_column(BigInteger, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    labels: Mapped[dict[str, Any] | None] = mapped_column(default=dict)  # {key: value}, api/labels.py
    # A step of a pipeline (kdiga_service.pipelines): created by crud when its inputs are ready.
    pipeline_id: Mapped[str | None] = mapped_column(ForeignKey("pipelines.id"), default=None, index=True)
    pipeline_step: Mapped[str | None] = mapped_column(String(64), default=None)
    # A job on several worker hosts (resources.nodes > 1) runs as a gang: the worker holding the row
    # opens a rendezvous (a fresh id per attempt, and the host:port of its c10d store) and the
    # others join it; it starts when gang_claims reaches gang_size (worker.gang).
    rendezvous_id: Mapped[str | None] = mapped_column(String(36), default=None)
    rendezvous_endpoint: Mapped[str | None] = mapped_column(String(255), default=None)
    gang_size: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    gang_claims: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When its task was last sent to the broker: the sweeper re-sends a task that nobody took
    # (an API crash between commit and publish, a broker that lost its data).
    enqueued_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", order_by="Artifact.created_at", lazy="selectin"
    )


class Artifact(Base):
    """A file a job produced (student weights, ONNX, model card, report, checkpoint)."""

    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    storage_key: Mapped[str] = mapped_column(String(512))
    content_type: Mapped[str] = mapped_column(String(100), default="application/octet-stream")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job | None] = relationship(back_populates="artifacts")


class Pipeline(Base):
    """Steps run as ordinary jobs, each created (by crud, from its step's planned spec) once the
    steps it refers to have succeeded. `spec["steps"]` is kdiga_service.pipelines' plan."""

    __tablename__ = "pipelines"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    status: Mapped[str] = mapped_column(String(16), default=RUNNING)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    labels: Mapped[dict[str, Any] | None] = mapped_column(default=dict)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookSecret(Base):
    """A key's webhook signing secret. The current one has no `expires_at`; a rotated-out one signs
    too (a second `v1=` in the header) until `expires_at`, so receivers can switch without a gap.
    Stored as is: signing needs the secret itself (as every HMAC webhook sender does)."""

    __tablename__ = "webhook_secrets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    secret: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookEvent(Base):
    """The outbox: one event to POST, written in the transaction of the state change that causes it.

    `seq` orders a job's events (they are delivered one at a time, in order); `lease_until` is the
    conditional claim that keeps two API processes from sending one event at once.
    """

    __tablename__ = "webhook_events"
    __table_args__ = (
        Index("ix_webhook_events_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_events_job_id_seq", "job_id", "seq"),
    )

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
                                     autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookDelivery(Base):
    """One attempt to deliver an event: what was sent where, and what came back."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    event_seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), ForeignKey("webhook_events.seq", ondelete="CASCADE"),
        index=True,
    )
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(String(2048))
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    ok: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    response_excerpt: Mapped[str | None] = mapped_column(Text, default=None)
    duration_ms: Mapped[float | None] = mapped_column(default=None)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConsoleSession(Base):
    """A signed-in web console session (api/routes/console.py). The cookie holds a random token;
    only its sha256 is stored, and the session acts as the API key it was opened with."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the cookie's token
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
