"""Bearer API keys: `kdg_` + secrets.token_urlsafe, stored as sha256, compared in constant time."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from kdiga_service import crud
from kdiga_service.admin import KEY_PREFIX, hash_key
from kdiga_service.models import ApiKey

MISSING_KEY = "Missing API key; send the header 'Authorization: Bearer <key>'."
INVALID_KEY = "Invalid API key."
REVOKED_KEY = "This API key has been revoked."


class AuthError(Exception):
    """Authentication failed; the message is the one sentence returned with the 401."""


def parse_bearer(authorization: str | None) -> str:
    """The key from an Authorization header, or AuthError(MISSING_KEY)."""
    if not authorization:
        raise AuthError(MISSING_KEY)
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(MISSING_KEY)
    return token.strip()


@dataclass(frozen=True)
class Owner:
    """The authenticated caller (a snapshot of its ApiKey row, safe to cache and share)."""

    id: str
    name: str
    is_admin: bool
    max_concurrent_jobs: int | None

    @classmethod
    def from_row(cls, row: ApiKey) -> Owner:
        return cls(
            id=row.id, name=row.name, is_admin=row.is_admin, max_concurrent_jobs=row.max_concurrent_jobs
        )


class AuthCache:
    """Remembers successful lookups for `ttl_s` seconds (0 disables), so hot read paths skip a query.

    A revoked key therefore keeps working for at most `ttl_s` seconds in each API process. Past
    half its lifetime an entry is refreshed in the background by the next request that uses it
    (which does not wait), and a refresh that fails drops the entry at once; so a key in steady
    use never expires under its requests, and one lookup at a time per key reaches the database.
    Without this, every in-flight request missed together at each expiry and each queried the
    database: those storms were the whole p99 of status reads (BENCHMARKS.md, "API").
    """

    MAX_ENTRIES = 10_000

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Owner]] = {}  # digest -> (expires at, owner)
        self._loading: dict[str, asyncio.Future[Owner]] = {}

    def get(self, key: str) -> Owner | None:
        if self.ttl_s <= 0:
            return None
        entry = self._entries.get(hash_key(key))
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    async def fetch(self, key: str, load: Callable[[], Awaitable[Owner]]) -> Owner:
        """The cached owner (refreshed ahead of expiry), or `load()` it, sharing one load per key."""
        digest = hash_key(key)
        entry = self._entries.get(digest) if self.ttl_s > 0 else None
        now = time.monotonic()
        if entry is not None and entry[0] >= now:
            if entry[0] - now < self.ttl_s / 2:
                self._start_load(key, digest, load)  # refresh ahead; this request does not wait
            return entry[1]
        return await asyncio.shield(self._start_load(key, digest, load))

    def _start_load(self, key: str, digest: str, load: Callable[[], Awaitable[Owner]]) -> asyncio.Future[Owner]:
        task = self._loading.get(digest)
        if task is None:
            task = self._loading[digest] = asyncio.ensure_future(load())
            task.add_done_callback(lambda done: self._loaded(key, digest, done))
        return task

    def _loaded(self, key: str, digest: str, task: asyncio.Future[Owner]) -> None:
        self._loading.pop(digest, None)
        if task.cancelled() or task.exception() is not None:
            self._entries.pop(digest, None)  # revoked (or unreachable): stop vouching for the key
        else:
            self.put(key, task.result())

    def put(self, key: str, owner: Owner) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[hash_key(key)] = (time.monotonic() + self.ttl_s, owner)


def authenticate(session: Session, key: str) -> ApiKey:
    """The active ApiKey row for a presented key, or AuthError."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        raise AuthError(INVALID_KEY)
    digest = hash_key(key)
    row = crud.get_api_key_by_hash(session, key_hash=digest)
    # The lookup is by hash (no timing signal about the key itself); the compare is constant-time too.
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        raise AuthError(INVALID_KEY)
    if row.revoked_at is not None:
        raise AuthError(REVOKED_KEY)
    return row
