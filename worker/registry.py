"""Register a finished job's model in MLflow (optional: `KDIGA_MLFLOW_TRACKING_URI`, off by default).

After a distill or adversarial_train job succeeded, the worker logs one MLflow run: params (the
job's spec, flattened), metrics (clean, PGD and AutoAttack accuracy of the student and the teacher,
and how much of the teacher's robustness the student kept), tags (the job's labels, and ours under
`kdiga.`), the artifacts (weights, ONNX, model card, reports under `kdiga/`), and registers the
ONNX export as an MLflow model (onnx flavour: `mlflow.pyfunc.load_model("models:/<name>/<version>")`
serves it, with a tensor signature). The registered model's name is the job's `mlflow_model_name`
label when set, else `kdiga-<arch>`.

A failure is logged and recorded on the job (`result.mlflow.error`), never failing the job: the
student is already stored and the job already succeeded when this runs. MLflow's own HTTP retries
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
    for key, value in MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
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


def export_after_success(job: Any, result: Mapping[str, Any], settings: Settings) -> dict[str, Any] | None:
    """Export a succeeded job when the operator configured MLflow; record the outcome on the job."""
    if not settings.mlflow_tracking_uri or job.kind not in MODEL_KINDS:
        return None
    files = {item["name"]: Path(item["path"]) for item in result.get("artifacts") or []}
    started = time.monotonic()
    try:
        record = export_job(job, result.get("metrics") or {}, files, settings)
        log.info("registered in MLflow", extra={"job_id": job.id, **record})
    except Exception as exc:  # noqa: BLE001 - the job succeeded; the registry's trouble is recorded, not raised
        log.exception("MLflow export failed", extra={"job_id": job.id})
        record = {"tracking_uri": settings.mlflow_tracking_uri,
                  "error": f"The export to MLflow failed ({type(exc).__name__}: {str(exc)[:300]})."}
    record["seconds"] = round(time.monotonic() - started, 2)
    with session_for(settings) as session:
        crud.record_job_export(session, job.id, key="mlflow", value=record)
    return record
