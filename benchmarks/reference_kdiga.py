"""A plain KDIGA step, written the way the paper author's code does it: the baseline to beat.

The student's input gradient g_s comes from `torch.autograd.grad(..., create_graph=True)`
(double backprop), the teacher's g_t is recomputed on every step, and the loss is

    L = α·τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) + (1−α)·CE(z_s, y) + γ·(1/B) Σ_i ‖g_s,i − g_t,i‖₂

(method.md §2, our per-sample reduction, so its parameter gradients are comparable with
`kdiga_core.objectives`). Per-sample input gradients are the gradients of the *summed*
cross-entropy, each sample's loss depending on its own input only (in eval mode; with
train-mode BatchNorm the batch statistics couple them, identically in both
implementations). Nothing here is optimised on purpose: no cache, no finite differences,
no fused kernels. It fails on layers without a double-backward kernel, which is the point
of method.md §3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, *, create_graph: bool) -> tuple[Tensor, Tensor]:
    """Return (logits, ∇ₓ Σ_i CE(model(x_i), y_i)): per-sample input gradients of the true-label CE."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    ce_sum = F.cross_entropy(logits, y, reduction="sum")
    (grad,) = torch.autograd.grad(ce_sum, x, create_graph=create_graph)
    return logits, grad


def reference_kdiga_loss(
    student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor,
    *, alpha: float = 0.5, tau: float = 1.0, gamma: float = 10.0,
) -> dict[str, Tensor]:
    """KDIGA loss by double backprop, teacher recomputed: {"loss", "ce", "kd", "iga"}."""
    z_s, g_s = input_gradient(student, x, y, create_graph=True)
    z_t, g_t = input_gradient(teacher, x, y, create_graph=False)
    z_t, g_t = z_t.detach(), g_t.detach()
    ce = F.cross_entropy(z_s, y)
    kd = tau * tau * F.kl_div(F.log_softmax(z_s / tau, dim=1), F.softmax(z_t / tau, dim=1), reduction="batchmean")
    iga = (g_s - g_t).flatten(1).norm(dim=1).mean()
    loss = alpha * kd + (1.0 - alpha) * ce + gamma * iga
    return {"loss": loss, "ce": ce.detach(), "kd": kd.detach(), "iga": iga.detach()}


def reference_kdiga_step(
    student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
    *, alpha: float = 0.5, tau: float = 1.0, gamma: float = 10.0,
) -> float:
    """One training step (zero_grad, loss, backward, optimizer step); returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
    out = reference_kdiga_loss(student, teacher, x, y, alpha=alpha, tau=tau, gamma=gamma)
    out["loss"].backward()
    optimizer.step()
    return float(out["loss"].detach())
