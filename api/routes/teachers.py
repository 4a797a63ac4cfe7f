"""Teacher models: upload (validated by the worker; idempotent with `Idempotency-Key`), list, read, delete."""

from __future__ import annotations

from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import CurrentOwner, PageDep, SessionDep, SettingsDep, StorageDep
from api.errors import error_responses
from api.labels import LabelFilterDep
from api.routes._common import (
    IDEMPOTENCY_KEY_DOC,
    delete_with_file,
    find_replay,
    owned_or_404,
    parse_json_field,
    publish_or_undo_async,
    replay,
    request_digest,
)
from api.routing import KdigaRoute
from api.schemas import Page, TeacherMetadata, TeacherPublic
from api.uploads import (
    PICKLE_REFUSED,
    TORCHSCRIPT_REFUSED,
    UNKNOWN_MODEL_FORMAT,
    Upload,
    check_model_archive,
    receive_upload,
    sniff_model_format,
)
from kdiga_service import crud
from kdiga_service.catalog import check_name
from kdiga_service.models import Teacher
from kdiga_service.queue import VALIDATE_TEACHER, validation_queue
from kdiga_service.settings import Settings
from kdiga_service.storage import StoredObject, new_key

router = APIRouter(prefix="/teachers", tags=["teachers"], route_class=KdigaRoute,
                   responses=error_responses(401, 404, 422))

UPLOAD_DESCRIPTION = """Upload a teacher (safetensors + metadata, or ONNX); the worker validates it.

Send `multipart/form-data` with a `file` part (safetensors weights, an ONNX file, or a zip/tar holding
`model.onnx` with its external data `model.onnx.data`; pickled
`torch.save` checkpoints are refused) and a `metadata` part holding JSON (TeacherMetadata), for example
`{"name": "robust-cnn", "arch": "cnn_medium", "num_classes": 10, "in_chans": 1, "img_size": 8,
"mean": [0.5], "std": [0.5]}`. `arch` and `num_classes` are required for safetensors.

**Normalisation**: inputs are pixels in [0, 1] and the model normalises them inside with `mean`/`std`
(one value per channel). When they are omitted, a safetensors teacher uses **0.5 per channel** (or the
mean/std tensors stored in the file, if it has them: validation records what it found), and an ONNX
teacher uses **none** (its exported graph is expected to normalise itself). The answer's
`normalization` states what the model will use.

The answer is 202 with `status: validating`; poll `GET /v1/teachers/{id}` until `ready` or `invalid`.
"""

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
                            "description": "safetensors, ONNX, or a zip/tar of model.onnx + model.onnx.data",
                        },
                        "metadata": {
                            "type": "string",
                            "description": "JSON (TeacherMetadata), e.g. "
                            '{"name": "robust-cnn", "arch": "cnn_medium", "num_classes": 10, "in_chans": 1, '
                            '"img_size": 8}',
                            "example": '{"name": "robust-cnn", "arch": "cnn_medium", "num_classes": 10, "in_chans": 1, '
                            '"img_size": 8, "mean": [0.5], "std": [0.5]}',
                        },
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
    _check_caps(meta, settings)


def _check_caps(meta: TeacherMetadata, settings: Settings) -> None:
    """What the metadata declares above the operator's caps is refused at once (validation, which
    applies the same caps to what the file holds, would only refuse it later)."""
    if meta.num_classes is not None and meta.num_classes > settings.max_classes:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"The teacher has {meta.num_classes} classes, above this service's limit of "
                            f"{settings.max_classes} (KDIGA_MAX_CLASSES).")
    if meta.in_chans > settings.max_input_channels:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"The teacher takes {meta.in_chans} input channels, above this service's limit of "
                            f"{settings.max_input_channels} (KDIGA_MAX_INPUT_CHANNELS).")


def _archive_problem(store: Any, key: str, settings: Settings) -> str | None:
    """An ONNX model sent as a zip or tar (with its external data): the checks every archive gets."""
    with store.open(key) as f:
        start = f.read(512)  # a tar's magic sits at byte 257, past the upload's kept head
    if start[:4] == b"PK\x03\x04" or start[:2] == b"\x1f\x8b" or start[257:262] == b"ustar":
        return check_model_archive(store, key, max_unpacked_bytes=2 * settings.max_upload_bytes)
    return None


def _early_check(settings: Settings) -> Any:
    def check(fields: dict[str, str]) -> None:
        """Metadata checks that need no file (run before the file streams in, when metadata comes first)."""
        if "metadata" in fields:
            meta = parse_json_field(fields["metadata"], TeacherMetadata, max_bytes=settings.max_json_bytes)
            if meta.arch is not None and (message := check_name("architectures", meta.arch)):
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)
            _check_caps(meta, settings)

    return check


def _insert_teacher(
    session: Session,
    owner_id: str,
    meta: TeacherMetadata,
    fmt: str,
    stored: StoredObject,
    filename: str | None,
    key: str | None,
    digest: str,
) -> Teacher | None:
    """Insert and commit the row; None when a concurrent upload with the same Idempotency-Key won."""
    try:
        teacher = crud.create_teacher(
            session,
            owner_id=owner_id,
            name=meta.name or (filename or "teacher")[:200],
            format=fmt,
            stored=stored,
            spec=meta.model_dump(exclude={"name", "labels"}),
            labels=meta.labels,
            idempotency_key=key,
            request_hash=digest,
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        if key is None:
            raise
        return None
    return teacher


async def _teacher_row(session: Session, owner_id: str, meta: TeacherMetadata, fmt: str, upload: Upload,
                       key: str | None, digest: str) -> Teacher:
    """The row for this upload: an earlier one made with the same Idempotency-Key, else a new one."""
    earlier: Teacher | None = await to_thread.run_sync(find_replay, session, Teacher, owner_id, key)
    if earlier is not None:
        return earlier
    assert upload.stored is not None
    inserted = await to_thread.run_sync(_insert_teacher, session, owner_id, meta, fmt, upload.stored,
                                        upload.filename, key, digest)
    if inserted is not None:
        return inserted
    return await to_thread.run_sync(find_replay, session, Teacher, owner_id, key)


def upload_digest(kind: str, sha256: str, metadata: dict[str, Any]) -> str:
    """What makes two uploads the same request: the file's content and the normalised metadata."""
    return request_digest({"kind": kind, "sha256": sha256, "metadata": metadata})


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TeacherPublic,
    openapi_extra=UPLOAD_BODY,
    description=UPLOAD_DESCRIPTION,
    responses={200: {"model": TeacherPublic, "description": "An earlier upload with this Idempotency-Key."},
               **error_responses(400, 409, 413, 415, 503)},
)
async def create_teacher(
    request: Request,
    response: Response,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    store: StorageDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200, description=IDEMPOTENCY_KEY_DOC)] = None,
) -> Teacher:
    """Upload a teacher (safetensors + metadata, or ONNX); the worker validates it."""
    key = new_key(f"teachers/{owner.id}")
    upload = await receive_upload(
        request, store, key=key, max_bytes=settings.max_upload_bytes, check_fields=_early_check(settings)
    )
    assert upload.stored is not None
    try:
        meta = parse_json_field(upload.fields.get("metadata"), TeacherMetadata, max_bytes=settings.max_json_bytes)
        fmt = await to_thread.run_sync(sniff_model_format, store, key, upload.head, upload.filename)
        _check_format(fmt, meta, settings)
        if fmt == "onnx" and (problem := await to_thread.run_sync(_archive_problem, store, key, settings)):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, problem)
        digest = upload_digest("teacher", upload.stored.sha256, meta.model_dump(mode="json"))
        teacher = await _teacher_row(session, owner.id, meta, fmt, upload, idempotency_key, digest)
    except BaseException:
        await to_thread.run_sync(store.delete, key)
        raise
    if teacher.storage_key != key:  # an earlier upload with this key: keep its file, drop this one
        await to_thread.run_sync(store.delete, key)
        replayed: Teacher = replay(teacher, digest, idempotency_key or "", response)
        return replayed
    await publish_or_undo_async(session, settings, teacher, task=VALIDATE_TEACHER,
                                queue=validation_queue(settings), store=store, what="teacher")
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


@router.delete("/{teacher_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(409))
def delete_teacher(teacher_id: str, owner: CurrentOwner, session: SessionDep, store: StorageDep) -> Response:
    """Delete a teacher and its file (409 while an active job uses it)."""
    teacher = owned_or_404(session, Teacher, owner.id, teacher_id, "Teacher")
    # A teacher made by an adversarial_train job shares its file with that job's artifact.
    shared = crud.artifact_uses_key(session, storage_key=teacher.storage_key)
    return delete_with_file(session, store, teacher, what="Teacher", keep_file=shared,
                            in_use=crud.teacher_in_use(session, teacher_id=teacher_id))
