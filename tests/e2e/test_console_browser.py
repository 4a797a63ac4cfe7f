"""The web console in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) against the
embedded service: sign in, submit a job from the form, watch its progress move, open its report,
cancel a job, and a second key that sees nothing of the first. Screenshots of every page are saved
under the test's tmp dir (`screenshots/`)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import e2e_flow as flow
import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def service(owner, teacher_file):
    """The shared embedded service (tests/e2e/conftest.py) under a key of this module's own."""
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (scripts/install-system-deps.sh)")
    pytest.importorskip("playwright.sync_api")
    api = owner["api"]
    ids = flow.setup_inputs(api, teacher_file)
    return {"url": owner["service"].url, "key": owner["key"], "home": owner["service"].home, "api": api, **ids}


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


class Shots:
    """Saves a full-page screenshot per page visited (and checks it is a real PNG)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def take(self, page, name: str) -> Path:
        path = self.folder / f"{len(list(self.folder.iterdir())):02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 5_000
        return path


def sign_in(page, url: str, key: str, shots: Shots) -> None:
    page.goto(f"{url}/ui/jobs")
    assert page.url.endswith("/ui/login")  # not signed in yet: sent to the sign-in page
    shots.take(page, "login")
    page.fill("#api_key", key)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(f"{url}/ui/jobs")


def submit_form(page, url: str, service: dict, *, epochs: int, name: str) -> str:
    page.goto(f"{url}/ui/jobs/new")
    page.select_option("#teacher_id", service["teacher_id"])
    page.select_option("#dataset_id", service["dataset_id"])
    page.fill("#arch", "cnn_tiny")
    page.select_option("#method", "kd")
    page.fill("#epochs", str(epochs))
    page.fill("#eps", "0.1")
    page.select_option("#evaluation", "quick")
    page.fill("#name", name)
    page.fill("#labels", "source=browser-test")
    page.click("#submit")
    page.wait_for_url(f"{url}/ui/jobs/*")
    return page.url.rsplit("/", 1)[1]


def progress_value(page) -> tuple[float, str, str] | None:
    """(percent, status, phase) as the page shows them."""
    try:
        return tuple(page.evaluate("() => ['progress', '.status', '.phase'].map((s, i) => {"
                                   " const el = document.querySelector('#progress-card ' + s);"
                                   " return i ? el.textContent : el.value; })"))
    except Exception:  # noqa: BLE001 - the page reloads itself when the job ends
        return None


def wait_for_status(page, status: str, timeout: float) -> None:
    """Poll the status the page shows (the console's CSP forbids eval, so no wait_for_function)."""
    deadline = time.monotonic() + timeout
    while (value := progress_value(page)) is None or value[1] != status:
        assert time.monotonic() < deadline, f"the page still shows {value}"
        time.sleep(0.1)


def test_console_end_to_end_in_chromium(service, chromium, tmp_path):
    url, shots = service["url"], Shots(tmp_path / "screenshots")
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sign_in(page, url, service["key"], shots)
    cookie = next(c for c in context.cookies() if c["name"] == "kdiga_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != service["key"]
    shots.take(page, "jobs-empty")

    # Submit from the form, then watch the progress bar move over the live stream.
    page.goto(f"{url}/ui/jobs/new")
    shots.take(page, "new-job-form")
    job_id = submit_form(page, url, service, epochs=12, name="browser job")
    seen: list[tuple[float, str, str]] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        value = progress_value(page)
        if value is not None:
            if not seen or value != seen[-1]:
                seen.append(value)
                if len(seen) == 3:
                    shots.take(page, "job-running")
            if value[1] in ("succeeded", "failed", "cancelled"):
                break
        time.sleep(0.05)
    moving = [v for v, status, _phase in seen if status == "running" and 0 < v < 100]
    assert len(set(moving)) >= 2, seen  # the bar moved while the job ran, without reloading the page
    assert moving == sorted(moving), seen  # the whole job's percent: it never goes back
    assert {"train", "evaluate"} <= {phase for _v, _s, phase in seen}, seen
    page.wait_for_selector("#report")  # reloaded at the end: the report and the files are there now
    assert page.inner_text("#progress-card .status") == "succeeded"
    assert page.locator("#artifacts a").count() == 5

    # Open the report: embedded in the job page, and on its own page.
    frame = page.frame_locator("#report")
    assert "KDIGA robustness report" in frame.locator("body").inner_text()
    frame.locator("img.plot").first.wait_for()
    shots.take(page, "job-succeeded")
    with context.expect_page() as report_page:
        page.click("#open-report")
    report = report_page.value
    report.wait_for_load_state()
    assert "KDIGA robustness report" in report.inner_text("body")
    assert report.locator("img.plot").count() >= 1
    shots.take(report, "report")
    report.close()
    api_job = service["api"].ok(service["api"].http.get(f"/v1/jobs/{job_id}"))
    assert api_job["labels"] == {"source": "browser-test"} and api_job["spec"]["train"]["epochs"] == 12

    # Cancel a long job with the button.
    long_id = submit_form(page, url, service, epochs=1000, name="to cancel")  # KDIGA_MAX_EPOCHS
    page.wait_for_selector("#cancel")
    shots.take(page, "job-to-cancel")
    page.click("#cancel")
    wait_for_status(page, "cancelled", 120)
    shots.take(page, "job-cancelled")
    assert service["api"].ok(service["api"].http.get(f"/v1/jobs/{long_id}"))["status"] == "cancelled"

    page.goto(f"{url}/ui/jobs")
    assert page.locator(f"#job-{job_id} .status").inner_text() == "succeeded"
    shots.take(page, "jobs")
    page.goto(f"{url}/ui/teachers")
    assert page.locator(f"#teacher-{service['teacher_id']}").count() == 1
    shots.take(page, "teachers")
    page.goto(f"{url}/ui/datasets")
    assert page.locator(f"#dataset-{service['dataset_id']}").count() == 1
    shots.take(page, "datasets")

    # A second key, in its own browser context, sees none of it.
    from kdiga_service import admin
    from kdiga_service.db import get_sessionmaker
    from kdiga_service.settings import Settings

    with get_sessionmaker(Settings(home=service["home"]))() as session:
        _row, second_key = admin.create_key(session, name="second")
    other = chromium.new_context().new_page()
    sign_in(other, url, second_key, Shots(tmp_path / "screenshots-second"))
    for path in ("/ui/jobs", "/ui/teachers", "/ui/datasets"):
        other.goto(f"{url}{path}")
        text = other.content()
        assert job_id not in text and service["teacher_id"] not in text and service["dataset_id"] not in text
        shots.take(other, f"second-key-{path.rsplit('/', 1)[1]}")
    response = other.goto(f"{url}/ui/jobs/{job_id}")
    assert response.status == 404 and "not found" in other.inner_text("body")
    shots.take(other, "second-key-job-404")
    assert len(list(shots.folder.iterdir())) >= 13
    context.close()
