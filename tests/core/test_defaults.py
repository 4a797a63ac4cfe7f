"""kdiga_core.defaults: settings sized to the data, one threat model (L∞ or L2) for training and report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdiga_core import defaults, jobs
from kdiga_core.attacks import random_start
from kdiga_core.config import ModelSpec, ObjectiveConfig
from kdiga_core.models import build_model
from kdiga_core.objectives import build_objective

torch.set_num_threads(1)

DIGITS = defaults.DataFacts(img_size=8, in_chans=1, num_classes=10, train_size=1347, test_size=450)
CIFAR = defaults.DataFacts(img_size=32, in_chans=3, num_classes=10, train_size=50_000, test_size=10_000)


def test_the_threat_model_is_sized_to_the_images():
    assert defaults.default_eps(DIGITS, "Linf") == 0.1
    assert defaults.default_eps(CIFAR, "Linf") == pytest.approx(8 / 255)
    assert defaults.default_eps(CIFAR, "L2") == pytest.approx(0.5, abs=1e-3)  # CIFAR-10's standard L2 radius
    assert defaults.default_eps(DIGITS, "L2") == pytest.approx(0.1 * 8 * defaults.L2_PER_LINF_SQRT_D, abs=1e-4)
    tm, filled = defaults.threat_model({"eps": 0.2}, DIGITS)
    assert tm == {"norm": "Linf", "eps": 0.2, "step": pytest.approx(2.5 * 0.2 / 7)}
    assert filled == ["threat_model.norm", "threat_model.step"]


def test_training_defaults_reach_the_recipes_steps():
    train, filled = defaults.train_defaults("distill", {}, DIGITS)
    assert train == {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05, "batch_size": 64, "epochs": 40}
    assert defaults.train_defaults("adversarial_train", {}, DIGITS)[0]["epochs"] == 10
    assert defaults.train_defaults("distill", {}, CIFAR)[0]["batch_size"] == 128
    tiny = defaults.DataFacts(img_size=8, in_chans=1, num_classes=10, train_size=100, test_size=50)
    assert defaults.train_defaults("distill", {}, tiny)[0]["epochs"] == 100  # capped
    assert defaults.train_defaults("distill", {"batch_size": 8}, DIGITS)[0]["epochs"] == 10  # at least 10
    sgd, filled = defaults.train_defaults("distill", {"optimizer": "sgd", "epochs": 3}, DIGITS)
    assert "lr" not in sgd and sgd["epochs"] == 3 and "train.epochs" not in filled  # given values untouched
    alone, filled = defaults.train_defaults("distill", {"lr": 0.05}, DIGITS)
    assert "optimizer" not in alone and "weight_decay" not in alone  # an lr given alone keeps its optimizer


def test_resolving_keeps_what_was_given_and_twice_changes_nothing():
    given = {"objective": {"attack_eps": 0.05, "attack_steps": 3}, "train": {"lr": 0.1},
             "evaluation": {"attacks": [{"name": "pgd", "eps": 0.3}], "max_points": 9}}
    once = defaults.resolve("adversarial_train", given, DIGITS)
    assert once["objective"]["attack_eps"] == 0.05 and once["objective"]["attack_steps"] == 3
    assert once["objective"]["attack_step"] == pytest.approx(2.5 * 0.05 / 3)  # scales with the given ε
    assert once["objective"]["method"] == "pgd_at" and once["train"]["lr"] == 0.1
    assert once["evaluation"] == {"attacks": [{"name": "pgd", "eps": 0.3, "norm": "Linf"}], "max_points": 9}
    assert defaults.resolve("adversarial_train", once, DIGITS) == once
    assert "train.lr" not in once["defaulted"] and "train.epochs" in once["defaulted"]


def test_kdiga_with_augmentation_gets_the_teacher_bank_where_it_fits():
    augmented = {"train": {"augment": True}}
    spec = defaults.resolve("distill", augmented, CIFAR)
    assert spec["objective"]["teacher_bank_k"] == defaults.BANK_K and "objective.teacher_bank_k" in spec["defaulted"]
    assert CIFAR.bank_bytes(4) == pytest.approx(1.23e9, rel=0.01)  # the README's "about 1.2 GiB"
    # it is the teacher_bank module's own size formula
    from kdiga_core.teacher_bank import bank_bytes
    assert CIFAR.bank_bytes(4) == bank_bytes(50_000, 4, 10, (3, 32, 32), grads=True)
    assert "teacher_bank_k" not in defaults.resolve("distill", {}, CIFAR)["objective"]  # no augmentation
    given = defaults.resolve("distill", {"train": {"augment": True}, "objective": {"teacher_bank_k": 0}}, CIFAR)
    assert given["objective"]["teacher_bank_k"] == 0 and "objective.teacher_bank_k" not in given["defaulted"]
    for other in ({"objective": {"method": "rslad"}}, {"train": {"augment": True, "augmentation": "imagenet"}}):
        spec = defaults.resolve("distill", {**augmented, **other}, CIFAR)
        assert "teacher_bank_k" not in spec["objective"], other
    huge = defaults.DataFacts(img_size=64, in_chans=3, num_classes=200, train_size=100_000, test_size=10_000)
    assert defaults.resolve("distill", augmented, huge)["objective"]["teacher_bank_k"] == 0  # 9.9 GB: left off
    streamed = defaults.DataFacts(**{**CIFAR.__dict__, "streamed": True})
    assert "teacher_bank_k" not in defaults.resolve("distill", augmented, streamed)["objective"]


def test_the_default_evaluation_has_autoattack_only_where_cheap():
    ev, _ = defaults.evaluation_defaults(None, {"norm": "L2", "eps": 0.5}, CIFAR)
    assert [a["name"] for a in ev["attacks"]] == ["pgd", "autoattack"] and ev["max_points"] == 1000
    assert ev["attacks"][1]["max_seconds"] == defaults.AUTOATTACK_CHEAP_S and ev["attacks"][0]["norm"] == "L2"


def test_attack_step_scales_with_attack_eps():
    assert ObjectiveConfig(attack_eps=0.1).attack_step == pytest.approx(2.5 * 0.1 / 10)
    assert ObjectiveConfig(attack_eps=0.1, attack_step=0.01).attack_step == 0.01


def test_training_attacks_and_iga_noise_follow_the_norm():
    student = build_model(ModelSpec(arch="cnn_tiny", num_classes=10, in_chans=1, img_size=8))
    obj = build_objective(ObjectiveConfig(method="pgd_at", attack_norm="L2", attack_eps=0.5), student)
    assert obj.attack_norm == "L2"
    x = torch.full((16, 1, 8, 8), 0.5)
    start = obj.random_start(x)
    assert (start - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert (random_start(x, 0.5, "L2", None) - x).abs().max() > 0.1  # an L2 ball is not an L∞ cube of 0.1
    with pytest.raises(Exception, match="attack_norm"):
        ObjectiveConfig(attack_norm="L1")


def _job(kind, method, tmp_path, teacher=None):
    spec = {"student": {"arch": "cnn_small"}, "objective": {"method": method, "attack_steps": 3},
            "threat_model": {"norm": "L2", "eps": 1.0}, "train": {"epochs": 4},
            "evaluation": {"max_points": 100, "alignment": False, "smoothing_sigma": 0.0, "latency": False,
                           "eps_curve": [0.0]}}
    return jobs.run_job(kind, spec, tmp_path / method, jobs.JobInputs({"kind": "digits"}, teacher=teacher))


@pytest.mark.slow
def test_an_l2_pgd_at_teacher_trains_and_is_evaluated_at_l2(tmp_path):
    robust = _job("adversarial_train", "pgd_at", tmp_path)
    plain = _job("adversarial_train", "ce", tmp_path)
    eps = 1.0  # in L2 on 64 pixels: the default (0.23) is too small to tell the two models apart quickly
    for result in (robust, plain):
        assert result["report"]["threat_model"]["norm"] == "L2"
        assert result["report"]["threat_model"]["eps"] == pytest.approx(eps)
        assert result["report"]["threat_model_spec"] == {"norm": "L2", "eps": 1.0, "step": pytest.approx(2.5 / 7)}
        assert "threat_model.step" in result["report"]["defaulted"]
    card = json.loads(next(a["path"] for a in robust["artifacts"] if a["kind"] == "model_card").read_text())
    assert card["training"]["threat_model"]["norm"] == "L2" and card["training"]["objective"]["attack_norm"] == "L2"
    assert "train.lr" in card["training"]["defaulted"]  # the model card says which values were defaulted
    pgd = next(k for k in robust["metrics"] if k.startswith("model_pgd") and k.endswith("_accuracy"))
    # PGD-AT in the L2 ball makes the model more robust in that ball than plain training does
    assert robust["metrics"][pgd] > plain["metrics"][pgd] + 0.05, (robust["metrics"], plain["metrics"])
    # it learned (4 short epochs in a wide L2 ball: 39% clean measured, chance is 10%)
    assert robust["metrics"]["model_clean_accuracy"] > 0.25
    assert math.isclose(robust["report"]["threat_model"]["eps"], eps, rel_tol=1e-6)
