"""Imports flow one way (design.md §1, style.md habit 6), checked two ways:

- at run time, by importing every module of a package in a fresh interpreter and looking at
  `sys.modules` (what a user of that package really loads);
- statically, by building the import graph of every project module from its AST (imports inside
  functions and under TYPE_CHECKING included) and looking for forbidden edges and cycles.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kdiga_core", "kdiga_service", "kdiga_launcher", "api", "worker", "kdiga_client", "migrations")
SERVER = {"api", "worker", "kdiga_service", "kdiga_launcher", "migrations"}
WEB = {"fastapi", "starlette"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(package: str | None = None) -> dict[str, Path]:
    """Every module of the project's packages (or of one package): dotted name -> file."""
    found: dict[str, Path] = {}
    for pkg in (package,) if package else PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imported_names(path: Path) -> Iterator[str]:
    """Every module name an import statement in `path` names (absolute imports; relative resolved)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    """Edges between project modules: module -> the project modules it imports."""
    modules = project_modules()
    return {name: {n for n in _imported_names(path) if n in modules and n != name}
            for name, path in modules.items()}


def external_imports(package: str) -> dict[str, set[str]]:
    """Top-level names of everything each module of `package` imports."""
    return {name: {n.split(".")[0] for n in _imported_names(path) if n}
            for name, path in project_modules(package).items()}


def _loaded_after_importing(modules: list[str]) -> set[str]:
    code = "import sys, json, importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _importable(package: str) -> list[str]:
    return [m for m in project_modules(package) if not m.endswith("__main__")]


# --------------------------------------------------------------------------- at run time


def test_every_client_module_loads_no_server_or_core_module():
    loaded = _loaded_after_importing(_importable("kdiga_client"))
    assert not loaded & (SERVER | {"kdiga_core", "torch", "sqlalchemy", "celery"} | WEB)


def test_the_shared_package_loads_neither_fastapi_celery_nor_torch():
    loaded = _loaded_after_importing(_importable("kdiga_service"))
    assert not loaded & ({"torch", "kdiga_core", "celery", "api", "worker", "kdiga_launcher"} | WEB)


# The API resolves a job's defaults with the core's own rules: that one module, which uses only the
# standard library (docker/api.Dockerfile copies just it), and nothing else of kdiga_core.
API_CORE_MODULES = {"kdiga_core", "kdiga_core.defaults"}


def test_the_api_loads_no_torch_core_or_worker():
    loaded = _loaded_after_importing(_importable("api"))
    assert not loaded & {"torch", "worker", "kdiga_launcher"}
    code = ("import sys, importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in _importable("api"))
            + "print(sorted(m for m in sys.modules if m.startswith('kdiga_core')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert set(ast.literal_eval(out.stdout.strip().splitlines()[-1])) <= API_CORE_MODULES


def test_the_core_module_the_api_reads_imports_only_the_standard_library():
    names = external_imports("kdiga_core")["kdiga_core.defaults"]
    assert names <= set(sys.stdlib_module_names) | {"__future__"}


def test_kdiga_core_loads_no_service_layer():
    loaded = _loaded_after_importing(_importable("kdiga_core"))
    assert not loaded & (SERVER | {"kdiga_client", "sqlalchemy", "celery", "redis", "httpx"} | WEB)


# --------------------------------------------------------------------------- statically


@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "api"])
def test_only_the_web_package_imports_fastapi(package):
    offenders = {m: sorted(names & WEB) for m, names in external_imports(package).items() if names & WEB}
    assert not offenders


@pytest.mark.parametrize("package", ["worker", "migrations", "kdiga_service", "kdiga_core"])
def test_no_arrow_back_up_to_the_web_package(package):
    offenders = {m: "api" for m, names in external_imports(package).items() if "api" in names}
    assert not offenders


def test_the_client_names_no_server_module_even_lazily():
    offenders = {m: sorted(names & (SERVER | {"kdiga_core", "torch"}))
                 for m, names in external_imports("kdiga_client").items() if names & (SERVER | {"kdiga_core"})}
    assert not offenders


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_project_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None
