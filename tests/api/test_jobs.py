"""POST/GET /v1/jobs, cancel, events (SSE), report; messages checked in the real Redis."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
from api_helpers import distill_body, finish, new_key, ready_dataset, ready_teacher, upload_teacher
from fastapi.testclient import TestClient

from api.main import create_app
from api.schemas import EvalConfigSchema, ObjectiveConfigSchema, SweepConfigSchema, TrainConfigSchema
from kdiga_service import crud
from kdiga_service.catalog import load_catalog, unknown_name_message


@pytest.fixture
def ready(client, owner):
    return ready_dataset(client, owner), ready_teacher(client, owner)


def _queued_job_ids(redis_client, queue: str) -> list[str]:
    ids = []
    for raw in redis_client.lrange(queue, 0, -1):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        assert message["headers"]["task"] in (
            "kdiga.run_job",
            "kdiga.validate_teacher",
            "kdiga.validate_dataset",
        )
        ids.append(args[0])
    return ids


def test_create_distill_job_enqueues_by_name(client, owner, ready, redis_client, settings):
    dataset_id, teacher_id = ready
    r = client.post("/v1/jobs", headers=owner, json=distill_body(dataset_id, teacher_id, name="demo"))
    assert r.status_code == 201, r.text
    job = r.json()
    assert (
        job["status"] == "queued"
        and job["kind"] == "distill"
        and job["name"] == "demo"
        and job["attempts"] == 0
    )
    # γ "auto" is the default, and its sweep is written out (its budget is part of the work estimate)
    # what the request left out is sized to the data (8×8 digits, 1000 train / 797 test) and written out
    threat = {"norm": "Linf", "eps": 0.1, "step": 2.5 * 0.1 / 7}
    assert job["spec"]["threat_model"] == threat
    assert job["spec"]["objective"] == {**ObjectiveConfigSchema().model_dump(), "sweep": SweepConfigSchema().model_dump(),
                                        "attack_norm": "Linf", "attack_eps": 0.1, "attack_step": threat["step"],
                                        "attack_steps": 7}
    assert job["spec"]["train"] == TrainConfigSchema(epochs=1, optimizer="adamw", lr=0.003, weight_decay=0.05,
                                                     batch_size=64).model_dump()
    attacks = [{"name": "pgd", "norm": "Linf", "eps": 0.1, "steps": 20},
               {"name": "autoattack", "norm": "Linf", "eps": 0.1, "max_seconds": 60.0}]
    assert job["spec"]["evaluation"] == EvalConfigSchema(attacks=attacks, max_points=797).model_dump()
    assert "train.lr" in job["spec"]["defaulted"] and "train.epochs" not in job["spec"]["defaulted"]
    assert job["spec"]["student"]["arch"] == "cnn_tiny" and job["artifacts"] == []
    assert job["id"] in _queued_job_ids(redis_client, settings.queue_train)
    raw = [json.loads(m) for m in redis_client.lrange(settings.queue_train, 0, -1)]
    assert any(m["headers"]["task"] == "kdiga.run_job" and job["id"] in m["headers"]["argsrepr"] for m in raw)


def test_create_adversarial_train_and_evaluate_jobs(client, owner, ready, redis_client, settings):
    dataset_id, teacher_id = ready
    r = client.post(
        "/v1/jobs",
        headers=owner,
        json={
            "kind": "adversarial_train",
            "dataset_id": dataset_id,
            "student": {"arch": "cnn_small"},
            "objective": {"gamma": 0},
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["objective"]["method"] == "pgd_at" and r.json()["spec"]["objective"]["gamma"] == 0
    r = client.post(
        "/v1/jobs",
        headers=owner,
        json={
            "kind": "evaluate",
            "dataset_id": dataset_id,
            "model": {"teacher_id": teacher_id},
            "evaluation": {"attacks": [{"name": "fgsm", "eps": 0.1}], "max_points": 10},
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["evaluation"]["attacks"][0]["name"] == "fgsm"
    assert r.json()["id"] in _queued_job_ids(redis_client, settings.queue_eval)


def test_evaluate_a_finished_job(client, owner, ready):
    dataset_id, teacher_id = ready
    source = client.post("/v1/jobs", headers=owner, json=distill_body(dataset_id, teacher_id)).json()["id"]
    body = {"kind": "evaluate", "dataset_id": dataset_id, "model": {"job_id": source}}
    r = client.post("/v1/jobs", headers=owner, json=body)
    assert r.status_code == 409 and r.json() == {
        "detail": f"Job '{source}' has not produced a model (status queued)."
    }
    finish(client, source)
    assert client.post("/v1/jobs", headers=owner, json=body).status_code == 201
    r = client.post(
        "/v1/jobs", headers=owner, json={**body, "model": {"job_id": source, "teacher_id": teacher_id}}
    )
    assert r.status_code == 422
    assert r.json() == {
        "detail": "Invalid value for 'model': model must name exactly one of teacher_id or job_id."
    }


@pytest.mark.parametrize(
    "patch, detail",
    [
        (
            {"student": {"arch": "resnet9000"}},
            unknown_name_message("architectures", "resnet9000"),
        ),
        (
            {"evaluation": {"attacks": [{"name": "deepfool"}]}},
            unknown_name_message("attacks", "deepfool"),
        ),
        ({"objective": {"method": "magic"}}, "Unknown method 'magic'; valid names are: {methods}."),
        (
            {"objective": {"method": "pgd_at"}},
            "Method 'pgd_at' cannot be used by a distill job; valid methods are: ard, ce, kd, kdiga, rslad.",
        ),
        (
            {"objective": {"alpha": 2}},
            "Invalid value for 'objective.alpha': input should be less than or equal to 1.",
        ),
        (
            {"train": {"epochs": 0}},
            "Invalid value for 'train.epochs': input should be greater than or equal to 1.",
        ),
        ({"train": {"warmup": 3}}, "Unknown field 'train.warmup'."),
        ({"objective": {"gamma": -1}}, 'Invalid value for \'objective\': gamma must be zero or positive, or "auto".'),
        ({"objective": {"gamma": 5, "sweep": {"points": 3}}},
         'Invalid value for \'objective\': objective.sweep is only read with gamma "auto".'),
        ({"objective": {"sweep": {"budget": 100}}},
         "Invalid value for 'objective.sweep.budget': input should be less than or equal to 20."),
        ({"objective": {"sweep": {"gammas": [0, 1]}}},
         "Invalid value for 'objective.sweep': sweep.gammas must be positive (γ = 0, plain KD, is always tried)."),
        ({"kind": "prune"}, "Unknown kind 'prune'; valid names are: adversarial_train, distill, evaluate."),
        ({"teacher_id": None}, "A distill job needs 'teacher_id'."),
        ({"student": None}, "A distill job needs 'student' with an 'arch'."),
        ({"dataset_id": None}, "Invalid value for 'dataset_id': input should be a valid string."),
    ],
)
def test_create_job_invalid_422(client, owner, ready, patch, detail):
    body = {**distill_body(*ready), **patch}
    body = {k: v for k, v in body.items() if v is not None or k == "dataset_id"}
    r = client.post("/v1/jobs", headers=owner, json=body)
    catalog = {k: ", ".join(v) for k, v in load_catalog().items()}
    assert r.status_code == 422
    assert r.json() == {"detail": detail.format(**catalog) if "{" in detail else detail}


def test_create_job_wrong_content_type_415(client, owner, ready):
    r = client.post(
        "/v1/jobs", headers={**owner, "Content-Type": "text/plain"}, content=json.dumps(distill_body(*ready))
    )
    assert r.status_code == 415
    assert r.json() == {"detail": "Send the job as JSON with 'Content-Type: application/json'."}
    r = client.post("/v1/jobs", headers={**owner, "Content-Type": "application/json"}, content=b"{oops")
    assert r.status_code == 422 and r.json() == {"detail": "The request body is not valid JSON."}


def test_create_job_resources_must_be_owned_and_ready(client, owner, other, ready):
    dataset_id, teacher_id = ready
    r = client.post("/v1/jobs", headers=other, json=distill_body(dataset_id, teacher_id))
    assert r.status_code == 404 and r.json() == {"detail": f"Dataset '{dataset_id}' not found."}
    other_dataset = ready_dataset(client, other)
    r = client.post("/v1/jobs", headers=other, json=distill_body(other_dataset, teacher_id))
    assert r.status_code == 404 and r.json() == {"detail": f"Teacher '{teacher_id}' not found."}
    validating = upload_teacher(client, owner).json()["id"]
    r = client.post("/v1/jobs", headers=owner, json=distill_body(dataset_id, validating))
    assert r.status_code == 409
    assert r.json() == {
        "detail": f"Teacher '{validating}' is not ready (status validating); "
        "wait until its validation finishes."
    }
    with client.app.state.sessionmaker() as session:
        crud.set_teacher_validated(session, validating, error="The file has no tensor named 'fc.weight'.")
    r = client.post("/v1/jobs", headers=owner, json=distill_body(dataset_id, validating))
    assert r.status_code == 409
    assert r.json() == {
        "detail": f"Teacher '{validating}' is not ready (status invalid): "
        "The file has no tensor named 'fc.weight'."
    }
    pending = client.post("/v1/datasets", headers=owner, json={"builtin": "cifar10"}).json()["id"]
    r = client.post("/v1/jobs", headers=owner, json=distill_body(pending, teacher_id))
    assert r.status_code == 409
    assert r.json() == {
        "detail": f"Dataset '{pending}' is not ready (status validating); wait until its validation finishes."
    }


def test_idempotency_key(client, owner, other, ready, redis_client, settings):
    body = distill_body(*ready)
    headers = {**owner, "Idempotency-Key": "abc-123"}
    first = client.post("/v1/jobs", headers=headers, json=body)
    again = client.post("/v1/jobs", headers=headers, json=dict(reversed(list(body.items()))))
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert _queued_job_ids(redis_client, settings.queue_train).count(first.json()["id"]) == 1
    r = client.post("/v1/jobs", headers=headers, json={**body, "name": "different"})
    assert r.status_code == 409
    assert r.json() == {"detail": "Idempotency-Key 'abc-123' was already used with a different request."}
    # The same request with every default written out is the same request (the normalised spec is hashed).
    stored = first.json()["spec"]
    spelled_out = {**body, **{part: stored[part] for part in ("objective", "evaluation", "train", "threat_model")}}
    r = client.post("/v1/jobs", headers=headers, json=spelled_out)
    assert r.status_code == 200 and r.json()["id"] == first.json()["id"]
    other_ready = (ready_dataset(client, other), ready_teacher(client, other))
    r = client.post(
        "/v1/jobs", headers={**other, "Idempotency-Key": "abc-123"}, json=distill_body(*other_ready)
    )
    assert r.status_code == 201 and r.json()["id"] != first.json()["id"]


def test_concurrent_job_limit_429(client, owner, ready):
    body = distill_body(*ready)
    ids = [client.post("/v1/jobs", headers=owner, json=body).json()["id"] for _ in range(2)]
    r = client.post("/v1/jobs", headers=owner, json=body)
    assert r.status_code == 429
    assert r.json() == {
        "detail": "This API key already has 2 active jobs, its limit; wait for one to finish or cancel one."
    }
    assert client.post(f"/v1/jobs/{ids[0]}/cancel", headers=owner).status_code == 202
    assert client.post("/v1/jobs", headers=owner, json=body).status_code == 201


def test_per_key_limit_overrides_default(client):
    headers, _ = new_key(client, "solo", max_concurrent_jobs=1)
    body = distill_body(ready_dataset(client, headers), ready_teacher(client, headers))
    assert client.post("/v1/jobs", headers=headers, json=body).status_code == 201
    r = client.post("/v1/jobs", headers=headers, json=body)
    assert r.status_code == 429 and "already has 1 active jobs" in r.json()["detail"]


def test_list_and_read_jobs(client, owner, other, ready):
    ids = [client.post("/v1/jobs", headers=owner, json=distill_body(*ready)).json()["id"] for _ in range(2)]
    finish(client, ids[0])
    page = client.get("/v1/jobs?limit=1", headers=owner).json()
    assert page["count"] == 2 and [j["id"] for j in page["data"]] == [ids[1]]
    assert client.get("/v1/jobs?offset=1", headers=owner).json()["data"][0]["id"] == ids[0]
    done = client.get("/v1/jobs?status=succeeded", headers=owner).json()
    assert done["count"] == 1 and done["data"][0]["id"] == ids[0]
    job = client.get(f"/v1/jobs/{ids[0]}", headers=owner).json()
    assert job["status"] == "succeeded" and job["attempts"] == 1 and job["result"] == {"ok": True}
    assert job["finished_at"] is not None and job["started_at"] is not None
    assert client.get("/v1/jobs", headers=other).json() == {"data": [], "count": 0}


def test_another_owners_job_is_404(client, owner, other, ready):
    job_id = client.post("/v1/jobs", headers=owner, json=distill_body(*ready)).json()["id"]
    detail = {"detail": f"Job '{job_id}' not found."}
    for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/events"), ("GET", "/report")):
        r = client.request(method, f"/v1/jobs/{job_id}{path}", headers=other)
        assert (r.status_code, r.json()) == (404, detail), path


def test_cancel_queued_running_and_finished(client, owner, ready):
    body = distill_body(*ready)
    queued = client.post("/v1/jobs", headers=owner, json=body).json()["id"]
    r = client.post(f"/v1/jobs/{queued}/cancel", headers=owner)
    assert r.status_code == 202 and r.json()["status"] == "cancelled" and r.json()["cancel_requested"]
    with client.app.state.sessionmaker() as session:  # the worker later receives the message: not claimable
        assert crud.claim_job(session, queued, "w") is None
    running = client.post("/v1/jobs", headers=owner, json=body).json()["id"]
    with client.app.state.sessionmaker() as session:
        assert crud.claim_job(session, running, "w") is not None
    r = client.post(f"/v1/jobs/{running}/cancel", headers=owner)
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    with client.app.state.sessionmaker() as session:
        assert crud.is_cancel_requested(session, running)
        assert crud.mark_cancelled(session, running, worker_id="w")
    r = client.post(f"/v1/jobs/{running}/cancel", headers=owner)
    assert r.status_code == 409
    assert r.json() == {
        "detail": f"Job '{running}' already finished (status cancelled), so it cannot be cancelled."
    }


def test_resume_only_a_stopped_job_and_enqueue_it_again(client, owner, other, ready, redis_client, settings):
    body = {**distill_body(*ready), "limits": {"time_budget_s": 60}}
    job = client.post("/v1/jobs", headers=owner, json=body).json()
    assert job["spec"]["limits"] == {"time_budget_s": 60, "checkpoint_every_s": settings.checkpoint_every_s}
    r = client.post(f"/v1/jobs/{job['id']}/resume", headers=owner)
    assert r.status_code == 409 and r.json() == {"detail": f"Job '{job['id']}' is queued; only a stopped job, or "
                                                           "one that failed after its training was stored, can be resumed."}
    with client.app.state.sessionmaker() as session:
        assert crud.claim_job(session, job["id"], "w") is not None
        assert crud.stop_job(session, job["id"], reason="The job reached its time budget.", worker_id="w")
    stopped = client.get(f"/v1/jobs/{job['id']}", headers=owner).json()
    assert (stopped["status"], stopped["error"]) == ("stopped", "The job reached its time budget.")
    assert client.get("/v1/jobs?status=stopped", headers=owner).json()["count"] == 1
    assert client.post(f"/v1/jobs/{job['id']}/resume", headers=other).status_code == 404
    too_long = client.post(f"/v1/jobs/{job['id']}/resume", headers=owner,
                           json={"time_budget_s": settings.max_time_budget_s + 1})
    assert too_long.status_code == 422 and "KDIGA_MAX_TIME_BUDGET_S" in too_long.json()["detail"]
    redis_client.delete(settings.queue_train)
    r = client.post(f"/v1/jobs/{job['id']}/resume", headers=owner, json={"time_budget_s": 120})
    assert r.status_code == 202, r.text
    resumed = r.json()
    assert (resumed["status"], resumed["error"], resumed["attempts"]) == ("queued", None, 0)
    assert resumed["spec"]["limits"]["time_budget_s"] == 120
    assert _queued_job_ids(redis_client, settings.queue_train) == [job["id"]]
    with client.app.state.sessionmaker() as session:  # the worker's claim takes it like a new job
        assert crud.claim_job(session, job["id"], "w2") is not None
        assert crud.stop_job(session, job["id"], reason="Stopped again.", worker_id="w2")
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=owner)  # a stopped job can be ended for good
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{job['id']}/resume", headers=owner).status_code == 409


def test_job_budget_above_the_operator_maximum_is_422(client, owner, ready, settings):
    body = {**distill_body(*ready), "limits": {"time_budget_s": settings.max_time_budget_s + 1}}
    r = client.post("/v1/jobs", headers=owner, json=body)
    assert r.status_code == 422
    assert r.json()["detail"] == (f"limits.time_budget_s is {settings.max_time_budget_s + 1} seconds but this service "
                                  f"allows at most {settings.max_time_budget_s} (KDIGA_MAX_TIME_BUDGET_S).")


def _events(client, headers, job_id):
    events, current = [], {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                current = {"event": line[7:]}
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
                events.append(current)
    return events


def test_events_of_a_finished_job(client, owner, ready):
    job_id = client.post("/v1/jobs", headers=owner, json=distill_body(*ready)).json()["id"]
    finish(client, job_id)
    events = _events(client, owner, job_id)
    assert [e["event"] for e in events] == ["progress", "end"]
    assert events[-1]["data"]["status"] == "succeeded"


def test_events_follow_progress(client, owner, ready):
    job_id = client.post("/v1/jobs", headers=owner, json=distill_body(*ready)).json()["id"]

    def work():
        with client.app.state.sessionmaker() as session:
            time.sleep(0.2)
            crud.claim_job(session, job_id, "w")
            for step in (1, 2):
                time.sleep(0.2)
                crud.update_progress(
                    session,
                    job_id,
                    progress={"phase": "train", "step": step, "percent": 50.0 * step},
                    worker_id="w",
                )
            time.sleep(0.2)
            crud.finish_job(session, job_id, result={}, worker_id="w")

    thread = threading.Thread(target=work)
    thread.start()
    events = _events(client, owner, job_id)
    thread.join()
    assert events[0]["data"]["status"] == "queued" and events[-1]["event"] == "end"
    steps = [e["data"]["progress"].get("step") for e in events if e["event"] == "progress"]
    assert 1 in steps and 2 in steps
    assert events[-1]["data"]["status"] == "succeeded"


def test_report(client, owner, ready):
    job_id = client.post("/v1/jobs", headers=owner, json=distill_body(*ready)).json()["id"]
    r = client.get(f"/v1/jobs/{job_id}/report", headers=owner)
    assert r.status_code == 404 and r.json() == {"detail": f"Job '{job_id}' has no report yet."}
    report = {"schema": "kdiga.report/1", "n_points": 10}
    finish(
        client,
        job_id,
        artifacts={
            "report_json": json.dumps(report).encode(),
            "report_html": b"<html><body>report</body></html>",
        },
    )
    assert client.get(f"/v1/jobs/{job_id}/report", headers=owner).json() == report
    r = client.get(f"/v1/jobs/{job_id}/report?format=html", headers=owner)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "report" in r.text
    r = client.get(f"/v1/jobs/{job_id}/report?format=pdf", headers=owner)
    assert r.status_code == 422 and r.json() == {
        "detail": "Unknown format 'pdf'; valid names are: html, json."
    }


def test_broker_down_creates_nothing(tmp_path):
    from api_helpers import MAX_UPLOAD

    from kdiga_service.settings import Settings

    settings = Settings(home=tmp_path, broker_url="redis://127.0.0.1:1/0", max_upload_bytes=MAX_UPLOAD)
    with TestClient(create_app(settings)) as client:
        headers, _ = new_key(client)
        r = client.post("/v1/datasets", headers=headers, json={"builtin": "digits"})
        assert r.status_code == 503
        assert r.json() == {
            "detail": "The job queue is unavailable, so nothing was created; try again shortly."
        }
        assert client.get("/v1/datasets", headers=headers).json()["count"] == 0
        r = upload_teacher(client, headers)
        assert r.status_code == 503 and client.get("/v1/teachers", headers=headers).json()["count"] == 0
        assert not [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
