"""kdiga_core.jobs: typed inputs, artifacts with their kinds, methods per kind, progress across phases."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kdiga_core import evaluate as E
from kdiga_core import formats, jobs, models
from kdiga_core.artifacts import ARTIFACT_KINDS
from kdiga_core.config import ModelSpec
from kdiga_core.errors import CancelledError, KdigaError, StoppedError
from kdiga_core.train import resolve_device

torch.set_num_threads(1)

DIGITS = {"kind": "digits"}
TINY_EVAL = {"attacks": [{"name": "pgd", "eps": 0.1, "steps": 2}], "max_points": 20, "eps_curve": [0.0, 0.1],
             "curve_attack_steps": 1, "linearity_steps": 2, "smoothing_points": 3, "smoothing_samples": 10,
             "latency": False, "batch_size": 16}


def _spec(method: str = "kd", arch: str = "cnn_tiny", device: str = "cpu", **objective) -> dict:
    return {"student": {"arch": arch}, "objective": {"method": method, **objective},
            "train": {"epochs": 1, "batch_size": 256, "lr": 0.01, "device": device}, "evaluation": TINY_EVAL}


def _saved(tmp_path, arch: str, name: str, seed: int = 0) -> jobs.ModelInput:
    torch.manual_seed(seed)
    spec = ModelSpec(arch=arch, num_classes=10, in_chans=1, img_size=8)
    artifacts = formats.save_model_bundle(models.build_model(spec).eval(), tmp_path / name, name=name)
    return jobs.ModelInput(next(a["path"] for a in artifacts if a["kind"] == "student_weights"), spec.to_dict())


def test_distill_job_returns_artifacts_with_their_kinds(tmp_path):
    teacher = _saved(tmp_path, "cnn_small", "teacher")
    result = jobs.run_job("distill", _spec(), tmp_path / "work", jobs.JobInputs(DIGITS, teacher=teacher))
    assert [(a["name"], a["kind"]) for a in result["artifacts"]] == [
        ("student.safetensors", "student_weights"), ("student.onnx", "onnx"), ("model_card.json", "model_card"),
        ("report.json", "report_json"), ("report.html", "report_html")]
    assert all(a["path"].is_file() and a["path"].name == a["name"] for a in result["artifacts"])
    assert result["model_file"] == "student.safetensors" and result["model_spec"]["arch"] == "cnn_tiny"
    report = json.loads(next(a["path"] for a in result["artifacts"] if a["kind"] == "report_json").read_text())
    assert report["points"]["method"] == "stratified" and set(report["models"]) == {"student", "teacher"}
    card = json.loads(next(a["path"] for a in result["artifacts"] if a["kind"] == "model_card").read_text())
    # the student was given no mean/std: its card says the normalisation was defaulted (issue 17.4); the
    # teacher's (a bundle of ours) comes from the mean/std stored in its file
    assert card["normalisation"]["source"] == "default" and card["normalisation"]["defaulted"] is True
    assert card["training"]["teacher_normalisation"]["source"] == "spec"
    assert card["training"]["teacher_normalisation"]["mean"] == [0.5]


def test_adversarial_train_makes_model_weights_not_student_weights(tmp_path):
    spec = _spec("pgd_at", attack_steps=1, attack_eps=0.05, attack_step=0.05)
    result = jobs.run_job("adversarial_train", spec, tmp_path / "work", jobs.JobInputs(DIGITS))
    kinds = {a["name"]: a["kind"] for a in result["artifacts"]}
    assert kinds["model.safetensors"] == "model_weights" and "student_weights" not in kinds.values()
    assert set(kinds.values()) <= set(ARTIFACT_KINDS) and result["model_file"] == "model.safetensors"


def test_each_kind_accepts_only_its_methods(tmp_path):
    assert set(jobs.METHODS_BY_KIND) == set(jobs.JOB_KINDS) and jobs.METHODS_BY_KIND["evaluate"] == ()
    inputs = jobs.JobInputs(DIGITS, teacher=_saved(tmp_path, "cnn_small", "teacher"))
    with pytest.raises(KdigaError, match=r"^Method 'kdiga' cannot train a model from scratch; use one of: "
                                         + ", ".join(jobs.METHODS_BY_KIND["adversarial_train"]) + r"\.$"):
        jobs.run_job("adversarial_train", _spec("kdiga"), tmp_path / "a", inputs)
    with pytest.raises(KdigaError, match=r"^Method 'pgd_at' cannot distill; use one of: "):
        jobs.run_job("distill", _spec("pgd_at"), tmp_path / "b", inputs)
    with pytest.raises(KdigaError, match="^Unknown job kind 'prune'; valid names are: distill, "):
        jobs.run_job("prune", _spec(), tmp_path / "c", inputs)


def test_progress_has_one_job_percent_across_train_and_evaluate(tmp_path):
    events: list[dict] = []
    teacher = _saved(tmp_path, "cnn_small", "teacher")
    jobs.run_job("distill", _spec(), tmp_path / "work", jobs.JobInputs(DIGITS, teacher=teacher),
                 jobs.JobHooks(on_step=events.append))
    phases = [e["phase"] for e in events]
    assert phases[0] == "train" and phases[-1] == "export"  # writing the files is a phase too
    assert phases == sorted(phases, key=["train", "evaluate", "export"].index)  # one pass through the phases
    export = [e for e in events if e["phase"] == "export"]
    assert [e["stage"] for e in export] == ["model weights, ONNX and model card", "report", "done"]
    assert all(e["eta_s"] is not None for e in export) and export[-1]["percent"] == 100.0
    job = [e["job_percent"] for e in events]
    assert job == sorted(job) and job[-1] == 100.0 and events[-1]["job_eta_s"] == 0.0
    first_eval = next(e for e in events if e["phase"] == "evaluate")
    last_train = [e for e in events if e["phase"] == "train"][-1]
    # percent is the phase's own; job_percent goes on from where training left it
    assert last_train["percent"] == pytest.approx(100.0) and first_eval["percent"] < 10.0
    assert 0.0 < last_train["job_percent"] < 100.0 and first_eval["job_percent"] >= last_train["job_percent"]
    assert {"stage", "points_done", "points_total", "eta_s"} <= set(first_eval)


def test_evaluation_runs_on_the_training_device(tmp_path, monkeypatch):
    seen = {}
    real = E.evaluate

    def spy(model, data, cfg, *, teacher=None, **kw):
        seen["model"], seen["teacher"] = E.model_device(model), E.model_device(teacher)
        return real(model, data, cfg, teacher=teacher, **kw)

    monkeypatch.setattr(jobs.evaluate_mod, "evaluate", spy)
    teacher = _saved(tmp_path, "cnn_small", "teacher")
    jobs.run_job("distill", _spec(device="auto"), tmp_path / "work", jobs.JobInputs(DIGITS, teacher=teacher))
    device = resolve_device("auto")  # CUDA when there is one: the test then checks the GPU path
    assert {role: (d.type, d.index or 0) for role, d in seen.items()} == {
        "model": (device.type, device.index or 0), "teacher": (device.type, device.index or 0)}


def test_cancel_is_honoured_during_evaluation(tmp_path):
    evaluating = []
    hooks = jobs.JobHooks(on_step=lambda e: evaluating.append(e) if e["phase"] == "evaluate" else None,
                          should_cancel=lambda: bool(evaluating))
    with pytest.raises(CancelledError):
        jobs.run_job("adversarial_train", _spec("ce"), tmp_path / "work", jobs.JobInputs(DIGITS), hooks)
    assert len(evaluating) == 1 and not (tmp_path / "work" / "out" / "report.json").exists()


def _attack_batch(event: dict) -> bool:
    """An evaluation tick after a measured batch of an attack (a fresh run's start ticks say 0 points)."""
    return event["phase"] == "evaluate" and ("pgd-" in event["stage"] or "eps curve (" in event["stage"]) \
        and event["points_done"] > 0


def test_a_stopped_evaluation_is_handed_over_once_and_the_resumed_job_measures_only_the_rest(tmp_path):
    """Issue 11: the job stops (as its time budget would) after k attack batches; with an hour between
    checkpoints the kept batches reach ``on_checkpoint`` once, at the stop; a job resumed from that folder
    alone (another worker) measures only the other batches and reports the same numbers."""
    inputs = jobs.JobInputs(DIGITS, teacher=_saved(tmp_path, "cnn_tiny", "model"))
    spec = {"evaluation": {**TINY_EVAL, "batch_size": 1}, "limits": {"checkpoint_every_s": 3600}}
    full_events: list[dict] = []
    full = jobs.run_job("evaluate", spec, tmp_path / "full", inputs, jobs.JobHooks(on_step=full_events.append))
    k = 3
    assert sum(map(_attack_batch, full_events)) > k  # the stop falls inside the attacks

    handed, seen = [], []

    def on_checkpoint(folder):  # what the worker uploads: the folder as it is now
        handed.append(shutil.copytree(folder, tmp_path / f"upload{len(handed)}"))

    def on_step(event):
        seen.append(event)
        if _attack_batch(event) and sum(map(_attack_batch, seen)) == k:
            raise StoppedError("stopped by the test")

    with pytest.raises(StoppedError):
        jobs.run_job("evaluate", spec, tmp_path / "first", inputs,
                     jobs.JobHooks(on_step=on_step, on_checkpoint=on_checkpoint))
    assert len(handed) == 1 and list((handed[0] / "eval" / "partial").glob("*.json"))
    shutil.copytree(handed[0], tmp_path / "second" / "checkpoint")
    events: list[dict] = []
    resumed = jobs.run_job("evaluate", spec, tmp_path / "second", inputs, jobs.JobHooks(on_step=events.append),
                           resume=True)
    assert resumed["report"]["models"] == full["report"]["models"]
    evaluating = [e for e in full_events if e["phase"] == "evaluate"]
    assert len(evaluating) - len([e for e in events if e["phase"] == "evaluate"]) == k


def test_evaluate_job_with_a_batchnorm_teacher_keeps_its_evaluation(tmp_path):
    student = formats.save_model_bundle(models.build_model(ModelSpec("cnn_tiny", 10, 1, 8)).eval(),
                                        tmp_path / "bundle", name="student")
    teacher = _saved(tmp_path, "resnet_small", "bn-teacher")  # BatchNorm: 0-dim num_batches_tracked
    inputs = jobs.JobInputs(DIGITS, teacher=teacher, model_dir=student[0]["path"].parent,
                            teacher_cache_dir=tmp_path / "cache")
    events: list[dict] = []
    first = jobs.run_job("evaluate", {"evaluation": TINY_EVAL}, tmp_path / "w1", inputs,
                         jobs.JobHooks(on_step=events.append))
    second = jobs.run_job("evaluate", {"evaluation": TINY_EVAL}, tmp_path / "w2", inputs)
    assert first["report"]["teacher_evaluation"]["cached"] is False
    assert second["report"]["teacher_evaluation"] == {**first["report"]["teacher_evaluation"], "cached": True}
    assert [a["kind"] for a in first["artifacts"]] == ["report_json", "report_html"]
    assert "model_file" not in first and [e["job_percent"] for e in events][-1] == 100.0


def test_job_progress_weighs_the_phases_by_their_seconds():
    seen: list[dict] = []
    progress = jobs.JobProgress(jobs.JobHooks(on_step=seen.append), train=True, eval_seconds=30.0,
                                export_seconds=0.0)
    progress({"phase": "train", "percent": 50.0, "eta_s": 45.0})  # training takes 90 s in all
    assert (seen[-1]["job_percent"], seen[-1]["job_eta_s"]) == (37.5, 75.0)  # 45 of 120 s done
    progress({"phase": "train", "percent": 100.0, "eta_s": 0.0})
    assert seen[-1]["job_percent"] == 75.0 and seen[-1]["percent"] == 100.0
    progress({"phase": "evaluate", "percent": 1.0, "eta_s": 99.0})  # too early to trust its rate
    assert seen[-1]["job_percent"] == round(100 * (90 + 0.3) / 120, 2)
    progress({"phase": "evaluate", "percent": 50.0, "eta_s": 10.0})  # evaluation takes 20 s, not 30
    assert (seen[-1]["job_percent"], seen[-1]["job_eta_s"]) == (round(100 * 100 / 110, 2), 10.0)
    progress({"phase": "evaluate", "percent": 99.0, "eta_s": 0.0})  # a rounded ETA keeps the last rate
    assert seen[-1]["job_percent"] == round(100 * 109.8 / 110, 2)


def test_gamma_auto_job_sweeps_then_trains_and_reports_the_choice(tmp_path):
    """kdiga with gamma "auto": phases sweep → train → evaluate, the report's gamma_sweep, the model card's record."""
    events: list[dict] = []
    teacher = _saved(tmp_path, "cnn_small", "teacher")
    spec = _spec("kdiga", iga_mode="finite_difference",
                 sweep={"gammas": [1.0], "attack_steps": 1, "validation_points": 40})
    spec["train"]["epochs"] = 2
    result = jobs.run_job("distill", spec, tmp_path / "work", jobs.JobInputs(DIGITS, teacher=teacher),
                          jobs.JobHooks(on_step=events.append))
    phases = [e["phase"] for e in events]
    assert phases[0] == "sweep" and phases == sorted(phases, key=["sweep", "train", "evaluate", "export"].index)
    job = [e["job_percent"] for e in events]
    assert job == sorted(job) and job[-1] == 100.0
    sweep = result["report"]["gamma_sweep"]
    assert {t["gamma"] for t in sweep["trials"]} == {0.0, 1.0} and sweep["final_check"]["kd_reference_clean_accuracy"]
    card = json.loads(next(a["path"] for a in result["artifacts"] if a["name"] == "model_card.json").read_text())
    assert card["training"]["gamma_auto"]["chosen"] == sweep["chosen"]["gamma"]
    method = "kd" if sweep["chosen"]["gamma"] == 0 else "kdiga"
    assert card["training"]["objective"]["method"] == method and card["training"]["objective"]["sweep"] is None
    assert (tmp_path / "work" / "checkpoint" / "sweep" / "optuna.journal").exists()
    checks = {f["check"] for f in result["report"]["sanity"]}
    assert "near_kd_clean_accuracy" in checks  # the KD reference's check, added once the sweep is done


def test_an_augmented_kdiga_job_trains_from_the_defaulted_teacher_bank(tmp_path, caplog):
    teacher = _saved(tmp_path, "cnn_small", "teacher")
    spec = _spec("kdiga", gamma=1.0)
    spec["train"].update(augment=True, hflip=False)
    with caplog.at_level("INFO", logger="kdiga_core.teacher_bank"):
        result = jobs.run_job("distill", spec, tmp_path / "work", jobs.JobInputs(DIGITS, teacher=teacher))
    assert "objective.teacher_bank_k" in result["report"]["defaulted"]
    assert "teacher bank built: 1347 samples × 4 augmentations" in caplog.text
    assert not list((tmp_path / "work").rglob("*.npy"))
