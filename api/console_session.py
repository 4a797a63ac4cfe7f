"""The web console's sign-in: a server-side session behind an HttpOnly, SameSite=Strict cookie,
and CSRF tokens on every form.

The cookie holds a random token; the database holds only its sha256, the API key it acts as and
the session's CSRF token (kdiga_service.models.ConsoleSession). The API key itself is never stored
or sent back to the browser: it is checked once at sign-in. A revoked key ends its sessions at
their next request. Forms carry the session's CSRF token (compared in constant time); the sign-in
form, which has no session yet, uses a double-submit cookie. A cross-site POST also fails on the
Origin check and on SameSite=Strict, so the token is the third of three locks.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from anyio import to_thread
from fastapi import Depends, HTTPException, Request, Response, status
from sqlalchemy.orm import Session

from api.auth import Owner
from kdiga_service import crud

COOKIE = "kdiga_console"
LOGIN_CSRF_COOKIE = "kdiga_console_login"
PATH = "/ui"
CSRF_REFUSED = "The form's security token is missing or stale; reload the page and try again."


@dataclass(frozen=True)
class ConsoleUser:
    """The signed-in key, and the CSRF token its forms must carry."""

    owner: Owner
    csrf_token: str
    token_hash: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    secure = request.app.state.settings.console_secure_cookie or request.url.scheme == "https"
    response.set_cookie(name, value, max_age=max_age, path=PATH, httponly=True, samesite="strict", secure=secure)


def open_session(request: Request, response: Response, owner_id: str) -> None:
    """Start a session for `owner_id` and hand its cookie to the browser."""
    settings = request.app.state.settings
    token = secrets.token_urlsafe(32)
    with request.app.state.sessionmaker() as session:
        crud.open_console_session(session, owner_id=owner_id, token_hash=token_hash(token),
                                  csrf_token=secrets.token_urlsafe(32), ttl_s=settings.console_session_ttl_s)
    set_cookie(response, request, COOKIE, token, settings.console_session_ttl_s)


def close_session(request: Request, response: Response) -> None:
    token = request.cookies.get(COOKIE)
    if token:
        with request.app.state.sessionmaker() as session:
            crud.close_console_session(session, token_hash=token_hash(token))
    response.delete_cookie(COOKIE, path=PATH)


def _lookup(sessionmaker: Callable[[], Session], token: str) -> ConsoleUser | None:
    digest = token_hash(token)
    with sessionmaker() as session:
        found = crud.console_session_key(session, token_hash=digest)
        if found is None:
            return None
        row, key = found
        return ConsoleUser(Owner.from_row(key), row.csrf_token, digest)


async def current_user(request: Request) -> ConsoleUser | None:
    """The signed-in user, or None."""
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 200:
        return None
    return await to_thread.run_sync(_lookup, request.app.state.sessionmaker, token)


async def require_user(request: Request) -> ConsoleUser:
    """The signed-in user, or a redirect to the sign-in page (401 for scripts: SSE, downloads)."""
    user = await current_user(request)
    if user is not None:
        return user
    if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
        raise HTTPException(status.HTTP_303_SEE_OTHER, headers={"Location": f"{PATH}/login"})
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Sign in to the console first.")


UserDep = Annotated[ConsoleUser, Depends(require_user)]


def same_origin(request: Request) -> bool:
    """False when the browser says the request came from another origin (Origin or Referer)."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source is None
    parts = urlsplit(source)
    return parts.netloc == request.headers.get("host", request.url.netloc)


def check_csrf(request: Request, expected: str, sent: str | None) -> None:
    """403 with one sentence unless the form's token matches and the request is same-origin."""
    if not sent or not expected or not hmac.compare_digest(sent, expected) or not same_origin(request):
        raise HTTPException(status.HTTP_403_FORBIDDEN, CSRF_REFUSED)
