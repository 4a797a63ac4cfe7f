"""FastAPI dependencies as `Annotated` aliases (full-stack-fastapi-template style)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Annotated, Any, TypeVar

from anyio import to_thread
from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.orm import Session

from api.auth import MISSING_KEY, AuthCache, AuthError, Owner, authenticate
from kdiga_service.settings import Settings
from kdiga_service.storage import ArtifactStore

T = TypeVar("T")

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer kdg_...`.")


# Cheap dependencies are `async def` so FastAPI does not hop to a worker thread for each of them.
async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_db(request: Request) -> AsyncIterator[Session]:
    """A session for the request (created lazily: no connection until the first query)."""
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        if request.app.state.settings.is_sqlite:
            session.close()  # a local file: returning the connection takes microseconds
        else:
            await to_thread.run_sync(session.close)


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.storage  # type: ignore[no-any-return]


async def run_query(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a short database read: inline on SQLite, in a worker thread on a networked database.

    A SQLite read of one indexed row takes tens of microseconds and WAL readers never wait for the
    writer, so hopping to a thread (and back) would cost more than the query; a PostgreSQL round
    trip must not block the event loop.
    """
    if request.app.state.settings.is_sqlite:
        return fn(*args, **kwargs)
    return await to_thread.run_sync(partial(fn, *args, **kwargs))


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_db)]
StorageDep = Annotated[ArtifactStore, Depends(get_store)]


def _lookup_owner(sessionmaker: Callable[[], Session], key: str) -> Owner:
    with sessionmaker() as session:
        return Owner.from_row(authenticate(session, key))


async def get_current_owner(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Owner:
    """The API key making the request, or 401 with one sentence."""
    return await _owner(request, credentials.credentials if credentials is not None else None)


# What `Depends(bearer)` declares in the OpenAPI document, for a route that authenticates with
# `owner_from_request` instead of the dependency.
BEARER_SECURITY: dict[str, Any] = {"security": [{"HTTPBearer": []}]}


async def owner_from_request(request: Request) -> Owner:
    """`get_current_owner` without FastAPI's dependency machinery, for the job-status read alone: solving
    its two nested dependencies was ~30% of that route's CPU under load (BENCHMARKS.md, "API status reads,
    profiled"). The route declares `BEARER_SECURITY` so its OpenAPI entry is the same."""
    scheme, key = get_authorization_scheme_param(request.headers.get("authorization"))  # as HTTPBearer reads it
    return await _owner(request, key if scheme.lower() == "bearer" and key else None)


async def _owner(request: Request, key: str | None) -> Owner:
    cache: AuthCache = request.app.state.auth_cache
    try:
        if key is None:
            raise AuthError(MISSING_KEY)
        # Its own short session: a cached key (the common case) then needs no session at all.
        return await cache.fetch(key, lambda: run_query(request, _lookup_owner, request.app.state.sessionmaker, key))
    except AuthError as exc:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED, detail=str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from None


CurrentOwner = Annotated[Owner, Depends(get_current_owner)]


async def get_admin(owner: CurrentOwner) -> Owner:
    if not owner.is_admin:
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN, detail="This action needs an admin API key."
        )
    return owner


AdminOwner = Annotated[Owner, Depends(get_admin)]


def not_found(what: str, id: str) -> HTTPException:
    """The 404 for a missing (or another owner's) resource."""
    return HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=f"{what} '{id}' not found.")


MAX_PAGE = 500
MAX_OFFSET = 2**31 - 1  # far beyond any real listing, far below SQLite's and PostgreSQL's 64-bit limits


class PageParams:
    """`?limit=50&offset=0` for list routes (the only integer query parameters: bounded here)."""

    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Rows per page.")] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Rows to skip.")] = 0,
    ):
        self.limit, self.offset = limit, offset


PageDep = Annotated[PageParams, Depends()]
