"""docs/ is true to the code where a machine can tell (issue 10):

- every `design.md §N`, `method.md §N` and `style.md habit N` cited anywhere in the repository is a
  section (or habit) of the page in docs/;
- design.md §3's REST table and the application's routes are the same set, both ways, and each status a
  row names is one its operations declare;
- every `KDIGA_*` setting the pages name is a field of `kdiga_service.settings.Settings`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", "build", "dist", "demo-output"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".sh", ".yml", ".yaml", ".ini", ".cfg", ".html", ".json",
                 ".Dockerfile"}
TEXT_NAMES = {"Makefile"}

# "design.md §5, §7, §9", "method.md §2 and §6", "style.md habit 8"
SECTION_CITE = re.compile(r"\b(design|method)\.md((?:,? ?(?:and )?§ ?\d+[a-z]?)+)")
HABIT_CITE = re.compile(r"\bstyle\.md habits? (\d+(?:(?:, | and )\d+)*)")
HEADING = re.compile(r"^## (\d+[a-z]?)\. ", re.MULTILINE)
HABIT = re.compile(r"^(\d+)\. \*\*", re.MULTILINE)
ROUTE = re.compile(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`")
# Environment variables that are not server settings: the client's, and the compose file's.
# Environment names that are not service settings: the client's own, and a test-only hook
# (worker.deliveries.HOLD_ENV, which the chaos test sets; never a deployment setting).
NOT_SETTINGS = {"KDIGA_URL", "KDIGA_API_KEY", "KDIGA_TEST_HOLD_VALIDATION"}


def repository_files() -> Iterator[Path]:
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if any(p in SKIP_DIRS or p.startswith(".") or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES):
            yield path


def citations() -> dict[tuple[str, str], list[str]]:
    """(page, section) -> where it is cited, e.g. ("design.md", "8b") -> ["worker/runner.py:9"]."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in repository_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in SECTION_CITE.finditer(text):
            for section in re.findall(r"§ ?(\d+[a-z]?)", match.group(2)):
                found.setdefault((f"{match.group(1)}.md", section), []).append(_where(path, text, match.start()))
        for match in HABIT_CITE.finditer(text):
            for number in re.findall(r"\d+", match.group(1)):
                found.setdefault(("style.md", number), []).append(_where(path, text, match.start()))
    return found


def _where(path: Path, text: str, offset: int) -> str:
    return f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, offset) + 1}"


def sections(page: str) -> set[str]:
    text = (DOCS / page).read_text(encoding="utf-8")
    if page == "style.md":
        habits = text[text.index("## Habits we take"):]
        return set(HABIT.findall(habits))
    return set(HEADING.findall(text))


def section_text(page: str, number: str) -> str:
    text = (DOCS / page).read_text(encoding="utf-8")
    start = re.search(rf"^## {re.escape(number)}\. .*$", text, re.MULTILINE)
    assert start is not None, f"{page} has no section {number}"
    end = HEADING.search(text, start.end())
    return text[start.end():end.start() if end else len(text)]


def test_the_pages_the_code_cites_live_in_docs() -> None:
    for page in ("design.md", "method.md", "style.md", "contracts.md"):
        assert (DOCS / page).is_file(), f"docs/{page} is missing"


def test_the_citation_scan_finds_the_known_citations() -> None:
    """Guards the scanner itself: a regex that matched nothing would pass the next test vacuously."""
    found = citations()
    assert ("design.md", "8b") in found and ("method.md", "3b") in found and ("style.md", "8") in found
    assert any(w.startswith("worker/celery_app.py") for w in found[("design.md", "7")])  # "§5, §7, §9"


def test_every_cited_section_exists() -> None:
    missing = [f"{page} §{section} (cited at {', '.join(where)})"
               for (page, section), where in sorted(citations().items()) if section not in sections(page)]
    assert not missing, "cited but absent from docs/: " + "; ".join(missing)


def _route_key(method: str, path: str) -> tuple[str, str]:
    return method, re.sub(r"\{[^}]+\}", "{}", path)  # {id} in the page, {job_id} in the code


def documented_routes() -> tuple[set[tuple[str, str]], set[tuple[str, str]], set[tuple[str, str]]]:
    """design.md §3's table: (method, path) pairs; those it says are outside OpenAPI; those not yet served."""
    routes: set[tuple[str, str]] = set()
    outside: set[tuple[str, str]] = set()
    planned: set[tuple[str, str]] = set()
    for line in section_text("design.md", "3").splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        pairs = {_route_key(m, p) for m, p in ROUTE.findall(first_cell)}
        routes |= pairs
        if "outside the OpenAPI document" in line:
            outside |= {pair for pair in pairs if pair[1] == "/metrics"}
        if "**not yet**" in line:
            planned |= pairs
    return routes, outside, planned


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from api.main import create_app
    from kdiga_service.settings import Settings

    return create_app(Settings(home=tmp_path_factory.mktemp("docs-home"), run_migrations=False))


def test_the_rest_table_and_the_openapi_document_agree(app) -> None:  # type: ignore[no-untyped-def]
    documented, outside, planned = documented_routes()
    assert len(documented) > 20, "design.md §3's table was not found or not parsed"
    openapi = {_route_key(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    absent = documented - outside - planned - openapi
    assert not absent, f"in design.md §3 but not in OpenAPI: {sorted(absent)}"
    assert not planned & openapi, f"design.md §3 says 'not yet' but the app serves: {sorted(planned & openapi)}"
    assert not openapi - documented, f"in OpenAPI but missing from design.md §3: {sorted(openapi - documented)}"
    client = TestClient(app)  # no lifespan: nothing starts, the routes answer
    for method, path in sorted(outside):
        status = client.request(method, path).status_code
        assert status not in (404, 405), f"design.md §3 lists {method} {path}, which answers {status}"


def test_every_setting_the_pages_name_is_a_settings_field() -> None:
    from kdiga_service.settings import Settings

    fields = {f"KDIGA_{name.upper()}" for name in Settings.model_fields}
    named = {m for page in DOCS.glob("*.md") for m in re.findall(r"KDIGA_[A-Z0-9_]*[A-Z0-9]",
                                                                  page.read_text(encoding="utf-8"))}
    assert named, "no settings found in docs/: the pattern is broken"
    unknown = sorted(named - fields - NOT_SETTINGS)
    assert not unknown, f"docs/ names settings that kdiga_service/settings.py does not have: {unknown}"


def test_the_contracts_settings_list_names_real_settings() -> None:
    from kdiga_service.settings import Settings

    text = (DOCS / "contracts.md").read_text(encoding="utf-8")
    paragraph = text[text.index("Settings (`KDIGA_` prefix"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    names = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", paragraph)) - {"KDIGA_"}
    assert len(names) > 10
    unknown = sorted(n for n in names if n.lower() not in Settings.model_fields)
    assert not unknown, f"contracts.md's settings list names unknown settings: {unknown}"


def test_the_status_codes_in_the_rest_table_are_documented_answers(app) -> None:  # type: ignore[no-untyped-def]
    """A status a row of design.md §3 names (202, 409, 307, ...) is an answer one of its operations declares."""
    answers: dict[tuple[str, str], set[str]] = {}
    for path, ops in app.openapi()["paths"].items():
        for method, op in ops.items():
            answers[_route_key(method.upper(), path)] = set(op.get("responses", {}))
    checked = 0
    for line in section_text("design.md", "3").splitlines():
        if not line.startswith("| `") or "**not yet**" in line:
            continue
        _, first_cell, what, *_ = line.split("|")
        declared = set().union(*(answers.get(_route_key(m, p), set()) for m, p in ROUTE.findall(first_cell)))
        for code in re.findall(r"\b([1-5]\d\d)\b", what):
            assert code in declared, f"design.md §3 says {code} for {first_cell.strip()}, which never answers it"
            checked += 1
    assert checked >= 8, "the table's status codes were not found"
    every = set().union(*answers.values())
    intro = section_text("design.md", "3").split("|")[0]
    for code in re.findall(r"\b(4\d\d|5\d\d)\b", intro):
        assert code in every, f"design.md §3 lists error status {code}, which no operation declares"
