"""Fixtures for the worker tests: a migrated SQLite database and store under a temp KDIGA_HOME."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import kdiga_svc_helpers as h  # noqa: E402


@pytest.fixture()
def settings(tmp_path):
    s = h.make_settings(tmp_path / "home", progress_interval_s=0.2, heartbeat_stale_s=4.0, task_max_retries=2)
    h.migrate(s)
    yield s
    from kdiga_service.db import dispose_engines

    dispose_engines()


@pytest.fixture()
def owner(settings):
    return h.create_owner(settings)[0]


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    return h.write_teacher_file(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


@pytest.fixture()
def seeded(settings, owner, teacher_file):
    return {"owner_id": owner, **h.seed_rows(settings, owner, teacher_file)}
