"""The scale-out column end to end: PostgreSQL + Redis, the API process and real worker processes.

- two workers and several concurrent jobs: each job runs exactly once and all succeed;
- a worker SIGKILLed mid-training: once a worker is back, the job resumes from its last epoch
  checkpoint and succeeds, without duplicate artifacts.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import e2e_flow as flow
import kdiga_svc_helpers as h
import pytest

from kdiga_launcher.supervisor import start_embedded
from kdiga_service.storage import get_storage
from worker.runner import checkpoint_prefix

pytestmark = [
    pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(900),
    pytest.mark.skipif(not (h.postgres_available() and h.redis_available()),
                       reason="needs the PostgreSQL and Redis servers"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, teacher_file):
    """The API (no embedded broker) on a fresh PostgreSQL database and Redis db, with two workers
    that validate the uploads (and then serve the first test)."""
    home = tmp_path_factory.mktemp("cluster")
    with h.postgres_database() as db_url, h.redis_database() as broker_url:
        settings = h.make_settings(home, database_url=db_url, broker_url=broker_url, progress_interval_s=0.3,
                                   **{k.removeprefix("KDIGA_").lower(): v for k, v in h.unique_queues().items()})
        env = h.settings_env(settings)
        service = start_embedded(home, port=0, workers=0, env=env)
        logs = [home / "worker-a.log", home / "worker-b.log"]
        workers = [h.start_worker(env, path) for path in logs]
        try:
            api = flow.Api(service.url, service.admin_key)
            ids = flow.setup_inputs(api, teacher_file)
            yield {"settings": settings, "env": env, "api": api, "ids": ids, "home": home,
                   "workers": workers, "logs": logs}
        finally:
            for proc in workers:
                h.stop_process(proc)
            service.stop()


def _claims(log_paths: list[Path]) -> dict[str, list[str]]:
    """job id -> the worker logs that claimed it (from the JSON log lines)."""
    claims: dict[str, list[str]] = {}
    for path in log_paths:
        for line in path.read_text(errors="replace").splitlines():
            if '"job claimed"' in line:
                record = json.loads(line)
                claims.setdefault(record["job_id"], []).append(path.name)
    return claims


def test_two_workers_run_each_job_exactly_once(cluster, tmp_path):
    api, ids, settings, logs = cluster["api"], cluster["ids"], cluster["settings"], cluster["logs"]
    try:
        for path in logs:
            h.wait_worker_ready(path)
        jobs = [api.submit(h.tiny_job_request(ids["dataset_id"], ids["teacher_id"], name=f"c{i}", method=m))
                for i, m in enumerate(("kdiga", "kd", "kdiga"))]
        done = [api.follow(job["id"], timeout=420) for job in jobs]
    finally:
        for proc in cluster["workers"]:
            h.stop_process(proc)
    for job in done:
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 1
        assert sorted(a["name"] for a in job["artifacts"]) == [
            "model_card.json", "report.html", "report.json", "student.onnx", "student.safetensors"]
    claims = _claims(logs)
    assert {j["id"]: len(claims.get(j["id"], [])) for j in done} == {j["id"]: 1 for j in done}
    assert len({h.job_row(settings, j["id"]).worker_id for j in done}) == 2  # both workers took jobs
    flow.check_student(api, done[0], tmp_path / "student")


def test_killed_worker_job_resumes_from_checkpoint(cluster, tmp_path):
    api, ids, settings = cluster["api"], cluster["ids"], cluster["settings"]
    for proc in cluster["workers"]:  # only the workers of this test may take the job
        h.stop_process(proc)
    # Redelivery after the visibility timeout; the restore sweep runs every second at this timeout.
    env = {**cluster["env"], "KDIGA_VISIBILITY_TIMEOUT_S": "5", "KDIGA_JOB_SOFT_TIME_LIMIT_S": "600",
           "KDIGA_JOB_HARD_TIME_LIMIT_S": "660"}
    store = get_storage(settings)
    first_log, second_log = tmp_path / "worker-1.log", tmp_path / "worker-2.log"
    first = h.start_worker(env, first_log)
    second = None
    try:
        h.wait_worker_ready(first_log)
        # Small batches make each epoch last seconds, so the kill lands in the middle of training
        # even on a fast idle machine (with 2 epochs of batch 64 the job sometimes finished first).
        job = api.submit(h.tiny_job_request(ids["dataset_id"], ids["teacher_id"], epochs=3, batch_size=4,
                                            name="killed"))
        pointer = f"{checkpoint_prefix(job['id'])}/latest.json"
        h.wait_for(lambda: store.exists(pointer), 300, interval=0.05, what="the first epoch checkpoint")
        h.stop_process(first, sig=signal.SIGKILL)  # the whole worker (parent and pool child) dies at once
        row = h.job_row(settings, job["id"])
        assert row.status == "running" and row.attempts == 1
        saved = json.loads(store.read_bytes(pointer))["epoch"]
        assert 1 <= saved < 3

        second = h.start_worker(env, second_log)
        done = api.follow(job["id"], timeout=420)
    finally:
        h.stop_process(first)
        if second is not None:
            h.stop_process(second)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    names = [a["name"] for a in done["artifacts"]]
    assert sorted(names) == ["model_card.json", "report.html", "report.json", "student.onnx", "student.safetensors"]
    assert len(h.artifacts_of(settings, job["id"])) == 5
    text = second_log.read_text(errors="replace")
    assert "resuming from checkpoint" in text
    assert f"epoch {saved + 1}/3" in text and "epoch 1/3" not in text  # went on after the checkpoint
    assert not store.exists(pointer)  # checkpoints are removed once the job succeeded
