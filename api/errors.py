"""The one error model: every error answer is `{"detail": "<one sentence>"}`.

Request validation errors are rewritten to that sentence; a database that cannot be reached is a
503 with `Retry-After`; a value the database refuses is a 422; anything unexpected is a 500 whose
sentence carries only a request id (the exception and its traceback go to the log, with the id).
`error_responses` documents these answers in the OpenAPI document with the same model.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import exc as sa_exc

from api.request_id import current_request_id

log = logging.getLogger("kdiga.api")
_QUOTED = re.compile(r"'([^']*)'")

DATABASE_DOWN = "The database is unavailable, so nothing was changed; try again shortly."
DATABASE_REFUSED = "A value in the request cannot be stored (out of range or not representable)."


class ErrorPublic(BaseModel):
    """Every error answer of the API."""

    detail: str = Field(description="One sentence saying what went wrong and, where it helps, what to do.")


class NotReadyPublic(ErrorPublic):
    """/readyz's 503: the error sentence plus the state of each dependency."""

    checks: dict[str, str] = Field(default_factory=dict)


ERROR_DESCRIPTIONS = {
    400: "The request is malformed (a broken multipart body, a NUL character in the path or query).",
    401: "The API key is missing, wrong or revoked.",
    403: "The API key may not do this.",
    404: "No such resource for this API key (another key's resource is not found either).",
    409: "The request conflicts with the resource's state, or an Idempotency-Key was reused with another body.",
    413: "The body, a form field or the uploaded file is larger than the server accepts.",
    415: "The body is not of a content type this operation takes.",
    422: "The request is well-formed but invalid: the sentence names the field and the problem.",
    429: "Too many active jobs for this API key; `Retry-After` says when to try again.",
    503: "The job queue or the database is unavailable; `Retry-After` says when to try again.",
}
RETRY_AFTER_HEADER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                      "schema": {"type": "integer"}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error statuses, all with ErrorPublic."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorPublic, "description": ERROR_DESCRIPTIONS[code]}
        if code in (429, 503):
            entry["headers"] = RETRY_AFTER_HEADER
        out[code] = entry
    return out


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def validation_sentence(errors: list[dict[str, Any]] | Any) -> str:
    """Turn pydantic's error list into one sentence about the first problem."""
    if not errors:
        return "The request is invalid."
    err = errors[0]
    kind, where, msg = err.get("type", ""), _loc(err.get("loc", ())), str(err.get("msg", "is invalid"))
    if kind == "json_invalid":
        return "The request body is not valid JSON."
    if kind == "missing":
        return f"Field '{where}' is required."
    if kind == "extra_forbidden":
        return f"Unknown field '{where}'."
    if kind == "literal_error":
        valid = sorted(_QUOTED.findall(str(err.get("ctx", {}).get("expected", ""))))
        field = where.rsplit(".", 1)[-1]
        return f"Unknown {field} '{_short(err.get('input'))}'; valid names are: {', '.join(valid)}."
    if kind == "finite_number":
        return f"Invalid value for '{where}': numbers must be finite (NaN and Infinity are not accepted)."
    msg = msg.removeprefix("Value error, ")
    sentence = f"Invalid value for '{where}': {msg[0].lower() + msg[1:] if msg else 'is invalid'}"
    return sentence if sentence.endswith(".") else sentence + "."


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"


def retry_after_headers(request: Request) -> dict[str, str]:
    return {"Retry-After": str(request.app.state.settings.retry_after_s)}


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:  # noqa: ARG001 - FastAPI handler signature
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": validation_sentence(exc.errors())},
    )


async def _on_database_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable on %s %s (request %s): %s", request.method, request.url.path,
                current_request_id(), exc.__class__.__name__)
    return JSONResponse(status_code=503, content={"detail": DATABASE_DOWN}, headers=retry_after_headers(request))


async def _on_database_refused(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database refused a value on %s %s (request %s): %s", request.method, request.url.path,
                current_request_id(), exc)
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": DATABASE_REFUSED})


async def _on_unhandled(request: Request, exc: Exception) -> JSONResponse:  # noqa: ARG001 - FastAPI handler signature
    rid = current_request_id()
    log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, rid)
    return JSONResponse(
        status_code=500,
        content={"detail": f"Internal server error; quote request id {rid} when reporting it."},
    )


class RetryAfterMiddleware:
    """Every 429 and 503 answer says when to try again: a `Retry-After` header is added where the route
    (a console page, a health check, a future limit) did not set one. Pure ASGI, so streams pass untouched."""

    def __init__(self, app: Any, seconds: int):
        self.app, self.header = app, (b"retry-after", str(int(seconds)).encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_retry_after(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] in (429, 503):
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    message = {**message, "headers": [*headers, self.header]}
            await send(message)

        await self.app(scope, receive, send_with_retry_after)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    for down in (sa_exc.OperationalError, sa_exc.TimeoutError, sa_exc.DisconnectionError):
        app.add_exception_handler(down, _on_database_down)
    app.add_exception_handler(sa_exc.DataError, _on_database_refused)
    app.add_exception_handler(Exception, _on_unhandled)


def pydantic_sentence(exc: ValidationError) -> str:
    return validation_sentence(exc.errors())
