"""The γ sweep (objective.gamma "auto"): split, plan, rule, pruning, cancel and resume, on real digits training."""

from __future__ import annotations

import json

import pytest
import torch

from kdiga_core import models
from kdiga_core.config import AttackSpec, ModelSpec, ObjectiveConfig, SweepConfig, TrainConfig
from kdiga_core.data import DataBundle, load_digits
from kdiga_core.errors import CancelledError, KdigaError
from kdiga_core.evaluate import evaluation_points
from kdiga_core.sweep import (
    COMPLETE,
    PRUNED,
    SweepData,
    choose_gamma,
    make_plan,
    pareto_front,
    rule_score,
    rungs_for,
    select,
    validation_split,
    work_multiple,
)
from kdiga_core.train import train

torch.set_num_threads(1)

SPEC = ModelSpec(arch="cnn_tiny", num_classes=10, in_chans=1, img_size=8)
TRAIN = TrainConfig(epochs=6, batch_size=128, optimizer="adamw", lr=1e-2, weight_decay=0.0, device="cpu")
ATTACK = AttackSpec("pgd", eps=0.1, steps=2)


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_digits()


@pytest.fixture(scope="module")
def teacher(digits):
    torch.manual_seed(0)
    model = models.build_model(SPEC)
    return train(model, digits, ObjectiveConfig(method="ce"), TrainConfig(**{**TRAIN.to_dict(), "epochs": 4})).model


def _student():
    torch.manual_seed(1)
    return models.build_model(SPEC)


def _objective(**sweep) -> ObjectiveConfig:
    base = {"gammas": [0.03, 300.0], "attack_steps": 2, "validation_points": 200, "budget": 6.0}
    return ObjectiveConfig(method="kdiga", iga_mode="finite_difference", sweep={**base, **sweep})


# ----------------------------------------------------------------------------- split and plan


def test_validation_split_is_stratified_held_out_training_rows(digits):
    keep, val = validation_split(digits.y_train, 200, seed=0)
    assert len(val) == 200 and len(keep) == len(digits.y_train) - 200
    assert set(keep.tolist()).isdisjoint(val.tolist())
    assert set(keep.tolist()) | set(val.tolist()) == set(range(len(digits.y_train)))
    counts = torch.bincount(digits.y_train[val], minlength=10)
    assert counts.max() - counts.min() <= 1  # stratified: 20 per class
    assert torch.equal(validation_split(digits.y_train, 200, seed=0)[1], val)  # seeded
    assert not torch.equal(validation_split(digits.y_train, 200, seed=1)[1], val)


def test_validation_points_never_overlap_the_report_points(digits):
    """The held-out rows are training rows; the report's points are test rows, and no image is in both."""
    sweep = SweepData.split(digits, SweepConfig(validation_points=300))
    x_eval, _ = evaluation_points(digits, 1000)
    assert torch.equal(sweep.x_val, digits.x_train[sweep.val_index])
    val_images = {row.numpy().tobytes() for row in sweep.x_val}
    eval_images = {row.numpy().tobytes() for row in x_eval}
    train_only = val_images - {row.numpy().tobytes() for row in digits.x_test}
    assert val_images.isdisjoint(eval_images - {row.numpy().tobytes() for row in digits.x_train})
    assert len(train_only) >= len(val_images) - 2  # digits has a couple of exact duplicates across splits
    assert len(sweep.train.y_train) + len(sweep.y_val) == len(digits.y_train)


def test_plan_fits_the_budget_and_counts_the_sweep():
    plan = make_plan(SweepConfig(), TrainConfig(epochs=40, batch_size=64), n_train=1347, n_sweep_train=1078,
                     n_val=269)
    assert plan.expected_steps() <= plan.budget_steps == 2 * plan.run_steps
    assert plan.gammas == tuple(sorted(SweepConfig().grid(), reverse=True))
    assert plan.rungs[-1] == plan.trial_epochs >= 20 and list(plan.rungs) == sorted(plan.rungs)
    assert rungs_for(27, 3) == (3, 9, 27) and rungs_for(2, 3) == (2,)
    assert work_multiple({"method": "kdiga"}) == 3.0
    assert work_multiple({"method": "kdiga", "gamma": 5}) == work_multiple({"method": "kd"}) == 1.0
    with pytest.raises(KdigaError, match="sweep.budget"):
        make_plan(SweepConfig(budget=1.5), TrainConfig(epochs=2, batch_size=64), n_train=1347,
                  n_sweep_train=1078, n_val=269)


def test_sweep_settings_are_validated():
    with pytest.raises(KdigaError, match="only read with gamma"):
        ObjectiveConfig(gamma=5.0, sweep={"points": 3})
    with pytest.raises(KdigaError, match='or "auto"'):
        ObjectiveConfig(gamma="often")
    with pytest.raises(KdigaError, match="sweep.gammas must be positive"):
        SweepConfig(gammas=(0.0, 1.0))
    assert SweepConfig(points=3, gamma_min=0.1, gamma_max=10).grid() == (0.1, 1.0, 10.0)


# ----------------------------------------------------------------------------- the rule


ROWS = [
    {"gamma": 0.0, "state": COMPLETE, "clean": 0.97, "robust": 0.45},
    {"gamma": 1.0, "state": COMPLETE, "clean": 0.99, "robust": 0.74},
    {"gamma": 3.0, "state": COMPLETE, "clean": 0.955, "robust": 0.76},  # 1.5 points below KD: allowed
    {"gamma": 5.0, "state": COMPLETE, "clean": 0.94, "robust": 0.78},  # 3 points below: not allowed
    {"gamma": 10.0, "state": PRUNED, "clean": 0.99, "robust": 0.90},  # stopped early: never chosen
]


def test_rule_picks_the_most_robust_student_within_the_clean_drop():
    choice = select(ROWS, SweepConfig())
    assert choice["gamma"] == 3.0 and "within 2.0 points of the KD student's" in choice["reason"]
    assert select(ROWS, SweepConfig(max_clean_drop=0.05))["gamma"] == 5.0
    assert select(ROWS, SweepConfig(rule="max_robust"))["gamma"] == 5.0
    assert select(ROWS, SweepConfig(rule="max_clean_plus_robust"))["gamma"] == 1.0
    assert pareto_front(ROWS) == [1.0, 3.0, 5.0]


def test_rule_measures_the_drop_from_a_less_accurate_teacher():
    """A robust teacher less accurate than the KD student: a student as accurate as the teacher qualifies."""
    assert select(ROWS, SweepConfig(), teacher_clean=0.945)["gamma"] == 5.0  # 0.94 is within 2 points of 0.945
    assert select(ROWS, SweepConfig(clean_reference="kd"), teacher_clean=0.945)["gamma"] == 3.0
    assert select(ROWS, SweepConfig(), teacher_clean=0.99)["gamma"] == 3.0  # a more accurate teacher changes nothing


def test_rule_keeps_plain_kd_and_says_why_when_every_gamma_collapses():
    rows = [ROWS[0], {"gamma": 3.0, "state": COMPLETE, "clean": 0.60, "robust": 0.40}]
    choice = select(rows, SweepConfig())
    assert choice["gamma"] == 0.0 and "No γ kept clean validation accuracy within 2.0 points" in choice["reason"]
    assert rule_score(0.60, 0.40, 0.97, SweepConfig()) < -1 < rule_score(0.96, 0.10, 0.97, SweepConfig())


# ----------------------------------------------------------------------------- real sweeps on digits


def test_sweep_prunes_a_collapsing_gamma_and_picks_by_the_rule(digits, teacher, tmp_path):
    seen = []
    out = choose_gamma(_student(), teacher, digits, _objective(), TRAIN, tmp_path / "sweep", attack=ATTACK,
                       hooks={"on_step": seen.append})
    trials = {t["gamma"]: t for t in out.report["trials"]}
    plan = out.report["plan"]
    assert len(plan["rungs"]) >= 2
    assert trials[300.0]["state"] == PRUNED and trials[300.0]["epochs"] < plan["trial_epochs"]
    assert trials[0.0]["state"] == COMPLETE and trials[0.0]["epochs"] == plan["trial_epochs"]
    assert out.gamma in (0.0, 0.03) and out.gamma != 300.0
    assert out.report["cost"]["job_runs"] <= 6.0
    assert all(p["phase"] == "sweep" for p in seen) and seen[-1]["percent"] == 100.0
    assert out.report["transfer"]["verdict"]["summary"]
    assert json.loads(json.dumps(out.report)) == out.report  # plain JSON


def test_with_augmentation_every_trial_and_rung_reads_one_shared_teacher_bank(digits, teacher, tmp_path, caplog):
    augmented = TrainConfig(**{**TRAIN.to_dict(), "augment": True, "hflip": False, "epochs": 4})
    objective = ObjectiveConfig(**{**_objective(gammas=[0.03]).to_dict(), "teacher_bank_k": 2})
    with caplog.at_level("INFO", logger="kdiga_core.teacher_bank"):
        out = choose_gamma(_student(), teacher, digits, objective, augmented, tmp_path / "job" / "checkpoint" / "sweep",
                           attack=ATTACK)
    trials = {t["gamma"]: t for t in out.report["trials"]}
    # the KD trial trains to the last rung (several train() calls), γ = 0.03 at least one rung: one bank
    assert trials[0.0]["state"] == COMPLETE and len(out.report["plan"]["rungs"]) >= 2
    assert trials[0.03]["state"] in (COMPLETE, PRUNED) and trials[0.03]["epochs"] >= 1
    builds = [r for r in caplog.records if "teacher bank built" in r.getMessage()]
    n_train = len(SweepData.split(digits, objective.sweep_config()).train.y_train)
    assert len(builds) == 1 and f"{n_train} samples × 2 augmentations" in builds[0].getMessage()
    assert not list((tmp_path / "job").rglob("*.npy"))  # closed (in memory here; files would be removed)


def test_the_sweep_never_reads_the_test_split(digits, teacher, tmp_path):
    poisoned = DataBundle("digits", digits.x_train, digits.y_train, torch.full_like(digits.x_test, float("nan")),
                          digits.y_test, 10)
    out = choose_gamma(_student(), teacher, poisoned, _objective(gammas=[0.03]), TRAIN, tmp_path / "s",
                       attack=ATTACK)
    assert all(t["clean"] is None or 0.0 <= t["clean"] <= 1.0 for t in out.report["trials"])
    assert out.report["validation"]["source"] == "training split"


def test_cancel_mid_sweep_stops_it(digits, teacher, tmp_path):
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 40  # after the KD reference, inside the first KDIGA trial

    with pytest.raises(CancelledError):
        choose_gamma(_student(), teacher, digits, _objective(), TRAIN, tmp_path / "sweep", attack=ATTACK,
                     hooks={"should_cancel": cancel})
    assert (tmp_path / "sweep" / "optuna.journal").exists()


def test_the_sweep_stops_when_the_job_runs_out_of_time(digits, teacher, tmp_path):
    out = choose_gamma(_student(), teacher, digits, _objective(), TRAIN, tmp_path / "sweep", attack=ATTACK,
                       hooks={"time_left": lambda: 0.0})
    states = {t["gamma"]: t["state"] for t in out.report["trials"]}
    assert states == {0.0: COMPLETE, 300.0: "stopped", 0.03: "not_run"}  # the KD reference always finishes
    assert out.gamma == 0.0 and "ran out before any γ > 0 finished" in out.report["chosen"]["reason"]
    assert out.report["cost"]["stopped_by"] == "time"
    assert not out.report["transfer"]["verdict"]["transfers"]


class Crash(Exception):
    """Stands for a worker killed mid-trial: nothing after the raise runs."""


def test_resume_after_a_crash_skips_finished_trials_and_agrees(digits, teacher, tmp_path):
    reference = choose_gamma(_student(), teacher, digits, _objective(gammas=[0.03, 1.0]), TRAIN, tmp_path / "a",
                             attack=ATTACK)

    def crash_in_second_kdiga_trial(progress):
        if progress["stage"].startswith("γ = 0.03: epoch 2"):
            raise Crash()

    with pytest.raises(Crash):
        choose_gamma(_student(), teacher, digits, _objective(gammas=[0.03, 1.0]), TRAIN, tmp_path / "b",
                     attack=ATTACK, hooks={"on_step": crash_in_second_kdiga_trial})
    stages = []
    resumed = choose_gamma(_student(), teacher, digits, _objective(gammas=[0.03, 1.0]), TRAIN, tmp_path / "b",
                           attack=ATTACK, hooks={"on_step": lambda p: stages.append(p["stage"])})
    assert not any(s.startswith(("γ = 0:", "γ = 1:")) for s in stages)  # finished trials are not re-run
    assert any(s.startswith("γ = 0.03: epoch") for s in stages)  # the interrupted one continues
    assert not any(s == "γ = 0.03: epoch 1/" + str(resumed.report["plan"]["trial_epochs"]) for s in stages)
    assert resumed.gamma == reference.gamma
    strip = lambda rows: [{k: r[k] for k in ("gamma", "state", "clean", "robust", "epochs")} for r in rows]  # noqa: E731
    assert strip(resumed.report["trials"]) == strip(reference.report["trials"])


def test_optuna_records_rung_scores_where_the_sweep_withdraws_them():
    """`_withdraw` rewrites the pruner's per-rung records; fail loudly if Optuna renames them."""
    import optuna

    from kdiga_core.sweep import RUNG_KEY_PREFIX

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    trial = study.ask()
    trial.report(0.5, 1)
    trial.should_prune()
    assert f"{RUNG_KEY_PREFIX}0" in study._storage.get_trial(trial._trial_id).system_attrs


def _teacher(linearity: float = 0.1, robust: float = 0.85, clean: float = 0.99) -> dict:
    return {"clean_accuracy": clean, "robust_accuracy": robust, "linearity": linearity, "uniform_guess_loss": 2.30}


@pytest.mark.parametrize("teacher, choice, transfers, words", [
    (_teacher(), {"gamma": 3.0, "clean": 0.98, "robust": 0.72}, True, "keeps 85%"),
    (_teacher(linearity=1.9), {"gamma": 3.0, "clean": 0.98, "robust": 0.72}, False, "not locally linear"),
    (_teacher(robust=0.46), {"gamma": 3.0, "clean": 0.98, "robust": 0.60}, False, "barely more robust"),
    (_teacher(), {"gamma": 0.3, "clean": 0.98, "robust": 0.455}, False, "only 0.5 points more robust"),
    (_teacher(), {"gamma": 0.0, "clean": 0.97, "robust": 0.45, "reason": "No γ kept clean ..."}, False, "No γ kept"),
])
def test_verdict_says_whether_robustness_transfers_and_why(teacher, choice, transfers, words):
    from kdiga_core.transfer import verdict

    kd = {"gamma": 0.0, "clean": 0.97, "robust": 0.45}
    out = verdict(teacher, kd, {"reason": "", "reference_clean": 0.97, **choice}, [kd], SweepConfig(),
                  student_params=25_000, teacher_params=99_000)
    assert out["transfers"] is transfers
    assert words in out["summary"] + " ".join(out["reasons"])


def test_verdict_names_a_student_short_of_capacity():
    from kdiga_core.transfer import verdict

    kd = {"gamma": 0.0, "clean": 0.70, "robust": 0.15}
    out = verdict(_teacher(), kd, {"gamma": 0.0, "clean": 0.70, "robust": 0.15, "reason": "No γ", "reference_clean": 0.7},
                  [kd], SweepConfig(), student_params=1_418, teacher_params=99_178)
    assert not out["transfers"] and out["capacity"]["short"] and "69.9× fewer" in out["summary"]


def test_a_gamma_whose_training_fails_is_stopped_and_the_sweep_goes_on(digits, teacher, tmp_path, monkeypatch):
    """A trial whose training raises (a non-finite loss, say) is recorded as stopped; the others still run."""
    import kdiga_core.sweep as sweep_mod

    real_train = sweep_mod.train

    def train(student, data, obj_cfg, *args, **kwargs):
        if obj_cfg.gamma == 300.0:
            raise KdigaError("The loss became non-finite at step 3 (iga).")
        return real_train(student, data, obj_cfg, *args, **kwargs)

    monkeypatch.setattr(sweep_mod, "train", train)
    out = choose_gamma(_student(), teacher, digits, _objective(), TRAIN, tmp_path / "sweep", attack=ATTACK)
    trials = {t["gamma"]: t for t in out.report["trials"]}
    assert trials[300.0]["state"] == "stopped" and "non-finite" in trials[300.0]["stopped_by"]
    assert trials[0.03]["state"] in (COMPLETE, PRUNED) and out.report["cost"]["stopped_by"] is None


KILLED_SWEEP = """
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from tests.core.test_sweep import ATTACK, TRAIN, _objective, _student
from kdiga_core import models
from kdiga_core.config import ObjectiveConfig, TrainConfig
from kdiga_core.data import load_digits
from kdiga_core.sweep import choose_gamma
from kdiga_core.train import train
digits = load_digits()
torch.manual_seed(0)
teacher = train(models.build_model(__import__("tests.core.test_sweep", fromlist=["SPEC"]).SPEC), digits,
                ObjectiveConfig(method="ce"), TrainConfig(**{{**TRAIN.to_dict(), "epochs": 4}})).model
folder = __import__("pathlib").Path({folder!r})


def hold_once_trial_1_checkpointed(progress):
    # Stop here (the test SIGKILLs this process) once trial-1 has a checkpoint: on a fast machine the
    # whole sweep ends between two polls of the test, so the kill must not depend on timing.
    if (folder / "trial-1" / "last.json").exists():
        (folder / "hold").touch()
        __import__("time").sleep(3600)


choose_gamma(_student(), teacher, digits, _objective(gammas=[0.03, 1.0]), TRAIN, folder, attack=ATTACK,
             hooks={{"on_step": hold_once_trial_1_checkpointed}})
"""


@pytest.mark.slow
def test_a_sweep_killed_with_sigkill_resumes_without_rerunning_the_kd_reference(digits, teacher, tmp_path):
    """A real crash: the process dies (SIGKILL) once the first KDIGA trial has started."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    folder = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SWEEP.format(root=root, folder=str(folder))],
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not (folder / "hold").exists():  # trial-1 (the largest γ, after the KD reference) has a checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.05)
    proc.kill()
    proc.wait(30)
    stages = []
    resumed = choose_gamma(_student(), teacher, digits, _objective(gammas=[0.03, 1.0]), TRAIN, folder,
                           attack=ATTACK, hooks={"on_step": lambda p: stages.append(p["stage"])})
    assert not any(s.startswith("γ = 0:") for s in stages)  # the finished KD reference was not trained again
    assert {t["gamma"] for t in resumed.report["trials"] if t["state"] != "not_run"} == {0.0, 0.03, 1.0}
    assert resumed.kd_reference is not None  # reloaded from its kept checkpoint
