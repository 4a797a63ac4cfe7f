"""A timm model with non-default keyword arguments (a ViT's patch size) is described by `ModelSpec.kwargs`:
built, trained, saved and rebuilt from its model card; bad kwargs are refused with one sentence."""

from __future__ import annotations

import pytest
import torch

from kdiga_core import formats, jobs, models
from kdiga_core.config import ModelSpec
from kdiga_core.errors import KdigaError

torch.set_num_threads(1)

VIT = "vit_tiny_patch16_224"
SMALL_VIT = {"patch_size": 4, "depth": 2, "num_heads": 3}
TINY_EVAL = {"attacks": [{"name": "pgd", "eps": 0.1, "steps": 1}], "max_points": 20, "eps_curve": [0.0, 0.1],
             "curve_attack_steps": 1, "alignment": False, "smoothing_sigma": 0.0, "latency": False, "batch_size": 20}


def test_a_vit_with_another_patch_size_is_built_as_described():
    model = models.build_model(ModelSpec(VIT, 10, in_chans=1, img_size=8, kwargs=SMALL_VIT))
    assert model.net.patch_embed.patch_size == (4, 4) and len(model.net.blocks) == 2
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(RuntimeError):  # the default 16-pixel patches cannot cut an 8x8 image
        models.build_model(ModelSpec(VIT, 10, in_chans=1, img_size=8))(torch.rand(2, 1, 8, 8))


def test_a_job_trains_saves_and_reloads_a_vit_with_kwargs(tmp_path):
    spec = {"student": {"arch": VIT, "kwargs": SMALL_VIT}, "objective": {"method": "ce"}, "evaluation": TINY_EVAL,
            "train": {"epochs": 1, "batch_size": 256, "lr": 0.001, "optimizer": "adamw", "device": "cpu"}}
    result = jobs.run_job("adversarial_train", spec, tmp_path / "work", jobs.JobInputs({"kind": "digits"}))
    assert result["model_spec"]["kwargs"] == SMALL_VIT
    card = next(a["path"] for a in result["artifacts"] if a["kind"] == "model_card")
    reloaded = formats.load_model_bundle(card)
    assert reloaded.spec.kwargs == SMALL_VIT and reloaded.net.patch_embed.patch_size == (4, 4)
    weights = next(a["path"] for a in result["artifacts"] if a["kind"] == "model_weights")
    again = formats.load_model(weights)  # the spec stored in the safetensors file carries the kwargs too
    assert again.spec.kwargs == SMALL_VIT


@pytest.mark.parametrize("arch, kwargs, message", [
    (VIT, {"pretrained": True}, "kwargs.pretrained is not a keyword a model spec may set; valid names are: "),
    (VIT, {"checkpoint_path": "/etc/passwd"}, "kwargs.checkpoint_path is not a keyword"),
    (VIT, {"patch_size": 100_000}, "kwargs.patch_size must be a boolean, an integer in [0, 4096]"),
    ("cnn_tiny", {"patch_size": 4}, "kwargs apply to timm architectures only; 'cnn_tiny' is one of ours"),
    ("resnet18", {"patch_size": 4}, "Architecture 'resnet18' cannot be built with kwargs patch_size=4"),
])
def test_bad_kwargs_are_refused_with_one_sentence(arch, kwargs, message):
    with pytest.raises(KdigaError) as info:
        models.build_model(ModelSpec(arch, 10, in_chans=1, img_size=8, kwargs=kwargs))
    assert message in str(info.value) and "\n" not in str(info.value)
