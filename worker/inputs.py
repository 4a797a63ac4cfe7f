"""Staging a job's inputs: local paths for its dataset, teacher, initial student and model bundle."""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kdiga_service.models import (
    READY,
    Artifact,
    Dataset,
    Job,
    Teacher,
)
from kdiga_service.settings import Settings
from kdiga_service.storage import ArtifactStore
from worker.common import session_for

log = logging.getLogger(__name__)


def prepare_inputs(job: Job, s: Settings, store: ArtifactStore, stack: ExitStack,
                    workdir: Path) -> dict[str, Any]:
    """Local paths for the job's dataset, teacher and (evaluate) model bundle."""
    from kdiga_core.errors import KdigaError

    out: dict[str, Any] = {}
    with session_for(s) as session:
        dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
        if dataset is None:
            raise KdigaError("The job's dataset no longer exists.")
        if dataset.status != READY:
            raise KdigaError(f"The dataset is not ready (status: {dataset.status}).")
        out["dataset"] = dataset_input(dataset, s, store, stack)
        out["about"] = about = job_about(job, dataset)
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
            # evaluate with model.teacher_id alone: that teacher is the model measured, not a reference
            alone = job.kind == "evaluate" and not model_ref.get("job_id")
            about["model" if alone else "teacher"] = {"id": teacher.id, "name": teacher.name,
                                                      "source_job_id": teacher.source_job_id}
        if model_ref.get("job_id"):
            out["model_dir"] = _download_model_bundle(session, store, model_ref["job_id"], workdir / "model")
            source = session.get(Job, model_ref["job_id"])
            about["model"] = {"source_job_id": model_ref["job_id"], "name": source.name if source else None}
        weights_id = ((job.spec or {}).get("student") or {}).get("weights_id")
        if weights_id:  # a pre-trained student: an uploaded model whose weights initialise it
            weights = session.get(Teacher, weights_id)
            if weights is None or weights.status != READY:
                raise KdigaError("The student's initial weights (student.weights_id) are not a ready model.")
            out["student_path"] = stack.enter_context(store.local_path(weights.storage_key))
            out["student_spec"] = dict(weights.spec or {})
    return out


def job_about(job: Job, dataset: Dataset) -> dict[str, Any]:
    """What the rows say of the job, for its report's ``about`` block and its model card's lineage."""
    return {"job": {"id": job.id, "name": job.name},
            "dataset": {"id": dataset.id, "name": dataset.name, "sha256": dataset.sha256,
                        "size_bytes": dataset.size_bytes, "source": dataset.builtin and f"builtin:{dataset.builtin}"},
            "service_version": service_version()}


def service_version() -> str:
    """The installed kdiga distribution's version (the package's own when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdiga")
    except PackageNotFoundError:
        from kdiga_core import __version__

        return __version__


def dataset_input(dataset: Dataset, s: Settings, store: ArtifactStore, stack: ExitStack) -> dict[str, Any]:
    """What `kdiga_core.jobs.load_data` reads: a local file, a built-in's folder, or a reference's URL."""
    if dataset.uri:
        return reference_input(dataset, s)
    if dataset.kind == "builtin" or (dataset.builtin and not dataset.storage_key):
        root = str(getattr(s, "data_dir", None) or s.home / "data")
        return {"kind": dataset.builtin, "path": root if dataset.builtin != "digits" else None}
    if not dataset.storage_key:
        from kdiga_core.errors import KdigaError

        raise KdigaError("The dataset has no stored file.")
    path = stack.enter_context(store.local_path(dataset.storage_key))
    return {"kind": dataset.kind, "path": str(path)}


def reference_input(dataset: Dataset, s: Settings) -> dict[str, Any]:
    """A dataset read in place: its URL (checked against today's roots), fsspec options, and what
    validation recorded (class names, split sizes, corrupt files, a webdataset's test labels)."""
    from kdiga_core.errors import KdigaError
    from kdiga_service.dataset_refs import check_reference, storage_options

    uri = dataset.uri or ""
    if problem := check_reference(uri, s.dataset_roots):
        raise KdigaError(problem)
    return {"kind": dataset.kind, "uri": uri, "storage_options": storage_options(uri, s),
            "layout": dict(dataset.layout or {}), "name": dataset.name,
            "max_corrupt_fraction": s.dataset_max_corrupt_fraction,
            "validate_max_images": s.dataset_validate_max_images}


def _download_model_bundle(session: Session, store: ArtifactStore, source_job_id: str, dest: Path) -> Path:
    """The source job's model card and every file it lists (weights, ONNX), for `load_model_bundle`."""
    from kdiga_core.errors import KdigaError

    rows = {a.name: a for a in session.scalars(select(Artifact).where(Artifact.job_id == source_job_id)).all()}
    card = rows.get("model_card.json")
    if card is None or not any(a.kind in ("student_weights", "model_weights") for a in rows.values()):
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


def teacher_cache_dir(s: Settings) -> Path | None:
    """This worker's folder of teacher evaluations (None when KDIGA_TEACHER_EVAL_CACHE is off)."""
    if not s.teacher_eval_cache:
        return None
    return Path(s.cache_dir or s.home / "cache") / "teacher-evaluations"
