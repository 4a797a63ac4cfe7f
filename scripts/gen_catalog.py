"""Regenerate kdiga_service/catalog.json from kdiga_core's registries.

The API must not import torch or kdiga_core, so the names users may pick
(architectures, attacks, methods, datasets) travel to it as a JSON file.
tests/service/test_catalog.py fails when this file and the registries drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path

CATALOG_PATH = Path(__file__).resolve().parents[1] / "kdiga_service" / "catalog.json"


def build_catalog() -> dict[str, object]:
    from kdiga_core import attacks, data, jobs, models
    from kdiga_core.config import METHODS

    return {
        "architectures": sorted(models.list_models()),
        "attacks": sorted(attacks.list_attacks()),
        "methods": sorted(METHODS),
        "datasets": sorted(data.list_builtin_datasets()),
        "job_kinds": list(jobs.JOB_KINDS),
        "methods_by_kind": {kind: sorted(methods) for kind, methods in jobs.METHODS_BY_KIND.items()},
    }


def main() -> None:
    CATALOG_PATH.write_text(json.dumps(build_catalog(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {CATALOG_PATH}")


if __name__ == "__main__":
    main()
