"""Pre-trained students: `student.weights_id` reaches kdiga_core.jobs.run_job as JobInputs.initial_student."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kdiga_core import formats, jobs, models
from kdiga_core.config import ModelSpec
from kdiga_core.errors import KdigaError

torch.set_num_threads(1)

TINY_EVAL = {"attacks": [{"name": "pgd", "eps": 0.1, "steps": 1}], "max_points": 16, "eps_curve": [0.0, 0.1],
             "curve_attack_steps": 1, "alignment": False, "smoothing_sigma": 0.0, "latency": False,
             "batch_size": 16}
DIGITS = {"kind": "digits"}


def _initial_weights(tmp_path, arch: str = "cnn_tiny", seed: int = 3):
    torch.manual_seed(seed)
    spec = ModelSpec(arch=arch, num_classes=10, in_chans=1, img_size=8)
    model = models.build_model(spec).eval()
    artifacts = formats.save_model_bundle(model, tmp_path / "init", name="init")
    weights = next(a["path"] for a in artifacts if a["kind"] == "student_weights")
    return jobs.ModelInput(weights, spec.to_dict()), {k: v.clone() for k, v in model.state_dict().items()}


def _spec(arch: str = "cnn_tiny", lr: float = 1e-9) -> dict:
    return {"student": {"arch": arch}, "objective": {"method": "ce"},
            "train": {"epochs": 1, "batch_size": 256, "lr": lr, "device": "cpu"}, "evaluation": TINY_EVAL}


def test_student_starts_from_the_uploaded_weights(tmp_path):
    initial_student, initial = _initial_weights(tmp_path)
    result = jobs.run_job("distill", _spec(), tmp_path / "work",
                          jobs.JobInputs(dataset=DIGITS, initial_student=initial_student))
    trained = load_file(str(next(a["path"] for a in result["artifacts"] if a["name"] == "student.safetensors")))
    # With a vanishing learning rate the student ends where it started: the uploaded weights,
    # not a fresh random draw (which differs by O(0.1) per weight).
    common = [k for k in initial if k in trained and initial[k].is_floating_point() and initial[k].numel() > 1]
    assert common
    assert max(float((trained[k] - initial[k]).abs().max()) for k in common) < 1e-5
    torch.manual_seed(99)
    fresh = models.build_model(ModelSpec.from_dict(initial_student.spec)).state_dict()
    assert max(float((fresh[k] - initial[k]).abs().max()) for k in common) > 1e-2


def test_initial_weights_of_another_architecture_are_refused(tmp_path):
    initial_student, _ = _initial_weights(tmp_path, arch="cnn_small")
    with pytest.raises(KdigaError, match="'cnn_small' model but student.arch is 'cnn_tiny'"):
        jobs.run_job("distill", _spec("cnn_tiny"), tmp_path / "work",
                     jobs.JobInputs(dataset=DIGITS, initial_student=initial_student))
