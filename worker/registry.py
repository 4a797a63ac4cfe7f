"""Register a finished job's model in MLflow (optional: `KDIGA_MLFLOW_TRACKING_URI`, off by default).

After a distill or adversarial_train job succeeded, the worker logs one MLflow run: params (the
job's spec, flattened), metrics (clean, PGD and AutoAttack accuracy of the student and the teacher,
and how much of the teacher's robustness the student kept), tags (the job's labels, and ours under
`kdiga.`), the artifacts (weights, ONNX, model card, reports under `kdiga/`), and registers the
ONNX export as an MLflow model (onnx flavour: `mlflow.pyfunc.load_model("models:/<name>/<version>")`
serves it, with a tensor signature). The registered model's name is the job's `mlflow_model_name`
label when set, else `kdiga-<arch>`.

A failure is logged and recorded on the job (`result.mlflow.error`), never failing the job: the
student is already stored and the job already succeeded when this runs. The job's `succeeded` row
says `result.mlflow.state = "pending"` until the export's outcome replaces it, so an export that a
dying worker never ran is found (`export_pending`: at a worker's start and, at most once a minute,
before its tasks) and run from the stored artifacts; a run MLflow already holds for the job (the
worker died after registering, before recording) is recorded, not logged twice. MLflow's own HTTP retries
are bounded here (unless the operator set MLFLOW_HTTP_REQUEST_* themselves) so that an unreachable
server costs seconds, not the minutes of its defaults.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kdiga_service import crud
from kdiga_service.settings import Settings
from worker.common import session_for

log = logging.getLogger(__name__)

MODEL_KINDS = ("distill", "adversarial_train")
SKIPPED_SPEC_KEYS = ("notify", "labels")
MAX_PARAM_CHARS = 6000  # MLflow's limit for a param value
BATCH = 100  # MLflow's limit of params per log_batch call
MLFLOW_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
MODEL_NAME_LABEL = "mlflow_model_name"


def flatten(spec: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """`{"train": {"lr": 0.1}}` as `("train.lr", "0.1")`; lists as JSON."""
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}.")
        elif value is not None:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            yield name, text[:MAX_PARAM_CHARS]


def registry_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The job's headline numbers, plus `retention_<attack>` = student / teacher robust accuracy."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, value in list(out.items()):
        match = re.fullmatch(r"student_(.+)_accuracy", key)
        if match and match.group(1) != "clean":
            teacher = out.get(f"teacher_{match.group(1)}_accuracy")
            if teacher:
                out[f"retention_{match.group(1)}"] = value / teacher
    return out


def model_name(job_labels: Mapping[str, str], spec: Mapping[str, Any]) -> str:
    """The registered model's name: the `mlflow_model_name` label, else `kdiga-<arch>`."""
    chosen = job_labels.get(MODEL_NAME_LABEL) or f"kdiga-{(spec.get('student') or {}).get('arch', 'model')}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", chosen)[:200]


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException:  # another worker created it meanwhile
        return str(client.get_experiment_by_name(name).experiment_id)


def _signature(onnx_model: Any) -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(value: Any) -> Any:
        dims = [d.dim_value if d.dim_value > 0 else -1 for d in value.type.tensor_type.shape.dim]
        return TensorSpec(np.dtype("float32"), tuple(dims), value.name)

    graph = onnx_model.graph
    return ModelSignature(inputs=Schema([spec(v) for v in graph.input]),
                          outputs=Schema([spec(v) for v in graph.output]))


def _log_run(client: Any, run_id: str, job: Any, metrics: Mapping[str, Any], files: Mapping[str, Path]) -> None:
    from mlflow.entities import Metric, Param

    spec = {k: v for k, v in (job.spec or {}).items() if k not in SKIPPED_SPEC_KEYS}
    params = [Param(k, v) for k, v in flatten(spec)]
    now = int(time.time() * 1000)
    values = [Metric(k, v, now, 0) for k, v in registry_metrics(metrics).items()]
    for i in range(0, max(len(params), len(values)), BATCH):
        client.log_batch(run_id, metrics=values[i:i + BATCH], params=params[i:i + BATCH])
    for _name, path in sorted(files.items()):
        client.log_artifact(run_id, str(path), "kdiga")


def export_job(job: Any, metrics: Mapping[str, Any], files: Mapping[str, Path], settings: Settings) -> dict[str, Any]:
    """Log the run and register the model; returns what the job records (`run_id`, `model`, `version`)."""
    _bound_retries()
    import mlflow
    import onnx
    from mlflow import MlflowClient

    uri = str(settings.mlflow_tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    labels = dict(job.labels or {})
    tags = {**labels, "kdiga.job_id": job.id, "kdiga.kind": job.kind, "kdiga.owner_id": job.owner_id}
    run = client.create_run(_experiment_id(client, settings.mlflow_experiment),
                            run_name=job.name or f"{job.kind} {job.id[:8]}", tags=tags)
    run_id = run.info.run_id
    try:
        _log_run(client, run_id, job, metrics, files)
        onnx_path = next(p for n, p in files.items() if n.endswith(".onnx"))
        name = model_name(labels, job.spec or {})
        onnx_model = onnx.load(str(onnx_path))
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(onnx_model, name="model", registered_model_name=name,
                                         signature=_signature(onnx_model),
                                         pip_requirements=["onnx", "onnxruntime"])
        version = str(info.registered_model_version)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return {"tracking_uri": uri, "experiment": settings.mlflow_experiment, "run_id": run_id, "model": name,
            "version": version, "model_uri": f"models:/{name}/{version}"}


def export_pending_record(job: Any, settings: Settings) -> dict[str, Any] | None:
    """What a succeeded job's result holds until its export ran (None: nothing to export)."""
    if not settings.mlflow_tracking_uri or job.kind not in MODEL_KINDS:
        return None
    return {"state": PENDING, "tracking_uri": settings.mlflow_tracking_uri}


def export_after_success(job: Any, result: Mapping[str, Any], settings: Settings) -> dict[str, Any] | None:
    """Export a succeeded job when the operator configured MLflow; record the outcome on the job."""
    if export_pending_record(job, settings) is None:
        return None
    files = {item["name"]: Path(item["path"]) for item in result.get("artifacts") or []}
    return _export_and_record(job, result.get("metrics") or {}, files, settings)


def _export_and_record(job: Any, metrics: Mapping[str, Any], files: Mapping[str, Path],
                       settings: Settings) -> dict[str, Any]:
    started = time.monotonic()
    try:
        record = _existing_run(job, settings) or export_job(job, metrics, files, settings)
        log.info("registered in MLflow", extra={"job_id": job.id, **record})
    except Exception as exc:  # noqa: BLE001 - the job succeeded; the registry's trouble is recorded, not raised
        log.exception("MLflow export failed", extra={"job_id": job.id})
        record = {"tracking_uri": settings.mlflow_tracking_uri,
                  "error": f"The export to MLflow failed ({type(exc).__name__}: {str(exc)[:300]})."}
    record["seconds"] = round(time.monotonic() - started, 2)
    with session_for(settings) as session:
        crud.record_job_export(session, job.id, key="mlflow", value=record)
    return record


# -- exports that a dying worker left pending -------------------------------------------------------
PENDING, EXPORTING = "pending", "exporting"
SCAN = 500  # recent succeeded jobs looked at per pass
_last_pass = 0.0


def _bound_retries() -> None:
    for key, value in MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _existing_run(job: Any, settings: Settings) -> dict[str, Any] | None:
    """The record of a finished MLflow run already logged for this job with its model registered
    (a worker that died after registering, before recording), else None."""
    _bound_retries()
    from mlflow import MlflowClient

    uri = str(settings.mlflow_tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], f"tags.`kdiga.job_id` = '{job.id}'",
                              order_by=["attributes.start_time DESC"])
    for run in runs:
        if run.info.status != "FINISHED":
            continue
        versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        if versions:
            version = versions[0]
            return {"tracking_uri": uri, "experiment": settings.mlflow_experiment, "run_id": run.info.run_id,
                    "model": version.name, "version": str(version.version),
                    "model_uri": f"models:/{version.name}/{version.version}"}
    return None


def export_pending(settings: Settings, store: Any, me: str, *, limit: int = 10) -> list[str]:
    """Export succeeded jobs whose export was left pending (or claimed by a worker that died) for
    longer than `mlflow_export_retry_after_s`; returns their ids. Each is claimed first (a row lock
    on PostgreSQL), so two workers starting together export it once."""
    import tempfile
    from datetime import timedelta

    from sqlalchemy import select

    from kdiga_service.models import SUCCEEDED, Job, utcnow

    if not settings.mlflow_tracking_uri:
        return []
    cutoff = utcnow() - timedelta(seconds=settings.mlflow_export_retry_after_s)
    with session_for(settings) as session:
        rows = session.execute(select(Job.id, Job.result).where(
            Job.status == SUCCEEDED, Job.kind.in_(MODEL_KINDS), Job.finished_at < cutoff)
            .order_by(Job.finished_at.desc()).limit(SCAN)).all()
    due = [job_id for job_id, result in rows if _due((result or {}).get("mlflow"), cutoff)][:limit]
    done = []
    for job_id in due:
        job = _claim(settings, job_id, me, cutoff)
        if job is None:
            continue
        with tempfile.TemporaryDirectory(prefix="kdiga-export-") as tmp:
            files = {a.name: store.download(a.storage_key, Path(tmp) / a.name) for a in job.artifacts}
            _export_and_record(job, job.metrics or {}, files, settings)
        done.append(job_id)
    return done


def export_pending_now_and_then(settings: Settings, store_factory: Any, me: str, *, every_s: float = 60.0) -> None:
    """`export_pending` at most once per `every_s` in this process; never raises (a registry that
    is down must not stop a worker from taking jobs)."""
    global _last_pass
    if not settings.mlflow_tracking_uri or time.monotonic() - _last_pass < every_s:
        return
    _last_pass = time.monotonic()
    try:
        export_pending(settings, store_factory(settings), me)
    except Exception:  # noqa: BLE001 - logged; the next pass tries again
        log.exception("exporting pending MLflow exports failed")


def _due(record: Any, cutoff: Any) -> bool:
    if not isinstance(record, dict) or record.get("state") not in (PENDING, EXPORTING):
        return False
    if record["state"] == PENDING:
        return True
    since = record.get("since")  # a claim older than the cutoff: its worker died too
    return isinstance(since, str) and since < cutoff.isoformat()


def _claim(settings: Settings, job_id: str, me: str, cutoff: Any) -> Any:
    """Mark the export as ours (under a row lock where the database has them); the job, or None when
    another worker has it or it is done."""
    from sqlalchemy import select, update

    from kdiga_service.models import Job, utcnow

    with session_for(settings) as session:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
        if job is None or not _due((job.result or {}).get("mlflow"), cutoff):
            session.rollback()
            return None
        claim = {"state": EXPORTING, "by": me, "since": utcnow().isoformat(),
                 "tracking_uri": settings.mlflow_tracking_uri}
        session.execute(update(Job).where(Job.id == job_id).values(result={**job.result, "mlflow": claim})
                        .execution_options(synchronize_session=False))
        session.commit()
        session.refresh(job)
        _ = list(job.artifacts)  # loaded before the session closes
        session.expunge(job)
        return job
