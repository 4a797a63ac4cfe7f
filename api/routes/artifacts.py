"""Artifacts a job produced: list and download (streamed, or a redirect to a presigned URL)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse

from api.deps import CurrentOwner, PageDep, SessionDep, SettingsDep, StorageDep, not_found
from api.errors import error_responses
from api.routing import KdigaRoute
from api.schemas import ArtifactPublic, Page
from kdiga_service import crud
from kdiga_service.models import Artifact
from kdiga_service.storage import StorageError

router = APIRouter(prefix="/artifacts", tags=["artifacts"], route_class=KdigaRoute,
                   responses=error_responses(401, 404, 422, 503))


def content_disposition(name: str) -> str:
    """`attachment` with a plain ASCII `filename=` (what `curl -OJ` and older clients read) and the
    exact name as RFC 6266 / 5987 `filename*=` (what browsers prefer)."""
    plain = "".join(c if 32 <= ord(c) < 127 and c not in '"\\/;' else "_" for c in name) or "download"
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='')}"


@router.get("", response_model=Page[ArtifactPublic])
def list_artifacts(
    owner: CurrentOwner,
    session: SessionDep,
    page: PageDep,
    job_id: Annotated[str | None, Query(max_length=64, description="Only this job's artifacts.")] = None,
    kind: Annotated[str | None, Query(max_length=32, description="Only artifacts of this kind.")] = None,
) -> Page[ArtifactPublic]:
    """List your artifacts, newest first (optionally for one job or of one kind)."""
    rows, count = crud.list_owned(
        session, Artifact, owner_id=owner.id, limit=page.limit, offset=page.offset, job_id=job_id, kind=kind
    )
    return Page(data=[ArtifactPublic.model_validate(r) for r in rows], count=count)


@router.get(
    "/{artifact_id}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                     "description": "The file (Content-Disposition names it)."},
               307: {"description": "Presigned URL."}},
)
def download_artifact(
    artifact_id: str, owner: CurrentOwner, session: SessionDep, store: StorageDep, settings: SettingsDep
) -> Response:
    """Download an artifact's file."""
    artifact = crud.get_owned(session, Artifact, owner_id=owner.id, id=artifact_id)
    if artifact is None:
        raise not_found("Artifact", artifact_id)
    if settings.presigned_downloads and store.supports_presign:
        url = store.presigned_url(artifact.storage_key, expires_s=settings.presigned_expiry_s)
        if url:
            return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    try:
        chunks = store.iter_chunks(artifact.storage_key)
        first = next(chunks, b"")  # opens the file now, so a missing file is a 404 and not a broken stream
    except StorageError:
        raise not_found("Artifact file", artifact_id) from None

    def body() -> Iterator[bytes]:
        yield first
        yield from chunks

    headers = {
        "Content-Length": str(artifact.size_bytes),
        "Content-Disposition": content_disposition(artifact.name),
        "ETag": f'"{artifact.sha256}"',
        "X-Content-SHA256": artifact.sha256,
    }
    return StreamingResponse(body(), media_type=artifact.content_type, headers=headers)
