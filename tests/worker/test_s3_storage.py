"""Checkpoints and artifacts on an S3 store (a local moto server standing in for S3/MinIO)."""

from __future__ import annotations

import json

import kdiga_svc_helpers as h
import pytest

from kdiga_service.db import get_sessionmaker
from kdiga_service.models import Job
from kdiga_service.storage import ArtifactStore
from worker import checkpoints, outputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k",
                 aws_secret_access_key="s").create_bucket(Bucket="kdiga-worker")
    yield endpoint
    server.stop()


@pytest.fixture()
def s3_settings(tmp_path, s3_endpoint):
    s = h.make_settings(tmp_path / "home", storage_url="s3://kdiga-worker/artifacts", s3_endpoint_url=s3_endpoint,
                        s3_access_key_id="k", s3_secret_access_key="s", s3_region="us-east-1")
    h.migrate(s)
    return s


def test_checkpoints_and_artifacts_on_s3(s3_settings, tmp_path):
    store = ArtifactStore.from_settings(s3_settings)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for epoch in (1, 2, 3):
        (ckpt / "last.json").write_text(json.dumps({"epoch": epoch}))
        (ckpt / "last.safetensors").write_bytes(b"w%d" % epoch)
        checkpoints.upload_checkpoint(store, "job-s3", ckpt)
    assert checkpoints.download_checkpoint(store, "job-s3", tmp_path / "back")
    assert (tmp_path / "back" / "last.safetensors").read_bytes() == b"w3"
    assert not store.exists("jobs/job-s3/checkpoint/e00002/last.json")

    owner = h.create_owner(s3_settings)[0]
    job_id = h.create_job_row(s3_settings, owner, {"kind": "evaluate", "dataset_id": "d", "model": {}})
    files = {"report.json": tmp_path / "report.json", "student.safetensors": tmp_path / "student.safetensors"}
    files["report.json"].write_text("{}")
    files["student.safetensors"].write_bytes(b"weights")
    artifacts = [{"name": "report.json", "path": files["report.json"], "kind": "report_json"},
                 {"name": "student.safetensors", "path": files["student.safetensors"], "kind": "student_weights"}]
    with get_sessionmaker(s3_settings)() as session:
        job = session.get(Job, job_id)
        outputs.store_artifacts(session, store, job, artifacts)
        rows = outputs.store_artifacts(session, store, job, artifacts)  # a rerun replaces
    assert len(h.artifacts_of(s3_settings, job_id)) == 2
    weights = next(r for r in rows if r.name == "student.safetensors")
    assert store.read_bytes(weights.storage_key) == b"weights"
    store.delete_prefix(checkpoints.checkpoint_prefix("job-s3"))
    assert not checkpoints.download_checkpoint(store, "job-s3", tmp_path / "none")


def test_an_evaluation_checkpoint_on_s3_sends_only_its_new_files(s3_settings, tmp_path):
    store = h.counting_store(s3_settings)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "last.json").write_text(json.dumps({"epoch": 2}))
    (ckpt / "last.safetensors").write_bytes(b"w" * 4096)
    checkpoints.upload_checkpoint(store, "job-s3e", ckpt)
    (ckpt / "eval" / "partial").mkdir(parents=True)
    (ckpt / "eval" / "partial" / "student.json").write_text('{"batches": 1}')
    store.written.clear()
    checkpoints.upload_checkpoint(store, "job-s3e", ckpt)
    assert [size for _, size in store.written[:-1]] == [len('{"batches": 1}')]  # not the weights again
    assert store.written[-1][0] == "jobs/job-s3e/checkpoint/latest.json"
    back = tmp_path / "back"
    assert checkpoints.download_checkpoint(store, "job-s3e", back)
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*") if p.is_file()) == [
        "eval/partial/student.json", "last.json", "last.safetensors"]
    assert (back / "last.safetensors").read_bytes() == b"w" * 4096
