"""The artifact store: key validation, capped streamed writes, reads, local_path; S3 via a moto server."""

from __future__ import annotations

import hashlib
import io

import pytest

from kdiga_service.settings import Settings
from kdiga_service.storage import (
    ArtifactStore,
    StorageError,
    TooLargeError,
    get_storage,
    new_key,
    validate_key,
)


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(f"file://{tmp_path}/store")


@pytest.mark.parametrize(
    "key", ["../x", "a/../../etc/passwd", "/etc/passwd", "a//b", "a/./b", "", "a\\b", ".hidden", "a/b/"]
)
def test_bad_keys_are_refused(store, key):
    with pytest.raises(StorageError):
        validate_key(key)
    with pytest.raises(StorageError):
        store.open(key)


def test_write_read_delete(store, tmp_path):
    key = new_key("jobs/abc", ".bin")
    data = b"x" * 3_000_000
    stored = store.write_stream(key, io.BytesIO(data))
    assert stored.size_bytes == len(data) and stored.sha256 == hashlib.sha256(data).hexdigest()
    assert store.exists(key) and store.size(key) == len(data)
    assert b"".join(store.iter_chunks(key)) == data
    with store.local_path(key) as path:
        assert path.read_bytes() == data and str(path).startswith(str(tmp_path))
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # missing is fine


def test_size_cap_leaves_nothing(store, tmp_path):
    with pytest.raises(TooLargeError):
        store.write_stream("uploads/big", [b"a" * 600, b"b" * 600], max_bytes=1000)
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]


async def _chunks():
    for part in (b"ab", b"cd"):
        yield part


def test_async_write(store):
    import anyio

    stored = anyio.run(lambda: store.awrite_stream("a/b", _chunks()))
    assert store.read_bytes("a/b") == b"abcd" and stored.size_bytes == 4
    assert not store.supports_presign and store.presigned_url("a/b") is None


def test_get_storage_from_settings(tmp_path):
    settings = Settings(home=tmp_path)
    store = get_storage(settings)
    assert store is get_storage(settings) and store.root == str(tmp_path / "artifacts")


@pytest.fixture(scope="module")
def s3_endpoint():
    """A local moto S3 server (a stand-in for S3/MinIO) with a bucket named 'kdiga'."""
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    ).create_bucket(Bucket="kdiga")
    yield endpoint
    server.stop()


def s3_settings(tmp_path, endpoint, **kw):
    return Settings(
        home=tmp_path,
        storage_url="s3://kdiga/artifacts",
        s3_endpoint_url=endpoint,
        s3_access_key_id="k",
        s3_secret_access_key="s",
        s3_region="us-east-1",
        **kw,
    )


@pytest.mark.slow
def test_s3_store(tmp_path, s3_endpoint):
    store = ArtifactStore.from_settings(s3_settings(tmp_path, s3_endpoint))
    stored = store.write_stream("jobs/j/w.bin", [b"abc", b"def"])
    assert stored.size_bytes == 6 and store.exists("jobs/j/w.bin")
    assert store.read_bytes("jobs/j/w.bin") == b"abcdef"
    with store.local_path("jobs/j/w.bin") as path:
        assert path.read_bytes() == b"abcdef"
    assert not path.exists()
    assert store.supports_presign and store.presigned_url("jobs/j/w.bin").startswith(s3_endpoint)
    with pytest.raises(TooLargeError):
        store.write_stream("jobs/j/big", [b"a" * 10], max_bytes=5)
    assert not store.exists("jobs/j/big")


@pytest.mark.slow
def test_presigned_download_redirect(tmp_path, s3_endpoint, redis_client):
    import httpx
    from api_helpers import REDIS_URL, distill_body, finish, new_key, ready_dataset, ready_teacher
    from fastapi.testclient import TestClient

    from api.main import create_app

    settings = s3_settings(
        tmp_path,
        s3_endpoint,
        presigned_downloads=True,
        broker_url=REDIS_URL,
        queue_train=f"kdiga_test_{tmp_path.name}_t",
        queue_eval=f"kdiga_test_{tmp_path.name}_e",
        queue_validate=f"kdiga_test_{tmp_path.name}_v",
    )
    try:
        with TestClient(create_app(settings)) as client:
            headers, _ = new_key(client)
            body = distill_body(ready_dataset(client, headers), ready_teacher(client, headers))
            job_id = client.post("/v1/jobs", headers=headers, json=body).json()["id"]
            finish(client, job_id, artifacts={"student_weights": b"weights"})
            artifact = client.get(f"/v1/jobs/{job_id}", headers=headers).json()["artifacts"][0]
            r = client.get(f"/v1/artifacts/{artifact['id']}", headers=headers, follow_redirects=False)
            assert r.status_code == 307 and r.headers["location"].startswith(s3_endpoint)
            assert httpx.get(r.headers["location"]).content == b"weights"
    finally:
        redis_client.delete(settings.queue_train, settings.queue_eval, settings.queue_validate)
