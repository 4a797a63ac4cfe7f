"""POST /v1/jobs sizes what a request leaves out to the dataset, with one threat model (issue 17)."""

from __future__ import annotations

import math

import pytest
from api_helpers import distill_body, ready_dataset, ready_teacher


@pytest.fixture
def ready(client, owner):
    return ready_dataset(client, owner), ready_teacher(client, owner)


def _post(client, owner, body):
    return client.post("/v1/jobs", headers=owner, json=body)


def test_an_l2_threat_model_reaches_training_attacks_and_evaluation(client, owner, ready):
    dataset_id, _ = ready
    r = _post(client, owner, {"kind": "adversarial_train", "dataset_id": dataset_id, "student": {"arch": "cnn_small"},
                              "threat_model": {"norm": "L2"}})
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    eps = spec["threat_model"]["eps"]
    # L2 radius scaled from the L∞ one by √d (d = 64 on 8×8 digits), well inside the image's diameter
    assert spec["threat_model"]["norm"] == "L2" and 0.1 < eps < math.sqrt(64)
    assert spec["objective"]["attack_norm"] == "L2" and spec["objective"]["attack_eps"] == eps
    assert spec["objective"]["attack_step"] == pytest.approx(2.5 * eps / spec["objective"]["attack_steps"])
    assert {a["norm"] for a in spec["evaluation"]["attacks"]} == {"L2"}
    assert {a["eps"] for a in spec["evaluation"]["attacks"]} == {eps}
    assert "threat_model.eps" in spec["defaulted"] and "threat_model.norm" not in spec["defaulted"]


def test_given_values_stay_as_given(client, owner, ready):
    body = distill_body(*ready, threat_model={"eps": 0.2}, objective={"attack_eps": 0.05, "method": "ard"},
                        train={"optimizer": "sgd", "lr": 0.05, "epochs": 3},
                        evaluation={"attacks": [{"name": "pgd", "eps": 0.3}, {"name": "fgsm"}], "max_points": 17})
    r = _post(client, owner, body)
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert spec["train"]["optimizer"] == "sgd" and spec["train"]["lr"] == 0.05 and spec["train"]["epochs"] == 3
    assert spec["train"]["weight_decay"] == 2e-4  # an SGD request keeps the static decay, not AdamW's
    # the attack's own ε keeps its step rule (2.5·ε/K), not the threat model's step for another ε
    assert spec["objective"]["attack_eps"] == 0.05
    assert spec["objective"]["attack_step"] == pytest.approx(2.5 * 0.05 / 7)
    assert [a["eps"] for a in spec["evaluation"]["attacks"]] == [0.3, 0.2]
    assert spec["evaluation"]["max_points"] == 17
    assert "evaluation.attacks[1].eps" in spec["defaulted"] and "train.lr" not in spec["defaulted"]


@pytest.mark.parametrize("threat, words", [
    ({"norm": "L1"}, "norm"),
    ({"eps": 0}, "eps"),
    ({"eps": 1.5}, "reaches every image"),
    ({"norm": "L2", "eps": 9.0}, "reaches every image"),
    ({"eps": 0.1, "step": 0.5}, "larger than its eps"),
    ({"eps": 0.1, "unknown": 1}, "unknown"),
])
def test_a_threat_model_that_cannot_be_meant_is_refused(client, owner, ready, threat, words):
    r = _post(client, owner, distill_body(*ready, threat_model=threat))
    assert r.status_code == 422, r.text
    assert words.lower() in r.json()["detail"].lower()


def test_an_evaluate_job_gets_the_threat_model_but_no_training(client, owner, ready):
    dataset_id, teacher_id = ready
    r = _post(client, owner, {"kind": "evaluate", "dataset_id": dataset_id, "model": {"teacher_id": teacher_id},
                              "threat_model": {"norm": "L2", "eps": 0.5}})
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert spec["objective"] is None and spec["train"] is None
    assert spec["evaluation"]["attacks"][0] == {**spec["evaluation"]["attacks"][0], "norm": "L2", "eps": 0.5}


def test_epochs_follow_the_training_split(client, owner):
    """Fewer images, more epochs: the default reaches about the same number of optimizer steps."""
    big = ready_dataset(client, owner)
    teacher = ready_teacher(client, owner)
    r = _post(client, owner, {**distill_body(big, teacher), "train": {}})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["train"]["epochs"] == math.ceil(880 / math.ceil(1000 / 64))


def test_kdiga_with_augmentation_defaults_to_the_teacher_bank(client, owner, ready):
    r = _post(client, owner, distill_body(*ready, train={"augment": True, "hflip": False, "epochs": 1}))
    assert r.status_code == 201, r.text
    spec = r.json()["spec"]
    assert spec["objective"]["method"] == "kdiga" and spec["objective"]["teacher_bank_k"] == 4
    assert "objective.teacher_bank_k" in spec["defaulted"]
    plain = _post(client, owner, distill_body(*ready, train={"epochs": 1})).json()["spec"]
    assert plain["objective"]["teacher_bank_k"] == 0 and "objective.teacher_bank_k" not in plain["defaulted"]
