"""What the tasks do, without Celery: reload the row, claim it, call kdiga_core.jobs, record the outcome.

Every function here takes only an id and is safe to run twice (style.md habit 8):

- `run_job` claims the job row with a conditional UPDATE (`api.crud.claim_job`). A finished job
  is skipped. A running job whose worker is known to be dead (same host, process gone) or whose
  heartbeat is stale is taken over and resumes from its last checkpoint; one whose worker is alive
  is left alone and looked at again later (`Outcome.retry_in`). After `task_max_retries`
  interruptions the job fails with a reason instead of killing workers forever (design.md §9).
- Progress goes to the row at most once per `progress_interval_s`; a background thread refreshes
  the heartbeat so long phases without progress (evaluation, export) do not look dead.
- Cancellation is cooperative, through the row (`should_cancel`, throttled like progress).
- Checkpoints are uploaded to the store after every epoch; artifacts are stored under
  deterministic keys and ids, so a rerun replaces instead of duplicating.

kdiga_core (and so torch) is imported inside the functions: importing this module stays cheap and
never touches CUDA (pytorch#40403).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from api import crud
from api.db import get_sessionmaker
from api.models import (
    CANCELLING,
    FAILED,
    FINISHED_STATES,
    READY,
    RUNNING,
    Artifact,
    Dataset,
    Job,
    Teacher,
    utcnow,
)
from api.settings import Settings, get_settings
from api.storage import ArtifactStore, get_storage

log = logging.getLogger(__name__)

ID_NAMESPACE = uuid.UUID("6b646967-612d-4b44-8000-000000000001")  # deterministic ids for reruns
PROGRESS_KEYS = ("phase", "epoch", "epochs", "step", "steps_per_epoch", "global_step", "total_steps",
                 "percent", "eta_s")
ARTIFACT_KINDS = {".safetensors": "student_weights", ".onnx": "onnx", "model_card.json": "model_card",
                  "report.json": "report_json", "report.html": "report_html"}
CONTENT_TYPES = {".json": "application/json", ".html": "text/html; charset=utf-8"}


@dataclass
class Outcome:
    """What a task did: succeeded / failed / cancelled / skipped, or busy (look again in `retry_in` s)."""

    status: str
    detail: str = ""
    retry_in: float | None = None
    result: dict[str, Any] = field(default_factory=dict)


def worker_identity() -> str:
    """`host:pid:thread` of this task; stored on the row so a redelivery can tell a dead owner."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def owner_is_dead(worker_id: str | None) -> bool:
    """True when `worker_id` names a process (or a thread of ours) on this host that no longer runs."""
    host, _, rest = (worker_id or "").partition(":")
    pid, _, thread = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():  # an earlier attempt in this very process (thread pool, or a retry)
        alive = {t.ident for t in threading.enumerate()} - {threading.get_ident()}
        return not (thread.isdigit() and int(thread) in alive)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ", 1)[1][:1] == "Z"
    except (OSError, IndexError):
        return False


def interrupted_message(attempts: int) -> str:
    return (f"The job was interrupted {attempts} times (the worker died each time, e.g. out of memory); "
            "giving up.")


# --------------------------------------------------------------------------- run_job


def run_job(job_id: str, *, settings: Settings | None = None, worker_id: str | None = None) -> Outcome:
    """Run one job to its end, or explain why not (see the module docstring)."""
    s = settings or get_settings()
    me = worker_id or worker_identity()
    with _session(s) as session:
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
    return _execute(claimed, s, me)


def _claim(session: Session, job: Job, me: str, s: Settings) -> tuple[Job | None, Outcome]:
    max_attempts = s.task_max_retries + 1
    stale_after = s.heartbeat_stale_s
    if job.status in (RUNNING, CANCELLING):
        dead = owner_is_dead(job.worker_id)
        if dead:
            stale_after = 0.0
        beat = job.heartbeat_at
        stale = dead or beat is None or beat < utcnow() - timedelta(seconds=s.heartbeat_stale_s)
        if stale and job.attempts >= max_attempts:
            _give_up(session, job)
            return None, Outcome("failed", interrupted_message(job.attempts))
        if stale:
            log.warning("taking over an interrupted job", extra={
                "job_id": job.id, "previous_worker": job.worker_id, "attempts": job.attempts})
    claimed = crud.claim_job(session, job.id, me, stale_after_s=stale_after, max_attempts=max_attempts)
    if claimed is not None:
        return claimed, Outcome("running")
    current = crud.get_job(session, job.id)
    if current is None or current.status in FINISHED_STATES:
        return None, Outcome("skipped", f"already {current.status if current else 'gone'}")
    wait = max(1.0, min(s.heartbeat_stale_s, s.visibility_timeout_s / 2))
    log.info("job is running on another live worker; looking again later", extra={
        "job_id": job.id, "owner": current.worker_id, "retry_in_s": wait})
    return None, Outcome("busy", f"running on {current.worker_id}", retry_in=wait)


def _give_up(session: Session, job: Job) -> None:
    message = interrupted_message(job.attempts)
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_((RUNNING, CANCELLING)), Job.attempts == job.attempts)
        .values(status=FAILED, error=message, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    log.error("giving up on a job that keeps killing its worker", extra={
        "job_id": job.id, "attempts": job.attempts})


def _execute(job: Job, s: Settings, me: str) -> Outcome:
    store = get_storage(s)
    reporter = Reporter(job.id, me, s)
    workdir = Path(tempfile.mkdtemp(prefix=f"kdiga-job-{job.id[:8]}-", dir=_scratch_dir(s)))
    from kdiga_core.errors import CancelledError, KdigaError

    try:
        with ExitStack() as stack:
            inputs = _prepare_inputs(job, s, store, stack, workdir)
            resume = download_checkpoint(store, job.id, workdir / "checkpoint")
            if resume:
                log.info("resuming from checkpoint", extra={"job_id": job.id})
            reporter.start()
            result = _call_core(job, workdir, inputs, reporter, store, resume, s)
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
    except SoftTimeLimitExceeded:
        return _fail(job, s, me, f"The job exceeded its time limit of {s.job_soft_time_limit_s} seconds.")
    except KdigaError as exc:
        return _fail(job, s, me, str(exc))
    except Exception as exc:  # noqa: BLE001 - recorded on the row, with the traceback in the log
        log.exception("job failed with an internal error", extra={"job_id": job.id})
        return _fail(job, s, me, f"The job failed with an internal error ({type(exc).__name__}: {exc}).")
    finally:
        reporter.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        free_accelerator_memory()


def _call_core(job: Job, workdir: Path, inputs: dict[str, Any], reporter: Reporter,
               store: ArtifactStore, resume: bool, s: Settings) -> dict[str, Any]:
    from kdiga_core import jobs as core_jobs

    def on_checkpoint(directory: Path) -> None:
        upload_checkpoint(store, job.id, Path(directory))
        reporter.beat()

    extra: dict[str, Any] = {}
    if "student_path" in inputs:
        extra = {"student_path": inputs["student_path"], "student_spec": inputs["student_spec"]}
    return core_jobs.run_job(
        job.kind, dict(job.spec or {}), workdir, dataset=inputs["dataset"],
        teacher_path=inputs.get("teacher_path"), teacher_spec=inputs.get("teacher_spec"),
        model_dir=inputs.get("model_dir"), on_step=reporter.on_step, should_cancel=reporter.should_cancel,
        on_checkpoint=on_checkpoint, resume=resume, allow_torchscript=s.allow_torchscript,
        teacher_cache_dir=_teacher_cache_dir(s), **extra,
    )


def _teacher_cache_dir(s: Settings) -> Path | None:
    """This worker's folder of teacher evaluations (None when KDIGA_TEACHER_EVAL_CACHE is off)."""
    if not s.teacher_eval_cache:
        return None
    return Path(s.cache_dir or s.home / "cache") / "teacher-evaluations"


def _succeed(job: Job, result: dict[str, Any], s: Settings, store: ArtifactStore, me: str) -> Outcome:
    with _session(s) as session:
        artifacts = store_artifacts(session, store, job, result.get("artifacts") or {})
        summary: dict[str, Any] = {
            "metrics": _jsonable(result.get("metrics") or {}),
            "artifacts": {a.name: a.id for a in artifacts},
        }
        report = next((a for a in artifacts if a.kind == "report_json"), None)
        if report is not None:
            summary["report_artifact_id"] = report.id
        if result.get("model_spec"):
            summary["model_spec"] = _jsonable(result["model_spec"])
        if job.kind == "adversarial_train":
            summary["teacher_id"] = register_teacher(session, store, job, result)
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
    return Outcome("succeeded", result=summary)


def _fail(job: Job, s: Settings, me: str, error: str) -> Outcome:
    with _session(s) as session:
        crud.fail_job(session, job.id, error=error, worker_id=me)
    log.error("job failed", extra={"job_id": job.id, "error": error})
    return Outcome("failed", error)


def fail_after_hard_time_limit(job_id: str, *, settings: Settings | None = None) -> None:
    """Called in the worker's main process when the pool process was killed at the hard time limit."""
    s = settings or get_settings()
    limit = max(s.job_hard_time_limit_s, s.job_soft_time_limit_s + 30)
    with _session(s) as session:
        crud.fail_job(session, job_id, error=f"The job exceeded its time limit of {limit} seconds and was stopped.")
    free_accelerator_memory()
    log.error("job stopped at the hard time limit", extra={"job_id": job_id, "limit_s": limit})


def _finish_cancelled(job: Job, s: Settings, me: str) -> Outcome:
    with _session(s) as session:
        crud.mark_cancelled(session, job.id, worker_id=me)
    log.info("job cancelled", extra={"job_id": job.id})
    return Outcome("cancelled")


# --------------------------------------------------------------------------- inputs


def _prepare_inputs(job: Job, s: Settings, store: ArtifactStore, stack: ExitStack,
                    workdir: Path) -> dict[str, Any]:
    """Local paths for the job's dataset, teacher and (evaluate) model bundle."""
    from kdiga_core.errors import KdigaError

    out: dict[str, Any] = {}
    with _session(s) as session:
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
        if dataset is None:
            raise KdigaError("The job's dataset no longer exists.")
        if dataset.status != READY:
            raise KdigaError(f"The dataset is not ready (status: {dataset.status}).")
        out["dataset"] = _dataset_input(dataset, s, store, stack)
        model_ref = dict((job.spec or {}).get("model") or {})
        teacher_id = job.teacher_id or model_ref.get("teacher_id")
        if teacher_id:
            teacher = session.get(Teacher, teacher_id)
            if teacher is None:
                raise KdigaError("The job's teacher no longer exists.")
            if teacher.status != READY:
                raise KdigaError(f"The teacher is not ready (status: {teacher.status}).")
            out["teacher_path"] = stack.enter_context(store.local_path(teacher.storage_key))
            out["teacher_spec"] = dict(teacher.spec or {})
        if model_ref.get("job_id"):
            out["model_dir"] = _download_model_bundle(session, store, model_ref["job_id"], workdir / "model")
        weights_id = ((job.spec or {}).get("student") or {}).get("weights_id")
        if weights_id:  # a pre-trained student: an uploaded model whose weights initialise it
            weights = session.get(Teacher, weights_id)
            if weights is None or weights.status != READY:
                raise KdigaError("The student's initial weights (student.weights_id) are not a ready model.")
            out["student_path"] = stack.enter_context(store.local_path(weights.storage_key))
            out["student_spec"] = dict(weights.spec or {})
    return out


def _dataset_input(dataset: Dataset, s: Settings, store: ArtifactStore, stack: ExitStack) -> dict[str, Any]:
    if dataset.kind == "builtin" or (dataset.builtin and not dataset.storage_key):
        root = str(getattr(s, "data_dir", None) or s.home / "data")
        return {"kind": dataset.builtin, "path": root if dataset.builtin != "digits" else None}
    if not dataset.storage_key:
        from kdiga_core.errors import KdigaError

        raise KdigaError("The dataset has no stored file.")
    path = stack.enter_context(store.local_path(dataset.storage_key))
    return {"kind": dataset.kind, "path": str(path)}


def _download_model_bundle(session: Session, store: ArtifactStore, source_job_id: str, dest: Path) -> Path:
    """The source job's model card and every file it lists (weights, ONNX), for `load_model_bundle`."""
    from kdiga_core.errors import KdigaError

    rows = {a.name: a for a in session.scalars(select(Artifact).where(Artifact.job_id == source_job_id)).all()}
    card = rows.get("model_card.json")
    if card is None or not any(a.kind == "student_weights" for a in rows.values()):
        raise KdigaError("The model job has no saved model (weights and model card) to evaluate.")
    store.download(card.storage_key, dest / card.name)
    try:
        listed = json.loads((dest / card.name).read_text(encoding="utf-8")).get("files") or {}
    except ValueError as exc:
        raise KdigaError("The model job's model card is not valid JSON.") from exc
    for name in listed:
        if name not in rows:
            raise KdigaError(f"The model job's file {name} is missing from its artifacts.")
        store.download(rows[name].storage_key, dest / name)
    return dest


# --------------------------------------------------------------------------- checkpoints


def checkpoint_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoint"


def upload_checkpoint(store: ArtifactStore, job_id: str, directory: Path) -> str:
    """Upload every file of a checkpoint directory, then point `latest` at it (the commit)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
    epoch = _checkpoint_epoch(directory)
    folder = f"e{epoch:05d}" if epoch is not None else f"t{int(time.time() * 1000)}"
    prefix = checkpoint_prefix(job_id)
    for path in files:
        store.upload_file(path, f"{prefix}/{folder}/{path.name}")
    previous = _read_pointer(store, job_id)
    store.write_bytes(f"{prefix}/latest.json", json.dumps(
        {"folder": folder, "files": [p.name for p in files], "epoch": epoch}).encode())
    if previous and previous.get("folder") != folder:
        store.delete_prefix(f"{prefix}/{previous['folder']}")
    log.info("checkpoint uploaded", extra={"job_id": job_id, "epoch": epoch, "folder": folder})
    return folder


def download_checkpoint(store: ArtifactStore, job_id: str, dest: Path) -> bool:
    """Fetch the latest uploaded checkpoint into `dest`; False when there is none."""
    pointer = _read_pointer(store, job_id)
    if not pointer:
        return False
    prefix = f"{checkpoint_prefix(job_id)}/{pointer['folder']}"
    for name in pointer.get("files", []):
        store.download(f"{prefix}/{name}", dest / name)
    return True


def _read_pointer(store: ArtifactStore, job_id: str) -> dict[str, Any] | None:
    key = f"{checkpoint_prefix(job_id)}/latest.json"
    if not store.exists(key):
        return None
    try:
        return json.loads(store.read_bytes(key, max_bytes=1 << 20))
    except ValueError:
        return None


def _checkpoint_epoch(directory: Path) -> int | None:
    try:
        meta = json.loads((directory / "last.json").read_text(encoding="utf-8"))
        return int(meta["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- outputs


def artifact_kind(name: str) -> str:
    if name in ARTIFACT_KINDS:
        return ARTIFACT_KINDS[name]
    return ARTIFACT_KINDS.get(Path(name).suffix, "file")


def store_artifacts(session: Session, store: ArtifactStore, job: Job, files: dict[str, Any]) -> list[Artifact]:
    """Upload the job's output files and record them; a rerun replaces rows and objects in place."""
    rows = []
    for name, path in sorted(files.items()):
        key = f"jobs/{job.id}/artifacts/{name}"
        stored = store.upload_file(path, key)
        artifact_id = str(uuid.uuid5(ID_NAMESPACE, f"artifact:{job.id}:{name}"))
        session.execute(delete(Artifact).where(Artifact.job_id == job.id, Artifact.name == name,
                                               Artifact.id != artifact_id))
        row = session.merge(Artifact(
            id=artifact_id, owner_id=job.owner_id, job_id=job.id, name=name, kind=artifact_kind(name),
            storage_key=stored.key, size_bytes=stored.size_bytes, sha256=stored.sha256,
            content_type=CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream"),
        ))
        rows.append(row)
    session.commit()
    return rows


def register_teacher(session: Session, store: ArtifactStore, job: Job, result: dict[str, Any]) -> str:
    """An adversarial_train job's model becomes a ready teacher (once, whatever the reruns)."""
    teacher_id = str(uuid.uuid5(ID_NAMESPACE, f"teacher:{job.id}"))
    if session.get(Teacher, teacher_id) is not None:
        return teacher_id
    weights = Path(result["artifacts"][result.get("model_file") or "model.safetensors"])
    stored = store.upload_file(weights, f"teachers/{teacher_id}.safetensors")
    spec = _jsonable(result.get("model_spec") or {})
    name = job.name or f"{spec.get('arch', 'model')} (robust, job {job.id[:8]})"
    crud.create_teacher(session, owner_id=job.owner_id, name=name, format="safetensors", stored=stored,
                        spec=spec, status=READY, source_job_id=job.id, id=teacher_id)
    session.commit()
    return teacher_id


# --------------------------------------------------------------------------- progress, cancel, heartbeat


class Reporter:
    """Throttled progress writes, throttled cancel checks and a heartbeat thread for one job."""

    def __init__(self, job_id: str, worker_id: str, settings: Settings):
        self.job_id, self.worker_id, self.settings = job_id, worker_id, settings
        self.interval = settings.progress_interval_s
        self.beat_every = max(0.2, min(10.0, settings.heartbeat_stale_s / 4))
        self.lost = False
        self._cancel = False
        self._last_write = self._last_check = -math.inf
        self._phase: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat_loop, name=f"heartbeat-{self.job_id[:8]}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def on_step(self, progress: dict[str, Any]) -> None:
        """kdiga_core's `on_step`: called every step; writes at most once per interval (or on a new phase)."""
        now = time.monotonic()
        phase = progress.get("phase")
        if now - self._last_write < self.interval and phase == self._phase:
            return
        self._last_write, self._phase = now, phase
        clean = {k: _scalar(progress[k]) for k in PROGRESS_KEYS if k in progress}
        extra = {k: _scalar(v) for k, v in progress.items()
                 if k not in PROGRESS_KEYS and isinstance(v, (int, float, str, bool))}
        metrics = {"live": extra} if extra else None
        try:
            with _session(self.settings) as session:
                ours = crud.update_progress(session, self.job_id, progress=clean, metrics=metrics,
                                            worker_id=self.worker_id)
        except Exception:  # noqa: BLE001 - progress is best effort; the job goes on
            log.warning("progress write failed", extra={"job_id": self.job_id}, exc_info=True)
            return
        if not ours:
            self._lose()
        if phase != "train" and self.should_cancel():
            # Training checks `should_cancel` itself; the later phases (evaluation, export) only
            # report progress, so a cancel is honoured here, between two of their stages.
            from kdiga_core.errors import CancelledError

            raise CancelledError("The job was cancelled.")

    def should_cancel(self, *, force: bool = False) -> bool:
        """kdiga_core's `should_cancel`: reads the row at most once per interval."""
        if self.lost or self._cancel:
            return True
        now = time.monotonic()
        if force or now - self._last_check >= self.interval:
            self._last_check = now
            try:
                with _session(self.settings) as session:
                    self._cancel = crud.is_cancel_requested(session, self.job_id)
            except Exception:  # noqa: BLE001 - try again next time
                log.warning("cancel check failed", extra={"job_id": self.job_id}, exc_info=True)
        return self._cancel

    def beat(self) -> None:
        try:
            with _session(self.settings) as session:
                ours = crud.heartbeat(session, self.job_id, worker_id=self.worker_id)
        except Exception:  # noqa: BLE001 - a missed beat is not fatal
            log.warning("heartbeat failed", extra={"job_id": self.job_id}, exc_info=True)
            return
        if not ours:
            self._lose()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.beat_every):
            self.beat()

    def _lose(self) -> None:
        if not self.lost:
            log.warning("the job row is no longer ours; stopping", extra={"job_id": self.job_id})
        self.lost = True


# --------------------------------------------------------------------------- teachers, datasets


def validate_teacher(teacher_id: str, *, settings: Settings | None = None) -> Outcome:
    """Load an uploaded teacher once; mark it ready (with its full spec) or invalid (one sentence)."""
    s = settings or get_settings()
    from kdiga_core import jobs as core_jobs

    with _session(s) as session:
        teacher = session.get(Teacher, teacher_id)
        if teacher is None or teacher.status != "validating":
            return Outcome("skipped", "no such teacher" if teacher is None else f"already {teacher.status}")
        key, spec = teacher.storage_key, dict(teacher.spec or {})
    try:
        with get_storage(s).local_path(key) as path:
            info = core_jobs.validate_teacher(path, spec, allow_torchscript=s.allow_torchscript)
        error, info = None, _jsonable(info)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the row
        error, info = _validation_error(exc, "model"), {}
    finally:
        free_accelerator_memory()
    with _session(s) as session:
        crud.set_teacher_validated(session, teacher_id, spec=info.get("spec"), format=info.get("format"),
                                   error=error)
    log.info("teacher validated", extra={"teacher_id": teacher_id, "error": error})
    return Outcome("failed" if error else "succeeded", error or "", result=info)


def validate_dataset(dataset_id: str, *, settings: Settings | None = None) -> Outcome:
    """Load a dataset once; record its classes, shapes and split sizes, or why it is invalid."""
    s = settings or get_settings()
    from kdiga_core import jobs as core_jobs

    with _session(s) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != "validating":
            return Outcome("skipped", "no such dataset" if dataset is None else f"already {dataset.status}")
        session.expunge(dataset)
    try:
        with ExitStack() as stack:
            summary = _jsonable(core_jobs.validate_dataset(_dataset_input(dataset, s, get_storage(s), stack)))
        error = None
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the row
        error, summary = _validation_error(exc, "dataset"), {}
    with _session(s) as session:
        crud.set_dataset_validated(session, dataset_id, info=summary, error=error)
    log.info("dataset validated", extra={"dataset_id": dataset_id, "error": error})
    return Outcome("failed" if error else "succeeded", error or "", result=summary)


def _validation_error(exc: Exception, what: str) -> str:
    from kdiga_core.errors import KdigaError

    if isinstance(exc, KdigaError):
        return str(exc)
    log.warning("validation failed with an unexpected error", exc_info=True)
    return f"The {what} could not be loaded ({type(exc).__name__}: {exc})."


# --------------------------------------------------------------------------- helpers


def _session(s: Settings) -> Session:
    return get_sessionmaker(s)()


def _scratch_dir(s: Settings) -> str | None:
    path = getattr(s, "work_dir", None)
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        return str(path)
    return None


def _scalar(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        return value.item()
    return value


def _jsonable(value: Any) -> Any:
    """A deep copy that JSON accepts (tuples become lists, NaN becomes null, paths become strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) or hasattr(value, "item"):
        return _scalar(float(value) if isinstance(value, float) else value.item())
    return str(value)


def free_accelerator_memory() -> None:
    """Give cached GPU memory back after a job (only if torch and CUDA are already in use)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
