"""Datasets: upload (npz / image-folder zip), register a built-in or a folder by reference; list; read; delete.

Three operations, one body type each (`POST /v1/datasets` multipart, `POST /v1/datasets/builtin` and
`POST /v1/datasets/reference` JSON): an operation that declares two request bodies breaks generated
clients (issue 17). A JSON body sent to `POST /v1/datasets` is still accepted (a built-in, or a
reference when it has a `uri`) and documented as deprecated.
"""

from __future__ import annotations

from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from sqlalchemy.orm import Session

from api.deps import CurrentOwner, PageDep, SessionDep, SettingsDep, StorageDep
from api.errors import error_responses
from api.labels import LabelFilterDep
from api.routes._common import (
    IDEMPOTENCY_KEY_DOC,
    delete_with_file,
    find_replay,
    insert_once,
    owned_or_404,
    parse_json_field,
    publish_or_undo_async,
    replay,
    request_digest,
)
from api.routes.teachers import upload_digest
from api.routing import KdigaRoute
from api.schemas import (
    DatasetBuiltinCreate,
    DatasetPublic,
    DatasetReferenceCreate,
    DatasetUploadMetadata,
    Page,
)
from api.uploads import check_dataset_zip, is_multipart, receive_upload
from kdiga_service import crud
from kdiga_service.catalog import check_name
from kdiga_service.dataset_refs import check_reference, normalise
from kdiga_service.models import Dataset
from kdiga_service.queue import VALIDATE_DATASET, validation_queue
from kdiga_service.settings import Settings
from kdiga_service.storage import ArtifactStore, new_key

router = APIRouter(prefix="/datasets", tags=["datasets"], route_class=KdigaRoute,
                   responses=error_responses(401, 404, 422))

NOT_DATASET_BODY = (
    "Send a dataset file as multipart/form-data ('file' + 'metadata'), or register a built-in "
    'with POST /v1/datasets/builtin and a JSON body like {"builtin": "digits"}.'
)
NOT_ZIP = "A dataset file must be an .npz file or a .zip of class folders."
NPZ_KEYS = (
    "An `.npz` holds the arrays `x_train`, `y_train`, `x_test`, `y_test` (required): images as uint8 "
    "(0..255) or float in [0, 1], laid out (N, C, H, W) or (N, H, W, C) with 1 to 4 channels (or (N, H, W) "
    "for grayscale), square; labels as integers in [0, num_classes). Optional: `num_classes` (a scalar) and "
    "`class_names` (1-D strings). Saved with `numpy.savez` (never pickled objects: they are refused). "
    "A `.zip` of class folders holds `train/<class>/<image>` and `test/<class>/<image>`."
)
UPLOAD_DESCRIPTION = f"""Upload a dataset file; the worker validates it.

Send `multipart/form-data` with a `file` part and an optional `metadata` part holding JSON
(`{{"name": "my-set", "kind": "npz"}}`; `kind` is npz or image_folder_zip, guessed from the file name).

{NPZ_KEYS}

To register a built-in dataset use `POST /v1/datasets/builtin`; to register a folder or bucket read in
place, `POST /v1/datasets/reference`. *Deprecated*: a JSON body (`{{"builtin": "digits"}}`, or one with a
`uri`) sent here is still accepted and does the same.
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
                        "file": {"type": "string", "format": "binary", "description": ".npz or .zip of class folders"},
                        "metadata": {
                            "type": "string",
                            "description": 'JSON (DatasetUploadMetadata), e.g. {"name": "my-set", "kind": "npz"}',
                            "example": '{"name": "my-set", "kind": "npz"}',
                        },
                    },
                }
            },
        },
    }
}
UPLOAD_RESPONSES = {200: {"model": DatasetPublic, "description": "An earlier request with this Idempotency-Key."},
                    **error_responses(400, 409, 413, 415, 503)}
IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=200, description=IDEMPOTENCY_KEY_DOC)]


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


def _early_check(settings: Settings) -> Any:
    def check(fields: dict[str, str]) -> None:
        if "metadata" in fields:
            parse_json_field(fields["metadata"], DatasetUploadMetadata, max_bytes=settings.max_json_bytes)

    return check


def _insert(session: Session, row: Dataset, response: Response) -> Dataset:
    """Commit the row, or the earlier one if a concurrent request with its Idempotency-Key won."""
    key = row.idempotency_key or ""
    return insert_once(session, row, on_duplicate=lambda: replay(
        find_replay(session, Dataset, row.owner_id, key), row.request_hash or "", key, response))


async def _stored_dataset(
    request: Request, owner_id: str, session: Session, settings: Settings, store: ArtifactStore,
    response: Response, idempotency_key: str | None,
) -> Dataset:
    key = new_key(f"datasets/{owner_id}")
    upload = await receive_upload(
        request, store, key=key, max_bytes=settings.max_upload_bytes, check_fields=_early_check(settings)
    )
    assert upload.stored is not None
    try:
        meta = parse_json_field(upload.fields.get("metadata"), DatasetUploadMetadata,
                                max_bytes=settings.max_json_bytes)
        kind = _kind_for(meta, upload.filename)
        if upload.head[:4] != b"PK\x03\x04":
            raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, NOT_ZIP)
        digest = upload_digest("dataset", upload.stored.sha256, {**meta.model_dump(mode="json"), "kind": kind})
        if earlier := await to_thread.run_sync(find_replay, session, Dataset, owner_id, idempotency_key):
            await to_thread.run_sync(store.delete, key)
            return replay(earlier, digest, idempotency_key or "", response)  # type: ignore[no-any-return]
        unpacked_cap = 4 * settings.max_upload_bytes
        if problem := await to_thread.run_sync(
            lambda: check_dataset_zip(store, key, max_unpacked_bytes=unpacked_cap)
        ):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, problem)
        row = Dataset(
            owner_id=owner_id, name=meta.name or (upload.filename or "dataset")[:200], kind=kind, storage_key=key,
            size_bytes=upload.stored.size_bytes, sha256=upload.stored.sha256, labels=meta.labels or {},
            idempotency_key=idempotency_key, request_hash=digest,
        )
        row = await to_thread.run_sync(_insert, session, row, response)
    except BaseException:
        await to_thread.run_sync(store.delete, key)
        raise
    if row.storage_key != key:
        await to_thread.run_sync(store.delete, key)
    return row


async def _builtin_dataset(
    body: DatasetBuiltinCreate, owner_id: str, session: Session, response: Response, idempotency_key: str | None,
) -> Dataset:
    if message := check_name("datasets", body.builtin):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)
    digest = request_digest({"kind": "builtin", **body.model_dump(mode="json")})
    if earlier := await to_thread.run_sync(find_replay, session, Dataset, owner_id, idempotency_key):
        return replay(earlier, digest, idempotency_key or "", response)  # type: ignore[no-any-return]
    row = Dataset(owner_id=owner_id, name=body.name or body.builtin, kind="builtin", builtin=body.builtin,
                  labels=body.labels or {}, idempotency_key=idempotency_key, request_hash=digest)
    return await to_thread.run_sync(_insert, session, row, response)


async def _reference_dataset(
    body: DatasetReferenceCreate, owner_id: str, session: Session, settings: Settings, response: Response,
    idempotency_key: str | None,
) -> Dataset:
    if problem := check_reference(body.uri, settings.dataset_roots):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, problem)
    uri = normalise(body.uri) or body.uri
    digest = request_digest({"kind": "reference", **body.model_dump(mode="json"), "uri": uri})
    if earlier := await to_thread.run_sync(find_replay, session, Dataset, owner_id, idempotency_key):
        return replay(earlier, digest, idempotency_key or "", response)  # type: ignore[no-any-return]
    # nothing is copied and no storage_key is set: deleting the row never deletes the operator's data
    row = Dataset(owner_id=owner_id, name=body.name or uri.rsplit("/", 1)[-1][:200] or body.format,
                  kind=body.format, uri=uri, labels=body.labels or {}, idempotency_key=idempotency_key,
                  request_hash=digest)
    return await to_thread.run_sync(_insert, session, row, response)


async def _queue(session: Session, settings: Settings, store: ArtifactStore, row: Dataset, response: Response) -> None:
    if response.status_code != status.HTTP_200_OK:  # a replay was queued by the first request
        await publish_or_undo_async(session, settings, row, task=VALIDATE_DATASET,
                                    queue=validation_queue(settings), store=store, what="dataset")


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=DatasetPublic, openapi_extra=UPLOAD_BODY,
             description=UPLOAD_DESCRIPTION, responses=UPLOAD_RESPONSES)
async def create_dataset(
    request: Request, response: Response, owner: CurrentOwner, session: SessionDep, settings: SettingsDep,
    store: StorageDep, idempotency_key: IdempotencyKey = None,
) -> Dataset:
    """Upload a dataset file (npz or zip of class folders); the worker validates it."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if is_multipart(request):
        row = await _stored_dataset(request, owner.id, session, settings, store, response, idempotency_key)
    elif content_type == "application/json":  # the deprecated form of POST /v1/datasets/builtin|reference
        raw = await request.body()
        if b'"uri"' in raw:
            ref = parse_json_field(raw, DatasetReferenceCreate, max_bytes=settings.max_json_bytes,
                                   what="The request body")
            row = await _reference_dataset(ref, owner.id, session, settings, response, idempotency_key)
        else:
            body = parse_json_field(raw, DatasetBuiltinCreate, max_bytes=settings.max_json_bytes,
                                    what="The request body")
            row = await _builtin_dataset(body, owner.id, session, response, idempotency_key)
    else:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, NOT_DATASET_BODY)
    await _queue(session, settings, store, row, response)
    return row


@router.post("/builtin", status_code=status.HTTP_202_ACCEPTED, response_model=DatasetPublic,
             responses={**UPLOAD_RESPONSES, **error_responses(409, 413, 503)})
async def create_builtin_dataset(
    body: DatasetBuiltinCreate, response: Response, owner: CurrentOwner, session: SessionDep,
    settings: SettingsDep, store: StorageDep, idempotency_key: IdempotencyKey = None,
) -> Dataset:
    """Register a built-in dataset by name (digits, cifar10, cifar100); the worker checks it is there."""
    row = await _builtin_dataset(body, owner.id, session, response, idempotency_key)
    await _queue(session, settings, store, row, response)
    return row


@router.post("/reference", status_code=status.HTTP_202_ACCEPTED, response_model=DatasetPublic,
             responses={**UPLOAD_RESPONSES, **error_responses(409, 413, 503)})
async def create_reference_dataset(
    body: DatasetReferenceCreate, response: Response, owner: CurrentOwner, session: SessionDep,
    settings: SettingsDep, store: StorageDep, idempotency_key: IdempotencyKey = None,
) -> Dataset:
    """Register a dataset read in place from `uri` (file:// or s3://..., under `KDIGA_DATASET_ROOTS`);
    nothing is copied. The worker lists it and decodes a sample: class names, counts per split and
    class, image sizes and corrupt files land in `layout`."""
    row = await _reference_dataset(body, owner.id, session, settings, response, idempotency_key)
    await _queue(session, settings, store, row, response)
    return row


@router.get("", response_model=Page[DatasetPublic], responses=error_responses(503))
def list_datasets(
    owner: CurrentOwner, session: SessionDep, page: PageDep, labels: LabelFilterDep
) -> Page[DatasetPublic]:
    """List your datasets, newest first (optionally by labels: `?label=key=value`)."""
    rows, count = crud.list_owned(session, Dataset, owner_id=owner.id, limit=page.limit, offset=page.offset,
                                  labels=labels)
    return Page(data=[DatasetPublic.model_validate(r) for r in rows], count=count)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=error_responses(503))
def read_dataset(dataset_id: str, owner: CurrentOwner, session: SessionDep) -> Dataset:
    """Read one dataset (classes, input shape, split sizes once validated)."""
    return owned_or_404(session, Dataset, owner.id, dataset_id, "Dataset")


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(409, 503))
def delete_dataset(dataset_id: str, owner: CurrentOwner, session: SessionDep, store: StorageDep) -> Response:
    """Delete a dataset and its file (409 while an active job uses it)."""
    row = owned_or_404(session, Dataset, owner.id, dataset_id, "Dataset")
    return delete_with_file(session, store, row, what="Dataset",
                            in_use=crud.dataset_in_use(session, dataset_id=dataset_id))
