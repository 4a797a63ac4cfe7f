"""Imports flow one way (style.md habit 6): kdiga_core never imports the web, queue or
database layers, and the CLI stays light. (api's side: tests/api/test_layering.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after_import(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_kdiga_core_never_imports_service_layers():
    statement = "\n".join(f"import kdiga_core.{m}" for m in (
        "models", "formats", "data", "attacks", "losses", "objectives", "train", "evaluate", "jobs"))
    loaded = _top_level(_modules_after_import(statement))
    for forbidden in ("fastapi", "sqlalchemy", "celery", "redis", "api", "worker", "kdiga_client", "httpx"):
        assert forbidden not in loaded, forbidden


def test_client_cli_is_light():
    loaded = _top_level(_modules_after_import("import kdiga_client.cli"))
    assert "torch" not in loaded
    assert "kdiga_core" not in loaded
