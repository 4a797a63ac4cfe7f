"""kdiga_service.work_budget: the estimate follows its documented formula, the ceilings name their setting."""

from __future__ import annotations

import dataclasses

from kdiga_service.settings import Settings
from kdiga_service.work_budget import (
    JobLimits,
    WorkEstimate,
    budget_problem,
    check_parameters,
    estimate_work,
    training_passes,
)

LIMITS = JobLimits.from_settings(Settings())


def _spec(**parts):
    spec = {"kind": "distill", "teacher_id": "t", "model": None,
            "objective": {"method": "kdiga", "attack_steps": 10},
            "train": {"epochs": 2, "batch_size": 64},
            "evaluation": {"attacks": [], "max_points": 10, "eps_curve": [], "curve_attack_steps": 0,
                           "alignment": False, "smoothing_sigma": 0, "linearity_steps": 0, "square_queries": 5000}}
    spec.update(parts)
    return spec


def test_training_passes_per_method():
    for method, per_sample in {"ce": 2, "kd": 3, "kdiga": 8, "pgd_at": 22, "trades": 24, "ard": 25,
                               "rslad": 25}.items():
        spec = _spec(objective={"method": method, "attack_steps": 10})
        assert estimate_work(spec, train_size=100, test_size=0).training == 2 * 100 * per_sample, method


def test_evaluation_passes_by_hand():
    evaluation = {"attacks": [{"name": "pgd", "steps": 20, "restarts": 2}, {"name": "autoattack", "steps": 100}],
                  "max_points": 50, "eps_curve": [0.1, 0.2], "curve_attack_steps": 5, "alignment": True,
                  "linearity_steps": 10, "smoothing_sigma": 0.25, "smoothing_samples": 100, "smoothing_points": 20,
                  "square_queries": 5000}
    work = estimate_work(_spec(evaluation=evaluation), train_size=0, test_size=30)  # 30 < max_points
    points = 30
    attacks = 2 * (2 * 20 + 1) + (38 * 100 + 5000)
    curve = 3 * (2 * 5 + 1)
    per_model = points * (1 + attacks + curve) + 20 * 2 * 100
    assert work.evaluation == 2 * per_model + points * (4 + 2 * 10)
    evaluate_only = estimate_work({**_spec(evaluation=evaluation), "kind": "evaluate", "teacher_id": None,
                                   "objective": None, "train": None}, train_size=10**6, test_size=30)
    assert evaluate_only == WorkEstimate(training=0, evaluation=per_model)


def test_ceilings_name_the_parameter_and_the_setting():
    assert check_parameters(_spec(), LIMITS) is None
    assert check_parameters(_spec(train={"epochs": 5000, "batch_size": 64}), LIMITS) == (
        "'train.epochs' is 5000, above this server's maximum of 1000 (KDIGA_MAX_EPOCHS).")
    tight = dataclasses.replace(LIMITS, max_square_queries=10)
    assert "(KDIGA_MAX_SQUARE_QUERIES)" in check_parameters(_spec(), tight)


def test_budget_sentences():
    limits = dataclasses.replace(LIMITS, max_work_per_key=1000)
    assert budget_problem(WorkEstimate(500, 100), 300, 1, limits) is None
    sentence, later = budget_problem(WorkEstimate(1500, 0), 0, 0, limits)
    assert not later and "above the per-key budget of 1e+03 (KDIGA_MAX_WORK_PER_KEY)" in sentence
    sentence, later = budget_problem(WorkEstimate(600, 0), 500, 2, limits)
    assert later and "with your 2 active job(s) (500 passes)" in sentence


def test_module_is_pure_python():
    import subprocess
    import sys

    code = "import sys, kdiga_service.work_budget; assert 'torch' not in sys.modules and 'fastapi' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_gamma_sweep_multiplies_the_training_work_by_its_budget():
    fixed = {"train": {"epochs": 2}, "objective": {"method": "kdiga", "gamma": 5.0, "attack_steps": 0}}
    auto = {"train": {"epochs": 2},
            "objective": {"method": "kdiga", "gamma": "auto", "attack_steps": 0, "sweep": {"budget": 3.0}}}
    assert training_passes(auto, 100) == 3 * training_passes(fixed, 100) > 0
