"""Objectives: dict contract, exact vs finite-difference IGA, mode selection, teacher cache."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdiga_core.attacks import PGD
from kdiga_core.config import ObjectiveConfig
from kdiga_core.errors import KdigaError
from kdiga_core.losses import iga_per_sample
from kdiga_core.objectives import build_objective, effective_gamma, supports_double_backward

torch.set_num_threads(1)


def tiny_cnn(act=nn.ReLU, bn=False, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 6, 3, padding=1)] + ([nn.BatchNorm2d(6)] if bn else [])
    layers += [act(), nn.Conv2d(6, 6, 3, padding=1, stride=2), act(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)]
    return nn.Sequential(*layers).to(dtype)


def batch(n=12, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=gen, dtype=dtype), torch.randint(0, 5, (n,), generator=gen)


def param_grad(objective, model, x, y, progress=1.0):
    model.zero_grad()
    out = objective(x, y, progress=progress)
    out["loss"].backward()
    return out, torch.cat([p.grad.flatten() for p in model.parameters()])


def kdiga(**kw):
    base = {"method": "kdiga", "gamma": 10.0, "gamma_warmup": 0.0}
    return ObjectiveConfig(**{**base, **kw})


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU])
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("reduction", ["per_sample", "author"])
def test_finite_difference_matches_exact_on_smooth_nets(act, bn, reduction):
    x, y = batch()
    teacher = tiny_cnn(nn.ReLU, seed=1)
    grads, values = {}, {}
    for mode in ("exact", "finite_difference"):
        student = tiny_cnn(act, bn)
        out, grads[mode] = param_grad(build_objective(kdiga(iga_mode=mode, iga_reduction=reduction), student, teacher),
                                      student, x, y)
        values[mode] = out["loss"].item()
    assert F.cosine_similarity(grads["exact"], grads["finite_difference"], dim=0) >= 0.99
    assert values["finite_difference"] == pytest.approx(values["exact"], rel=1e-5)  # value is γ·IGA in both


@pytest.mark.parametrize("reduction", ["per_sample", "author"])
def test_finite_difference_matches_exact_on_relu_net_in_float64(reduction):
    """ReLU kinks add O(1)/h spikes when a unit changes sign inside ±h·v̂; a tiny h avoids crossings."""
    x, y = batch(dtype=torch.float64)
    teacher = tiny_cnn(nn.ReLU, seed=1, dtype=torch.float64)
    grads = {}
    for mode in ("exact", "finite_difference"):
        student = tiny_cnn(nn.ReLU, bn=True, dtype=torch.float64)
        cfg = kdiga(iga_mode=mode, iga_reduction=reduction, fd_step=1e-4)
        _, grads[mode] = param_grad(build_objective(cfg, student, teacher), student, x, y)
    assert F.cosine_similarity(grads["exact"], grads["finite_difference"], dim=0) >= 0.99


def test_exact_iga_value_uses_per_sample_gradients():
    x, y = batch(n=4)
    student, teacher = tiny_cnn(nn.Tanh, bn=True), tiny_cnn(seed=1)
    student.eval()  # no batch coupling, so a one-sample loop is an independent reference
    out = build_objective(kdiga(iga_mode="exact"), student, teacher)(x, y, progress=1.0)

    def one_grad(model, i):
        xi = x[i:i + 1].clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi)[0]

    gs = torch.cat([one_grad(student, i) for i in range(4)])
    gt = torch.cat([one_grad(teacher, i) for i in range(4)])
    assert out["iga"].item() == pytest.approx(iga_per_sample(gs, gt).item(), rel=1e-5)


def test_gamma_warmup_ramps_linearly():
    cfg = kdiga(gamma=10.0, gamma_warmup=0.5)
    assert [effective_gamma(cfg, p) for p in (0.0, 0.25, 0.5, 1.0)] == [0.0, 5.0, 10.0, 10.0]
    assert effective_gamma(kdiga(gamma=3.0, gamma_warmup=0.0), 0.0) == 3.0


def test_kdiga_at_zero_gamma_equals_kd():
    x, y = batch()
    student, teacher = tiny_cnn(), tiny_cnn(seed=1)
    kd = build_objective(ObjectiveConfig(method="kd"), student, teacher)(x, y, progress=0.0)
    iga = build_objective(kdiga(gamma_warmup=0.5, iga_mode="finite_difference"), student, teacher)(x, y, progress=0.0)
    assert iga["loss"].item() == pytest.approx(kd["loss"].item())
    assert iga["gamma"] == 0.0 and iga["iga"].item() > 0  # still reported while γ is warming up


def test_auto_picks_finite_difference_on_mobilenetv3_and_exact_refuses():
    timm = pytest.importorskip("timm")
    student = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=5, in_chans=1)
    teacher = tiny_cnn(seed=1)
    x = torch.rand(2, 1, 32, 32)
    teacher_32 = nn.Sequential(nn.AdaptiveAvgPool2d(8), teacher)
    y = torch.tensor([0, 1])
    assert not supports_double_backward(student, (1, 32, 32))
    assert supports_double_backward(teacher_32, (1, 32, 32))
    student.eval()  # batch of 2 images: keep BN on running statistics
    auto = build_objective(kdiga(iga_mode="auto"), student, teacher_32)
    auto(x, y, progress=1.0)["loss"].backward()
    assert auto.mode == "finite_difference"
    exact = build_objective(kdiga(iga_mode="exact"), student, teacher_32)
    with pytest.raises(KdigaError, match="finite_difference"):
        exact(x, y, progress=1.0)


def test_auto_picks_exact_when_double_backward_works():
    x, y = batch()
    objective = build_objective(kdiga(iga_mode="auto"), tiny_cnn(), tiny_cnn(seed=1))
    objective(x, y, progress=1.0)
    assert objective.mode == "exact"


@pytest.mark.parametrize("method,parts", [
    ("ce", {"ce"}), ("kd", {"ce", "kd"}), ("kdiga", {"ce", "kd", "iga", "gamma"}), ("ard", {"ce", "kd"}),
    ("rslad", {"ce", "kd", "kd_adv"}), ("pgd_at", {"ce", "adv_ce"}), ("trades", {"ce", "kl"}),
])
def test_every_method_returns_loss_logits_and_parts(method, parts):
    x, y = batch(n=6)
    student = tiny_cnn(bn=True)
    cfg = ObjectiveConfig(method=method, gamma=5.0, attack_steps=2, attack_eps=0.1, attack_step=0.05)
    out = build_objective(cfg, student, tiny_cnn(seed=1), generator=torch.Generator().manual_seed(0))(
        x, y, progress=0.5)
    assert {"loss", "logits"} | parts <= set(out)
    assert out["logits"].shape == (6, 5) and not out["logits"].requires_grad
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is not None for p in student.parameters())
    assert student.training  # inner attacks restore the mode


def test_adversarial_methods_stay_in_eps_ball():
    # PGD-AT on a model whose loss grows with the input: the attack must stop at ε
    x, y = batch(n=4)
    student = tiny_cnn()
    seen = []
    original_forward = student.forward

    def spy(inp):
        seen.append(inp.detach().clone())
        return original_forward(inp)

    student.forward = spy
    cfg = ObjectiveConfig(method="pgd_at", attack_steps=3, attack_eps=0.05, attack_step=0.03)
    build_objective(cfg, student)(x, y, progress=0.0)
    final = seen[-1]
    assert (final - x).abs().max() <= 0.05 + 1e-6 and final.min() >= 0 and final.max() <= 1


def test_teacher_cache_gives_the_same_loss():
    x, y = batch()
    student, teacher = tiny_cnn(), tiny_cnn(seed=1)
    cfg = kdiga(iga_mode="finite_difference")
    plain = build_objective(cfg, student, teacher)(x, y, progress=1.0)
    cached_obj = build_objective(cfg, student, teacher)
    cached_obj.precompute_teacher(x, y, batch_size=5, dtype=torch.float32)
    index = torch.arange(len(x)).flip(0)
    cached = cached_obj(x.flip(0), y.flip(0), progress=1.0, index=index)
    assert cached["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-5)
    # the default: 16-bit floats in host memory (half the bytes), never on the device; close, not equal
    cached_obj.precompute_teacher(x, y, batch_size=5)
    assert cached_obj.cache.logits.dtype == torch.float16 and cached_obj.cache.logits.device.type == "cpu"
    assert cached_obj.cache.grads.dtype == torch.bfloat16
    bf16 = cached_obj(x.flip(0), y.flip(0), progress=1.0, index=index)
    assert bf16["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-3)


def test_noise_variant_takes_gradients_at_a_noised_point():
    x, y = batch()
    student, teacher = tiny_cnn(nn.Tanh), tiny_cnn(seed=1)
    clean = build_objective(kdiga(), student, teacher)(x, y, progress=1.0)
    noisy = build_objective(kdiga(iga_noise_eps=0.1), student, teacher, generator=torch.Generator().manual_seed(0))
    out = noisy(x, y, progress=1.0)
    assert out["kd"].item() == pytest.approx(clean["kd"].item())  # KD stays on clean inputs
    assert out["iga"].item() != pytest.approx(clean["iga"].item())
    out["loss"].backward()
    noisy.precompute_teacher(x, y)  # with noise only the logits are cacheable
    assert noisy.cache.grads is None
    cached = noisy(x, y, progress=1.0, index=torch.arange(len(x)))
    assert cached["kd"].item() == pytest.approx(clean["kd"].item(), rel=1e-3)  # fp16 logits in the cache


def test_distillation_needs_a_teacher_and_freezes_it():
    with pytest.raises(KdigaError, match="needs a teacher"):
        build_objective(ObjectiveConfig(method="kdiga"), tiny_cnn())
    teacher = tiny_cnn(seed=1)
    build_objective(ObjectiveConfig(method="kd"), tiny_cnn(), teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_class_count_mismatch_is_one_sentence():
    x, y = batch()
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    with pytest.raises(KdigaError, match="teacher predicts 7 classes but the student predicts 5"):
        build_objective(ObjectiveConfig(method="kd"), tiny_cnn(), teacher)(x, y, progress=0.0)


@pytest.mark.parametrize("method", ["pgd_at", "ard"])
def test_inner_attack_is_the_evaluation_pgd(method):
    """The training objectives' inner attack and attacks.PGD run one PGD: same start, same loss, same x_adv."""
    x, y = batch(n=8)
    student = tiny_cnn(bn=True)
    # first: the objective's training forward on x_adv updates the batch-norm running statistics
    evaluation = PGD(0.1, "Linf", steps=4, step_size=0.03, generator=torch.Generator().manual_seed(5))(student, x, y)
    seen = []
    hook = student.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    cfg = ObjectiveConfig(method=method, attack_steps=4, attack_eps=0.1, attack_step=0.03)
    build_objective(cfg, student, tiny_cnn(seed=1), generator=torch.Generator().manual_seed(5))(x, y, progress=0.0)
    hook.remove()
    inner = seen[cfg.attack_steps]  # the forward after the last attack step sees x_adv
    assert torch.equal(evaluation, inner)
    assert 0 < float((inner - x).abs().max()) <= 0.1 + 1e-6


def test_inner_attack_supports_l2():
    x, y = batch(n=6)
    objective = build_objective(ObjectiveConfig(method="pgd_at", attack_steps=3, attack_eps=0.5, attack_step=0.2),
                                tiny_cnn(), generator=torch.Generator().manual_seed(0))
    objective.attack_norm = "L2"
    x_adv = objective.attack(lambda xa: F.cross_entropy(objective.student(xa), y), x, objective.random_start(x))
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert float(norms.max()) <= 0.5 + 1e-5 and float(norms.min()) > 0.1
    assert float((x_adv - x).abs().max()) > 0.1  # an L2 step, not an L∞ one of 0.1 per pixel


def test_kdiga_with_gamma_auto_is_resolved_before_training():
    with pytest.raises(KdigaError, match='gamma "auto" is chosen by the sweep'):
        build_objective(ObjectiveConfig(method="kdiga"), tiny_cnn(), tiny_cnn(seed=1))
    assert build_objective(ObjectiveConfig(method="kd"), tiny_cnn(), tiny_cnn(seed=1))  # kd ignores gamma
