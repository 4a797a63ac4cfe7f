"""Webhooks: signing secrets, the SSRF policy at creation and at delivery, signed events in order,
retries with backoff, the outbox's transaction and its claims. A real receiver on loopback; the
job's life cycle is driven through crud's worker-side helpers (tests/e2e runs a real worker)."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time

import pytest
from api_helpers import distill_body, make_settings, new_key, ready_dataset, ready_teacher
from fastapi.testclient import TestClient
from receiver import Receiver
from sqlalchemy import select

from api.main import create_app
from kdiga_client.webhooks import verify_webhook
from kdiga_service import crud, outbox
from kdiga_service.models import Job, WebhookEvent
from kdiga_service.webhooks import UrlPolicy, UrlRefused, check_url, deliver, verify_signature

BACKOFF_S = 0.2
MAX_ATTEMPTS = 4


@pytest.fixture(scope="module")
def hooks(backend, request, tmp_path_factory, redis_client):
    """An app whose allow-list holds 127.0.0.1 only, with fast retries and a fast pump, on its own
    database (the shared app's pump, with its own policy, must not take these events)."""
    home = tmp_path_factory.mktemp(f"hooks-{backend}")
    url = request.getfixturevalue("pg_database")("hooks") if backend == "postgres" else f"sqlite:///{home}/kdiga.db"
    settings = make_settings(home, url, webhook_allowed_hosts=["127.0.0.1/32"], webhook_backoff_s=BACKOFF_S,
                             webhook_max_attempts=MAX_ATTEMPTS, webhook_poll_interval_s=0.05,
                             webhook_timeout_s=5, max_concurrent_jobs_per_key=50)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def user(hooks):
    headers, key_id = new_key(hooks, "hooks")
    secret = hooks.post("/v1/webhooks/secret", headers=headers).json()["secret"]
    return {"headers": headers, "key_id": key_id, "secret": secret,
            "dataset_id": ready_dataset(hooks, headers), "teacher_id": ready_teacher(hooks, headers)}


def _job(client, user, url, events=None, **extra):
    notify = {"url": url, **({"events": events} if events else {})}
    body = distill_body(user["dataset_id"], user["teacher_id"], notify=notify, **extra)
    return client.post("/v1/jobs", headers=user["headers"], json=body)


def _own_hmac(secret: str, header: str, body: bytes) -> bool:
    """An independent check of the documented scheme: HMAC-SHA256(secret, "<t>." + body)."""
    fields = [part.split("=", 1) for part in header.split(",")]
    t = next(v for k, v in fields if k == "t")
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return abs(time.time() - int(t)) < 300 and any(v == expected for k, v in fields if k == "v1")


def _sessions(client):
    return client.app.state.sessionmaker


def _log(client, user, job_id, attempts: int) -> dict:
    """The deliveries log once it holds `attempts` attempts (recorded just after the receiver answers)."""
    deadline = time.monotonic() + 10
    while True:
        log = client.get(f"/v1/jobs/{job_id}/deliveries", headers=user["headers"]).json()
        if log["count"] >= attempts or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


def _run_life_cycle(client, job_id):
    with _sessions(client)() as session:
        assert crud.claim_job(session, job_id, "w1") is not None
        assert crud.update_progress(session, job_id, progress={"phase": "train", "percent": 50.0}, worker_id="w1",
                                    milestone=True)
        assert crud.update_progress(session, job_id, progress={"phase": "train", "percent": 60.0}, worker_id="w1")
        assert crud.finish_job(session, job_id, result={"metrics": {"student_clean_accuracy": 0.9}}, worker_id="w1")


def test_secret_is_shown_once_and_rotates_with_a_grace_period(hooks):
    headers, _ = new_key(hooks, "rotate")
    first = hooks.post("/v1/webhooks/secret", headers=headers)
    assert first.status_code == 201 and first.json()["secret"].startswith("whsec_")
    assert first.json()["previous_valid_until"] is None
    listed = hooks.get("/v1/webhooks/secret", headers=headers).json()["data"]
    assert [s["prefix"] for s in listed] == [first.json()["prefix"]]
    assert first.json()["secret"] not in str(listed)
    second = hooks.post("/v1/webhooks/secret?grace_s=3600", headers=headers).json()
    assert second["secret"] != first.json()["secret"] and second["previous_valid_until"] is not None
    assert len(hooks.get("/v1/webhooks/secret", headers=headers).json()["data"]) == 2
    hooks.post("/v1/webhooks/secret?grace_s=0", headers=headers)
    assert len(hooks.get("/v1/webhooks/secret", headers=headers).json()["data"]) == 1


def test_notify_needs_a_signing_secret_first(hooks, receiver):
    headers, _ = new_key(hooks, "nosecret")
    body = distill_body(ready_dataset(hooks, headers), ready_teacher(hooks, headers), notify={"url": receiver.url})
    r = hooks.post("/v1/jobs", headers=headers, json=body)
    assert r.status_code == 409 and "POST /v1/webhooks/secret" in r.json()["detail"]


@pytest.mark.parametrize("url, words", [
    ("http://10.1.2.3/hook", "private, loopback or reserved address (10.1.2.3)"),
    ("http://192.168.0.10:8080/hook", "private, loopback or reserved"),
    ("http://169.254.169.254/latest/meta-data", "cloud metadata address"),
    ("http://[::1]:9000/hook", "private, loopback or reserved address (::1)"),
    ("http://127.0.0.2/hook", "private, loopback or reserved address (127.0.0.2)"),
    ("http://0x7f.0.0.3/hook", "(127.0.0.3)"),  # other spellings of loopback are resolved first
    ("http://[::ffff:10.0.0.1]/hook", "(10.0.0.1)"),
    ("http://100.64.0.1/hook", "private, loopback or reserved"),
    ("ftp://127.0.0.1/hook", "must start with http:// or https://"),
    ("http://user:pw@127.0.0.1/hook", "must not contain a user name or password"),
    ("http://no-such-host.invalid/hook", "could not be resolved"),
])
def test_disallowed_urls_are_refused_at_creation(hooks, user, url, words):
    before = hooks.get("/v1/jobs", headers=user["headers"]).json()["count"]
    r = _job(hooks, user, url)
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"] and r.json()["detail"].endswith(".")
    assert hooks.get("/v1/jobs", headers=user["headers"]).json()["count"] == before  # nothing created


def test_metadata_address_needs_to_be_named_exactly():
    broad = UrlPolicy(networks=(__import__("ipaddress").ip_network("169.254.0.0/16"),))
    with pytest.raises(UrlRefused, match="metadata"):
        check_url("http://169.254.169.254/", broad)
    exact = UrlPolicy(networks=(__import__("ipaddress").ip_network("169.254.169.254/32"),))
    assert check_url("http://169.254.169.254/", exact).addresses
    assert check_url("https://example.test/x", UrlPolicy(), resolve=lambda h, p: ["93.184.215.14"]).port == 443
    only_listed = UrlPolicy(names=("*.hooks.test",), allow_public=False)
    assert check_url("https://a.hooks.test/", only_listed, resolve=lambda h, p: ["10.0.0.9"])
    with pytest.raises(UrlRefused, match="allow-list"):
        check_url("https://example.test/", only_listed, resolve=lambda h, p: ["93.184.215.14"])


def test_events_are_signed_and_arrive_in_order(hooks, user, receiver):
    events = ["job.queued", "job.running", "job.progress", "job.succeeded"]
    r = _job(hooks, user, receiver.url, events=events, labels={"commit": "abc123"})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    _run_life_cycle(hooks, job_id)
    receiver.wait(lambda: len(receiver.events(job_id)) == 4)
    time.sleep(0.3)  # nothing more comes (exactly once here: every answer was 200)
    got = [req for req in receiver.requests if req.event["data"]["job"]["id"] == job_id]
    assert [req.event["type"] for req in got] == events
    assert [req.event["data"]["job"]["status"] for req in got] == ["queued", "running", "running", "succeeded"]
    assert got[2].event["data"]["job"]["progress"]["percent"] == 50.0
    assert got[3].event["data"]["job"]["metrics"] == {"student_clean_accuracy": 0.9}
    assert all(req.event["data"]["job"]["labels"] == {"commit": "abc123"} for req in got)
    for req in got:
        header = req.headers["kdiga-signature"]
        assert _own_hmac(user["secret"], header, req.body)
        assert verify_signature(user["secret"], req.body, header) and verify_webhook(user["secret"], req.body, header)
        assert not _own_hmac(user["secret"], header, req.body + b" ")  # the body is covered
        assert not verify_webhook(user["secret"], req.body, header, now=time.time() + 301)  # replay window
        assert req.headers["kdiga-event-id"] == req.event["id"] and req.headers["kdiga-event-type"] == req.event["type"]
    assert len({req.event["id"] for req in got}) == 4
    log = _log(hooks, user, job_id, 4)
    assert [e["type"] for e in log["events"]] == events and {e["status"] for e in log["events"]} == {"delivered"}
    assert log["count"] == 4 and all(d["ok"] and d["status_code"] == 200 and d["attempt"] == 1 for d in log["data"])


def test_a_rotated_secret_signs_beside_the_new_one(hooks, receiver):
    headers, _ = new_key(hooks, "rot2")
    old = hooks.post("/v1/webhooks/secret", headers=headers).json()["secret"]
    new = hooks.post("/v1/webhooks/secret?grace_s=600", headers=headers).json()["secret"]
    user = {"headers": headers, "dataset_id": ready_dataset(hooks, headers), "teacher_id": ready_teacher(hooks, headers)}
    job_id = _job(hooks, user, receiver.url, events=["job.queued"]).json()["id"]
    receiver.wait(lambda: receiver.events(job_id))
    req = receiver.requests[-1]
    assert req.headers["kdiga-signature"].count("v1=") == 2
    assert _own_hmac(old, req.headers["kdiga-signature"], req.body)
    assert _own_hmac(new, req.headers["kdiga-signature"], req.body)


def test_a_failing_receiver_gets_retries_with_exponential_backoff(hooks, user, receiver):
    receiver.answer = 500
    job_id = _job(hooks, user, receiver.url, events=["job.queued", "job.cancelled"]).json()["id"]
    hooks.post(f"/v1/jobs/{job_id}/cancel", headers=user["headers"])
    receiver.wait(lambda: len(receiver.events(job_id)) >= MAX_ATTEMPTS, timeout=30)
    time.sleep(BACKOFF_S * 2 ** MAX_ATTEMPTS)
    got = [r for r in receiver.requests if r.event["data"]["job"]["id"] == job_id]
    # The first event is tried MAX_ATTEMPTS times, then given up; only then the second goes (in order).
    first = [r for r in got if r.event["type"] == "job.queued"]
    assert len(first) == MAX_ATTEMPTS
    assert [int(r.headers["kdiga-delivery-attempt"]) for r in first] == [1, 2, 3, 4]
    gaps = [b.at - a.at for a, b in zip(first, first[1:], strict=False)]
    assert all(gap >= BACKOFF_S * 2 ** i * 0.95 for i, gap in enumerate(gaps)), gaps
    log = _log(hooks, user, job_id, MAX_ATTEMPTS)
    assert log["events"][0]["status"] == "failed" and log["events"][0]["attempts"] == MAX_ATTEMPTS
    assert log["events"][0]["last_error"] == "The receiver answered 500."
    assert [d["status_code"] for d in log["data"] if d["event_type"] == "job.queued"] == [500] * MAX_ATTEMPTS
    assert first[0].body == first[-1].body  # the same event each time, signed afresh
    assert first[0].headers["kdiga-event-id"] == first[-1].headers["kdiga-event-id"]


def test_redirects_are_not_followed(hooks, user, receiver):
    receiver.answer, receiver.location = 307, "http://169.254.169.254/latest/meta-data"
    job_id = _job(hooks, user, receiver.url, events=["job.queued"]).json()["id"]
    receiver.wait(lambda: receiver.events(job_id))
    attempts = _log(hooks, user, job_id, 1)["data"]
    assert attempts and attempts[0]["status_code"] == 307 and not attempts[0]["ok"]
    assert "do not follow redirects" in attempts[0]["error"]


def test_delivery_rechecks_the_address_it_connects_to(hooks, receiver):
    """DNS rebinding: a name checked at creation that resolves to a private address when delivering."""
    policy = UrlPolicy.from_settings(hooks.app.state.settings)
    sent = deliver("http://hooks.example.test/x", b"{}", {}, policy=policy, timeout_s=2,
                   resolve=lambda host, port: ["10.0.0.7"])
    assert not sent.ok and "(10.0.0.7)" in sent.error and sent.status_code is None
    # The operator took loopback off the allow-list after a job named it: nothing is sent there.
    sent = deliver(receiver.url, b"{}", {}, policy=UrlPolicy(), timeout_s=2)
    assert not sent.ok and "(127.0.0.1)" in sent.error and receiver.requests == []
    assert deliver(receiver.url, b"{}", {}, policy=policy, timeout_s=2).ok and len(receiver.requests) == 1


def test_event_and_state_change_are_one_transaction(hooks, user, receiver):
    job_id = _job(hooks, user, receiver.url, events=["job.cancelled"]).json()["id"]
    with _sessions(hooks)() as session:
        crud.request_cancel(session, job=session.get(Job, job_id))
        session.rollback()  # e.g. the API process died before its commit
        assert session.get(Job, job_id).status == "queued"
        assert session.scalars(select(WebhookEvent).where(WebhookEvent.job_id == job_id)).all() == []
    assert hooks.post(f"/v1/jobs/{job_id}/cancel", headers=user["headers"]).status_code == 202
    receiver.wait(lambda: receiver.events(job_id))
    assert [e["type"] for e in receiver.events(job_id)] == ["job.cancelled"]


def test_concurrent_pumps_send_each_event_once(hooks, user, receiver):
    settings = hooks.app.state.settings
    job_ids = [_job(hooks, user, receiver.url, events=["job.queued", "job.cancelled"]).json()["id"]
               for _ in range(6)]
    for job_id in job_ids:
        hooks.post(f"/v1/jobs/{job_id}/cancel", headers=user["headers"])
    threads = [threading.Thread(target=lambda: [outbox.deliver_due(_sessions(hooks), settings) for _ in range(20)])
               for _ in range(4)]  # four more "processes" beside the app's own pump
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    receiver.wait(lambda: sum(len(receiver.events(j)) for j in job_ids) >= 12)
    time.sleep(0.3)
    for job_id in job_ids:
        assert [e["type"] for e in receiver.events(job_id)] == ["job.queued", "job.cancelled"]
