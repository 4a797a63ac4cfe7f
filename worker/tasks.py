"""Celery tasks, by name. Each takes only a row id; the work lives in `worker.runner`.

The API enqueues these by name (`send_task("kdiga.run_job", args=[job_id], queue=...)`), so it
never imports this module.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from billiard.exceptions import TimeLimitExceeded
from celery import Task
from celery.signals import task_prerun, worker_process_init, worker_ready

from kdiga_service.models import Dataset, Teacher
from kdiga_service.queue import JOIN_JOB, RUN_JOB, VALIDATE_DATASET, VALIDATE_TEACHER
from kdiga_service.settings import get_settings
from kdiga_service.storage import get_storage
from worker import deliveries, leftovers, registry, runner, validation
from worker.celery_app import app
from worker.ownership import worker_identity

log = logging.getLogger(__name__)


@worker_process_init.connect
def _after_fork(**_kwargs: Any) -> None:
    """A forked pool process must not reuse the parent's database connections."""
    from kdiga_service.db import dispose_engines

    dispose_engines()


@worker_ready.connect
def _sweep_at_start(**_kwargs: Any) -> None:
    """Remove scratch folders that attempts killed with an earlier worker left behind, and run the
    MLflow exports that a worker dying right after `succeeded` left pending."""
    leftovers.sweep_now_and_then(get_settings())
    _export_pending_in_background()


@task_prerun.connect
def _sweep_before_task(**_kwargs: Any) -> None:
    """...and those of pool processes killed since (at most once a minute per process)."""
    leftovers.sweep_now_and_then(get_settings())
    _export_pending_in_background()


def _export_pending_in_background() -> None:
    """In a thread: an export takes seconds (minutes when the registry is slow); a task or the
    worker's start must not wait for it."""
    settings = get_settings()
    if settings.mlflow_tracking_uri:
        threading.Thread(target=registry.export_pending_now_and_then,
                         args=(settings, get_storage, worker_identity()), daemon=True).start()


@task_prerun.connect
def apply_thread_share(**_kwargs: Any) -> int | None:
    """torch.set_num_threads(KDIGA_WORKER_THREADS, set by `worker.launcher`) before a task runs: a
    process using every core beside others makes each job 10-30x slower on a busy machine (issue
    17.9). Not at pool-process start: importing torch there outlasts Celery's wait for a new pool
    process (4 s) on a busy machine, and the process is killed."""
    threads = get_settings().worker_threads
    if threads:
        import torch  # the task imports it anyway

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
            log.info("intra-op threads set", extra={"threads": threads})
    return threads


class JobTask(Task):
    """Records a hard time limit on the job row: the pool process was killed, so the task could not."""

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # type: ignore[no-untyped-def]  # noqa: ARG002 - Celery Task signature
        if isinstance(exc, TimeLimitExceeded) and args:
            runner.fail_after_hard_time_limit(str(args[0]))


@app.task(name=RUN_JOB, bind=True, base=JobTask, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Task, job_id: str) -> str:
    """Run a job to its end (safe to deliver twice)."""
    outcome = runner.run_job(job_id)
    if outcome.status == "busy" and outcome.retry_in:
        # Another live worker holds the job: look again later, so that if it dies the job is not lost.
        raise self.retry(countdown=outcome.retry_in, max_retries=None)
    return outcome.status


@app.task(name=JOIN_JOB)
def join_job(job_id: str, rendezvous_id: str) -> str:
    """Take a place in a multi-host job's gang and run this host's ranks (acknowledged on receipt: a
    member that dies ends the attempt, and the retried attempt sends new join tasks)."""
    from worker import ddp

    return ddp.join_job(job_id, rendezvous_id).status


@app.task(name=VALIDATE_TEACHER, acks_late=True, reject_on_worker_lost=True)
def validate_teacher(teacher_id: str) -> str:
    """Load an uploaded teacher once and mark it ready or invalid (invalid too past the delivery cap)."""
    if deliveries.over_cap(Teacher, teacher_id):
        return "failed"
    return validation.validate_teacher(teacher_id).status


@app.task(name=VALIDATE_DATASET, acks_late=True, reject_on_worker_lost=True)
def validate_dataset(dataset_id: str) -> str:
    """Load a dataset once and record its summary, or why it is invalid (invalid too past the delivery cap)."""
    if deliveries.over_cap(Dataset, dataset_id):
        return "failed"
    return validation.validate_dataset(dataset_id).status
