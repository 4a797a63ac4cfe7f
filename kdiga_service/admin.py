"""API keys: `kdg_` + secrets.token_urlsafe, stored as sha256; created by `kdiga admin keys` and at start-up."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from kdiga_service.models import ApiKey, utcnow

KEY_PREFIX = "kdg_"
DISPLAY_PREFIX_LEN = 12


def generate_key() -> str:
    """A new secret key, e.g. `kdg_Xy3...` (43 random url-safe characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """What is stored for a key: its sha256 (the secret itself never is)."""
    return hashlib.sha256(key.encode()).hexdigest()


class AdminError(ValueError):
    """A key operation that cannot be done; one sentence."""


def create_key(
    session: Session,
    *,
    name: str,
    is_admin: bool = False,
    max_concurrent_jobs: int | None = None,
    key: str | None = None,
) -> tuple[ApiKey, str]:
    """Create a key and commit; returns (row, secret). The secret is never stored and shown once.

    `key` lets a deployment choose the secret (it must start with 'kdg_'); by default one is generated.
    """
    secret = key or generate_key()
    if not secret.startswith(KEY_PREFIX) or len(secret) < len(KEY_PREFIX) + 16:
        raise AdminError(f"An API key must start with '{KEY_PREFIX}' and have at least 16 more characters.")
    if max_concurrent_jobs is not None and max_concurrent_jobs < 1:
        raise AdminError("max_concurrent_jobs must be at least 1.")
    row = ApiKey(
        name=name,
        prefix=secret[:DISPLAY_PREFIX_LEN],
        key_hash=hash_key(secret),
        is_admin=is_admin,
        max_concurrent_jobs=max_concurrent_jobs,
    )
    session.add(row)
    session.commit()
    return row, secret


def find_key(session: Session, key_id_or_prefix: str) -> ApiKey | None:
    """A key by its id, or by its unique display prefix."""
    row = session.get(ApiKey, key_id_or_prefix)
    if row is not None:
        return row
    rows = session.scalars(select(ApiKey).where(ApiKey.prefix == key_id_or_prefix)).all()
    return rows[0] if len(rows) == 1 else None


def revoke_key(session: Session, *, key_id: str) -> ApiKey:
    """Revoke a key (by id or display prefix) and commit; revoking twice is harmless."""
    row = find_key(session, key_id)
    if row is None:
        raise AdminError(f"No API key with id or prefix '{key_id}'.")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def list_keys(session: Session, *, include_revoked: bool = True) -> Sequence[ApiKey]:
    """Every key, oldest first."""
    stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return session.scalars(stmt).all()


def ensure_key(
    session: Session, *, secret: str, name: str = "bootstrap-admin", is_admin: bool = True
) -> ApiKey:
    """Create the key with this secret unless it already exists (compose start-up); commits."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
    return row if row is not None else create_key(session, name=name, is_admin=is_admin, key=secret)[0]
