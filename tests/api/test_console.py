"""The web console over HTTP: sign-in, the session cookie's flags, CSRF, tenancy, the job form, the
report's sandbox. The browser tests (tests/e2e/test_console_browser.py) drive it in Chromium."""

from __future__ import annotations

import re

import pytest
from api_helpers import finish, new_key, ready_dataset, ready_teacher
from fastapi.testclient import TestClient

from kdiga_service import admin

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def browser(client):
    """A second client on the same app, with its own cookie jar (a browser)."""
    with TestClient(client.app, base_url="http://testserver") as b:
        yield b


def _secret(client, name="console"):
    with client.app.state.sessionmaker() as session:
        row, secret = admin.create_key(session, name=name)
        return row.id, secret


def sign_in(b: TestClient, secret: str):
    form = b.get("/ui/login")
    token = CSRF.search(form.text).group(1)
    return b.post("/ui/login", data={"api_key": secret, "csrf_token": token}, follow_redirects=False)


def test_sign_in_sets_a_strict_httponly_session_cookie(client, browser):
    _key_id, secret = _secret(client)
    assert browser.get("/ui/jobs", headers={"accept": "text/html"}, follow_redirects=False).headers["location"] == "/ui/login"
    r = sign_in(browser, secret)
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("kdiga_console="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert secret not in cookie  # the key itself never goes back to the browser
    page = browser.get("/ui/jobs")
    assert page.status_code == 200 and "No jobs yet" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script src=\"http" not in page.text  # nothing from elsewhere
    logout_token = CSRF.search(page.text).group(1)
    assert browser.post("/ui/logout", data={"csrf_token": logout_token}, follow_redirects=False).status_code == 303
    assert browser.get("/ui/jobs", follow_redirects=False).status_code == 401


def test_wrong_key_and_missing_csrf_are_refused(client, browser):
    r = sign_in(browser, "kdg_not-a-key")
    assert r.status_code == 401 and "Invalid API key." in r.text
    r = browser.post("/ui/login", data={"api_key": "kdg_x", "csrf_token": "forged"})
    assert r.status_code == 403 and "security token" in r.json()["detail"]


def test_forms_need_the_session_csrf_token_and_same_origin(client, browser):
    _key_id, secret = _secret(client)
    sign_in(browser, secret)
    token = CSRF.search(browser.get("/ui/jobs").text).group(1)
    assert browser.post("/ui/jobs", data={"csrf_token": "nope"}).status_code == 403
    cross = browser.post("/ui/logout", data={"csrf_token": token}, headers={"origin": "https://evil.example"})
    assert cross.status_code == 403
    assert browser.get("/ui/jobs").status_code == 200  # still signed in


def test_submit_from_the_form_then_cancel(client, browser):
    key_id, secret = _secret(client)
    headers = {"Authorization": f"Bearer {secret}"}
    dataset_id, teacher_id = ready_dataset(client, headers), ready_teacher(client, headers)
    sign_in(browser, secret)
    form = browser.get("/ui/jobs/new")
    assert teacher_id in form.text and dataset_id in form.text
    token = CSRF.search(form.text).group(1)
    bad = browser.post("/ui/jobs", data={"csrf_token": token, "teacher_id": teacher_id, "dataset_id": dataset_id,
                                         "arch": "no_such_net", "method": "kdiga", "epochs": "1", "gamma": "1"})
    assert bad.status_code == 422 and "Unknown architecture &#39;no_such_net&#39;" in bad.text
    r = browser.post("/ui/jobs", follow_redirects=False, data={
        "csrf_token": token, "teacher_id": teacher_id, "dataset_id": dataset_id, "arch": "cnn_tiny",
        "method": "kd", "epochs": "2", "gamma": "0", "name": "from the form", "labels": "commit=abc\nteam=vision"})
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["name"] == "from the form" and job["labels"] == {"commit": "abc", "team": "vision"}
    assert job["spec"]["objective"]["method"] == "kd" and job["spec"]["train"]["epochs"] == 2
    page = browser.get(f"/ui/jobs/{job_id}")
    assert 'data-events="/ui/jobs/' in page.text and 'id="cancel"' in page.text
    assert browser.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": token}).status_code == 200
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).json()["status"] == "cancelled"


def test_another_key_sees_nothing_of_the_first(client, browser):
    _key_id, secret = _secret(client, "first")
    headers = {"Authorization": f"Bearer {secret}"}
    dataset_id, teacher_id = ready_dataset(client, headers), ready_teacher(client, headers)
    job = client.post("/v1/jobs", headers=headers, json={"kind": "distill", "dataset_id": dataset_id,
                                                         "teacher_id": teacher_id, "student": {"arch": "cnn_tiny"},
                                                         "name": "first's job"}).json()
    finish(client, job["id"], artifacts={"report_html": b"<html>report</html>"})
    sign_in(browser, _secret(client, "second")[1])
    for path in ("/ui/jobs", "/ui/teachers", "/ui/datasets"):
        text = browser.get(path).text
        assert job["id"] not in text and teacher_id not in text and dataset_id not in text and "first" not in text
    assert browser.get(f"/ui/jobs/{job['id']}").status_code == 404
    assert browser.get(f"/ui/jobs/{job['id']}/report").status_code == 404
    assert browser.get(f"/ui/jobs/{job['id']}/events").status_code == 404
    artifact_id = client.get(f"/v1/jobs/{job['id']}", headers=headers).json()["artifacts"][0]["id"]
    assert browser.get(f"/ui/artifacts/{artifact_id}").status_code == 404
    token = CSRF.search(browser.get("/ui/jobs").text).group(1)
    assert browser.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf_token": token}).status_code == 404


def test_report_is_sandboxed_and_revoked_keys_end_sessions(client, browser):
    key_id, secret = _secret(client)
    headers = {"Authorization": f"Bearer {secret}"}
    dataset_id, teacher_id = ready_dataset(client, headers), ready_teacher(client, headers)
    job = client.post("/v1/jobs", headers=headers, json={"kind": "distill", "dataset_id": dataset_id,
                                                         "teacher_id": teacher_id, "student": {"arch": "cnn_tiny"}}).json()
    finish(client, job["id"], artifacts={"report_html": b"<html><body>the report</body></html>"})
    sign_in(browser, secret)
    report = browser.get(f"/ui/jobs/{job['id']}/report")
    assert report.status_code == 200 and "the report" in report.text
    assert report.headers["content-security-policy"].startswith("sandbox")
    assert 'id="report"' in browser.get(f"/ui/jobs/{job['id']}").text
    with client.app.state.sessionmaker() as session:
        admin.revoke_key(session, key_id=key_id)
    assert browser.get("/ui/jobs", follow_redirects=False).status_code == 401
    new_key(client)  # the app is fine


def test_a_429_from_the_console_form_says_when_to_retry(client, browser):
    """Every 429 carries Retry-After, the console's job form too (issue 17, item 10)."""
    from kdiga_service.models import ApiKey

    key_id, secret = _secret(client)
    with client.app.state.sessionmaker() as session:
        session.get(ApiKey, key_id).max_concurrent_jobs = 1
        session.commit()
    headers = {"Authorization": f"Bearer {secret}"}
    dataset_id, teacher_id = ready_dataset(client, headers), ready_teacher(client, headers)
    sign_in(browser, secret)
    token = CSRF.search(browser.get("/ui/jobs/new").text).group(1)
    form = {"csrf_token": token, "teacher_id": teacher_id, "dataset_id": dataset_id, "arch": "cnn_tiny",
            "method": "kd", "epochs": "1", "gamma": "0"}
    assert browser.post("/ui/jobs", data=form, follow_redirects=False).status_code == 303
    r = browser.post("/ui/jobs", data=form, follow_redirects=False)
    assert r.status_code == 429 and r.headers["retry-after"] == str(client.app.state.settings.retry_after_s)
