"""Pure tensor loss functions (style.md habit 3).

Each function takes logits / gradients and returns a scalar tensor; none of them
runs a model. Every docstring names its paper and formula, and
tests/core/test_losses.py checks each one against a slow, independent reference.

Notation: z_s, z_t are student / teacher logits of shape (B, C); y are int64
labels of shape (B,); g_s, g_t are per-sample input gradients of shape (B, ...)
of the cross-entropy with the true labels (method.md §1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_entropy", "kd_kl", "iga_per_sample", "iga_author", "ard_loss", "rslad_loss", "trades_kl"]


def upcast(t: Tensor) -> Tensor:
    """Upcast bf16/fp16 logits (autocast) to float32; keep float64 as is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy with the true labels: CE = -(1/B) Σ_i log softmax(z_i)[y_i]."""
    return F.cross_entropy(upcast(logits), y)


def _kl_rows(z_s: Tensor, z_t: Tensor, tau: float) -> Tensor:
    """Per-row KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), shape (B,). Computed in at least float32 for stability."""
    log_p_s = F.log_softmax(upcast(z_s) / tau, dim=1)
    log_p_t = F.log_softmax(upcast(z_t) / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def kd_kl(z_s: Tensor, z_t: Tensor, tau: float = 1.0, *, reduction: str = "batchmean") -> Tensor:
    """Hinton distillation term: τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)).

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015).
    The τ² factor keeps the gradient scale independent of τ.

    Args:
        z_s: student logits (B, C); gradients flow into them.
        z_t: teacher logits (B, C); treated as constants by the caller.
        tau: temperature τ > 0.
        reduction: "batchmean" (sum over classes, mean over the batch: the true KL) or
            "mean" (mean over batch×classes, i.e. batchmean / C, as `nn.KLDivLoss()` with its
            default reduction in the KDIGA author's code).
    """
    rows = _kl_rows(z_s, z_t, tau)
    scale = tau * tau if reduction == "batchmean" else tau * tau / z_s.shape[1]
    return scale * rows.mean()


def iga_per_sample(g_s: Tensor, g_t: Tensor) -> Tensor:
    """Input gradient alignment, our default reduction: IGA = (1/B) Σ_i ‖g_s,i − g_t,i‖₂.

    Shao et al., "How and When Adversarial Robustness Transfers in Knowledge Distillation?"
    (arXiv 2110.12072), method.md §2. The norm is not squared, so each sample's penalty grows
    linearly with its misalignment.
    """
    diff = (upcast(g_s) - upcast(g_t)).flatten(1)
    return diff.norm(dim=1).mean()


def iga_author(g_s: Tensor, g_t: Tensor) -> Tensor:
    """Input gradient alignment as the KDIGA author's code reduces it: (1/B²)·sqrt(Σ_i ‖g_s,i − g_t,i‖²).

    The author's code takes input gradients of the *batch-mean* cross-entropy (each sample's
    gradient is g_i/B), takes one Frobenius norm over the whole batch, and multiplies it by γ/B:
    γ/B·‖(G_s − G_t)/B‖_F = γ/B²·‖G_s − G_t‖_F (method.md §2). This function takes per-sample
    gradients (like `iga_per_sample`) and returns that value without γ.

    Mapping γ between the reductions: with d_i = ‖g_s,i − g_t,i‖ and d̄ their mean,
    sqrt(B)·d̄ ≤ ‖G_s − G_t‖_F ≤ B·d̄, so iga_author lies in [d̄/B^1.5, d̄/B]. When the d_i
    are about equal (the usual case), γ_author·iga_author ≈ γ_per_sample·iga_per_sample for
    γ_per_sample = γ_author / B^1.5 (B = 128: γ_author = 100 ↔ γ_per_sample ≈ 0.069).
    """
    diff = (upcast(g_s) - upcast(g_t)).flatten(1)
    batch = diff.shape[0]
    return diff.norm() / (batch * batch)


def ard_loss(z_s_adv: Tensor, z_s: Tensor, z_t: Tensor, y: Tensor, tau: float = 30.0, alpha: float = 1.0) -> Tensor:
    """ARD: α·τ²·KL(softmax(z_t/τ) ‖ softmax(z_s(x+δ*)/τ)) + (1−α)·CE(z_s(x), y).

    Goldblum et al., "Adversarially Robust Distillation" (AAAI 2020); δ* is PGD on the
    student's cross-entropy. Defaults τ = 30, α = 1 as in the paper.
    """
    loss = alpha * kd_kl(z_s_adv, z_t, tau)
    if alpha < 1.0:
        loss = loss + (1.0 - alpha) * cross_entropy(z_s, y)
    return loss


def rslad_loss(z_s_adv: Tensor, z_s: Tensor, z_t: Tensor) -> Tensor:
    """RSLAD: (5/6)·KL(T(x) ‖ S(x+δ*)) + (1/6)·KL(T(x) ‖ S(x)), KL summed over classes, batch mean.

    Zi et al., "Revisiting Adversarial Robustness Distillation: Robust Soft Labels Make Student
    Better" (ICCV 2021). δ* maximises KL(T(x) ‖ S(x+δ)) (PGD-10).
    """
    return (5.0 / 6.0) * kd_kl(z_s_adv, z_t, 1.0) + (1.0 / 6.0) * kd_kl(z_s, z_t, 1.0)


def trades_kl(z_adv: Tensor, z_clean: Tensor) -> Tensor:
    """TRADES robustness term: KL(softmax(f(x)) ‖ softmax(f(x+δ))), summed over classes, batch mean.

    Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy" (ICML
    2019). The full TRADES loss is CE(f(x), y) + β·trades_kl; unlike distillation, both sides
    carry gradients (the clean distribution is not detached).
    """
    return kd_kl(z_adv, z_clean, 1.0)
