"""The SDK and the `kdiga` CLI against a real embedded service (session fixture in conftest.py)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdiga_client import AuthError, Client, JobFailedError, KdigaError, NotFoundError, cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
runner = CliRunner()

# The smallest job that still exercises training, evaluation, export and the report.
TINY_TRAIN = {"epochs": 1, "batch_size": 256, "lr": 0.05, "device": "cpu"}
TINY_EVAL = {"attacks": [{"name": "pgd", "eps": 0.1, "steps": 2}], "max_points": 32, "eps_curve": [0.0, 0.1, 0.3],
             "curve_attack_steps": 2, "alignment": False, "smoothing_sigma": 0.0, "latency": False}


@pytest.fixture(scope="module")
def client(live_service) -> Client:
    with Client(live_service.url, live_service.admin_key, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def digits(client: Client):
    ds = client.wait_dataset(client.register_builtin_dataset("digits", "digits").id, timeout=180)
    assert ds.status == "ready", ds.error
    return ds


@pytest.fixture(scope="module")
def finished_job(client: Client, digits):
    job = client.create_job("adversarial_train", digits.id, name="tiny robust teacher",
                            student={"arch": "cnn_tiny"},
                            objective={"method": "pgd_at", "attack_eps": 0.1, "attack_step": 0.1, "attack_steps": 1},
                            train=TINY_TRAIN, evaluation=TINY_EVAL)
    return client.wait_job(job.id, timeout=400)


@pytest.fixture
def env(live_service, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """CLI environment: the live URL and key from the environment, an empty config file."""
    monkeypatch.setenv("KDIGA_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("KDIGA_URL", live_service.url)
    monkeypatch.setenv("KDIGA_API_KEY", live_service.admin_key)
    return live_service


def kdiga(*args: str):
    cli.mount_server_commands()  # what `kdiga` (cli.main) does first
    return runner.invoke(cli.app, list(args))


def test_job_runs_end_to_end_with_report_and_downloads(client: Client, finished_job, tmp_path: Path):
    job = finished_job
    assert job.status == "succeeded" and job.result.get("teacher_id")
    assert client.get_teacher(job.result["teacher_id"]).status == "ready"
    assert job.progress.percent == 100.0
    report = client.get_report(job.id)
    assert report["schema"] == "kdiga.report/1" and set(report["models"]) == {"model"}
    page = client.get_report(job.id, format="html")
    assert page.lstrip().startswith("<!DOCTYPE html>") and 'id="plot-eps-curve"' in page
    paths = client.download_job(job.id, tmp_path)
    kinds = {a.kind for a in job.artifacts}
    assert {"model_weights", "model_card", "report_json"} <= kinds  # an adversarial_train job
    assert all(p.stat().st_size > 0 for p in paths.values())
    card = json.loads(next(p for p in paths.values() if p.name.endswith("model_card.json")).read_text())
    assert card  # a real JSON model card came back


def test_events_stream_ends_for_a_finished_job(client: Client, finished_job):
    events = list(client.stream_events(finished_job.id))
    assert events[-1].event == "end" and events[0].job.status == "succeeded"


def test_broken_teacher_is_invalid_and_cannot_be_distilled(client: Client, digits, tmp_path: Path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    teacher = client.upload_teacher(broken, "broken", arch="cnn_small", num_classes=10, in_chans=1, img_size=8)
    teacher = client.wait_teacher(teacher.id, timeout=120)
    assert teacher.status == "invalid" and teacher.error
    with pytest.raises(KdigaError) as info:
        client.create_job("distill", digits.id, teacher_id=teacher.id, student={"arch": "cnn_small"})
    assert info.value.status in (409, 422) and teacher.id in info.value.detail


def test_job_that_fails_in_the_worker_raises_job_failed(client: Client, digits, env):
    # A ViT with 16-pixel patches cannot take 8x8 digits: the API accepts the spec, the worker fails it.
    job = client.create_job("adversarial_train", digits.id, student={"arch": "vit_tiny_patch16_224"},
                            objective={"method": "ce"}, train=TINY_TRAIN, evaluation=TINY_EVAL)
    with pytest.raises(JobFailedError) as info:
        client.wait_job(job.id, timeout=300)
    assert info.value.job.status == "failed" and info.value.job.error
    result = kdiga("jobs", "watch", job.id)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: Job {job.id} failed: ")


def test_sdk_errors_from_the_real_server(live_service, client: Client):
    with pytest.raises(NotFoundError):
        client.get_job("does-not-exist")
    with Client(live_service.url, "kdg_not_a_real_key_000000000000") as bad, pytest.raises(AuthError) as info:
        bad.list_jobs()
    assert info.value.status == 401 and info.value.detail


def test_cli_wrong_key_and_unreachable_server(env):
    result = kdiga("jobs", "list", "--api-key", "kdg_not_a_real_key_000000000000")
    assert result.exit_code == 1 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("Error: ")
    assert "--api-key" in result.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = kdiga("jobs", "list", "--url", f"http://127.0.0.1:{port}")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: Cannot reach the kdiga server at http://127.0.0.1:{port}:")


def test_cli_json_outputs(env, digits, finished_job, tmp_path: Path):
    listed = json.loads(kdiga("datasets", "list", "--json").stdout)
    assert digits.id in [d["id"] for d in listed["data"]]
    shown = json.loads(kdiga("jobs", "show", finished_job.id, "--json").stdout)
    assert shown["status"] == "succeeded" and shown["artifacts"]
    report = json.loads(kdiga("jobs", "report", finished_job.id, "--json").stdout)
    assert report["schema"] == "kdiga.report/1"
    teachers = json.loads(kdiga("teachers", "list", "--json").stdout)
    assert finished_job.result["teacher_id"] in [t["id"] for t in teachers["data"]]
    files = json.loads(kdiga("jobs", "download", finished_job.id, str(tmp_path), "--json").stdout)
    assert files and all(Path(p).exists() for p in files.values())
    result = kdiga("jobs", "cancel", finished_job.id, "--json")
    assert result.exit_code == 1 and json.loads(result.stderr)["status"] == 409


def test_cli_admin_keys_against_the_service_database(env, monkeypatch: pytest.MonkeyPatch):
    from kdiga_service.settings import reset_settings

    monkeypatch.setenv("KDIGA_HOME", str(env.home))
    monkeypatch.setenv("KDIGA_DATABASE_URL", env.database_url)
    reset_settings()
    try:
        created = json.loads(kdiga("admin", "keys", "create", "--name", "ci", "--json").stdout)
        assert created["key"].startswith("kdg_") and created["name"] == "ci"
        ok = kdiga("jobs", "list", "--api-key", created["key"], "--json")
        assert ok.exit_code == 0 and json.loads(ok.stdout)["count"] == 0  # a new owner sees no jobs
        keys = json.loads(kdiga("admin", "keys", "list", "--json").stdout)
        assert created["id"] in [k["id"] for k in keys] and all("key" not in k for k in keys)
        # a key never used before it is revoked (used keys stay in the API's short auth cache)
        other = json.loads(kdiga("admin", "keys", "create", "--name", "gone", "--json").stdout)
        revoked = kdiga("admin", "keys", "revoke", other["id"], "--json")
        assert revoked.exit_code == 0 and json.loads(revoked.stdout)["revoked_at"]
        denied = kdiga("jobs", "list", "--api-key", other["key"])
        assert denied.exit_code == 1 and denied.stderr.startswith("Error: This API key has been revoked.")
        missing = kdiga("admin", "keys", "revoke", "no-such-key")
        assert missing.exit_code == 1 and "No API key" in missing.stderr
    finally:
        reset_settings()
