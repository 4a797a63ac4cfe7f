"""POST /v1/pipelines: planning and its sentences, steps created by crud as inputs become ready,
skipping after a failure, cancel, SSE. Jobs finish through crud's worker-side helpers here;
tests/e2e/test_pipeline_e2e.py runs a three-step pipeline on a real worker."""

from __future__ import annotations

import base64
import json
import time

import pytest
from api_helpers import ready_dataset, ready_teacher
from sqlalchemy import select

from kdiga_service import crud
from kdiga_service.models import Job
from kdiga_service.pipelines import produced_teacher_id

TINY = {"train": {"epochs": 1}}


def _steps(dataset_id: str) -> list[dict]:
    return [
        {"name": "teacher", "kind": "adversarial_train", "dataset_id": dataset_id, "student": {"arch": "cnn_small"},
         **TINY},
        {"name": "small", "kind": "distill", "dataset_id": dataset_id, "teacher_id": {"step": "teacher"},
         "student": {"arch": "cnn_tiny"}, **TINY},
        {"name": "warm", "kind": "distill", "dataset_id": dataset_id, "teacher_id": {"step": "teacher"},
         "student": {"arch": "cnn_small", "weights_id": {"step": "teacher"}}, **TINY},
        {"name": "eval-small", "kind": "evaluate", "dataset_id": dataset_id, "teacher_id": {"step": "teacher"},
         "model": {"job_id": {"step": "small"}}},
        {"name": "eval-warm", "kind": "evaluate", "dataset_id": dataset_id, "teacher_id": {"step": "teacher"},
         "model": {"job_id": {"step": "warm"}}},
    ]


@pytest.fixture
def dataset_id(client, owner):
    return ready_dataset(client, owner)


def _job(client, job_id):
    with client.app.state.sessionmaker() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def _finish(client, job_id, *, ok=True):
    with client.app.state.sessionmaker() as session:
        assert crud.claim_job(session, job_id, "w") is not None
        if ok:
            assert crud.finish_job(session, job_id, result={"metrics": {}}, worker_id="w")
        else:
            assert crud.fail_job(session, job_id, error="The student diverged.", worker_id="w")


def _states(client, owner, pipeline_id):
    body = client.get(f"/v1/pipelines/{pipeline_id}", headers=owner).json()
    return body["status"], {s["name"]: s["status"] for s in body["steps"]}


def test_steps_start_when_their_inputs_are_ready(client, owner, dataset_id):
    r = client.post("/v1/pipelines", headers=owner, json={"name": "chain", "labels": {"run": "42"},
                                                          "steps": _steps(dataset_id)})
    assert r.status_code == 201, r.text
    pipe = r.json()
    assert pipe["status"] == "running" and pipe["labels"] == {"run": "42"}
    steps = {s["name"]: s for s in pipe["steps"]}
    assert steps["teacher"]["status"] == "queued" and steps["small"]["status"] == "waiting"
    assert steps["eval-small"]["depends_on"] == ["small", "teacher"]
    teacher_job = _job(client, steps["teacher"]["job_id"])
    assert teacher_job.pipeline_id == pipe["id"] and teacher_job.labels == {"run": "42"}
    assert teacher_job.name == "chain / teacher"

    _finish(client, teacher_job.id)
    status, states = _states(client, owner, pipe["id"])
    assert status == "running" and states["small"] == states["warm"] == "queued"  # both students at once
    assert states["eval-small"] == "waiting"
    small = _job(client, steps["small"]["job_id"])
    assert small.spec["teacher_id"] == produced_teacher_id(teacher_job.id) == small.teacher_id
    assert _job(client, steps["warm"]["job_id"]).spec["student"]["weights_id"] == produced_teacher_id(teacher_job.id)

    _finish(client, small.id)
    evaluation = _job(client, steps["eval-small"]["job_id"])
    assert evaluation.spec["model"]["job_id"] == small.id and evaluation.kind == "evaluate"
    _finish(client, steps["warm"]["job_id"], ok=False)
    status, states = _states(client, owner, pipe["id"])
    assert states["eval-warm"] == "skipped" and status == "running"  # eval-small still runs
    _finish(client, evaluation.id)
    body = client.get(f"/v1/pipelines/{pipe['id']}", headers=owner).json()
    assert body["status"] == "failed" and body["error"] == "Step 'warm' failed: The student diverged."
    assert body["percent"] == 100.0 and body["finished_at"]
    listed = client.get("/v1/pipelines?label=run=42", headers=owner).json()
    assert [p["id"] for p in listed["data"]] == [pipe["id"]]
    stream = client.get(f"/v1/pipelines/{pipe['id']}/events", headers=owner).text
    assert "event: end" in stream and '"status":"failed"' in stream


def test_the_pump_sends_new_steps_to_the_queue(client, owner, dataset_id, redis_client, settings):
    r = client.post("/v1/pipelines", headers=owner, json={"steps": _steps(dataset_id)[:2]})
    first = r.json()["steps"][0]["job_id"]
    deadline = time.monotonic() + 10
    while _job(client, first).enqueued_at is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _job(client, first).enqueued_at is not None
    sent = [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0]
            for m in redis_client.lrange(settings.queue_train, 0, -1)]
    assert first in sent  # kdiga.run_job(first step's job) went to the training queue
    client.post(f"/v1/pipelines/{r.json()['id']}/cancel", headers=owner)


def test_cancel_stops_the_pipeline(client, owner, dataset_id):
    pipe = client.post("/v1/pipelines", headers=owner, json={"steps": _steps(dataset_id)}).json()
    r = client.post(f"/v1/pipelines/{pipe['id']}/cancel", headers=owner)
    assert r.status_code == 202
    assert r.json()["status"] == "cancelled" and {s["status"] for s in r.json()["steps"]} == {"cancelled", "skipped"}
    again = client.post(f"/v1/pipelines/{pipe['id']}/cancel", headers=owner)
    assert again.status_code == 409 and "already finished" in again.json()["detail"]
    with client.app.state.sessionmaker() as session:
        assert len(session.scalars(select(Job).where(Job.pipeline_id == pipe["id"])).all()) == 1


def test_a_running_step_is_cancelled_and_nothing_follows(client, owner, dataset_id):
    pipe = client.post("/v1/pipelines", headers=owner, json={"steps": _steps(dataset_id)}).json()
    teacher = pipe["steps"][0]["job_id"]
    with client.app.state.sessionmaker() as session:
        crud.claim_job(session, teacher, "w")
    assert client.post(f"/v1/pipelines/{pipe['id']}/cancel", headers=owner).json()["status"] == "running"
    assert _job(client, teacher).status == "cancelling"
    with client.app.state.sessionmaker() as session:
        crud.mark_cancelled(session, teacher, worker_id="w")
    status, states = _states(client, owner, pipe["id"])
    assert status == "cancelled" and states["small"] == "skipped"


@pytest.mark.parametrize("change, words", [
    (lambda s: s[1].update(teacher_id={"step": "eval-small"}), "'teacher_id' refers to step 'eval-small', which is not an earlier step"),
    (lambda s: s[3].update(teacher_id={"step": "small"}), "only adversarial_train steps make teachers"),
    (lambda s: s[3]["model"].update(job_id={"step": "eval-small"}), "which is not an earlier step"),
    (lambda s: s[2].update(name="small"), "Two steps are named 'small'"),
    (lambda s: s[1]["student"].update(arch="no_such_arch"), "Step 'small': Unknown architecture 'no_such_arch'"),
    (lambda s: s[1].update(train={"epochs": 0}), "Step 'small': Invalid value for 'train.epochs'"),
    (lambda s: s[0].update(dataset_id="nope"), "Step 'teacher': Dataset 'nope' not found."),
    (lambda s: s[1].update(name="bad name"), "Invalid value for 'steps.1.name'"),
])
def test_bad_pipelines_get_one_sentence_and_create_nothing(client, owner, dataset_id, change, words):
    steps = _steps(dataset_id)
    change(steps)
    before = client.get("/v1/jobs", headers=owner).json()["count"]
    r = client.post("/v1/pipelines", headers=owner, json={"steps": steps})
    assert r.status_code in (404, 422), r.text
    assert words in r.json()["detail"], r.json()["detail"]
    assert client.get("/v1/jobs", headers=owner).json()["count"] == before
    assert client.get("/v1/pipelines", headers=owner).json()["count"] == 0


def test_another_key_sees_no_pipeline(client, owner, other, dataset_id):
    pipe = client.post("/v1/pipelines", headers=owner, json={"steps": _steps(dataset_id)[:1]}).json()
    assert client.get(f"/v1/pipelines/{pipe['id']}", headers=other).status_code == 404
    assert client.post(f"/v1/pipelines/{pipe['id']}/cancel", headers=other).status_code == 404
    assert client.get("/v1/pipelines", headers=other).json()["count"] == 0
    client.post(f"/v1/pipelines/{pipe['id']}/cancel", headers=owner)


def test_existing_teacher_ids_still_work_in_a_step(client, owner, dataset_id):
    teacher_id = ready_teacher(client, owner)
    steps = [{"name": "s", "kind": "distill", "dataset_id": dataset_id, "teacher_id": teacher_id,
              "student": {"arch": "cnn_tiny"}, **TINY}]
    pipe = client.post("/v1/pipelines", headers=owner, json={"steps": steps})
    assert pipe.status_code == 201, pipe.text
    assert _job(client, pipe.json()["steps"][0]["job_id"]).teacher_id == teacher_id
    client.post(f"/v1/pipelines/{pipe.json()['id']}/cancel", headers=owner)


def test_a_step_can_describe_a_vit_with_kwargs(client, owner, dataset_id):
    step = {"name": "vit", "kind": "adversarial_train", "dataset_id": dataset_id, **TINY,
            "student": {"arch": "vit_tiny_patch16_224", "kwargs": {"patch_size": 4, "depth": 2}}}
    r = client.post("/v1/pipelines", headers=owner, json={"steps": [step]})
    assert r.status_code == 201, r.text
    job = _job(client, r.json()["steps"][0]["job_id"])
    assert job.spec["student"]["kwargs"] == {"patch_size": 4, "depth": 2}
    step["student"]["kwargs"] = {"pretrained": True}
    r = client.post("/v1/pipelines", headers=owner, json={"steps": [step]})
    assert r.status_code == 422 and "kwargs.pretrained is not a keyword a model spec may set" in r.json()["detail"]
