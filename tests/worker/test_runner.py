"""The task layer called directly (no broker): claims, retries cap, cancel, checkpoints, artifacts."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta

import kdiga_svc_helpers as h
import numpy as np
import pytest
from sqlalchemy import update

from kdiga_service.db import get_sessionmaker
from kdiga_service.models import Job, utcnow
from kdiga_service.storage import get_storage
from worker import checkpoints, outputs, ownership, progress, runner, validation

DEAD_PID = 4_000_000  # above pid_max's default: never a live process


def _set(settings, job_id, **values):
    with get_sessionmaker(settings)() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def _job(settings, seeded):
    return h.create_job_row(settings, seeded["owner_id"],
                            h.tiny_job_request(seeded["dataset_id"], seeded["teacher_id"]))


def _claim(settings, job_id):
    with get_sessionmaker(settings)() as session:
        job = session.get(Job, job_id)
        return runner._claim(session, job, ownership.worker_identity(), settings)


def test_claim_twice_second_is_a_noop(settings, seeded):
    job_id = _job(settings, seeded)
    first, _ = _claim(settings, job_id)
    assert first is not None and first.status == "running" and first.attempts == 1
    _set(settings, job_id, worker_id=f"{socket.gethostname()}:{os.getppid()}")  # a live process owns it
    second, why = _claim(settings, job_id)
    assert second is None
    assert why.status == "busy" and why.retry_in and why.retry_in > 0
    assert h.job_row(settings, job_id).attempts == 1


def test_finished_job_is_skipped(settings, seeded):
    job_id = _job(settings, seeded)
    _set(settings, job_id, status="succeeded", finished_at=utcnow())
    assert runner.run_job(job_id, settings=settings).status == "skipped"
    assert runner.run_job("no-such-job", settings=settings).status == "skipped"


def test_dead_owner_is_taken_over_at_once(settings, seeded):
    job_id = _job(settings, seeded)
    _set(settings, job_id, status="running", attempts=1, heartbeat_at=utcnow(),
         worker_id=f"{socket.gethostname()}:{DEAD_PID}")
    claimed, _ = _claim(settings, job_id)
    assert claimed is not None and claimed.attempts == 2


def test_stale_heartbeat_elsewhere_is_taken_over(settings, seeded):
    job_id = _job(settings, seeded)
    _set(settings, job_id, status="running", attempts=1, worker_id="another-host:123",
         heartbeat_at=utcnow() - timedelta(seconds=settings.heartbeat_stale_s + 5))
    claimed, _ = _claim(settings, job_id)
    assert claimed is not None and claimed.attempts == 2


def test_fresh_heartbeat_elsewhere_is_left_alone(settings, seeded):
    job_id = _job(settings, seeded)
    _set(settings, job_id, status="running", attempts=1, worker_id="another-host:123", heartbeat_at=utcnow())
    outcome = runner.run_job(job_id, settings=settings)
    assert outcome.status == "busy"
    assert h.job_row(settings, job_id).worker_id == "another-host:123"


def test_retry_cap_fails_the_job_with_a_reason(settings, seeded):
    cap = settings.task_max_retries + 1
    job_id = _job(settings, seeded)
    _set(settings, job_id, status="running", attempts=cap, heartbeat_at=utcnow(),
         worker_id=f"{socket.gethostname()}:{DEAD_PID}")
    outcome = runner.run_job(job_id, settings=settings)
    assert outcome.status == "failed"
    row = h.job_row(settings, job_id)
    assert row.status == "failed"
    assert row.error == (f"The job was interrupted {cap} times (the worker died each time, e.g. out of memory); "
                         "giving up.")
    assert row.finished_at is not None


def test_cancel_requested_before_start(settings, seeded):
    job_id = _job(settings, seeded)
    _set(settings, job_id, status="running", attempts=1, cancel_requested=True, heartbeat_at=utcnow(),
         worker_id=f"{socket.gethostname()}:{DEAD_PID}")
    assert runner.run_job(job_id, settings=settings).status == "cancelled"
    assert h.job_row(settings, job_id).status == "cancelled"


def test_reporter_throttles_writes_and_sees_cancel(settings, seeded):
    job_id = _job(settings, seeded)
    me = ownership.worker_identity()
    claimed, _ = _claim(settings, job_id)
    reporter = progress.Reporter(job_id, me, settings)
    writes = []
    original = runner.crud.update_progress

    def counting(*args, **kwargs):
        writes.append(kwargs["progress"])
        return original(*args, **kwargs)

    runner.crud.update_progress = counting
    try:
        for step in range(1, 2001):
            reporter.on_step({"phase": "train", "epoch": 1, "epochs": 1, "step": step, "steps_per_epoch": 2000,
                              "percent": step / 20, "eta_s": 1.0, "loss": 0.5, "iga": float("nan")})
    finally:
        runner.crud.update_progress = original
    assert 1 <= len(writes) <= 5  # 2000 calls in well under a second
    row = h.job_row(settings, job_id)
    assert row.progress["step"] == writes[-1]["step"] and row.progress["phase"] == "train"
    assert row.metrics["live"]["iga"] is None and row.metrics["live"]["loss"] == 0.5
    assert row.heartbeat_at is not None
    assert reporter.should_cancel() is False
    _set(settings, job_id, cancel_requested=True)
    reporter._last_check = float("-inf")
    assert reporter.should_cancel() is True


def test_reporter_writes_the_update_its_throttle_held_back(settings, seeded):
    """The last stage of a phase is not lost behind the throttle: the background thread writes it once the
    interval is over, and `settle` writes what is left when the work ends (a CI log never shows a stale
    stage)."""
    job_id = _job(settings, seeded)
    _claim(settings, job_id)
    reporter = progress.Reporter(job_id, ownership.worker_identity(),
                                 settings.model_copy(update={"progress_interval_s": 0.3}))
    reporter.start()
    try:
        reporter.on_step({"phase": "evaluate", "stage": "model: clean accuracy", "percent": 0.0})
        reporter.on_step({"phase": "evaluate", "stage": "model: pgd-20", "percent": 40.0})  # held back
        deadline = time.monotonic() + 30
        while h.job_row(settings, job_id).progress.get("stage") != "model: pgd-20" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert h.job_row(settings, job_id).progress["stage"] == "model: pgd-20"
        reporter.on_step({"phase": "evaluate", "stage": "model: eps curve", "percent": 60.0})
        reporter.on_step({"phase": "evaluate", "stage": "done", "percent": 100.0})
        reporter.settle()
        assert h.job_row(settings, job_id).progress["stage"] == "done"
        reporter.on_step({"phase": "evaluate", "stage": "late", "percent": 100.0})  # after settle: nothing
    finally:
        reporter.stop()
    assert h.job_row(settings, job_id).progress["stage"] == "done"


def test_reporter_notices_a_lost_claim(settings, seeded):
    job_id = _job(settings, seeded)
    claimed, _ = _claim(settings, job_id)
    reporter = progress.Reporter(job_id, ownership.worker_identity(), settings)
    _set(settings, job_id, worker_id="someone-else:1")
    reporter.beat()
    assert reporter.lost and reporter.should_cancel()


def test_checkpoint_upload_points_to_the_latest_epoch(settings, tmp_path):
    store = get_storage(settings)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for epoch in (1, 2):
        (ckpt / "last.json").write_text(json.dumps({"epoch": epoch}))
        (ckpt / "last.safetensors").write_bytes(b"weights-%d" % epoch)
        checkpoints.upload_checkpoint(store, "job-1", ckpt)
    assert not store.exists("jobs/job-1/checkpoint/e00001/last.json")  # the older one is gone
    dest = tmp_path / "restored"
    assert checkpoints.download_checkpoint(store, "job-1", dest)
    assert (dest / "last.safetensors").read_bytes() == b"weights-2"
    assert json.loads((dest / "last.json").read_text())["epoch"] == 2
    assert not checkpoints.download_checkpoint(store, "job-2", tmp_path / "none")


def test_checkpoint_keeps_the_sweep_folder(settings, tmp_path):
    """The γ sweep's journal and running trial live in checkpoint/sweep/: uploaded and restored with the rest."""
    store = get_storage(settings)
    ckpt = tmp_path / "ckpt"
    (ckpt / "sweep" / "trial-2").mkdir(parents=True)
    (ckpt / "sweep" / "optuna.journal").write_text("journal-1")
    (ckpt / "sweep" / "trial-2" / "last.json").write_text(json.dumps({"epoch": 3}))
    first = checkpoints.upload_checkpoint(store, "job-s", ckpt)
    (ckpt / "sweep" / "optuna.journal").write_text("journal-2")  # a later decision of the same trial
    second = checkpoints.upload_checkpoint(store, "job-s", ckpt)
    assert first != second and not store.exists(f"jobs/job-s/checkpoint/{first}/sweep/optuna.journal")
    dest = tmp_path / "restored"
    assert checkpoints.download_checkpoint(store, "job-s", dest)
    assert (dest / "sweep" / "optuna.journal").read_text() == "journal-2"
    assert json.loads((dest / "sweep" / "trial-2" / "last.json").read_text())["epoch"] == 3


def test_checkpoint_pointer_with_unsafe_names_is_not_followed(settings, tmp_path):
    store = get_storage(settings)
    store.write_bytes("jobs/job-u/checkpoint/latest.json",
                      json.dumps({"folder": "e00001", "files": ["../../escape", "/abs"]}).encode())
    dest = tmp_path / "restored"
    assert checkpoints.download_checkpoint(store, "job-u", dest)
    assert not (tmp_path / "escape").exists() and not list(dest.rglob("*"))


def test_storing_artifacts_twice_replaces_them(settings, seeded, tmp_path):
    job_id = _job(settings, seeded)
    kinds = {"student.safetensors": "student_weights", "model_card.json": "model_card", "report.json": "report_json",
             "report.html": "report_html", "student.onnx": "onnx"}
    files = {}
    for name in kinds:
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    artifacts = [{"name": n, "path": p, "kind": kinds[n]} for n, p in files.items()]
    store = get_storage(settings)
    with get_sessionmaker(settings)() as session:
        job = session.get(Job, job_id)
        first = {a.name: a.id for a in outputs.store_artifacts(session, store, job, artifacts)}
        files["report.json"].write_bytes(b"newer")
        second = {a.name: (a.id, a.kind, a.sha256) for a in outputs.store_artifacts(session, store, job, artifacts)}
    assert {k: v[0] for k, v in second.items()} == first
    rows = h.artifacts_of(settings, job_id)
    assert sorted(a.name for a in rows) == sorted(files)
    assert {a.name: a.kind for a in rows}["student.safetensors"] == "student_weights"
    report = next(a for a in rows if a.name == "report.json")
    assert store.read_bytes(report.storage_key) == b"newer" and report.size_bytes == 5


def test_validate_teacher_ready_and_invalid(settings, owner, teacher_file, tmp_path):
    from kdiga_service import crud

    store = get_storage(settings)
    good = store.upload_file(teacher_file, "teachers/good.safetensors")
    bad_path = tmp_path / "bad.pt"
    bad_path.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # looks like a pickle
    bad = store.upload_file(bad_path, "teachers/bad.pt")
    with get_sessionmaker(settings)() as session:
        spec = {k: v for k, v in h.TEACHER_META.items() if k != "name"}
        t_good = crud.create_teacher(session, owner_id=owner, name="g", format="safetensors", stored=good, spec=spec)
        t_bad = crud.create_teacher(session, owner_id=owner, name="b", format="unknown", stored=bad, spec=spec)
        session.commit()
        ids = (t_good.id, t_bad.id)
    assert validation.validate_teacher(ids[0], settings=settings).status == "succeeded"
    assert validation.validate_teacher(ids[0], settings=settings).status == "skipped"  # already ready
    assert validation.validate_teacher(ids[1], settings=settings).status == "failed"
    from kdiga_service.models import Teacher

    with get_sessionmaker(settings)() as session:
        good_row, bad_row = session.get(Teacher, ids[0]), session.get(Teacher, ids[1])
        assert good_row.status == "ready" and good_row.spec["arch"] == "cnn_tiny" and good_row.error is None
        assert bad_row.status == "invalid" and bad_row.error and bad_row.error.endswith(".")


def test_validate_datasets(settings, owner, tmp_path):
    from kdiga_service.models import Dataset

    store = get_storage(settings)
    npz = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x_train=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), y_train=np.arange(20) % 2,
             x_test=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), y_test=np.arange(6) % 2)
    stored = store.upload_file(npz, "datasets/d.npz")
    junk = store.write_bytes("datasets/junk.npz", b"not a zip at all")
    with get_sessionmaker(settings)() as session:
        rows = [
            Dataset(owner_id=owner, name="digits", kind="builtin", builtin="digits"),
            Dataset(owner_id=owner, name="npz", kind="npz", storage_key=stored.key, size_bytes=stored.size_bytes,
                    sha256=stored.sha256),
            Dataset(owner_id=owner, name="junk", kind="npz", storage_key=junk.key, size_bytes=junk.size_bytes,
                    sha256=junk.sha256),
        ]
        session.add_all(rows)
        session.commit()
        ids = [r.id for r in rows]
    assert [validation.validate_dataset(i, settings=settings).status for i in ids] == ["succeeded", "succeeded", "failed"]
    with get_sessionmaker(settings)() as session:
        digits, small, junk_row = (session.get(Dataset, i) for i in ids)
        assert digits.status == "ready" and digits.num_classes == 10 and digits.input_shape == [1, 8, 8]
        assert small.status == "ready" and small.train_size == 20 and small.test_size == 6
        assert junk_row.status == "invalid" and junk_row.error


@pytest.mark.slow
def test_run_job_end_to_end_then_again(settings, seeded):
    job_id = _job(settings, seeded)
    outcome = runner.run_job(job_id, settings=settings)
    row = h.job_row(settings, job_id)
    assert outcome.status == "succeeded", row.error
    assert row.status == "succeeded" and row.attempts == 1 and row.progress["percent"] == 100.0
    names = sorted(a.name for a in h.artifacts_of(settings, job_id))
    assert names == ["model_card.json", "report.html", "report.json", "student.onnx", "student.safetensors"]
    assert row.result["metrics"]["student_clean_accuracy"] is not None
    assert not get_storage(settings).exists(f"{checkpoints.checkpoint_prefix(job_id)}/latest.json")
    assert runner.run_job(job_id, settings=settings).status == "skipped"  # a second delivery does nothing
    assert sorted(a.name for a in h.artifacts_of(settings, job_id)) == names


def test_owner_is_dead():
    host = socket.gethostname()
    assert ownership.owner_is_dead(f"{host}:{DEAD_PID}:1")
    assert not ownership.owner_is_dead(f"{host}:{os.getppid()}:1")  # a live process
    assert not ownership.owner_is_dead(f"other-host:{DEAD_PID}:1")  # cannot tell: rely on the heartbeat
    assert ownership.owner_is_dead(ownership.worker_identity())  # our own earlier attempt
    import threading

    done = threading.Event()
    sibling = threading.Thread(target=done.wait)
    sibling.start()
    try:
        assert not ownership.owner_is_dead(f"{host}:{os.getpid()}:{sibling.ident}")  # a live sibling thread
    finally:
        done.set()
        sibling.join()
    assert not ownership.owner_is_dead(None) and not ownership.owner_is_dead("garbage")


@pytest.mark.slow
def test_adversarial_train_registers_a_teacher_then_evaluate_it(settings, seeded):
    from kdiga_service.models import Teacher

    request = {"kind": "adversarial_train", "name": "robust", "dataset_id": seeded["dataset_id"],
               "student": {"arch": "cnn_tiny"}, "objective": {"method": "pgd_at", "attack_steps": 1},
               "train": {"epochs": 1, "batch_size": 128, "device": "cpu"}, "evaluation": h.TINY_EVAL}
    trained = h.create_job_row(settings, seeded["owner_id"], request)
    outcome = runner.run_job(trained, settings=settings)
    assert outcome.status == "succeeded", h.job_row(settings, trained).error
    teacher_id = h.job_row(settings, trained).result["teacher_id"]
    with get_sessionmaker(settings)() as session:
        teacher = session.get(Teacher, teacher_id)
        assert teacher.status == "ready" and teacher.source_job_id == trained and teacher.name == "robust"
        assert teacher.spec["arch"] == "cnn_tiny" and teacher.owner_id == seeded["owner_id"]
    with get_sessionmaker(settings)() as session:  # a rerun finds the same deterministic teacher
        job = session.get(Job, trained)
        assert outputs.register_teacher(session, get_storage(settings), job, {}) == teacher_id

    evaluate = {"kind": "evaluate", "dataset_id": seeded["dataset_id"], "teacher_id": seeded["teacher_id"],
                "model": {"job_id": trained, "teacher_id": None}, "evaluation": h.TINY_EVAL}
    job_id = h.create_job_row(settings, seeded["owner_id"], evaluate)
    outcome = runner.run_job(job_id, settings=settings)
    row = h.job_row(settings, job_id)
    assert outcome.status == "succeeded", row.error
    assert sorted(a.name for a in h.artifacts_of(settings, job_id)) == ["report.html", "report.json"]
    report = json.loads(get_storage(settings).read_bytes(
        next(a for a in h.artifacts_of(settings, job_id) if a.name == "report.json").storage_key))
    assert set(report["models"]) == {"model", "teacher"}  # an evaluate job's model is no "student"
    assert abs(report["models"]["model"]["clean_accuracy"]
               - h.job_row(settings, trained).metrics["model_clean_accuracy"]) < 1e-6
    assert not any(k.startswith("student_") for k in h.job_row(settings, trained).metrics)  # a teacher job
    assert report["about"]["models"]["model"]["source_job_id"] == trained
    assert report["about"]["models"]["teacher"]["id"] == seeded["teacher_id"]


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["train", "evaluate", "sweep"])
def test_running_job_is_cancelled(settings, seeded, phase):
    import threading

    request = h.tiny_job_request(seeded["dataset_id"], seeded["teacher_id"], epochs=3, batch_size=16, method="kd")
    if phase == "evaluate":
        # an evaluation of seconds, not the tiny one: the tiny one (and the export after it) could end
        # between two of the worker's throttled progress writes, so "evaluate" was never on the row to
        # cancel in; the cancel is checked at every evaluation batch, so the job ends soon after it
        request["train"]["epochs"] = 1
        request["evaluation"] = {**h.TINY_EVAL, "max_points": 360, "batch_size": 16,
                                 "attacks": [{"name": "pgd", "eps": 0.1, "steps": 200}]}
    if phase == "sweep":  # γ "auto": cancelled while the sweep trains its trials
        request["objective"] = {"method": "kdiga", "iga_mode": "finite_difference",
                                "sweep": {"gammas": [1.0, 10.0], "attack_steps": 1, "validation_points": 50}}
    job_id = h.create_job_row(settings, seeded["owner_id"], request)

    def cancel_when_in_phase():
        h.wait_for(lambda: h.job_row(settings, job_id).progress.get("phase") == phase, 120, interval=0.05,
                   what=phase)
        _set(settings, job_id, status="cancelling", cancel_requested=True)

    canceller = threading.Thread(target=cancel_when_in_phase, daemon=True)
    canceller.start()
    outcome = runner.run_job(job_id, settings=settings)
    canceller.join(5)
    row = h.job_row(settings, job_id)
    assert outcome.status == "cancelled" and row.status == "cancelled", row.error
    assert row.finished_at is not None
    if phase == "train":
        assert row.progress["epoch"] == 1
    assert h.artifacts_of(settings, job_id) == []


def test_hard_time_limit_is_recorded_on_the_row(settings, seeded):
    job_id = _job(settings, seeded)
    _set(settings, job_id, status="running", attempts=1, heartbeat_at=utcnow(), worker_id="h:1:1")
    runner.fail_after_hard_time_limit(job_id, settings=settings)
    row = h.job_row(settings, job_id)
    limit = max(settings.job_hard_time_limit_s, settings.job_soft_time_limit_s + 30)
    assert row.status == "failed"
    assert row.error == f"The job exceeded its time limit of {limit} seconds and was stopped."
