"""/docs and /redoc render in headless Chromium with the network disabled (assets served by the app)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from api_helpers import REDIS_URL, serve
from fastapi.testclient import TestClient

from api.main import create_app
from kdiga_service.settings import Settings

CHROMIUM = "/usr/bin/chromium"


def _chromium() -> str:
    exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    return exe


def _offline_flags(exe: str, profile: Path) -> list[str]:
    # Every host but loopback resolves to nothing and every proxied request goes to a closed port:
    # a page that needed a CDN would stay blank.
    return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage",
            "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            f"--user-data-dir={profile}", "--virtual-time-budget=15000"]


@pytest.mark.browser
def test_docs_and_redoc_render_offline(tmp_path):
    exe = _chromium()
    app = create_app(Settings(home=tmp_path, broker_url=REDIS_URL))
    with serve(app) as url:
        operations = sum(len(ops) for ops in TestClient(app).get("/openapi.json").json()["paths"].values())
        flags = _offline_flags(exe, tmp_path / "profile")
        dom = subprocess.run(flags + ["--dump-dom", f"{url}/docs"], capture_output=True, text=True,
                             timeout=180).stdout
        shot = tmp_path / "docs.png"
        subprocess.run(flags + ["--window-size=1280,2400", f"--screenshot={shot}", f"{url}/docs"],
                       capture_output=True, timeout=180)
        redoc = subprocess.run(flags + ["--dump-dom", f"{url}/redoc"], capture_output=True, text=True,
                               timeout=180).stdout
    paths = re.findall(r'class="opblock-summary-path"[^>]*data-path="([^"]+)"', dom)
    assert len(paths) == operations, f"Swagger UI shows {len(paths)} of {operations} operations: {dom[:300]!r}"
    assert {"/v1/jobs", "/v1/datasets/builtin", "/v1/jobs/{job_id}/events"} <= set(paths)
    assert shot.exists() and shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 30_000
    assert "Create Job" in redoc and "Upload a dataset file" in redoc, redoc[:300]
