"""Issue 11's long-job acceptance through the REST API, a real Celery worker, PostgreSQL and Redis.

A job whose time budget is shorter than its training stops with status `stopped` and a sentence
saying where; `POST /v1/jobs/{id}/resume` continues it from its checkpoint (inside an epoch: the same
batches), and its final weights equal, bit for bit, those of an uninterrupted job with the same seed
on the CPU.
"""

from __future__ import annotations

import json

import e2e_flow as flow
import kdiga_svc_helpers as h
import pytest

from kdiga_client import Client, JobStoppedError
from kdiga_launcher.supervisor import start_embedded

pytestmark = [
    pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(900),
    pytest.mark.skipif(not (h.postgres_available() and h.redis_available()),
                       reason="needs the PostgreSQL and Redis servers"),
]

ENDED = {"succeeded", "failed", "cancelled", "stopped"}


@pytest.fixture(scope="module")
def service(tmp_path_factory, teacher_file):
    """The API (no embedded broker) on a fresh PostgreSQL database and Redis db, and one worker."""
    home = tmp_path_factory.mktemp("longjobs")
    with h.postgres_database() as db_url, h.redis_database() as broker_url:
        settings = h.make_settings(home, database_url=db_url, broker_url=broker_url, progress_interval_s=0.3,
                                   max_time_budget_s=7200,
                                   **{k.removeprefix("KDIGA_").lower(): v for k, v in h.unique_queues().items()})
        env = h.settings_env(settings)
        running = start_embedded(home, port=0, workers=0, env=env)
        worker = h.start_worker(env, home / "worker.log")
        try:
            api = flow.Api(running.url, running.admin_key)
            ids = flow.setup_inputs(api, teacher_file)
            yield {"api": api, "ids": ids, "url": running.url, "key": running.admin_key, "home": home}
        finally:
            h.stop_process(worker)
            running.stop()


def _weights(api: flow.Api, job: dict, dest):
    from safetensors.torch import load_file

    artifact = next(a for a in job["artifacts"] if a["name"] == "student.safetensors")
    return load_file(str(api.download(artifact, dest)))


def test_budget_stops_and_resume_matches_an_uninterrupted_run(service, tmp_path):
    import torch

    api, ids = service["api"], service["ids"]
    # kd on batches of 64: 2 epochs of 22 steps; a 1 ms budget is spent before the first step ends
    request = h.tiny_job_request(ids["dataset_id"], ids["teacher_id"], epochs=2, method="kd")
    job = api.submit({**request, "name": "budgeted", "limits": {"time_budget_s": 0.001}})
    assert job["spec"]["limits"]["checkpoint_every_s"] == 600.0  # KDIGA_CHECKPOINT_EVERY_S filled in
    reference = api.submit({**request, "name": "uninterrupted"})

    stopped = api.wait(f"/v1/jobs/{job['id']}", ENDED, 300)
    assert stopped["status"] == "stopped", stopped["error"]
    assert stopped["error"].startswith("The job reached its time budget of 0.001 seconds (limits.time_budget_s); "
                                       "training stopped after step 1 of 44 and saved a checkpoint")
    with Client(service["url"], service["key"]) as client, pytest.raises(JobStoppedError, match="kdiga jobs resume"):
        client.wait_job(job["id"], timeout=60)

    # a second stop, inside the first epoch again: the resumed run continues from step 1 and stops after step 2
    again = api.ok(api.http.post(f"/v1/jobs/{job['id']}/resume"), 202)
    assert again["status"] == "queued" and again["error"] is None
    stopped = api.wait(f"/v1/jobs/{job['id']}", ENDED, 300)
    assert stopped["status"] == "stopped" and "after step 2 of 44" in stopped["error"], stopped["error"]

    too_long = api.http.post(f"/v1/jobs/{job['id']}/resume", json={"time_budget_s": 10**6})
    assert too_long.status_code == 422 and "KDIGA_MAX_TIME_BUDGET_S" in too_long.json()["detail"]
    with Client(service["url"], service["key"]) as client:  # the SDK, with a budget that lets it finish
        assert client.resume_job(job["id"], time_budget_s=3600).status == "queued"
    done = api.follow(job["id"], timeout=420)
    assert done["status"] == "succeeded", done["error"]
    assert done["spec"]["limits"]["time_budget_s"] == 3600
    base = api.follow(reference["id"], timeout=420)
    assert base["status"] == "succeeded", base["error"]

    conflict = api.http.post(f"/v1/jobs/{job['id']}/resume")
    assert conflict.status_code == 409 and "only a stopped job" in conflict.json()["detail"]
    mine, theirs = _weights(api, done, tmp_path / "a.safetensors"), _weights(api, base, tmp_path / "b.safetensors")
    assert sorted(mine) == sorted(theirs)
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    assert done["metrics"]["student_clean_accuracy"] == base["metrics"]["student_clean_accuracy"]
    card_artifact = next(a for a in done["artifacts"] if a["name"] == "model_card.json")
    card = json.loads(api.download(card_artifact, tmp_path / "model_card.json").read_text())
    assert card["training"]["resumed_from_step"] == 2 and card["training"]["steps"] == 44
