"""The route class every router uses: the one place where request input is bounded before a route runs.

FastAPI's documented way to change how requests are read is a custom `Request` and `APIRoute`
(fastapi.tiangolo.com/how-to/custom-request-and-route). Ours:

- reads a JSON body through `api.json_input.read_json` (size, UTF-8, finite numbers, depth, NUL),
  with the body capped at `KDIGA_MAX_JSON_BYTES` while it is received, so no route (and no
  FastAPI body parsing) ever sees a body that would raise RecursionError or fill memory;
- refuses query parameters the operation does not declare, naming the ones it does;
- refuses NUL characters in the path and the query (PostgreSQL text cannot hold them).

Integer query parameters are bounded where they are declared (`api.deps.PageParams`, the only
ones); tests/api/test_openapi.py checks that every integer parameter in the document has a maximum.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response, status
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from api.json_input import JSONInputError, read_json

NUL_IN_URL = "The request's path or query contains a NUL character, which is not allowed."


class BoundedRequest(Request):
    """A Request whose body is capped as it arrives and whose JSON is read by `read_json`."""

    def _max_json_bytes(self) -> int:
        return int(self.app.state.settings.max_json_bytes)

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            cap = self._max_json_bytes()
            length = self.headers.get("content-length", "")
            if length.isdigit() and int(length) > cap:
                raise _too_large(cap)
            chunks, size = [], 0
            async for chunk in self.stream():
                size += len(chunk)
                if size > cap:
                    raise _too_large(cap)
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = read_json(await self.body(), max_bytes=self._max_json_bytes())
            except JSONInputError as exc:
                raise HTTPException(exc.status, str(exc)) from None
        return self._json


def _too_large(cap: int) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"The request body is larger than the limit of {cap} bytes.")


def declared_query_names(dependant: Dependant) -> frozenset[str]:
    """The query parameter names (aliases) an operation declares, its dependencies included."""
    names: set[str] = set()
    stack = [dependant]
    while stack:
        current = stack.pop()
        names.update(p.alias for p in current.query_params)
        stack.extend(current.dependencies)
    return frozenset(names)


def refuse_odd_url(request: Request, allowed: frozenset[str]) -> None:
    """400 for a NUL in the path or query; 422 for query parameters the operation does not take."""
    items = request.query_params.multi_items()
    if "\x00" in request.scope.get("path", "") or any("\x00" in k or "\x00" in v for k, v in items):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, NUL_IN_URL)
    unknown = sorted(set(request.query_params.keys()) - allowed)
    if unknown:
        takes = f"it takes: {', '.join(sorted(allowed))}" if allowed else "it takes none"
        names = ", ".join(f"'{n[:40]}'" for n in unknown[:3])
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"Unknown query parameter{'s' if len(unknown) > 1 else ''} {names} for this operation; {takes}.",
        )


class KdigaRoute(APIRoute):
    """APIRoute with bounded input (see the module docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        allowed = declared_query_names(self.dependant)

        async def bounded_handler(request: Request) -> Response:
            request = BoundedRequest(request.scope, request.receive)
            refuse_odd_url(request, allowed)
            return await handler(request)

        return bounded_handler
