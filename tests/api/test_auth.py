"""Bearer keys: missing, malformed, unknown, revoked; the admin functions the CLI calls."""

from __future__ import annotations

import pytest
from api_helpers import new_key

from api.auth import INVALID_KEY, MISSING_KEY, REVOKED_KEY
from kdiga_service import admin
from kdiga_service.admin import hash_key


@pytest.mark.parametrize(
    "headers, detail",
    [
        ({}, MISSING_KEY),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, MISSING_KEY),
        ({"Authorization": "Bearer "}, MISSING_KEY),
        ({"Authorization": "Bearer kdg_not-a-real-key-at-all"}, INVALID_KEY),
        ({"Authorization": "Bearer sk-something-else"}, INVALID_KEY),
    ],
)
def test_bad_credentials_401(client, headers, detail):
    for path in ("/v1/teachers", "/v1/datasets", "/v1/jobs", "/v1/catalog", "/v1/artifacts"):
        r = client.get(path, headers=headers)
        assert r.status_code == 401 and r.json() == {"detail": detail}, path
        assert r.headers["www-authenticate"] == "Bearer"


def test_revoked_key_401(client):
    headers, key_id = new_key(client, "to-revoke")
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    with client.app.state.sessionmaker() as session:
        row = admin.revoke_key(session, key_id=key_id)
        assert row.revoked_at is not None
        assert admin.revoke_key(session, key_id=key_id).revoked_at == row.revoked_at  # twice is harmless
    r = client.get("/v1/jobs", headers=headers)
    assert r.status_code == 401 and r.json() == {"detail": REVOKED_KEY}


def test_admin_functions(client):
    with client.app.state.sessionmaker() as session:
        row, secret = admin.create_key(session, name="ci", is_admin=True, max_concurrent_jobs=3)
        assert secret.startswith("kdg_") and len(secret) > 40
        assert row.key_hash == hash_key(secret) and secret not in (row.key_hash, row.prefix)
        assert row.prefix == secret[:12]
        assert admin.find_key(session, row.prefix).id == row.id
        assert row.id in [k.id for k in admin.list_keys(session)]
        admin.revoke_key(session, key_id=row.prefix)
        assert row.id not in [k.id for k in admin.list_keys(session, include_revoked=False)]
        with pytest.raises(admin.AdminError, match="No API key with id or prefix 'nope'."):
            admin.revoke_key(session, key_id="nope")
        with pytest.raises(admin.AdminError, match="must start with 'kdg_'"):
            admin.create_key(session, name="x", key="abc")
        chosen = "kdg_" + "a" * 32
        assert admin.ensure_key(session, secret=chosen).id == admin.ensure_key(session, secret=chosen).id


def test_catalog(client, owner):
    r = client.get("/v1/catalog", headers=owner)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"architectures", "attacks", "methods", "datasets", "job_kinds", "methods_by_kind"}
    assert {"cnn_tiny", "resnet18"} <= set(body["architectures"])
    assert {"pgd", "autoattack", "square"} <= set(body["attacks"])
    assert body["methods"] == ["ard", "ce", "kd", "kdiga", "pgd_at", "rslad", "trades"]
    assert body["job_kinds"] == ["adversarial_train", "distill", "evaluate"]
    assert body["methods_by_kind"]["adversarial_train"] == ["ce", "pgd_at", "trades"]


def test_auth_cache_expires(client):
    """With a cache, a revoked key works until its entry expires, then gets 401."""
    import time

    from api.auth import AuthCache

    headers, key_id = new_key(client, "cached")
    state = client.app.state
    original, state.auth_cache = state.auth_cache, AuthCache(0.3)
    try:
        assert client.get("/v1/jobs", headers=headers).status_code == 200
        with state.sessionmaker() as session:
            admin.revoke_key(session, key_id=key_id)
        assert client.get("/v1/jobs", headers=headers).status_code == 200
        time.sleep(0.35)
        r = client.get("/v1/jobs", headers=headers)
        assert r.status_code == 401 and r.json() == {"detail": REVOKED_KEY}
    finally:
        state.auth_cache = original
