"""Input gradients, their alignment between student and teacher, local linearity, and the bound.

What IGA trains for, measured (method.md §4): how close the student's input gradients are to the
teacher's, how locally linear each model is, and the local-linearity bound on the student's
adversarial loss next to the loss PGD actually reaches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiga_core.attacks import PGD, model_mode, pgd, random_start
from kdiga_core.evaluate.common import batches, mean, on_model_device, seeded_generator
from kdiga_core.evaluate.plan import MEASURED_LOSS_STEPS
from kdiga_core.evaluate.progress import StageFn, Ticker, silent_stage

Gradients = tuple[Tensor, Tensor, Tensor]  # student loss, student gradients, teacher gradients


def input_gradients(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500,
                    progress: Ticker | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample cross-entropy (true labels) and its input gradient g(x) = ∇ₓℓ(f, x, y).

    Returns CPU tensors ``(loss of shape (N,), grad of x's shape)``. Summing the
    per-sample losses before differentiating gives each sample its own gradient.
    """
    x, y = on_model_device(model, x, y)
    losses, grads = [], []
    with model_mode(model), torch.enable_grad():
        for xb, yb in batches(x, y, batch_size):
            xb = xb.clone().requires_grad_(True)
            loss = F.cross_entropy(model(xb), yb, reduction="none")
            (grad,) = torch.autograd.grad(loss.sum(), xb)
            losses.append(loss.detach().cpu())
            grads.append(grad.cpu())
            _tick(progress, sum(len(g) for g in grads), len(x))
    return torch.cat(losses), torch.cat(grads)


def _tick(progress: Ticker | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def alignment_of(g_s: Tensor, g_t: Tensor) -> dict[str, float]:
    """Means over the points of ‖g_s − g_t‖₁ (``l1``), ‖g_s − g_t‖₂ (``l2``) and cos(g_s, g_t) (``cosine``)."""
    diff = (g_s - g_t).flatten(1)
    cosine = F.cosine_similarity(g_s.flatten(1), g_t.flatten(1), dim=1, eps=1e-12)
    return {"l1": mean(diff.abs().sum(1)), "l2": mean(diff.norm(dim=1)), "cosine": mean(cosine)}


def gradient_alignment(
    student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500
) -> dict[str, float]:
    """How well the student's input gradients match the teacher's (what IGA trains for); see `alignment_of`."""
    _, g_s = input_gradients(student, x, y, batch_size=batch_size)
    _, g_t = input_gradients(teacher, x, y, batch_size=batch_size)
    return alignment_of(g_s, g_t)


def local_linearity(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    norm: str = "Linf",
    steps: int = 50,
    step_size: float | None = None,
    batch_size: int = 500,
    seed: int = 0,
    x_start: Tensor | None = None,
    progress: Ticker | None = None,
) -> Tensor:
    """Per-sample local linearity γ(ε, x) = max_{‖δ‖≤ε} |ℓ(x+δ) − ℓ(x) − δᵀ∇ₓℓ(x)| (Qin et al. 2019).

    Estimated as in the KDIGA author's code (method.md §4): start at δ ~ U(−ε, ε), take
    ``steps`` signed-gradient ascent steps (normalised-gradient steps for L2) of size
    ``step_size`` (default 2.5ε/steps), projecting onto the ε-ball and [0, 1], and keep
    the largest value seen. γ is a maximum, so any estimate is a lower bound of it.

    The gap has two ascent basins, along +∇ℓ and along −∇ℓ, and from a random start
    the ascent often settles in the smaller one (on a toy model: γ 10× too small, the
    "bound" below the measured PGD loss). Passing ``x_start`` (e.g. PGD's adversarial
    points) runs a second ascent from there and keeps the larger value.

    Returns:
        A CPU tensor of shape (N,).
    """
    x, y = on_model_device(model, x, y)
    starts = x_start.to(x.device) if x_start is not None else None
    rule = PGD(eps, norm, steps=steps, step_size=step_size, generator=seeded_generator(x.device, seed))
    out: list[Tensor] = []
    with model_mode(model), torch.enable_grad():
        for i, (xb, yb) in enumerate(batches(x, y, batch_size)):
            extra = starts[i * batch_size : i * batch_size + len(xb)] if starts is not None else None
            out.append(_linearity_batch(model, xb, yb, rule, extra))
            _tick(progress, i * batch_size + len(xb), len(x))
    return torch.cat(out).cpu()


def _linearity_batch(model: nn.Module, x: Tensor, y: Tensor, rule: PGD, x_start: Tensor | None) -> Tensor:
    """γ for one batch: ascent from PGD's random start (and from ``x_start``), keeping the max."""
    x0 = x.clone().requires_grad_(True)
    loss0 = F.cross_entropy(model(x0), y, reduction="none")
    (g0,) = torch.autograd.grad(loss0.sum(), x0)
    starts = [random_start(x, rule.eps, rule.norm, rule.generator)] + ([x_start] if x_start is not None else [])
    return torch.stack([_ascend_gap(model, x, y, loss0.detach(), g0, s, rule) for s in starts]).amax(0)


def _ascend_gap(
    model: nn.Module, x: Tensor, y: Tensor, loss0: Tensor, g0: Tensor, start: Tensor, rule: PGD
) -> Tensor:
    """`pgd` ascent of |ℓ(x+δ) − ℓ(x) − δᵀg0| from ``start``; the largest value seen at any iterate."""
    best = torch.zeros_like(loss0)

    def gap(x_adv: Tensor, _active: Tensor | None) -> tuple[Tensor, None]:
        nonlocal best
        value = (F.cross_entropy(model(x_adv), y, reduction="none") - loss0
                 - ((x_adv - x) * g0).flatten(1).sum(1)).abs()
        best = torch.maximum(best, value.detach())
        return value.sum(), None

    last = pgd(gap, x, start, eps=rule.eps, norm=rule.norm, step_size=rule.step_size, steps=rule.steps)
    gap(last, None)  # the last iterate counts too
    return best


def adversarial_examples(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    norm: str = "Linf",
    steps: int = MEASURED_LOSS_STEPS,
    batch_size: int = 500,
    seed: int = 0,
    progress: Ticker | None = None,
) -> Tensor:
    """PGD-``steps`` adversarial points of ``model`` (CPU tensor, same shape as ``x``)."""
    x, y = on_model_device(model, x, y)
    attack = PGD(eps, norm, steps=steps, generator=seeded_generator(x.device, seed))
    out: list[Tensor] = []
    for xb, yb in batches(x, y, batch_size):
        out.append(attack(model, xb, yb).cpu())
        _tick(progress, sum(len(o) for o in out), len(x))
    return torch.cat(out)


def per_sample_loss(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500) -> Tensor:
    """Per-sample cross-entropy with the true labels (CPU tensor of shape (N,))."""
    x, y = on_model_device(model, x, y)
    with model_mode(model), torch.no_grad():
        return torch.cat([F.cross_entropy(model(xb), yb, reduction="none").cpu() for xb, yb in batches(x, y, batch_size)])


def linearity_bound(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    norm: str = "Linf",
    steps: int = 50,
    batch_size: int = 500,
    seed: int = 0,
    gradients: Gradients | None = None,
    stages: StageFn | None = None,
    role: str = "student",
) -> dict[str, float]:
    """The local-linearity bound of method.md §4 next to the measured adversarial losses.

    Per sample, max_{‖δ‖≤ε} ℓ_s(x+δ) ≤ ℓ_s(x) + ε‖g_t‖_* + ε‖g_s − g_t‖_* + γ_s(ε, x), where
    ‖·‖_* is the dual norm (L1 for an L∞ ball, L2 for an L2 ball). ``bound`` is its mean;
    ``measured_loss`` / ``teacher_measured_loss`` are the mean PGD-20 losses of student
    and teacher; ``linearity_*`` the mean γ of each model.

    Args:
        gradients: ``(student loss, student gradients, teacher gradients)`` when already computed.
        stages: Where each model's stages report progress (`progress.Tracker.stage`).
        role: The student's name in the stage labels (``model`` in an evaluate job); the keys stay.
    """
    stage = stages or silent_stage
    loss_s, g_s, g_t = gradients or (*input_gradients(student, x, y, batch_size=batch_size),
                                     input_gradients(teacher, x, y, batch_size=batch_size)[1])
    dual = 1 if norm == "Linf" else 2
    kw: dict[str, Any] = {"norm": norm, "batch_size": batch_size, "seed": seed}
    measured, gamma = {}, {}
    for key, label, model in (("student", role, student), ("teacher", "teacher", teacher)):
        adv = adversarial_examples(model, x, y, eps, progress=stage(f"{label}: measured PGD-{MEASURED_LOSS_STEPS} loss"),
                                   **kw)
        measured[key] = per_sample_loss(model, adv, y, batch_size=batch_size)
        gamma[key] = local_linearity(model, x, y, eps, steps=steps, x_start=adv, progress=stage(f"{label}: local linearity"),
                                     **kw)
    bound = loss_s + eps * g_t.flatten(1).norm(p=dual, dim=1) + eps * (g_s - g_t).flatten(1).norm(p=dual, dim=1)
    return {
        "linearity_student": mean(gamma["student"]),
        "linearity_teacher": mean(gamma["teacher"]),
        "bound": mean(bound + gamma["student"]),
        "measured_loss": mean(measured["student"]),
        "teacher_measured_loss": mean(measured["teacher"]),
    }


def alignment_report(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, eps: float, *, norm: str,
                     steps: int, batch_size: int, seed: int, stages: StageFn | None = None,
                     role: str = "student") -> dict[str, float]:
    """The report's ``alignment`` block: `alignment_of` and `linearity_bound`, sharing the input gradients.
    ``role`` names the student in the stage labels (they match `plan.alignment_plan`'s)."""
    stage = stages or silent_stage
    loss_s, g_s = input_gradients(student, x, y, batch_size=batch_size, progress=stage(f"{role}: input gradients"))
    _, g_t = input_gradients(teacher, x, y, batch_size=batch_size, progress=stage("teacher: input gradients"))
    return alignment_of(g_s, g_t) | linearity_bound(student, teacher, x, y, eps, norm=norm, steps=steps,
                                                    batch_size=batch_size, seed=seed, gradients=(loss_s, g_s, g_t),
                                                    stages=stages, role=role)
