"""Tests for kdiga_core.attacks: the shared contract, PGD against torchattacks, AutoAttack's survivor loop."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torchattacks
from torch import nn

from kdiga_core.attacks import (
    PGD,
    build_attack,
    list_attacks,
    model_mode,
    pgd,
    predict,
    project,
    random_start,
    run_autoattack,
)
from kdiga_core.config import AttackSpec
from kdiga_core.errors import KdigaError, UnknownNameError

torch.set_num_threads(1)

EPS = {"Linf": 0.2, "L2": 1.3}  # radii where the toy model is partly robust


def _toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes, each a bright 2-pixel-wide column band on a noisy 8x8 image."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.4
    for c in range(4):
        x[y == c, :, :, 2 * c : 2 * c + 2] += 0.5
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    x, y = _toy_data(200, 0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    x_test, y_test = _toy_data(48, 1)
    assert (predict(model, x_test) == y_test).float().mean() > 0.9
    return model, x_test, y_test


def _max_norm(delta: torch.Tensor, norm: str) -> float:
    flat = delta.flatten(1)
    return float((flat.abs().max(1).values if norm == "Linf" else flat.norm(dim=1)).max())


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("name", ["pgd", "fgsm", "apgd-ce", "apgd-t", "fab-t", "square", "autoattack"])
def test_every_attack_respects_the_contract(model_and_data, name, norm):
    model, x, y = model_and_data
    attack = build_attack(AttackSpec(name, norm=norm, eps=EPS[norm], steps=5), n_queries=50)
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert _max_norm(x_adv - x, norm) <= EPS[norm] + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    clean = (predict(model, x) == y).float().mean()
    assert (predict(model, x_adv) == y).float().mean() <= clean


def _torchattacks_pgd(model: nn.Module, norm: str, eps: float, random_start: bool):
    cls = torchattacks.PGD if norm == "Linf" else torchattacks.PGDL2
    return cls(model, eps=eps, alpha=2.5 * eps / 10, steps=10, random_start=random_start)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_matches_torchattacks(model_and_data, norm):
    model, x, y = model_and_data
    eps = EPS[norm]
    # Without the random start both are deterministic and must agree point by point.
    ours = PGD(eps, norm, steps=10, random_start=False)(model, x, y)
    assert torch.allclose(ours, _torchattacks_pgd(model, norm, eps, False)(x, y), atol=1e-4)
    # With it, robust accuracy agrees up to sampling noise (averaged over a few seeds).
    acc_ours, acc_ref = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        acc_ours.append((predict(model, PGD(eps, norm, steps=10)(model, x, y)) == y).float().mean().item())
        acc_ref.append(
            (predict(model, _torchattacks_pgd(model, norm, eps, True)(x, y)) == y).float().mean().item()
        )
    assert sum(acc_ours) / 3 < 0.9  # the attack does something on this model
    assert abs(sum(acc_ours) - sum(acc_ref)) / 3 <= 0.1


def test_pgd_is_reproducible_and_fgsm_is_one_step(model_and_data):
    model, x, y = model_and_data
    a, b = (PGD(0.05, steps=3, generator=torch.Generator().manual_seed(3))(model, x, y) for _ in range(2))
    assert torch.equal(a, b)
    fgsm = build_attack(AttackSpec("fgsm", eps=0.05))(model, x, y)
    assert torch.allclose((fgsm - x).abs()[(fgsm > 0) & (fgsm < 1)], torch.tensor(0.05), atol=1e-6)


def test_bookkeeping_restores_mode_and_requires_grad(model_and_data):
    model, x, y = model_and_data
    model.train()
    model.zero_grad(set_to_none=True)
    model[1].weight.requires_grad_(False)
    try:
        PGD(0.05, steps=2)(model, x, y)
        assert model.training
        assert [p.requires_grad for p in model.parameters()] == [False, True, True, True]
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()
        model[1].weight.requires_grad_(True)


def test_attack_works_inside_no_grad_and_keeps_global_rng(model_and_data):
    model, x, y = model_and_data
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with torch.no_grad():
        build_attack(AttackSpec("apgd-ce", eps=0.05, steps=2))(model, x[:8], y[:8])
    assert torch.equal(torch.rand(3), expected)  # torchattacks' manual_seed did not leak out


def test_run_autoattack_attacks_survivors_only(model_and_data):
    model, x, y = model_and_data
    res = run_autoattack(model, x, y, 0.2, "Linf", steps=5, n_queries=50)
    accs = [s["robust_accuracy"] for s in res["breakdown"]]
    assert [s["attack"] for s in res["breakdown"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(b <= a for a, b in pairwise([res["clean_accuracy"], *accs]))
    assert res["robust_accuracy"] == accs[-1] == res["robust"].float().mean().item()
    still_right = predict(model, res["x_adv"]) == y
    assert torch.equal(still_right & res["robust"], res["robust"])
    assert not (still_right & ~res["robust"] & (predict(model, x) == y)).any()


def test_zero_eps_and_bad_inputs(model_and_data):
    model, x, y = model_and_data
    assert torch.equal(PGD(0.0)(model, x, y), x)
    with pytest.raises(KdigaError, match="pixels in \\[0, 1\\]"):
        PGD(0.1)(model, x * 2 - 0.5, y)
    with pytest.raises(KdigaError, match="norm must be one of: Linf, L2."):
        PGD(0.1, norm="L1")


def test_unknown_attack_lists_names():
    with pytest.raises(UnknownNameError) as info:
        build_attack(AttackSpec("cw"))
    assert str(info.value) == (
        "Unknown attack 'cw'; valid names are: apgd-ce, apgd-t, autoattack, fab-t, fgsm, pgd, square."
    )
    assert list_attacks() == ["apgd-ce", "apgd-t", "autoattack", "fab-t", "fgsm", "pgd", "square"]


def test_project_and_model_mode():
    x = torch.full((2, 1, 2, 2), 0.5)
    far = x + torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
    assert torch.allclose(project(far, x, 0.1, "Linf"), x + torch.tensor([0.1, -0.1]).view(2, 1, 1, 1))
    l2 = project(far, x, 0.2, "L2")
    assert torch.allclose((l2 - x).flatten(1).norm(dim=1), torch.tensor([0.2, 0.2]))
    inside = project(torch.rand(2, 1, 2, 2), x, 0.3, "Linf")
    assert torch.equal(project(inside, x, 0.3, "Linf"), inside)  # projecting twice changes nothing
    net = nn.Linear(2, 2).train()
    with model_mode(net):
        assert not net.training and not net.weight.requires_grad
    assert net.training and net.weight.requires_grad


def test_model_mode_can_keep_the_mode_and_freeze_batchnorm_statistics():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train()
    before = net[1].running_mean.clone()
    with model_mode(net, train=None, freeze_params=False, freeze_bn_stats=True):
        assert net.training and net[0].weight.requires_grad
        out = net(torch.randn(8, 3) + 5)
    assert torch.equal(net[1].running_mean, before) and net[1].momentum == 0.1
    assert out.mean(0).abs().max() < 1e-5  # batch statistics were still used
    with pytest.raises(RuntimeError), model_mode(net):
        raise RuntimeError("boom")
    assert net.training and net[0].weight.requires_grad


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_loop_follows_the_loss_and_stops_points_it_drops(model_and_data, norm):
    model, x, y = model_and_data
    eps = EPS[norm]
    calls = []

    def loss_fn(x_adv, active):
        calls.append(len(x_adv))
        keep = torch.ones(len(x_adv), dtype=torch.bool)
        keep[0] = False  # drop one point per step
        return nn.functional.cross_entropy(model(x_adv), y if active is None else y[active], reduction="sum"), keep

    start = random_start(x, eps, norm, torch.Generator().manual_seed(0))
    out = pgd(loss_fn, x, start, eps=eps, norm=norm, step_size=eps / 4, steps=5)
    assert calls == [48, 47, 46, 45, 44]
    assert _max_norm(out - x, norm) <= eps + 1e-5 and out.min() >= 0 and out.max() <= 1
    # the point dropped at the first step keeps its (projected) start
    assert torch.equal(out[0], project(start, x, eps, norm)[0])


def test_pgd_stopping_at_misclassification_is_never_weaker_and_stays_in_the_ball():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 4, (64,))
    eps = 0.2
    robust = {}
    for stop in (False, True):
        gen = torch.Generator().manual_seed(1)
        attack = PGD(eps, "Linf", steps=10, generator=gen, stop_when_misclassified=stop)
        x_adv = attack(model, x, y)
        assert float((x_adv - x).abs().max()) <= eps + 1e-6 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
        robust[stop] = (model(x_adv).argmax(1) == y)
    # same random start: a point broken by the last iterate was broken by some iterate
    assert not bool((robust[True] & ~robust[False]).any())
    assert int(robust[True].sum()) <= int(robust[False].sum())
