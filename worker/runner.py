"""A job's life cycle, without Celery: reload the row, claim it, call kdiga_core.jobs, record the outcome.

Every function here takes only an id and is safe to run twice (style.md habit 8):

- `run_job` claims the job row with a conditional UPDATE (`kdiga_service.crud.claim_job`). A finished job
  is skipped. A running job whose worker is known to be dead (same host, process gone) or whose
  heartbeat is stale is taken over and resumes from its last checkpoint; one whose worker is alive
  is left alone and looked at again later (`Outcome.retry_in`). After `task_max_retries`
  interruptions the job fails with a reason instead of killing workers forever (design.md §9).
- A run that spends its time budget (`limits.time_budget_s`) or nears the soft time limit stops at a
  safe point and the row becomes `stopped`, its checkpoint kept; `POST /v1/jobs/{id}/resume` queues it
  again. Training and evaluation are separate phases: once training ends its checkpoint is stored
  before evaluation starts, and a failure after that is recorded as resumable (evaluation only).
- The rest lives beside it, one concern a module: `worker.inputs` (staging the dataset and models),
  `worker.checkpoints`, `worker.outputs` (artifacts, the teacher an adversarial_train job makes),
  `worker.progress` (throttled progress, cancel checks, heartbeat), `worker.validation` (teachers
  and datasets), `worker.ownership` (who holds a row).

kdiga_core (and so torch) is imported inside the functions: importing this module stays cheap and
never touches CUDA (pytorch#40403).
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session

from kdiga_service import crud
from kdiga_service.models import (
    CANCELLING,
    FAILED,
    FINISHED_STATES,
    RUNNING,
    Job,
)
from kdiga_service.settings import Settings, get_settings
from kdiga_service.storage import ArtifactStore, get_storage
from worker.checkpoints import CheckpointUploader, checkpoint_prefix, download_checkpoint
from worker.common import (
    Outcome,
    free_accelerator_memory,
    internal_failure,
    jsonable,
    session_for,
)
from worker.inputs import prepare_inputs, teacher_cache_dir
from worker.leftovers import make_scratch
from worker.outputs import register_teacher, store_artifacts
from worker.ownership import owner_is_dead, worker_identity
from worker.progress import Reporter
from worker.registry import export_after_success, export_pending_record

log = logging.getLogger(__name__)

AFTER_TRAINING = (" Its trained weights are kept: resuming the job (POST /v1/jobs/{id}/resume) retries the "
                  "evaluation without retraining.")


class FailedAfterTraining(Exception):
    """A job failed once its trained weights were stored: `resume` can retry what came after training."""

    def __init__(self, sentence: str):
        super().__init__(sentence)
        self.sentence = sentence


def failure_sentence(exc: BaseException) -> str:
    """The row's one sentence for an exception: a KdigaError's own words, else an internal error."""
    from kdiga_core.errors import KdigaError

    if isinstance(exc, KdigaError):
        return str(exc)
    return f"The job failed with an internal error ({type(exc).__name__}: {exc})."


def run_job(job_id: str, *, settings: Settings | None = None, worker_id: str | None = None) -> Outcome:
    """Run one job to its end, or explain why not (see the module docstring)."""
    s = settings or get_settings()
    me = worker_id or worker_identity()
    with session_for(s) as session:
        job = crud.get_job(session, job_id)
        if job is None:
            log.warning("job not found", extra={"job_id": job_id})
            return Outcome("skipped", "no such job")
        if job.status in FINISHED_STATES:
            log.info("job already finished, skipping", extra={"job_id": job_id, "status": job.status})
            return Outcome("skipped", f"already {job.status}")
        claimed, why = _claim(session, job, me, s)
        if claimed is None:
            return why
        if claimed.status == CANCELLING:
            crud.mark_cancelled(session, job_id, worker_id=me)
            log.info("job cancelled before it started", extra={"job_id": job_id})
            return Outcome("cancelled")
        session.expunge(claimed)
    log.info("job claimed", extra={"job_id": job_id, "kind": claimed.kind, "attempt": claimed.attempts,
                                   "worker_id": me})
    from worker import ddp  # jobs on several devices: torchrun ranks (imports this module)

    if ddp.on_several_devices(claimed):
        return ddp.run_on_devices(claimed, s, me)
    return _execute(claimed, s, me)


def _claim(session: Session, job: Job, me: str, s: Settings) -> tuple[Job | None, Outcome]:
    """Claim the row (crud.claim_job decides); a job whose owner is known dead is stale at once."""
    stale_after, status_before = s.heartbeat_stale_s, job.status
    if job.status in (RUNNING, CANCELLING) and owner_is_dead(job.worker_id):
        stale_after = 0.0
        log.warning("taking over an interrupted job", extra={
            "job_id": job.id, "previous_worker": job.worker_id, "attempts": job.attempts})
    claimed = crud.claim_job(session, job.id, me, stale_after_s=stale_after, max_attempts=s.task_max_retries + 1)
    if claimed is not None:
        return claimed, Outcome("running")
    current = crud.get_job(session, job.id)
    if current is not None and current.status == FAILED and status_before != FAILED:
        log.error("giving up on a job that keeps killing its worker", extra={
            "job_id": job.id, "attempts": current.attempts})
        return None, Outcome("failed", current.error or "")
    if current is None or current.status in FINISHED_STATES:
        return None, Outcome("skipped", f"already {current.status if current else 'gone'}")
    wait = max(1.0, min(s.heartbeat_stale_s, s.visibility_timeout_s / 2))
    log.info("job is running on another live worker; looking again later", extra={
        "job_id": job.id, "owner": current.worker_id, "retry_in_s": wait})
    return None, Outcome("busy", f"running on {current.worker_id}", retry_in=wait)


def _execute(job: Job, s: Settings, me: str) -> Outcome:
    store = get_storage(s)
    reporter = Reporter(job.id, me, s)
    workdir = make_scratch(s, f"kdiga-job-{job.id[:8]}-")
    from kdiga_core.errors import CancelledError, KdigaError, StoppedError

    try:
        with ExitStack() as stack:
            inputs = prepare_inputs(job, s, store, stack, workdir)
            resume = download_checkpoint(store, job.id, workdir / "checkpoint")
            if resume:
                log.info("resuming from checkpoint", extra={"job_id": job.id})
            reporter.start()
            result = _call_core(job, workdir, inputs, reporter, store, resume, s)
            reporter.settle()  # the last throttled progress, before the row is finished
        if reporter.lost:
            return Outcome("skipped", "another worker took the job over")
        if reporter.should_cancel(force=True):  # cancelled during the last phase: honour it
            return _finish_cancelled(job, s, me)
        return _succeed(job, result, s, store, me)
    except CancelledError:
        if reporter.lost:
            log.warning("stopped: the job was taken over by another worker", extra={"job_id": job.id})
            return Outcome("skipped", "another worker took the job over")
        return _finish_cancelled(job, s, me)
    except StoppedError as exc:
        return _stop(job, s, me, str(exc))
    except FailedAfterTraining as exc:
        return _fail(job, s, me, exc.sentence + AFTER_TRAINING.format(id=job.id), resumable=True)
    except SoftTimeLimitExceeded:
        return _fail(job, s, me, f"The job exceeded its time limit of {s.job_soft_time_limit_s} seconds.")
    except KdigaError as exc:
        return _fail(job, s, me, str(exc))
    except Exception as exc:  # noqa: BLE001 - recorded on the row, with the traceback in the log
        log.exception("job failed with an internal error", extra={"job_id": job.id})
        return _fail(job, s, me, internal_failure(exc, job.id))
    finally:
        reporter.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        free_accelerator_memory()


def _call_core(job: Job, workdir: Path, inputs: dict[str, Any], reporter: Reporter,
               store: ArtifactStore, resume: bool, s: Settings) -> dict[str, Any]:
    from kdiga_core import jobs as core_jobs
    from kdiga_core.errors import CancelledError, StoppedError

    # The γ sweep stops early to leave the final run time before the soft limit, and training stops
    # (resumable) shortly before it.
    deadline = time.monotonic() + s.job_soft_time_limit_s
    uploads = CheckpointUploader(store, job.id, workdir / "uploads")
    trained: list[str] = []  # the stored checkpoint of the finished training, once there is one

    def on_checkpoint(directory: Path) -> None:
        uploads.submit(Path(directory))  # stored in the background; training goes on
        reporter.beat()

    def after_training() -> None:
        # stored now, or (a resumed run that trained nothing more) the checkpoint it was resumed from
        if (folder := uploads.flush()) is not None or resume:
            trained.append(folder or "resumed")

    teacher = initial = None
    if inputs.get("teacher_path") is not None:
        teacher = core_jobs.ModelInput(inputs["teacher_path"], inputs.get("teacher_spec"))
    if "student_path" in inputs:
        initial = core_jobs.ModelInput(inputs["student_path"], inputs["student_spec"])
    job_inputs = core_jobs.JobInputs(
        dataset=inputs["dataset"], teacher=teacher, model_dir=inputs.get("model_dir"), initial_student=initial,
        allow_torchscript=s.allow_torchscript, teacher_cache_dir=teacher_cache_dir(s), about=inputs.get("about"),
        teacher_cache_budget_bytes=s.teacher_cache_budget_bytes)
    hooks = core_jobs.JobHooks(on_step=reporter.on_step, should_cancel=reporter.should_cancel,
                               on_checkpoint=on_checkpoint, time_left=lambda: deadline - time.monotonic(),
                               after_training=after_training)
    try:
        return core_jobs.run_job(job.kind, dict(job.spec or {}), workdir, job_inputs, hooks, resume=resume)
    except SoftTimeLimitExceeded:
        if uploads.flush() is None and not resume:
            raise
        raise StoppedError(f"The job reached the service's time limit of {s.job_soft_time_limit_s} seconds; "
                           "resuming it continues from its last checkpoint.") from None
    except (CancelledError, StoppedError):
        raise
    except Exception as exc:
        if trained:
            raise FailedAfterTraining(failure_sentence(exc)) from exc
        raise
    finally:
        uploads.close()  # the job waits for its last upload before it finishes


def _succeed(job: Job, result: dict[str, Any], s: Settings, store: ArtifactStore, me: str) -> Outcome:
    with session_for(s) as session:
        artifacts = store_artifacts(session, store, job, result.get("artifacts") or [])
        summary: dict[str, Any] = {
            "metrics": jsonable(result.get("metrics") or {}),
            "artifacts": {a.name: a.id for a in artifacts},
        }
        report = next((a for a in artifacts if a.kind == "report_json"), None)
        if report is not None:
            summary["report_artifact_id"] = report.id
        if result.get("model_spec"):
            summary["model_spec"] = jsonable(result["model_spec"])
        if job.kind == "adversarial_train":
            summary["teacher_id"] = register_teacher(session, store, job, result)
        if (pending := export_pending_record(job, s)) is not None:  # committed with `succeeded`: a worker
            summary["mlflow"] = pending  # that dies before the export leaves it for the next one
        current = crud.get_job(session, job.id)
        progress = {**((current.progress if current else None) or {}), "phase": "done", "percent": 100.0,
                    "eta_s": 0}
        ok = crud.finish_job(session, job.id, result=summary, metrics=summary["metrics"], progress=progress,
                             worker_id=me)
    if not ok:
        log.warning("job finished but was no longer ours (cancelled or taken over)", extra={"job_id": job.id})
        return Outcome("skipped", "the job was no longer ours when it finished")
    store.delete_prefix(checkpoint_prefix(job.id))
    log.info("job succeeded", extra={"job_id": job.id, "metrics": summary["metrics"]})
    if (exported := export_after_success(job, result, s)) is not None:  # never fails the job
        summary["mlflow"] = exported
    return Outcome("succeeded", result=summary)


def _fail(job: Job, s: Settings, me: str, error: str, *, resumable: bool = False) -> Outcome:
    with session_for(s) as session:
        crud.fail_job(session, job.id, error=error, worker_id=me, resumable=resumable)
    log.error("job failed", extra={"job_id": job.id, "error": error, "resumable": resumable})
    return Outcome("failed", error)


def _stop(job: Job, s: Settings, me: str, reason: str) -> Outcome:
    """The run reached its time budget at a safe point: `stopped`, its checkpoint kept for `resume`."""
    with session_for(s) as session:
        crud.stop_job(session, job.id, reason=reason, worker_id=me)
    log.info("job stopped", extra={"job_id": job.id, "reason": reason})
    return Outcome("stopped", reason)


def fail_after_hard_time_limit(job_id: str, *, settings: Settings | None = None) -> None:
    """Called in the worker's main process when the pool process was killed at the hard time limit."""
    s = settings or get_settings()
    limit = s.effective_hard_time_limit_s
    # a stored checkpoint makes it resumable (the run went past the soft limit's graceful stop)
    resumable = get_storage(s).exists(f"{checkpoint_prefix(job_id)}/latest.json")
    with session_for(s) as session:
        if resumable:
            crud.stop_job(session, job_id, reason=f"The job reached its time limit of {limit} seconds and was "
                                                  "stopped; resuming it continues from its last checkpoint.")
        else:
            crud.fail_job(session, job_id, error=f"The job exceeded its time limit of {limit} seconds and was stopped.")
    free_accelerator_memory()
    log.error("job stopped at the hard time limit", extra={"job_id": job_id, "limit_s": limit})


def _finish_cancelled(job: Job, s: Settings, me: str) -> Outcome:
    with session_for(s) as session:
        crud.mark_cancelled(session, job.id, worker_id=me)
    log.info("job cancelled", extra={"job_id": job.id})
    return Outcome("cancelled")
