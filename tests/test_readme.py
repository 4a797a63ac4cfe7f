"""The README's settings table is generated from the Settings class; keep them equal."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_every_setting_as_in_settings():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from settings_table import settings_table
    finally:
        sys.path.pop(0)
    assert settings_table() in (ROOT / "README.md").read_text(encoding="utf-8"), (
        "README.md's settings table is stale: regenerate it with `python scripts/settings_table.py`."
    )
