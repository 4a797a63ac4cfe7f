"""Validating an uploaded teacher or dataset: load it once, mark it ready (with what it holds) or invalid."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

from kdiga_service import crud
from kdiga_service.models import (
    Dataset,
    Teacher,
)
from kdiga_service.settings import Settings, get_settings
from kdiga_service.storage import get_storage
from worker.common import Outcome, free_accelerator_memory, internal_failure, jsonable, session_for
from worker.inputs import dataset_input

log = logging.getLogger(__name__)


def validate_teacher(teacher_id: str, *, settings: Settings | None = None) -> Outcome:
    """Load an uploaded teacher once; mark it ready (with its full spec) or invalid (one sentence)."""
    s = settings or get_settings()
    from kdiga_core import jobs as core_jobs

    with session_for(s) as session:
        teacher = session.get(Teacher, teacher_id)
        if teacher is None or teacher.status != "validating":
            return Outcome("skipped", "no such teacher" if teacher is None else f"already {teacher.status}")
        key, spec = teacher.storage_key, dict(teacher.spec or {})
    try:
        with get_storage(s).local_path(key) as path:
            info = core_jobs.validate_teacher(path, spec, allow_torchscript=s.allow_torchscript,
                                              limits=validation_limits(s))
        error, info = None, jsonable(info)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the row
        error, info = _validation_error(exc, "model", teacher_id), {}
    finally:
        free_accelerator_memory()
    with session_for(s) as session:
        crud.set_teacher_validated(session, teacher_id, spec=info.get("spec"), format=info.get("format"),
                                   error=error)
    log.info("teacher validated", extra={"teacher_id": teacher_id, "error": error})
    return Outcome("failed" if error else "succeeded", error or "", result=info)


def validate_dataset(dataset_id: str, *, settings: Settings | None = None) -> Outcome:
    """Load a dataset once; record its classes, shapes and split sizes, or why it is invalid."""
    s = settings or get_settings()
    from kdiga_core import jobs as core_jobs

    with session_for(s) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != "validating":
            return Outcome("skipped", "no such dataset" if dataset is None else f"already {dataset.status}")
        session.expunge(dataset)
    try:
        with ExitStack() as stack:
            dataset_spec = dataset_input(dataset, s, get_storage(s), stack)
            summary = jsonable(core_jobs.validate_dataset(dataset_spec, limits=validation_limits(s)))
        error = None
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the row
        error, summary = _validation_error(exc, "dataset", dataset_id), {}
    with session_for(s) as session:
        crud.set_dataset_validated(session, dataset_id, info=summary, error=error)
    log.info("dataset validated", extra={"dataset_id": dataset_id, "error": error})
    return Outcome("failed" if error else "succeeded", error or "", result=summary)


def validation_limits(s: Settings) -> Any:
    """The operator's caps, as `kdiga_core.limits.Limits`."""
    from kdiga_core.limits import Limits

    return Limits(max_classes=s.max_classes, max_in_chans=s.max_input_channels,
                  max_params=s.max_teacher_params, max_memory_bytes=s.max_teacher_memory_bytes)


def _validation_error(exc: Exception, what: str, ref: str) -> str:
    """Our own sentence (a KdigaError), or the exception's type and the id: never its raw text."""
    from kdiga_core.errors import KdigaError

    if isinstance(exc, KdigaError):
        return str(exc)
    log.warning("validation failed with an unexpected error", exc_info=True, extra={"id": ref})
    return internal_failure(exc, ref, subject=f"The {what}", failed="could not be loaded")
