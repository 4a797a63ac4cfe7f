"""Every ONNX teacher that validates also distills and evaluates (issue 17.3).

Small timm models (a ResNet-18 with BatchNorm, a MobileNetV3, a one-block ViT) on the 1x8x8 digits,
exported by torch's legacy and dynamo exporters at opsets 17, 18 and 20, go through the path a user's
upload takes: `jobs.validate_teacher` with the service's default caps, then a kdiga `distill` job
with the teacher-evaluation cache on (its fingerprint hashes every tensor, 0-dim ones included).
One case runs by default; the rest of the matrix is `slow` (each dynamo export takes 5-35 s here).
"""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stderr, redirect_stdout

import pytest
import timm
import torch

from kdiga_core import jobs
from kdiga_core.limits import Limits

torch.set_num_threads(1)

SERVICE_LIMITS = Limits(max_classes=10_000, max_in_chans=16, max_params=100_000_000, max_memory_bytes=512 * 2**20)
TINY_EVAL = {"attacks": [{"name": "pgd", "eps": 0.1, "steps": 2}], "max_points": 20, "eps_curve": [0.0, 0.1],
             "curve_attack_steps": 1, "linearity_steps": 2, "smoothing_points": 3, "smoothing_samples": 10,
             "latency": False, "batch_size": 16}
MODELS = {
    "resnet18": {},
    "mobilenetv3_small_050": {},
    "vit_tiny_patch16_224": {"img_size": 8, "patch_size": 2, "depth": 1, "embed_dim": 32, "num_heads": 2},
}
CASES = [
    pytest.param(name, opset, exporter, id=f"{name}-{exporter}-{opset}",
                 marks=() if (name, opset, exporter) == ("resnet18", 17, "legacy") else pytest.mark.slow)
    for name in MODELS for opset, exporter in ((17, "legacy"), (18, "legacy"), (18, "dynamo"), (20, "dynamo"))
]


def _export(name: str, opset: int, exporter: str, path) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, in_chans=1, **MODELS[name]).eval()
    kwargs = {"dynamo": True, "external_data": False} if exporter == "dynamo" else {"dynamo": False}
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, 1, 8, 8),), str(path), opset_version=opset, **kwargs)


@pytest.mark.parametrize("name,opset,exporter", CASES)
def test_a_validated_onnx_teacher_distills_and_evaluates(tmp_path, name, opset, exporter):
    path = tmp_path / "teacher.onnx"
    _export(name, opset, exporter, path)
    info = jobs.validate_teacher(path, None, limits=SERVICE_LIMITS)
    assert info["format"] == "onnx" and info["spec"]["num_classes"] == 10 and info["spec"]["in_chans"] == 1
    spec = {"student": {"arch": "cnn_tiny"}, "objective": {"method": "kdiga", "gamma": 1.0},
            "train": {"epochs": 1, "batch_size": 256, "lr": 0.01, "device": "cpu"}, "evaluation": TINY_EVAL}
    inputs = jobs.JobInputs({"kind": "digits"}, teacher=jobs.ModelInput(path, info["spec"]),
                            teacher_cache_dir=tmp_path / "cache")
    result = jobs.run_job("distill", spec, tmp_path / "work", inputs)
    metrics = result["metrics"]
    assert 0.0 <= metrics["teacher_clean_accuracy"] <= 1.0 and 0.0 <= metrics["student_clean_accuracy"] <= 1.0
    assert metrics["teacher_params"] > 0
    assert result["report"]["teacher_evaluation"]["cached"] is False
    assert any((tmp_path / "cache").rglob("*"))  # the teacher's evaluation was fingerprinted and kept
    assert {a["kind"] for a in result["artifacts"]} >= {"student_weights", "onnx", "model_card", "report_json"}
