"""The job-status hot path (api/status_reader.py, crud.job_status) against the ORM, on both backends.

The fast path decodes rows itself on SQLite; these tests pin it to what the ORM and JobPublic
give for the same row, check that a poller sees another connection's commits at once, and check
the ETag / If-None-Match exchange and the owner scoping.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from api_helpers import new_key

from api.auth import AuthCache, Owner
from api.schemas import JobPublic
from kdiga_service import crud
from kdiga_service.models import Artifact, Job, utcnow


def _make_job(client, owner_id: str, *, artifacts: int = 2) -> str:
    with client.app.state.sessionmaker() as session:
        now = utcnow()
        job = Job(owner_id=owner_id, kind="distill", name="ünïcode ✓", queue="q", status="running",
                  spec={"train": {"epochs": 3}, "γ": 5.0}, progress={"step": 4, "total": 10, "eta_s": 1.5},
                  metrics={"loss": 0.25, "nested": [1, 2, {"a": None}]}, result={}, attempts=1,
                  cancel_requested=True, started_at=now)
        session.add(job)
        session.flush()
        for i in range(artifacts):
            session.add(Artifact(owner_id=owner_id, job_id=job.id, name=f"file{i}.bin", kind=f"kind{i}",
                                 storage_key=f"k/{i}", size_bytes=10 + i, sha256=f"{i:064d}",
                                 created_at=now + timedelta(seconds=i)))
        session.commit()
        return job.id


def _orm_json(client, job_id: str) -> dict:
    with client.app.state.sessionmaker() as session:
        return JobPublic.model_validate(session.get(Job, job_id)).model_dump(mode="json")


def test_status_read_equals_the_orm_view(client):
    headers, owner_id = new_key(client, "status")
    for n_artifacts in (0, 3):
        job_id = _make_job(client, owner_id, artifacts=n_artifacts)
        resp = client.get(f"/v1/jobs/{job_id}", headers=headers)
        assert resp.status_code == 200
        assert resp.json() == _orm_json(client, job_id)
        assert [a["name"] for a in resp.json()["artifacts"]] == [f"file{i}.bin" for i in range(n_artifacts)]
        assert resp.json()["created_at"].endswith("Z")


def test_fast_reader_matches_crud_query(client):
    _, owner_id = new_key(client, "reader")
    job_id = _make_job(client, owner_id)
    reader = client.app.state.status_reader
    fast = JobPublic.model_validate(reader.read(owner_id, job_id))
    core = JobPublic.model_validate(crud.job_status(reader.engine, owner_id=owner_id, job_id=job_id))
    assert fast == core
    assert reader.read("someone-else", job_id) is None
    assert reader.read(owner_id, "no-such-job") is None


def test_poller_sees_progress_committed_elsewhere(client):
    headers, owner_id = new_key(client, "poll")
    job_id = _make_job(client, owner_id)
    first = client.get(f"/v1/jobs/{job_id}", headers=headers)
    with client.app.state.sessionmaker() as session:
        assert crud.update_progress(session, job_id, progress={"step": 9, "total": 10})
    second = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert second.json()["progress"]["step"] == 9
    assert second.headers["etag"] != first.headers["etag"]


def test_etag_gives_304_until_the_job_changes(client):
    headers, owner_id = new_key(client, "etag")
    job_id = _make_job(client, owner_id)
    first = client.get(f"/v1/jobs/{job_id}", headers=headers)
    etag = first.headers["etag"]
    same = client.get(f"/v1/jobs/{job_id}", headers={**headers, "If-None-Match": etag})
    assert same.status_code == 304 and same.content == b""
    with client.app.state.sessionmaker() as session:
        crud.update_progress(session, job_id, progress={"step": 5, "total": 10})
    changed = client.get(f"/v1/jobs/{job_id}", headers={**headers, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["progress"]["step"] == 5


def test_another_owners_job_is_not_found(client):
    _, owner_id = new_key(client, "mine")
    other_headers, _ = new_key(client, "theirs")
    job_id = _make_job(client, owner_id)
    resp = client.get(f"/v1/jobs/{job_id}", headers=other_headers)
    assert resp.status_code == 404
    assert resp.json() == {"detail": f"Job '{job_id}' not found."}


def test_auth_cache_loads_a_key_once_for_concurrent_misses():
    cache, calls = AuthCache(ttl_s=60), []
    owner = Owner(id="o", name="n", is_admin=False, max_concurrent_jobs=None)

    async def load() -> Owner:
        calls.append(1)
        await asyncio.sleep(0.01)
        return owner

    async def main() -> list[Owner]:
        return await asyncio.gather(*(cache.fetch("kdg_x", load) for _ in range(20)))

    assert asyncio.run(main()) == [owner] * 20
    assert len(calls) == 1
    assert cache.get("kdg_x") == owner


def test_auth_cache_does_not_keep_a_failed_lookup():
    cache, calls = AuthCache(ttl_s=60), []

    async def load() -> Owner:
        calls.append(1)
        raise PermissionError("no")

    async def main() -> None:
        for _ in range(2):
            try:
                await cache.fetch("kdg_y", load)
            except PermissionError:
                pass

    asyncio.run(main())
    assert len(calls) == 2 and cache.get("kdg_y") is None


def test_auth_cache_refreshes_ahead_and_drops_a_revoked_key():
    cache = AuthCache(ttl_s=0.2)
    owner = Owner(id="o", name="n", is_admin=False, max_concurrent_jobs=None)
    revoked = False
    calls = []

    async def load() -> Owner:
        calls.append(1)
        if revoked:
            raise PermissionError("revoked")
        return owner

    async def main() -> None:
        nonlocal revoked
        assert await cache.fetch("kdg_z", load) == owner  # miss: waits for the load
        await asyncio.sleep(0.12)  # past half the lifetime
        assert await cache.fetch("kdg_z", load) == owner  # served cached, refresh started
        await asyncio.sleep(0.01)
        assert len(calls) == 2
        revoked = True
        await asyncio.sleep(0.12)
        assert await cache.fetch("kdg_z", load) == owner  # still cached; this refresh fails ...
        await asyncio.sleep(0.01)
        assert cache.get("kdg_z") is None  # ... and drops the entry
        try:
            await cache.fetch("kdg_z", load)
        except PermissionError:
            pass
        else:
            raise AssertionError("a revoked key was accepted after its refresh failed")

    asyncio.run(main())


def test_kept_answer_follows_the_rows(client):
    """The reader keeps each job's last answer keyed by its rows: reused while nothing changed, made
    again when only an artifact row changed (the job row itself unchanged)."""
    headers, owner_id = new_key(client, "kept")
    job_id = _make_job(client, owner_id, artifacts=1)
    reader = client.app.state.status_reader
    first = reader.answer(owner_id, job_id)
    assert first is not None and reader.answer(owner_id, job_id) == first
    with client.app.state.sessionmaker() as session:
        session.add(Artifact(owner_id=owner_id, job_id=job_id, name="late.bin", kind="other", storage_key="k/late",
                             size_bytes=1, sha256="f" * 64, created_at=utcnow() + timedelta(seconds=9)))
        session.commit()
    resp = client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert [a["name"] for a in resp.json()["artifacts"]] == ["file0.bin", "late.bin"]
    assert resp.json() == _orm_json(client, job_id)
    assert resp.headers["etag"] != first[1]
    assert reader.answer("someone-else", job_id) is None  # the kept answer is never served to another owner


def test_status_read_checks_the_key_as_every_route_does(client):
    """The status route reads the Authorization header itself (deps.owner_from_request): the same
    answers as the routes that take the key through FastAPI's HTTPBearer dependency."""
    headers, owner_id = new_key(client, "hdr")
    job_id = _make_job(client, owner_id)
    key = headers["Authorization"].split(" ", 1)[1]
    for path in (f"/v1/jobs/{job_id}", "/v1/jobs"):  # the status read, and a route with the dependency
        assert client.get(path, headers={"Authorization": f"bearer   {key}"}).status_code == 200
        for sent in ({}, {"Authorization": f"Basic {key}"}, {"Authorization": "Bearer"},
                     {"Authorization": "Bearer kdg_not_a_key"}):
            resp = client.get(path, headers=sent)
            assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer", (path, sent)
            assert resp.json()["detail"].endswith("."), resp.json()
