"""Every error is `{"detail": "<one sentence>"}`: request validation errors are rewritten to one."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

log = logging.getLogger("kdiga.api")
_QUOTED = re.compile(r"'([^']*)'")


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
        return f"Unknown {field} '{err.get('input')}'; valid names are: {', '.join(valid)}."
    msg = msg.removeprefix("Value error, ")
    sentence = f"Invalid value for '{where}': {msg[0].lower() + msg[1:] if msg else 'is invalid'}"
    return sentence if sentence.endswith(".") else sentence + "."


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": validation_sentence(exc.errors())},
    )


async def _on_unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(status_code=500, content={"detail": "Internal server error."})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unhandled)


def pydantic_sentence(exc: ValidationError) -> str:
    return validation_sentence(exc.errors())
