"""The MLflow export against a real `mlflow server` (loopback, SQLite backend store, local artifact
root), read back through MLflow's own client: run params and metrics, labels as tags, the files,
the registered model (served by MLflow's pyfunc, equal to our student); and a registry that is down
never fails the job."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import httpx
import kdiga_svc_helpers as h
import numpy as np
import pytest

from worker import runner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = h.free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        h.wait_for(lambda: _healthy(url) or proc.poll() is not None, 120, what="mlflow server")
        assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
        yield url
    finally:
        h.stop_process(proc)
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _run(settings, seeded, labels):
    request = h.tiny_job_request(seeded["dataset_id"], seeded["teacher_id"], name="registry test")
    request["labels"] = labels
    job_id = h.create_job_row(settings, seeded["owner_id"], request)
    outcome = runner.run_job(job_id, settings=settings)
    row = h.job_row(settings, job_id)
    assert outcome.status == "succeeded", row.error
    return row


def test_student_is_registered_and_reads_back(settings, seeded, mlflow_server, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from kdiga_core.data import load_dataset
    from kdiga_core.formats import load_model_bundle

    experiment = f"kdiga-test-{uuid.uuid4().hex[:6]}"
    settings = settings.model_copy(update={"mlflow_tracking_uri": mlflow_server, "mlflow_experiment": experiment})
    labels = {"commit": "3f2c1ab", "mlflow_model_name": f"digits-student-{uuid.uuid4().hex[:6]}"}
    row = _run(settings, seeded, labels)
    record = row.result["mlflow"]
    assert "error" not in record, record
    assert record["model"] == labels["mlflow_model_name"] and record["version"] == "1"

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == experiment
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["objective.method"] == "kdiga" and params["train.epochs"] == "1"
    assert json.loads(params["evaluation.attacks"])[0]["eps"] == 0.1
    assert "notify.url" not in params and "labels.commit" not in params
    assert metrics["student_clean_accuracy"] == pytest.approx(row.metrics["student_clean_accuracy"])
    robust = [k for k in row.metrics if k.startswith("student_pgd") and k.endswith("_accuracy")]
    assert robust, row.metrics
    attack = robust[0][len("student_"):-len("_accuracy")]
    teacher_robust = row.metrics[f"teacher_{attack}_accuracy"]
    if teacher_robust:
        assert metrics[f"retention_{attack}"] == pytest.approx(row.metrics[robust[0]] / teacher_robust)
    assert tags["commit"] == "3f2c1ab" and tags["kdiga.job_id"] == row.id and tags["kdiga.kind"] == "distill"

    files = {f.path for f in client.list_artifacts(record["run_id"], "kdiga")}
    assert files == {f"kdiga/{n}" for n in ("model_card.json", "report.html", "report.json", "student.onnx",
                                             "student.safetensors")}
    bundle = tmp_path / "bundle"
    client.download_artifacts(record["run_id"], "kdiga", str(bundle))
    card = json.loads((bundle / "kdiga" / "model_card.json").read_text())
    assert card["training"]["labels"] == labels  # the labels in the model card, too
    ours = {a.name: a.sha256 for a in h.artifacts_of(settings, row.id)}
    assert card["files"]["student.safetensors"]["sha256"] == ours["student.safetensors"]

    version = client.get_model_version(record["model"], record["version"])
    assert version.run_id == record["run_id"] and version.tags["commit"] == "3f2c1ab"
    mlflow.set_tracking_uri(mlflow_server)
    served = mlflow.pyfunc.load_model(record["model_uri"])
    x = load_dataset("digits").x_test[:16].numpy().astype(np.float32)
    logits = next(iter(served.predict(x).values()))
    student = load_model_bundle(bundle / "kdiga")  # checks every file's sha256 against the card
    import torch

    with torch.no_grad():
        expected = student(torch.from_numpy(x)).numpy()
    assert np.abs(logits - expected).max() < 1e-3


def test_an_unreachable_registry_never_fails_the_job(settings, seeded):
    settings = settings.model_copy(update={"mlflow_tracking_uri": f"http://127.0.0.1:{h.free_port()}"})
    started = time.monotonic()
    row = _run(settings, seeded, {"commit": "abc"})
    assert row.status == "succeeded"
    assert row.result["mlflow"]["error"].startswith("The export to MLflow failed (")
    assert time.monotonic() - started < 120
    assert row.result["metrics"]  # the job's own result is intact


def _leave_pending(settings, job_id: str, record: dict | None = None) -> None:
    """The row as a worker that died right after `succeeded` leaves it: the export pending, and
    finished longer ago than the retry delay."""
    from datetime import timedelta

    from sqlalchemy import update

    from kdiga_service.db import get_sessionmaker
    from kdiga_service.models import Job, utcnow

    row = h.job_row(settings, job_id)
    pending = record or {"state": "pending", "tracking_uri": settings.mlflow_tracking_uri}
    with get_sessionmaker(settings)() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            result={k: v for k, v in row.result.items() if k != "mlflow"} | {"mlflow": pending},
            finished_at=utcnow() - timedelta(seconds=settings.mlflow_export_retry_after_s + 60)))
        session.commit()


def test_an_export_a_dead_worker_left_pending_runs_once_from_the_stored_artifacts(settings, seeded, mlflow_server):
    from mlflow import MlflowClient

    from kdiga_service.storage import get_storage
    from worker import registry

    experiment = f"kdiga-pending-{uuid.uuid4().hex[:6]}"
    labels = {"mlflow_model_name": f"pending-{uuid.uuid4().hex[:6]}"}
    row = _run(settings, seeded, labels)  # MLflow not configured for the run itself: nothing exported
    assert "mlflow" not in row.result
    settings = settings.model_copy(update={"mlflow_tracking_uri": mlflow_server, "mlflow_experiment": experiment})
    _leave_pending(settings, row.id)
    store = get_storage(settings)
    assert registry.export_pending(settings, store, "test-worker") == [row.id]
    record = h.job_row(settings, row.id).result["mlflow"]
    assert record["model"] == labels["mlflow_model_name"] and record["version"] == "1", record
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    files = {f.path for f in client.list_artifacts(record["run_id"], "kdiga")}
    assert "kdiga/student.onnx" in files and "kdiga/model_card.json" in files  # from the artifact store
    assert registry.export_pending(settings, store, "test-worker") == []  # nothing pending any more

    # the worker died after MLflow registered the model, before it recorded that: recorded, not repeated
    _leave_pending(settings, row.id)
    assert registry.export_pending(settings, store, "test-worker") == [row.id]
    again = h.job_row(settings, row.id).result["mlflow"]
    assert again["run_id"] == record["run_id"] and again["version"] == "1"
    assert len(client.search_model_versions(f"name = '{labels['mlflow_model_name']}'")) == 1

    # a claim by another worker is left alone until it is as old as the retry delay (that worker died)
    from kdiga_service.models import utcnow

    _leave_pending(settings, row.id, {"state": "exporting", "by": "other", "since": utcnow().isoformat()})
    assert registry.export_pending(settings, store, "test-worker") == []
    _leave_pending(settings, row.id, {"state": "exporting", "by": "other", "since": "2000-01-01T00:00:00+00:00"})
    assert registry.export_pending(settings, store, "test-worker") == [row.id]



def test_two_workers_find_one_pending_export_and_one_of_them_runs_it_on_postgresql(tmp_path, teacher_file):
    import threading

    from sqlalchemy import update

    from kdiga_service.db import get_sessionmaker
    from kdiga_service.models import SUCCEEDED, Job
    from kdiga_service.storage import get_storage
    from worker import registry

    if not h.postgres_available():
        pytest.skip("needs the PostgreSQL server")
    with h.postgres_database() as db_url:
        # a registry that is down: the export fails fast and records why; what counts is who ran it
        s = h.make_settings(tmp_path / "home", database_url=db_url,
                            mlflow_tracking_uri=f"http://127.0.0.1:{h.free_port()}")
        h.migrate(s)
        owner = h.create_owner(s)[0]
        rows = h.seed_rows(s, owner, teacher_file)
        job_id = h.create_job_row(s, owner, h.tiny_job_request(rows["dataset_id"], rows["teacher_id"]))
        with get_sessionmaker(s)() as session:
            session.execute(update(Job).where(Job.id == job_id).values(status=SUCCEEDED, result={}))
            session.commit()
        _leave_pending(s, job_id)
        found: list[list[str]] = []
        go = threading.Barrier(2)

        def worker(name: str) -> None:
            go.wait()
            found.append(registry.export_pending(s, get_storage(s), name))

        threads = [threading.Thread(target=worker, args=(f"worker-{i}",)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(sum(found, [])) == [job_id], found  # claimed by exactly one
        record = h.job_row(s, job_id).result["mlflow"]
        assert record["error"].startswith("The export to MLflow failed (") and "state" not in record
