"""The names users pick from (architectures, attacks, methods, built-in datasets, job kinds), and
which methods each job kind accepts.

Read from `kdiga_service/catalog.json`, which `scripts/gen_catalog.py` generates from kdiga_core's
registries (the api never imports kdiga_core); a test keeps the two equal.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from pathlib import Path

CATALOG_PATH = Path(__file__).with_name("catalog.json")
KINDS = ("architectures", "attacks", "methods", "datasets", "job_kinds")
_SINGULAR = {
    "architectures": "architecture",
    "attacks": "attack",
    "methods": "method",
    "datasets": "built-in dataset",
    "job_kinds": "job kind",
}
MAX_LISTED = 60


@lru_cache(maxsize=1)
def load_catalog() -> dict[str, list[str]]:
    """The catalog as sorted lists of names (`methods_by_kind` has its own reader)."""
    raw = json.loads(CATALOG_PATH.read_text())
    return {kind: sorted(set(raw.get(kind, []))) for kind in KINDS}


@lru_cache(maxsize=1)
def methods_by_kind() -> dict[str, list[str]]:
    """The methods each job kind accepts (kdiga_core.jobs.METHODS_BY_KIND, through the file)."""
    raw = json.loads(CATALOG_PATH.read_text())
    return {kind: list(methods) for kind, methods in raw.get("methods_by_kind", {}).items()}


@lru_cache(maxsize=len(KINDS))
def names(kind: str) -> frozenset[str]:
    return frozenset(load_catalog()[kind])


def unknown_name_message(kind: str, name: str) -> str:
    """One sentence naming the valid choices (the closest ones when the list is long)."""
    valid = load_catalog()[kind]
    label = _SINGULAR[kind]
    if len(valid) <= MAX_LISTED:
        return f"Unknown {label} '{name}'; valid names are: {', '.join(valid)}."
    close = difflib.get_close_matches(name, valid, n=10, cutoff=0.5) or valid[:20]
    return (
        f"Unknown {label} '{name}'; valid names include: {', '.join(close)} "
        f"({len(valid)} in all, listed by GET /v1/catalog)."
    )


def check_name(kind: str, name: str) -> str | None:
    """None when `name` is in the catalog, else the one-sentence error message."""
    return None if name in names(kind) else unknown_name_message(kind, name)
