"""The OpenAPI document: every error answer the API can give, with the one model it really returns.

Routes declare their specific errors (`api.errors.error_responses`: 404, 409, 413, 415, 429, ...).
This adds the ones every operation can give, so that no declaration can be forgotten:
400 (a NUL in the path or query) and 422 (an unknown query parameter) everywhere, and 401 and 503
(an API key lookup with the database down) on every operation that takes a key. FastAPI's own
422 model (`HTTPValidationError`, `detail` as an array) is never used: the API answers
`{"detail": "<sentence>"}` (api/errors.py), and the document says so.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.errors import ERROR_DESCRIPTIONS, RETRY_AFTER_HEADER

ERROR_REF = {"$ref": "#/components/schemas/ErrorPublic"}
EVERYWHERE = (400, 422)
WITH_KEY = (401, 503)
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def _error_entry(code: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"description": ERROR_DESCRIPTIONS[code],
                             "content": {"application/json": {"schema": ERROR_REF}}}
    if code in (429, 503):
        entry["headers"] = RETRY_AFTER_HEADER
    return entry


def complete_error_responses(document: dict[str, Any]) -> dict[str, Any]:
    """Add the common error answers to every operation and drop FastAPI's unused validation models."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            codes = EVERYWHERE + (WITH_KEY if operation.get("security") else ())
            for code in codes:
                responses.setdefault(str(code), _error_entry(code))
            for code, answer in responses.items():  # a route that kept FastAPI's default 422 model
                if "HTTPValidationError" in str(answer.get("content", "")):
                    responses[code] = _error_entry(int(code))
    schemas = document.get("components", {}).get("schemas", {})
    for name in FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    return document


def install_openapi(app: FastAPI) -> None:
    """Replace `app.openapi` with one that completes the error answers (built once, then cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                   description=app.description, routes=app.routes)
            app.openapi_schema = complete_error_responses(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
