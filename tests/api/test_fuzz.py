"""A bounded schemathesis run over the whole OpenAPI document against the real app (uvicorn,
SQLite, Redis), fixed seed: no server error and no answer the document does not describe.
`make fuzz` runs the long version (FUZZING.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_schemathesis_finds_nothing(tmp_path, redis_client):
    if importlib.util.find_spec("schemathesis") is None:
        pytest.skip("schemathesis is not installed (requirements-dev.txt)")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from fuzz_api import fuzz
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    result = fuzz(max_examples=25, seed=20261127, out=tmp_path / "report")
    assert result["failures"] == {} and result["exit_code"] == 0, result["output_tail"]
    assert not [code for code in result["statuses"] if code.startswith("5") or code == "no response"], result
    assert result["cases"] > 1000 and result["statuses"].get("200", 0) > 100, result
