"""Lazy IGA (objective.iga_every / iga_fraction): exact when off, skipped work when on."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdiga_core.config import ObjectiveConfig
from kdiga_core.errors import KdigaError
from kdiga_core.losses import cross_entropy, iga_per_sample, kd_kl
from kdiga_core.objectives import build_objective

torch.set_num_threads(1)


def tiny_cnn(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 6, 3, padding=1)] + ([nn.BatchNorm2d(6)] if bn else [])
    layers += [nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(96, 5)]
    return nn.Sequential(*layers)


def batch(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def kdiga(**kw):
    return ObjectiveConfig(**{"method": "kdiga", "gamma": 3.0, "gamma_warmup": 0.0, "iga_mode": "exact", **kw})


def input_grad(model, x, y, create_graph):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x, create_graph=create_graph)
    return g


def graph_names(loss):
    """Names of every autograd node behind `loss` (double backward shows as ...BackwardBackward)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack += [f for f, _ in node.next_functions]
    return {type(n).__name__ for n in seen}


def param_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_k1_f1_is_the_exact_full_batch_loss():
    """The defaults compute α·KD + (1−α)·CE + γ·mean‖g_s − g_t‖ to the last bit."""
    x, y = batch()
    student, teacher = tiny_cnn(), tiny_cnn(seed=1)
    cfg = kdiga()
    assert (cfg.iga_every, cfg.iga_fraction) == (1, 1.0)
    out = build_objective(cfg, student, teacher)(x, y, progress=1.0, step=3)
    x_in = x.clone().requires_grad_(True)
    z = student(x_in)
    ce, kd = cross_entropy(z, y), kd_kl(z, teacher(x), cfg.tau)
    (g_s,) = torch.autograd.grad(ce * len(x), x_in, create_graph=True)
    g_t = input_grad(teacher, x, y, create_graph=False)
    reference = cfg.alpha * kd + (1 - cfg.alpha) * ce + cfg.gamma * iga_per_sample(g_s, g_t)
    assert torch.equal(out["loss"].detach(), reference.detach())
    assert torch.equal(param_grads(student, out["loss"]), param_grads(student, reference))


def test_lazy_steps_skip_the_double_backward_and_the_teacher_gradient():
    x, y = batch()
    student, teacher = tiny_cnn(), tiny_cnn(seed=1)
    teacher_calls = []
    teacher.register_forward_hook(lambda m, i, o: teacher_calls.append(torch.is_grad_enabled()))
    objective = build_objective(kdiga(iga_every=4), student, teacher)
    kd = build_objective(ObjectiveConfig(method="kd"), student, teacher)
    for step in range(8):
        teacher_calls.clear()
        out = objective(x, y, progress=1.0, step=step)
        double = any("BackwardBackward" in n for n in graph_names(out["loss"]))
        assert double == (step % 4 == 0), step
        assert teacher_calls == [step % 4 == 0]  # a lazy step: one no-grad teacher forward
        if step % 4:  # a lazy step is the KD step, and reports the last measured IGA
            assert torch.equal(out["loss"].detach(), kd(x, y, progress=1.0)["loss"].detach())
    assert out["iga"].item() > 0


def test_every_kth_step_carries_k_times_the_term():
    x, y = batch()
    student, teacher = tiny_cnn(), tiny_cnn(seed=1)
    every = build_objective(kdiga(), student, teacher)(x, y, progress=1.0)
    lazy = build_objective(kdiga(iga_every=4), student, teacher)(x, y, progress=1.0, step=8)
    kd = build_objective(ObjectiveConfig(method="kd"), student, teacher)(x, y, progress=1.0)["loss"]
    assert (lazy["loss"] - kd).item() == pytest.approx(4 * (every["loss"] - kd).item(), rel=1e-5)


@pytest.mark.parametrize("bn", [False, True])
def test_a_fraction_aligns_the_first_part_of_the_batch(bn):
    x, y = batch(n=12)
    student, teacher = tiny_cnn(bn=bn), tiny_cnn(seed=1)
    part = math.ceil(0.3 * 12)
    out = build_objective(kdiga(iga_fraction=0.3), student, teacher)(x, y, progress=1.0)
    g_s = input_grad(student, x[:part], y[:part], create_graph=False)
    g_t = input_grad(teacher, x[:part], y[:part], create_graph=False)
    assert out["iga"].item() == pytest.approx(iga_per_sample(g_s, g_t).item(), rel=1e-5)
    # the double backward runs through the part's own forward only
    assert any("BackwardBackward" in n for n in graph_names(out["loss"]))


def test_lazy_iga_reads_the_teacher_cache():
    x, y = batch()
    student, teacher = tiny_cnn(), tiny_cnn(seed=1)
    cfg = kdiga(iga_fraction=0.5)
    plain = build_objective(cfg, student, teacher)(x, y, progress=1.0)
    cached = build_objective(cfg, student, teacher)
    cached.precompute_teacher(x, y)
    out = cached(x, y, progress=1.0, index=torch.arange(len(x)))
    # the cache holds the teacher in 16-bit floats (fp16 logits, bf16 gradients: kdiga_core.cache_policy)
    assert out["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-3)


def test_bad_lazy_settings_are_one_sentence():
    for bad in ({"iga_every": 0}, {"iga_fraction": 0.0}, {"iga_fraction": 1.5}, {"teacher_bank_k": -1}):
        with pytest.raises(KdigaError, match=r"^[A-Za-z_]+ must .*\.$"):
            kdiga(**bad)


def test_training_with_lazy_iga_and_micro_batches_runs():
    from types import SimpleNamespace

    from kdiga_core.config import TrainConfig
    from kdiga_core.train import train

    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (48,), generator=gen)
    data = SimpleNamespace(x_train=torch.rand(48, 1, 8, 8, generator=gen), y_train=y)
    steps = []
    result = train(tiny_cnn(), data, kdiga(iga_every=2, iga_fraction=0.5),
                   TrainConfig(epochs=2, batch_size=8, grad_accum_steps=2, device="cpu", lr=0.05),
                   teacher=tiny_cnn(seed=1), on_step=steps.append)
    assert result.steps == 6 and all(math.isfinite(s["loss"]) for s in steps)
    assert all(h["iga"] > 0 for h in result.history)
