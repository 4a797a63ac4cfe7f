"""The catalog the API reads (kdiga_service/catalog.json) is what kdiga_core offers.

The API cannot import kdiga_core, so the names users may pick travel as a generated file;
this test fails when the file and the registries drift apart (regenerate: `make catalog`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kdiga_service.catalog import CATALOG_PATH, KINDS, load_catalog, methods_by_kind

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_catalog", ROOT / "scripts" / "gen_catalog.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_catalog_file_matches_the_registries():
    built = _generator().build_catalog()
    on_disk = load_catalog()
    for kind in KINDS:
        assert sorted(built[kind]) == on_disk[kind], f"{kind} drifted: run `make catalog`"
    assert built == __import__("json").loads(CATALOG_PATH.read_text()), "regenerate with `make catalog`"


def test_every_method_of_a_job_kind_is_a_known_method():
    catalog = load_catalog()
    assert set(methods_by_kind()) == set(catalog["job_kinds"])
    for kind, methods in methods_by_kind().items():
        assert kind in catalog["job_kinds"]
        assert set(methods) <= set(catalog["methods"]), kind
