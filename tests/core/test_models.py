"""kdiga_core.models: our architectures, the timm path, and the [0, 1] wrapper."""

import pytest
import torch
import torch.nn.functional as F

from kdiga_core import models
from kdiga_core.config import ModelSpec
from kdiga_core.errors import KdigaError, UnknownNameError
from kdiga_core.models import (
    NormalizedModel,
    build_model,
    count_parameters,
    create_model,
    list_models,
    our_models,
    register_model,
)

torch.set_num_threads(1)
OURS = ["cnn_tiny", "cnn_small", "cnn_medium", "resnet_small", "mlp"]


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("in_chans,img_size", [(1, 8), (3, 28), (3, 32), (1, 13)])
def test_our_models_take_any_small_input(name, in_chans, img_size):
    model = create_model(name, 10, in_chans=in_chans, img_size=img_size)
    assert model(torch.rand(2, in_chans, img_size, img_size)).shape == (2, 10)


def test_parameter_counts():
    tiny = count_parameters(create_model("cnn_tiny", 10, 3, 32))
    small = count_parameters(create_model("cnn_small", 10, 1, 8))
    medium = count_parameters(create_model("cnn_medium", 10, 1, 8))
    assert 500 < tiny < 5_000
    assert 3.5 < medium / small < 4.5  # the digits teacher → student pair


@pytest.mark.parametrize("name", OURS)
def test_students_support_double_backward(name):
    """Exact IGA differentiates the input gradient with respect to the parameters."""
    model = create_model(name, 4, in_chans=1, img_size=8).eval()
    x = torch.rand(3, 1, 8, 8, requires_grad=True)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2]))
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    grad.norm().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_normalisation_is_inside_and_defaults_to_half():
    model = create_model("cnn_tiny", 3, in_chans=2, img_size=8)
    assert torch.equal(model.mean.flatten(), torch.tensor([0.5, 0.5]))
    x = torch.rand(1, 2, 8, 8)
    assert torch.allclose(model(x), model.net((x - 0.5) / 0.5))
    custom = create_model("cnn_tiny", 3, in_chans=2, img_size=8, mean=(0.1, 0.2), std=(0.3, 0.4))
    assert custom.std.shape == (1, 2, 1, 1) and custom.spec.mean == (0.1, 0.2)
    assert {"mean", "std"} <= set(custom.state_dict())


def test_wrong_input_shape_is_one_clear_sentence():
    model = create_model("cnn_tiny", 10, in_chans=1, img_size=8)
    with pytest.raises(KdigaError) as info:
        model(torch.rand(2, 3, 8, 8))
    assert (
        str(info.value)
        == "Expected input of shape (N, C, H, W) with (C, H, W) = (1, 8, 8), got (2, 3, 8, 8)."
    )


def test_unknown_architecture_lists_ours_not_all_of_timm():
    with pytest.raises(UnknownNameError) as info:
        create_model("resnet19", 10)
    message = str(info.value)
    assert message.startswith(
        "Unknown architecture 'resnet19'; valid names are: cnn_medium, cnn_small, cnn_tiny"
    )
    assert "or any timm architecture name" in message and "GET /v1/catalog" in message
    assert "resnet18" in message  # the closest-match hint
    assert len(message) < 400 and message.count(".") <= 2
    assert "resnet18" in info.value.valid and "cnn_small" in info.value.valid


def test_list_models_is_ours_plus_timm():
    names = list_models()
    assert names == sorted(names)
    assert set(our_models()) <= set(names) and "resnet18" in names and "vit_tiny_patch16_224" in names


def test_timm_cnn_and_vit_get_the_right_shapes():
    cnn = create_model("resnet10t", 5, in_chans=1, img_size=16)
    assert cnn(torch.rand(2, 1, 16, 16)).shape == (2, 5)
    vit = create_model("vit_tiny_patch16_224", 5, in_chans=3, img_size=32)  # needs img_size
    assert vit(torch.rand(1, 3, 32, 32)).shape == (1, 5)
    # fused attention has no double-backward kernel on CPU, so it is switched off
    assert not any(getattr(m, "fused_attn", False) for m in vit.modules())


def test_build_model_from_spec_and_registry():
    @register_model
    def _test_linear(num_classes, in_chans, img_size):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_chans * img_size**2, num_classes))

    try:
        spec = ModelSpec(arch="_test_linear", num_classes=3, in_chans=1, img_size=4)
        model = build_model(spec)
        assert isinstance(model, NormalizedModel) and model.spec is spec
        assert count_parameters(model) == 16 * 3 + 3
    finally:  # other tests compare the registry with the API catalog
        models._REGISTRY.pop("_test_linear")


def test_clamp_hard_activations_equal_torchs_and_differentiate_twice():
    from kdiga_core.models import ClampHardsigmoid, ClampHardswish

    x = torch.linspace(-5, 5, 1001, dtype=torch.float64).requires_grad_(True)
    for ours, theirs in ((ClampHardsigmoid(), torch.nn.Hardsigmoid()), (ClampHardswish(), torch.nn.Hardswish())):
        a, b = ours(x), theirs(x)
        assert torch.allclose(a, b, atol=1e-12)
        (ga,) = torch.autograd.grad(a.sum(), x, create_graph=True)
        (gb,) = torch.autograd.grad(b.sum(), x)
        away_from_kinks = (x.detach().abs() - 3).abs() > 1e-3
        assert torch.allclose(ga[away_from_kinks], gb[away_from_kinks], atol=1e-12)
        # double backprop through a weight, as exact IGA does: torch's hardsigmoid_backward has no
        # derivative, ours has
        w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        for act in (ours, theirs):
            (g,) = torch.autograd.grad(act(w * x).sum(), x, create_graph=True)
            if isinstance(act, torch.nn.Hardsigmoid):
                with pytest.raises(RuntimeError, match="not implemented"):
                    g.pow(2).sum().backward()
            else:
                w.grad = None
                g.pow(2).sum().backward()
                assert w.grad is not None and w.grad != 0


def test_mobilenetv3_student_supports_exact_iga():
    timm = pytest.importorskip("timm")
    from kdiga_core.objectives import supports_double_backward

    spec = ModelSpec(arch="mobilenetv3_small_100", num_classes=5, in_chans=1, img_size=32)
    ours = build_model(spec).eval()
    stock = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=5, in_chans=1).eval()
    assert set(ours.net.state_dict()) == set(stock.state_dict())  # weights move between them unchanged
    stock.load_state_dict(ours.net.state_dict())
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(ours.net(x), stock(x), atol=1e-5)
    assert not any(isinstance(m, torch.nn.Hardswish | torch.nn.Hardsigmoid) for m in ours.modules())
    assert supports_double_backward(ours, (1, 32, 32))
    assert not supports_double_backward(stock, (1, 32, 32))
