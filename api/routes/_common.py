"""Small helpers shared by the resource routes."""

from __future__ import annotations

import json
import logging
from typing import TypeVar

from fastapi import HTTPException, status
from pydantic import BaseModel, ValidationError

from api.errors import pydantic_sentence
from api.queue import QueueUnavailable, enqueue
from api.settings import Settings

log = logging.getLogger("kdiga.api")
S = TypeVar("S", bound=BaseModel)

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


def publish(settings: Settings, task: str, object_id: str, *, queue: str) -> None:
    """Enqueue by task name, or raise QueueUnavailable (callers undo their row and file, then 503)."""
    enqueue(settings, task, object_id, queue=queue)


def queue_down() -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, QUEUE_DOWN)


__all__ = ["QueueUnavailable", "parse_json_field", "publish", "queue_down", "log"]
