"""A finished job's outputs: artifacts in the store and rows (crud.add_artifact), and the teacher an
adversarial_train job makes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from kdiga_service import crud
from kdiga_service.models import (
    READY,
    Artifact,
    Job,
    Teacher,
)
from kdiga_service.pipelines import produced_teacher_id
from kdiga_service.storage import ArtifactStore
from worker.common import jsonable

log = logging.getLogger(__name__)


def store_artifacts(session: Session, store: ArtifactStore, job: Job,
                    files: list[dict[str, Any]]) -> list[Artifact]:
    """Upload the job's output files (`{name, path, kind}` each, as kdiga_core made them) and record them.

    crud.add_artifact derives each row's id from (job, name): a rerun replaces rows and objects in place.
    """
    rows = []
    for item in sorted(files, key=lambda f: f["name"]):
        stored = store.upload_file(item["path"], f"jobs/{job.id}/artifacts/{item['name']}")
        rows.append(crud.add_artifact(session, job=job, name=item["name"], kind=item["kind"], stored=stored))
    return rows


def register_teacher(session: Session, store: ArtifactStore, job: Job, result: dict[str, Any]) -> str:
    """An adversarial_train job's model becomes a ready teacher (once, whatever the reruns)."""
    teacher_id = produced_teacher_id(job.id)
    if session.get(Teacher, teacher_id) is not None:
        return teacher_id
    weights = next(Path(a["path"]) for a in result["artifacts"] if a["kind"] == "model_weights")
    stored = store.upload_file(weights, f"teachers/{teacher_id}.safetensors")
    spec = jsonable(result.get("model_spec") or {})
    name = job.name or f"{spec.get('arch', 'model')} (robust, job {job.id[:8]})"
    crud.create_teacher(session, owner_id=job.owner_id, name=name, format="safetensors", stored=stored,
                        spec=spec, status=READY, source_job_id=job.id, id=teacher_id, labels=job.labels)
    session.commit()
    return teacher_id
