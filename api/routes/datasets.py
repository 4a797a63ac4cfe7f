"""Datasets: upload (npz / image-folder zip) or register a built-in; list; read."""

from __future__ import annotations

import json
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, HTTPException, Request, Response, status
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.deps import CurrentOwner, PageDep, SessionDep, SettingsDep, StorageDep
from api.errors import pydantic_sentence
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
from api.schemas import DatasetBuiltinCreate, DatasetPublic, DatasetUploadMetadata, Page
from api.uploads import check_dataset_zip, is_multipart, receive_upload
from kdiga_service import crud
from kdiga_service.catalog import check_name
from kdiga_service.models import Dataset
from kdiga_service.queue import VALIDATE_DATASET, validation_queue
from kdiga_service.settings import Settings
from kdiga_service.storage import ArtifactStore, new_key

router = APIRouter(prefix="/datasets", tags=["datasets"])

NOT_DATASET_BODY = (
    "Send a dataset as multipart/form-data ('file' + 'metadata') or register a built-in "
    'with a JSON body like {"builtin": "digits"}.'
)
NOT_ZIP = "A dataset file must be an .npz file or a .zip of class folders."

CREATE_BODY: dict[str, Any] = {
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
                            "description": ".npz or .zip of class folders",
                        },
                        "metadata": {
                            "type": "string",
                            "description": "JSON: {name, kind: npz|image_folder_zip}",
                        },
                    },
                }
            },
            "application/json": {"schema": DatasetBuiltinCreate.model_json_schema()},
        },
    }
}


def _kind_for(meta: DatasetUploadMetadata, filename: str | None) -> str:
    if meta.kind:
        return meta.kind
    name = (filename or "").lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".zip"):
        return "image_folder_zip"
    raise HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT,
        "Set 'kind' (npz or image_folder_zip) in the metadata; the file name does not say.",
    )


def _check_early(fields: dict[str, str]) -> None:
    if "metadata" in fields:
        parse_json_field(fields["metadata"], DatasetUploadMetadata)


def _insert(session: Session, row: Dataset) -> Dataset:
    session.add(row)
    session.commit()
    return row


def _undo(session: Session, store: ArtifactStore, row: Dataset) -> None:
    key = row.storage_key
    session.delete(row)
    session.commit()
    if key:
        store.delete(key)


async def _publish_or_undo(session: Session, settings: Settings, store: ArtifactStore, row: Dataset) -> None:
    try:
        await to_thread.run_sync(
            lambda: publish(settings, VALIDATE_DATASET, row.id, queue=validation_queue(settings))
        )
    except QueueUnavailable:
        log.warning("broker unavailable; dataset %s removed", row.id)
        await to_thread.run_sync(_undo, session, store, row)
        raise queue_down() from None


async def _create_uploaded(
    request: Request, owner_id: str, session: Session, settings: Settings, store: ArtifactStore
) -> Dataset:
    key = new_key(f"datasets/{owner_id}")
    upload = await receive_upload(
        request, store, key=key, max_bytes=settings.max_upload_bytes, check_fields=_check_early
    )
    assert upload.stored is not None
    try:
        meta = parse_json_field(upload.fields.get("metadata"), DatasetUploadMetadata)
        kind = _kind_for(meta, upload.filename)
        if upload.head[:4] != b"PK\x03\x04":
            raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, NOT_ZIP)
        unpacked_cap = 4 * settings.max_upload_bytes
        if problem := await to_thread.run_sync(
            lambda: check_dataset_zip(store, key, max_unpacked_bytes=unpacked_cap)
        ):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, problem)
        row = Dataset(
            owner_id=owner_id,
            name=meta.name or upload.filename or "dataset",
            kind=kind,
            storage_key=key,
            size_bytes=upload.stored.size_bytes,
            sha256=upload.stored.sha256,
            labels=meta.labels or {},
        )
        return await to_thread.run_sync(_insert, session, row)
    except BaseException:
        await to_thread.run_sync(store.delete, key)
        raise


async def _create_builtin(request: Request, owner_id: str, session: Session) -> Dataset:
    try:
        body = DatasetBuiltinCreate.model_validate(json.loads(await request.body()))
    except json.JSONDecodeError:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "The request body is not valid JSON."
        ) from None
    except ValidationError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, pydantic_sentence(exc)) from None
    if message := check_name("datasets", body.builtin):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)
    row = Dataset(owner_id=owner_id, name=body.name or body.builtin, kind="builtin", builtin=body.builtin,
                  labels=body.labels or {})
    return await to_thread.run_sync(_insert, session, row)


@router.post(
    "", status_code=status.HTTP_202_ACCEPTED, response_model=DatasetPublic, openapi_extra=CREATE_BODY
)
async def create_dataset(
    request: Request, owner: CurrentOwner, session: SessionDep, settings: SettingsDep, store: StorageDep
) -> Dataset:
    """Upload a dataset file, or register a built-in by name; the worker validates it."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if is_multipart(request):
        row = await _create_uploaded(request, owner.id, session, settings, store)
    elif content_type == "application/json":
        row = await _create_builtin(request, owner.id, session)
    else:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, NOT_DATASET_BODY)
    await _publish_or_undo(session, settings, store, row)
    return row


@router.get("", response_model=Page[DatasetPublic])
def list_datasets(
    owner: CurrentOwner, session: SessionDep, page: PageDep, labels: LabelFilterDep
) -> Page[DatasetPublic]:
    """List your datasets, newest first (optionally by labels: `?label=key=value`)."""
    rows, count = crud.list_owned(session, Dataset, owner_id=owner.id, limit=page.limit, offset=page.offset,
                                  labels=labels)
    return Page(data=[DatasetPublic.model_validate(r) for r in rows], count=count)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def read_dataset(dataset_id: str, owner: CurrentOwner, session: SessionDep) -> Dataset:
    """Read one dataset (classes, input shape, split sizes once validated)."""
    return owned_or_404(session, Dataset, owner.id, dataset_id, "Dataset")


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(dataset_id: str, owner: CurrentOwner, session: SessionDep, store: StorageDep) -> Response:
    """Delete a dataset and its file (409 while an active job uses it)."""
    row = owned_or_404(session, Dataset, owner.id, dataset_id, "Dataset")
    return delete_with_file(session, store, row, what="Dataset",
                            in_use=crud.dataset_in_use(session, dataset_id=dataset_id))
