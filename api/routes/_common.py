"""Small helpers shared by the resource routes."""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from fastapi import HTTPException, Response, status
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from api.deps import not_found
from api.errors import pydantic_sentence
from api.publish import QueueUnavailable, enqueue
from kdiga_service import crud
from kdiga_service.settings import Settings
from kdiga_service.storage import ArtifactStore

log = logging.getLogger("kdiga.api")
S = TypeVar("S", bound=BaseModel)
M = TypeVar("M")

QUEUE_DOWN = "The job queue is unavailable, so nothing was created; try again shortly."


def parse_json_field(raw: str | None, schema: type[S], *, field: str = "metadata") -> S:
    """Validate a JSON form field against `schema`, or 422 with one sentence."""
    try:
        data = json.loads(raw) if raw and raw.strip() else {}
    except json.JSONDecodeError:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"The '{field}' part is not valid JSON."
        ) from None
    if not isinstance(data, dict):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"The '{field}' part must be a JSON object."
        )
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, pydantic_sentence(exc)) from None


def owned_or_404(session: Session, model: type[M], owner_id: str, object_id: str, what: str) -> M:
    """The caller's row, or 404 ("<what> '<id>' not found."), also for another owner's row."""
    row = crud.get_owned(session, model, owner_id=owner_id, id=object_id)  # type: ignore[type-var]
    if row is None:
        raise not_found(what, object_id)
    return row  # type: ignore[return-value]


def delete_with_file(session: Session, store: ArtifactStore, row: Any, *, what: str, in_use: bool,
                     keep_file: bool = False) -> Response:
    """Delete an uploaded resource's row, then its file (409 while an active job uses it).

    The row goes first: a file left behind by a failing store is logged, never a dangling row.
    """
    if in_use:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"{what} '{row.id}' is used by an active job; cancel the job or wait for it to finish.",
        )
    key = row.storage_key
    session.delete(row)
    session.commit()
    if key and not keep_file:
        try:
            store.delete(key)
        except Exception:  # noqa: BLE001 - the row is gone; a leftover file is logged, not fatal
            log.exception("could not delete %s file %s", what.lower(), key)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def publish(settings: Settings, task: str, object_id: str, *, queue: str) -> None:
    """Enqueue by task name, or raise QueueUnavailable (callers undo their row and file, then 503)."""
    enqueue(settings, task, object_id, queue=queue)


def queue_down() -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, QUEUE_DOWN)


__all__ = ["QueueUnavailable", "delete_with_file", "log", "owned_or_404", "parse_json_field", "publish",
           "queue_down"]
