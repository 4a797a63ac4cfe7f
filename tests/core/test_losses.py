"""Each loss against an independent reference: plain Python/numpy loops, no torch.nn.functional."""

import math

import numpy as np
import pytest
import torch

from kdiga_core import losses


def _softmax(row, tau=1.0):
    e = np.exp((row - row.max()) / tau)
    return e / e.sum()


def _kl_loop(zs, zt, tau=1.0):
    """Σ_c p_t,c·log(p_t,c/p_s,c) per row, averaged over rows (the textbook KL)."""
    total = 0.0
    for a, b in zip(zs, zt, strict=True):
        ps, pt = _softmax(a, tau), _softmax(b, tau)
        total += sum(pt[c] * math.log(pt[c] / ps[c]) for c in range(len(a)))
    return total / len(zs)


def _ce_loop(z, y):
    return sum(-math.log(_softmax(row)[label]) for row, label in zip(z, y, strict=True)) / len(z)


@pytest.fixture
def logits():
    gen = torch.Generator().manual_seed(0)
    zs = torch.randn(5, 4, generator=gen, dtype=torch.float64) * 2
    zt = torch.randn(5, 4, generator=gen, dtype=torch.float64) * 2
    y = torch.tensor([0, 3, 1, 2, 3])
    return zs, zt, y


def test_cross_entropy_matches_loop(logits):
    zs, _, y = logits
    assert losses.cross_entropy(zs, y).item() == pytest.approx(_ce_loop(zs.numpy(), y.numpy()), rel=1e-5)


def test_cross_entropy_by_hand():
    # two equal logits: CE = log 2
    assert losses.cross_entropy(torch.zeros(1, 2), torch.tensor([1])).item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_kl_matches_loop_with_tau_squared(logits, tau):
    zs, zt, _ = logits
    expected = tau**2 * _kl_loop(zs.numpy(), zt.numpy(), tau)
    assert losses.kd_kl(zs, zt, tau).item() == pytest.approx(expected, rel=1e-5)


def test_kd_kl_author_reduction_divides_by_classes(logits):
    zs, zt, _ = logits
    expected = _kl_loop(zs.numpy(), zt.numpy()) / zs.shape[1]
    assert losses.kd_kl(zs, zt, 1.0, reduction="mean").item() == pytest.approx(expected, rel=1e-5)


def test_kd_kl_is_zero_for_equal_logits(logits):
    zs, _, _ = logits
    assert losses.kd_kl(zs, zs.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_iga_per_sample_by_hand():
    gs = torch.zeros(2, 1, 2, 2)
    gt = torch.zeros(2, 1, 2, 2)
    gs[0, 0, 0, 0], gs[0, 0, 1, 1] = 3.0, 4.0  # ‖·‖ = 5
    gt[1, 0, 0, 1] = 2.0  # ‖·‖ = 2
    assert losses.iga_per_sample(gs, gt).item() == pytest.approx((5 + 2) / 2)


def test_iga_author_by_hand():
    gs = torch.zeros(2, 1, 2, 2)
    gt = torch.zeros(2, 1, 2, 2)
    gs[0, 0, 0, 0], gs[0, 0, 1, 1] = 3.0, 4.0
    gt[1, 0, 0, 1] = 2.0
    # sqrt(25 + 4) / B²
    assert losses.iga_author(gs, gt).item() == pytest.approx(math.sqrt(29) / 4)


def test_iga_author_equals_authors_formula():
    """γ/B·‖∇ₓ mean-CE_s − ∇ₓ mean-CE_t‖_F, the author's code path, with per-sample inputs."""
    gen = torch.Generator().manual_seed(1)
    gs, gt = torch.randn(8, 3, 4, 4, generator=gen), torch.randn(8, 3, 4, 4, generator=gen)
    batch = 8
    authors = torch.norm(gs / batch - gt / batch, p=2) / batch
    assert losses.iga_author(gs, gt).item() == pytest.approx(authors.item(), rel=1e-5)


def test_iga_gamma_mapping_for_equal_norms():
    """Equal per-sample distances d: author = d / B^1.5, so γ_per_sample = γ_author / B^1.5."""
    batch = 16
    diff = torch.zeros(batch, 4)
    diff[:, 0] = 2.0
    ratio = losses.iga_author(diff, torch.zeros_like(diff)) / losses.iga_per_sample(diff, torch.zeros_like(diff))
    assert ratio.item() == pytest.approx(batch**-1.5)


def test_ard_loss_matches_loop(logits):
    zs, zt, y = logits
    zs_adv = zs + 0.5
    for alpha, tau in [(1.0, 30.0), (0.7, 2.0)]:
        expected = alpha * tau**2 * _kl_loop(zs_adv.numpy(), zt.numpy(), tau) + (1 - alpha) * _ce_loop(zs.numpy(), y.numpy())
        assert losses.ard_loss(zs_adv, zs, zt, y, tau, alpha).item() == pytest.approx(expected, rel=1e-5)


def test_rslad_loss_matches_loop(logits):
    zs, zt, _ = logits
    zs_adv = zs.flip(1)
    expected = 5 / 6 * _kl_loop(zs_adv.numpy(), zt.numpy()) + 1 / 6 * _kl_loop(zs.numpy(), zt.numpy())
    assert losses.rslad_loss(zs_adv, zs, zt).item() == pytest.approx(expected, rel=1e-5)


def test_trades_kl_direction_and_gradients(logits):
    zs, zt, _ = logits
    z_clean = zs.clone().requires_grad_(True)
    z_adv = zt.clone().requires_grad_(True)
    value = losses.trades_kl(z_adv, z_clean)
    assert value.item() == pytest.approx(_kl_loop(zt.numpy(), zs.numpy()), rel=1e-5)  # KL(clean ‖ adv)
    value.backward()
    assert z_clean.grad.abs().sum() > 0 and z_adv.grad.abs().sum() > 0  # TRADES does not detach
