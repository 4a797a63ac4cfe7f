"""Small helpers shared by the resource routes: JSON form fields, ownership, deletion, publishing,
and `Idempotency-Key` replays."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from anyio import to_thread
from fastapi import HTTPException, Response, status
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from api.deps import not_found
from api.errors import pydantic_sentence
from api.json_input import JSONInputError, read_json
from api.publish import QueueUnavailable, enqueue
from kdiga_service import crud
from kdiga_service.settings import Settings
from kdiga_service.storage import ArtifactStore

log = logging.getLogger("kdiga.api")
S = TypeVar("S", bound=BaseModel)
R = TypeVar("R")  # a row model (Job, Teacher, Dataset)
M = TypeVar("M")

QUEUE_DOWN = "The job queue is unavailable, so nothing was created; try again shortly."
IDEMPOTENCY_KEY_DOC = (
    "Send the same key again to get the first answer back (status 200) instead of a duplicate; "
    "the same key with a different request is a 409."
)


def parse_json_field(raw: str | bytes | None, schema: type[S], *, max_bytes: int, field: str = "metadata",
                     what: str | None = None) -> S:
    """Validate a JSON form field (or body) against `schema`, or 4xx with one sentence (api.json_input)."""
    what = what or f"The '{field}' part"
    try:
        data = read_json(raw, what=what, max_bytes=max_bytes) if raw and raw.strip() else {}
    except JSONInputError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    if not isinstance(data, dict):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{what} must be a JSON object.")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, pydantic_sentence(exc)) from None


def owned_or_404(session: Session, model: type[M], owner_id: str, object_id: str, what: str) -> M:
    """The caller's row, or 404 ("<what> '<id>' not found."), also for another owner's row."""
    row = crud.get_owned(session, model, owner_id=owner_id, id=object_id)  # type: ignore[type-var]
    if row is None:
        raise not_found(what, object_id)
    return row


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


def queue_down(settings: Settings) -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, QUEUE_DOWN,
                         headers={"Retry-After": str(settings.retry_after_s)})


def _remove(session: Session, store: ArtifactStore | None, row: Any) -> None:
    key = getattr(row, "storage_key", None)
    session.delete(row)
    session.commit()
    if key and store is not None:
        store.delete(key)


def publish_or_undo(session: Session, settings: Settings, row: Any, *, task: str, queue: str,
                    store: ArtifactStore | None = None, what: str) -> None:
    """Publish the row's task; if the broker is unavailable, remove the row (and its file) and 503.

    Why roll back rather than keep the row for the sweeper: the 503 says "nothing was created", and
    a client that retries (with the same Idempotency-Key or without one) must not find a duplicate.
    Publishing is bounded by KDIGA_PUBLISH_TIMEOUT_S, so a frozen broker answers 503 in seconds. A
    message that reached the broker despite the timeout finds no row and is skipped by the worker;
    if the removal itself fails (the database went down too), the row keeps its `enqueued_at` and the
    sweeper (api/sweeper.py) sends its task once the broker is back, so no row waits forever.
    Blocking: call it from a worker thread (sync routes) or through `publish_or_undo_async`.
    """
    try:
        publish(settings, task, row.id, queue=queue)
    except QueueUnavailable as exc:
        log.warning("broker unavailable (%s); %s %s removed", exc, what, row.id)
        _remove(session, store, row)
        raise queue_down(settings) from None


async def publish_or_undo_async(session: Session, settings: Settings, row: Any, *, task: str, queue: str,
                                store: ArtifactStore | None = None, what: str) -> None:
    """`publish_or_undo` in a worker thread (for async routes)."""
    await to_thread.run_sync(lambda: publish_or_undo(session, settings, row, task=task, queue=queue,
                                                     store=store, what=what))


# -- Idempotency-Key -----------------------------------------------------------------------------
def request_digest(payload: dict[str, Any]) -> str:
    """sha256 of a canonical JSON form (sorted keys, no spaces) of a normalised request."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def replay(row: Any, digest: str, key: str, response: Response) -> Any:
    """The row an earlier request with this key made (status 200), or 409 if that request differed."""
    if row.request_hash != digest:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"Idempotency-Key '{key}' was already used with a different request."
        )
    response.status_code = status.HTTP_200_OK
    return row


def find_replay(session: Session, model: Any, owner_id: str, key: str | None) -> Any:
    """The caller's row made with this Idempotency-Key, or None."""
    return crud.get_by_idempotency_key(session, model, owner_id=owner_id, key=key) if key else None


def insert_once(session: Session, row: R, *, on_duplicate: Callable[[], R],
                before_commit: Callable[[Session, R], Any] | None = None) -> R:
    """Commit a new row (after `before_commit(session, row)`, in the same transaction); if a concurrent
    request with the same Idempotency-Key won, `on_duplicate()`."""
    from sqlalchemy.exc import IntegrityError

    session.add(row)
    try:
        if before_commit is not None:
            before_commit(session, row)
        session.commit()
    except IntegrityError:
        session.rollback()
        if not getattr(row, "idempotency_key", None):
            raise
        return on_duplicate()
    return row


__all__ = ["IDEMPOTENCY_KEY_DOC", "QueueUnavailable", "delete_with_file", "find_replay", "insert_once", "log",
           "owned_or_404", "parse_json_field", "publish", "publish_or_undo", "publish_or_undo_async", "queue_down", "replay",
           "request_digest"]
