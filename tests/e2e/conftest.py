"""Fixtures for the end-to-end tests: real API, broker, database and worker processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker"))

import kdiga_svc_helpers as h  # noqa: E402


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    return h.write_teacher_file(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
