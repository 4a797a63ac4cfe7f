"""Teacher models: upload (validated by the worker), list, read, delete."""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from fastapi import APIRouter, HTTPException, Request, Response, status
from sqlalchemy.orm import Session

from api.deps import CurrentOwner, PageDep, SessionDep, SettingsDep, StorageDep
from api.labels import LabelFilterDep
from api.routes._common import (
    QueueUnavailable,
    delete_with_file,
    log,
    owned_or_404,
    parse_json_field,
    publish,
    queue_down,
)
from api.schemas import Page, TeacherMetadata, TeacherPublic
from api.uploads import (
    PICKLE_REFUSED,
    TORCHSCRIPT_REFUSED,
    UNKNOWN_MODEL_FORMAT,
    receive_upload,
    sniff_model_format,
)
from kdiga_service import crud
from kdiga_service.catalog import check_name
from kdiga_service.models import Teacher
from kdiga_service.queue import VALIDATE_TEACHER, validation_queue
from kdiga_service.settings import Settings
from kdiga_service.storage import ArtifactStore, StoredObject, new_key

router = APIRouter(prefix="/teachers", tags=["teachers"])

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "safetensors or ONNX file",
                        },
                        "metadata": {"type": "string", "description": "JSON: TeacherMetadata"},
                    },
                }
            }
        },
    }
}


def _check_format(fmt: str, meta: TeacherMetadata, settings: Settings) -> None:
    if fmt == "pickle":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, PICKLE_REFUSED)
    if fmt == "torchscript" and not settings.allow_torchscript:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, TORCHSCRIPT_REFUSED)
    if fmt == "unknown":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, UNKNOWN_MODEL_FORMAT)
    if fmt == "safetensors" and (meta.arch is None or meta.num_classes is None):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "A safetensors teacher needs 'arch' and 'num_classes' in its metadata.",
        )
    if meta.arch is not None and (message := check_name("architectures", meta.arch)):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)


def _check_early(fields: dict[str, str]) -> None:
    """Metadata checks that need no file (run before the file streams in, when metadata comes first)."""
    if "metadata" in fields:
        meta = parse_json_field(fields["metadata"], TeacherMetadata)
        if meta.arch is not None and (message := check_name("architectures", meta.arch)):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)


def _insert_teacher(
    session: Session,
    owner_id: str,
    meta: TeacherMetadata,
    fmt: str,
    stored: StoredObject,
    filename: str | None,
) -> Teacher:
    spec = meta.model_dump(exclude={"name", "labels"})
    teacher = crud.create_teacher(
        session,
        owner_id=owner_id,
        name=meta.name or filename or "teacher",
        format=fmt,
        stored=stored,
        spec=spec,
        labels=meta.labels,
    )
    session.commit()
    return teacher


def _undo(session: Session, store: ArtifactStore, key: str, row: Teacher | None = None) -> None:
    if row is not None:
        session.delete(row)
        session.commit()
    store.delete(key)


@router.post(
    "", status_code=status.HTTP_202_ACCEPTED, response_model=TeacherPublic, openapi_extra=UPLOAD_BODY
)
async def create_teacher(
    request: Request, owner: CurrentOwner, session: SessionDep, settings: SettingsDep, store: StorageDep
) -> Teacher:
    """Upload a teacher (safetensors + metadata, or ONNX); the worker validates it."""
    key = new_key(f"teachers/{owner.id}")
    upload = await receive_upload(
        request, store, key=key, max_bytes=settings.max_upload_bytes, check_fields=_check_early
    )
    assert upload.stored is not None
    try:
        meta = parse_json_field(upload.fields.get("metadata"), TeacherMetadata)
        fmt = await to_thread.run_sync(sniff_model_format, store, key, upload.head, upload.filename)
        _check_format(fmt, meta, settings)
        teacher = await to_thread.run_sync(
            _insert_teacher, session, owner.id, meta, fmt, upload.stored, upload.filename
        )
    except BaseException:
        await to_thread.run_sync(store.delete, key)
        raise
    try:
        await to_thread.run_sync(
            lambda: publish(settings, VALIDATE_TEACHER, teacher.id, queue=validation_queue(settings))
        )
    except QueueUnavailable:
        log.warning("broker unavailable; teacher %s removed", teacher.id)
        await to_thread.run_sync(_undo, session, store, key, teacher)
        raise queue_down() from None
    return teacher


@router.get("", response_model=Page[TeacherPublic])
def list_teachers(
    owner: CurrentOwner, session: SessionDep, page: PageDep, labels: LabelFilterDep
) -> Page[TeacherPublic]:
    """List your teachers, newest first (optionally by labels: `?label=key=value`)."""
    rows, count = crud.list_owned(session, Teacher, owner_id=owner.id, limit=page.limit, offset=page.offset,
                                  labels=labels)
    return Page(data=[TeacherPublic.model_validate(r) for r in rows], count=count)


@router.get("/{teacher_id}", response_model=TeacherPublic)
def read_teacher(teacher_id: str, owner: CurrentOwner, session: SessionDep) -> Teacher:
    """Read one teacher."""
    return owned_or_404(session, Teacher, owner.id, teacher_id, "Teacher")


@router.delete("/{teacher_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_teacher(teacher_id: str, owner: CurrentOwner, session: SessionDep, store: StorageDep) -> Response:
    """Delete a teacher and its file (409 while an active job uses it)."""
    teacher = owned_or_404(session, Teacher, owner.id, teacher_id, "Teacher")
    # A teacher made by an adversarial_train job shares its file with that job's artifact.
    shared = crud.artifact_uses_key(session, storage_key=teacher.storage_key)
    return delete_with_file(session, store, teacher, what="Teacher", keep_file=shared,
                            in_use=crud.teacher_in_use(session, teacher_id=teacher_id))
