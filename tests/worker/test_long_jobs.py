"""Long jobs at the task layer (no broker): checkpoint uploads off the training loop, a run stopped by
its time budget, and a failure after training that keeps the trained weights for a retry."""

from __future__ import annotations

import json

import kdiga_svc_helpers as h
import pytest

from kdiga_service import crud
from kdiga_service.db import get_sessionmaker
from kdiga_service.models import Job
from kdiga_service.storage import get_storage
from worker import checkpoints, runner


def _write(folder, step, partial=None):
    """Replace the files by rename, as save_checkpoint does (the uploader's snapshots are hard links)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "last.safetensors.tmp").write_bytes(b"w" * 10 + str(step).encode())
    (folder / "last.safetensors.tmp").replace(folder / "last.safetensors")
    (folder / "last.json.tmp").write_text(json.dumps({"epoch": 1, "global_step": step, "partial": partial}))
    (folder / "last.json.tmp").replace(folder / "last.json")


def test_uploader_stores_the_latest_snapshot_and_flushes(settings, tmp_path):
    """Snapshots are taken at submit (a later write does not change them); flush waits for the store."""
    store = get_storage(settings)
    folder = tmp_path / "checkpoint"
    with checkpoints.CheckpointUploader(store, "job-u", tmp_path / "uploads") as uploads:
        for step in (3, 4, 5):
            _write(folder, step, partial={"step": step})
            uploads.submit(folder)
        stored = uploads.flush()
        _write(folder, 99)  # after the flush: not uploaded
    assert stored == "e00001-s000000005"
    dest = tmp_path / "down"
    assert checkpoints.download_checkpoint(store, "job-u", dest)
    assert json.loads((dest / "last.json").read_text())["global_step"] == 5
    assert (dest / "last.safetensors").read_bytes().endswith(b"5")
    assert not list((tmp_path / "uploads").iterdir())  # snapshots are removed once stored


def _request(seeded, **extra):
    return {**h.tiny_job_request(seeded["dataset_id"], seeded["teacher_id"], epochs=2, method="kd"), **extra}


@pytest.mark.slow
def test_time_budget_stops_then_resume_finishes(settings, seeded):
    job_id = h.create_job_row(settings, seeded["owner_id"], _request(seeded, limits={"time_budget_s": 1e-3}))
    outcome = runner.run_job(job_id, settings=settings)
    row = h.job_row(settings, job_id)
    assert (outcome.status, row.status) == ("stopped", "stopped"), row.error
    assert "time budget of 0.001 seconds" in row.error and "training stopped after step 1 of" in row.error
    assert get_storage(settings).exists(f"{checkpoints.checkpoint_prefix(job_id)}/latest.json")
    assert runner.run_job(job_id, settings=settings).status == "skipped"  # a stray delivery does not run it

    with get_sessionmaker(settings)() as session:
        job = session.get(Job, job_id)
        crud.resume_job(session, job=job, spec={**job.spec, "limits": {"time_budget_s": None}})
        session.commit()
    outcome = runner.run_job(job_id, settings=settings)
    row = h.job_row(settings, job_id)
    assert outcome.status == "succeeded", row.error
    card = _card(settings, job_id)
    assert card["training"]["resumed_from_step"] == 1 and card["training"]["steps"] > 1


def _card(settings, job_id):
    artifact = next(a for a in h.artifacts_of(settings, job_id) if a.name == "model_card.json")
    return json.loads(get_storage(settings).read_bytes(artifact.storage_key))


@pytest.mark.slow
def test_failure_in_evaluation_keeps_the_trained_weights_and_resume_only_evaluates(settings, seeded,
                                                                                   monkeypatch):
    """Issue 17: the evaluation fails after training (a fault injected into the evaluation); the row is
    failed and resumable, the trained checkpoint is in the store, and the retry trains nothing."""
    from kdiga_core import evaluate as evaluate_mod

    real, calls = evaluate_mod.evaluate, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("injected evaluation fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_mod, "evaluate", flaky)
    job_id = h.create_job_row(settings, seeded["owner_id"], _request(seeded))
    store = get_storage(settings)
    for attempt in (1, 2):  # the retry fails again (it trained nothing): still resumable
        assert runner.run_job(job_id, settings=settings).status == "failed"
        row = h.job_row(settings, job_id)
        assert row.result == {"resumable": "evaluation"}, attempt
        assert "injected evaluation fault" in row.error and "retries the evaluation without retraining" in row.error
        pointer = json.loads(store.read_bytes(f"{checkpoints.checkpoint_prefix(job_id)}/latest.json"))
        assert pointer["epoch"] == 2  # the finished training
        _resume(settings, job_id)
    assert runner.run_job(job_id, settings=settings).status == "succeeded", h.job_row(settings, job_id).error
    training = _card(settings, job_id)["training"]
    assert training["resumed_from_step"] == training["steps"] > 0  # nothing was trained again
    assert len(calls) == 3


def _resume(settings, job_id):
    with get_sessionmaker(settings)() as session:
        crud.resume_job(session, job=session.get(Job, job_id))
        session.commit()


@pytest.mark.slow
def test_near_the_soft_time_limit_a_job_stops_resumably(settings, seeded):
    """A run nearing KDIGA_JOB_SOFT_TIME_LIMIT_S (1 s here; the job takes several) stops as `stopped`,
    not failed; resumed under a longer limit, it finishes."""
    short = settings.model_copy(update={"job_soft_time_limit_s": 1, "job_hard_time_limit_s": 60})
    # enough epochs that training outlasts the 1 s limit on a fast machine too (2 epochs took < 1 s)
    request = {**_request(seeded), "train": {**_request(seeded)["train"], "epochs": 40}}
    job_id = h.create_job_row(settings, seeded["owner_id"], request)
    assert runner.run_job(job_id, settings=short).status == "stopped"
    row = h.job_row(settings, job_id)
    assert row.error.startswith("The job reached the service's time limit for one run"), row.error
    _resume(settings, job_id)
    assert runner.run_job(job_id, settings=settings).status == "succeeded", h.job_row(settings, job_id).error


@pytest.mark.slow
def test_evaluate_job_stops_between_evaluation_batches_and_resumes(settings, seeded):
    request = {"kind": "evaluate", "dataset_id": seeded["dataset_id"], "teacher_id": None,
               "model": {"teacher_id": seeded["teacher_id"], "job_id": None}, "evaluation": h.TINY_EVAL,
               "limits": {"time_budget_s": 1e-3}}
    job_id = h.create_job_row(settings, seeded["owner_id"], request)
    assert runner.run_job(job_id, settings=settings).status == "stopped"
    assert h.job_row(settings, job_id).error == ("The job reached its time budget of 0.001 seconds "
                                                 "(limits.time_budget_s) during evaluation; its finished batches "
                                                 "are kept, and resuming the job continues it.")
    with get_sessionmaker(settings)() as session:
        job = session.get(Job, job_id)
        crud.resume_job(session, job=job, spec={**job.spec, "limits": {}})
        session.commit()
    assert runner.run_job(job_id, settings=settings).status == "succeeded", h.job_row(settings, job_id).error


@pytest.mark.slow
def test_resumed_evaluation_reuses_the_teacher_measured_before_the_failure(settings, seeded, monkeypatch, caplog):
    """The teacher's evaluation is kept in the job's checkpoint: after a failure in the alignment stage
    (injected), the retry reuses it even with the worker's own teacher cache wiped. The student's attack
    batches (issue 11) were handed over with the checkpoint at the failure: the retry measures none again.
    That evaluation checkpoint sent only its evaluation files, not the trained weights again."""
    import logging
    import shutil

    from kdiga_core.evaluate import accuracy as accuracy_mod
    from kdiga_core.evaluate import report as report_mod
    from worker.inputs import teacher_cache_dir

    real, calls = report_mod.alignment_report, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected alignment fault")
        return real(*args, **kwargs)

    real_build, batches = accuracy_mod.build_attack, []  # one attack is built per measured batch
    monkeypatch.setattr(accuracy_mod, "build_attack", lambda *a, **kw: batches.append(1) or real_build(*a, **kw))
    monkeypatch.setattr(report_mod, "alignment_report", flaky)
    request = _request(seeded, evaluation={**h.TINY_EVAL, "alignment": True, "linearity_steps": 2})
    job_id = h.create_job_row(settings, seeded["owner_id"], request)
    with caplog.at_level(logging.INFO, logger="worker.checkpoints"):
        assert runner.run_job(job_id, settings=settings).status == "failed"
    assert h.job_row(settings, job_id).result == {"resumable": "evaluation"}
    pointer = json.loads(get_storage(settings).read_bytes(f"{checkpoints.checkpoint_prefix(job_id)}/latest.json"))
    assert any(name.startswith("eval/partial/") for name in pointer["files"])
    uploads = [r for r in caplog.records if r.getMessage() == "checkpoint uploaded"]
    evaluation = sum(o["size"] for name, o in pointer["objects"].items() if name.startswith("eval/"))
    weights = pointer["objects"]["last.safetensors"]["size"]
    trained = [r for r in uploads if r.files == uploads[0].files]  # last.json + last.safetensors
    later = uploads[len(trained):]
    assert trained and all(r.sent_bytes > weights for r in trained)
    assert any(r.sent_bytes for r in later)
    assert all(r.sent_bytes <= evaluation < weights for r in later)  # the weights were not sent again
    measured = len(batches)
    assert measured > 0
    shutil.rmtree(teacher_cache_dir(settings), ignore_errors=True)

    _resume(settings, job_id)
    assert runner.run_job(job_id, settings=settings).status == "succeeded", h.job_row(settings, job_id).error
    assert len(batches) == measured
    artifact = next(a for a in h.artifacts_of(settings, job_id) if a.name == "report.json")
    report = json.loads(get_storage(settings).read_bytes(artifact.storage_key))
    assert report["teacher_evaluation"]["cached"] is True and "alignment" in report


def test_hard_time_limit_with_a_stored_checkpoint_is_a_stop(settings, seeded, tmp_path):
    from sqlalchemy import update

    from kdiga_service.models import utcnow

    job_id = h.create_job_row(settings, seeded["owner_id"], _request(seeded))
    with get_sessionmaker(settings)() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running", attempts=1,
                                                                   heartbeat_at=utcnow(), worker_id="h:1:1"))
        session.commit()
    _write(tmp_path / "checkpoint", 7)
    checkpoints.upload_checkpoint(get_storage(settings), job_id, tmp_path / "checkpoint")
    runner.fail_after_hard_time_limit(job_id, settings=settings)
    row = h.job_row(settings, job_id)
    assert row.status == "stopped" and "resuming it continues from its last checkpoint" in row.error
