"""The robustness report: clean and robust accuracy, ε-curves, sanity checks, alignment.

`evaluate` returns the ``kdiga.report/1`` dict of docs/contracts.md, built from plain
Python types only so that ``json.dumps`` works. Teacher and student are measured on the
same first ``max_points`` test points, so their numbers are comparable (method.md §5).
Each piece is a public function that can be used and tested on its own.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiga_core.attacks import (
    PGD,
    SQUARE_QUERIES,
    build_attack,
    model_mode,
    pgd,
    predict,
    random_start,
    run_autoattack,
)
from kdiga_core.config import AttackSpec, EvalConfig, Norm
from kdiga_core.data import DataBundle

SCHEMA = "kdiga.report/1"
LARGE_EPS = {"Linf": 0.5, "L2": 8.0}  # a radius at which any classifier should be broken
WHITE_BOX = ("pgd", "fgsm", "apgd-ce", "apgd-t", "fab-t")
CURVE_TOLERANCE = 0.02  # accuracy may rise this much between ε-curve points (sampling noise)
LARGE_EPS_MAX_ACCURACY = 0.05
BLACK_BOX_TOLERANCE = 0.01  # one percentage point
MEASURED_LOSS_STEPS = 20

Progress = Callable[[dict[str, Any]], None]


# ----------------------------------------------------------------------------- helpers


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def evaluation_points(data: DataBundle, max_points: int) -> tuple[Tensor, Tensor]:
    """The first ``max_points`` test points: deterministic, and the same for every model."""
    return data.x_test[:max_points], data.y_test[:max_points]


def _on(model: nn.Module, *tensors: Tensor) -> list[Tensor]:
    device = model_device(model)
    return [t.to(device) for t in tensors]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _mean(values: Tensor) -> float:
    return float(values.float().mean().item()) if values.numel() else 0.0


# ----------------------------------------------------------------------------- accuracy


def clean_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500) -> float:
    """Fraction of ``x`` classified correctly (no-grad batches, eval mode)."""
    x, y = _on(model, x, y)
    with model_mode(model):
        return _mean(predict(model, x, batch_size) == y)


def attack_key(spec: AttackSpec, threat: AttackSpec | None = None) -> str:
    """Report key of an attack: ``pgd-20`` for PGD, the name otherwise.

    An attack whose norm or ε differs from the report's threat model gets them as a
    suffix (``pgd-20@L2-0.5``) so that keys never collide silently.
    """
    key = f"pgd-{spec.steps}" if spec.name == "pgd" else spec.name
    if threat is not None and (spec.norm, spec.eps) != (threat.norm, threat.eps):
        key += f"@{spec.norm}-{spec.eps:g}"
    return key


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    spec: AttackSpec,
    *,
    n_classes: int | None = None,
    batch_size: int = 500,
    seed: int = 0,
    square_queries: int = SQUARE_QUERIES,
) -> dict[str, Any]:
    """Accuracy under one attack.

    A point counts as robust when it is classified correctly both clean and attacked.

    Returns:
        ``{"accuracy": float, "breakdown": list | None}`` (the breakdown for AutoAttack).
    """
    x, y = _on(model, x, y)
    if spec.name == "autoattack":
        res = run_autoattack(
            model,
            x,
            y,
            spec.eps,
            spec.norm,
            seed=seed,
            n_classes=n_classes,
            steps=spec.steps,
            n_queries=square_queries,
            batch_size=batch_size,
        )
        return {"accuracy": float(res["robust_accuracy"]), "breakdown": res["breakdown"]}
    attack = build_attack(
        spec, n_classes=n_classes, seed=seed, n_queries=square_queries, generator=_generator(x.device, seed),
        stop_when_misclassified=True,  # a point counts as broken by the first iterate that breaks it
    )
    with model_mode(model):
        clean = predict(model, x, batch_size) == y
        robust = clean.clone()
        # Only points classified correctly count, so only they are attacked (as AutoAttack does):
        # a robust model misclassifies 10-20% of clean points, which PGD would attack for nothing.
        idx = clean.nonzero().flatten()
        for chunk in idx.split(batch_size):
            xb, yb = x[chunk], y[chunk]
            robust[chunk] = predict(model, attack(model, xb, yb), batch_size) == yb
    return {"accuracy": _mean(robust), "breakdown": None}


def with_large_eps(grid: tuple[float, ...], norm: str) -> tuple[float, ...]:
    """``grid`` plus the very large radius, so that the 'reaches zero' check always has its point."""
    return grid if max(grid, default=0.0) >= LARGE_EPS[norm] else (*grid, LARGE_EPS[norm])


def default_eps_grid(eps: float, norm: str, points: int = 7) -> tuple[float, ...]:
    """``points`` radii from 0 to 4ε, plus one very large radius where accuracy must be ~0."""
    eps = eps if eps > 0 else (8 / 255 if norm == "Linf" else 0.5)
    grid = [round(4 * eps * i / (points - 1), 6) for i in range(points)]
    if LARGE_EPS[norm] > grid[-1]:
        grid.append(LARGE_EPS[norm])
    return tuple(grid)


def eps_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: Norm,
    eps_grid: tuple[float, ...],
    steps: int = 10,
    batch_size: int = 500,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Robust accuracy under PGD-``steps`` at each radius of ``eps_grid``."""
    curve = []
    for eps in eps_grid:
        spec = AttackSpec("pgd", norm=norm, eps=float(eps), steps=steps)
        acc = robust_accuracy(model, x, y, spec, batch_size=batch_size, seed=seed)["accuracy"]
        curve.append({"eps": float(eps), "accuracy": acc})
    return curve


# ----------------------------------------------------------------------------- sanity checks


def sanity_flags(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Checks that flag a broken evaluation (method.md §5, design.md §9), per model.

    - ``accuracy_falls_with_eps``: the ε-curve never rises by more than 2 points.
    - ``reaches_zero_at_large_eps``: accuracy at the largest ε is at most 5%.
    - ``black_box_not_better``: Square (alone, or as AutoAttack's last stage on the
      survivors of the white-box attacks) does not beat the white-box attacks by more
      than 1 point; if it does, gradients are probably masked.
    - ``robust_not_above_clean``: no attack raises accuracy above clean accuracy.

    Args:
        models: ``{"student": model_report, "teacher": ...}`` as built by `evaluate`.
    """
    flags = []
    for name, rep in models.items():
        flags += [dict(check=check, model=name, **fn(rep)) for check, fn in _CHECKS.items()]
    return flags


def _check_curve(rep: dict[str, Any]) -> dict[str, Any]:
    curve = rep.get("eps_curve") or []
    for a, b in pairwise(curve):
        if b["accuracy"] > a["accuracy"] + CURVE_TOLERANCE:
            return {
                "ok": False,
                "message": f"Accuracy rises from {a['accuracy']:.3f} at eps {a['eps']:g} to "
                f"{b['accuracy']:.3f} at eps {b['eps']:g}, which suggests a weak attack or masked gradients.",
            }
    return {"ok": True, "message": "Robust accuracy falls as eps grows."}


def _check_large_eps(rep: dict[str, Any]) -> dict[str, Any]:
    curve = rep.get("eps_curve") or []
    if not curve:
        return {"ok": True, "message": "No eps curve was measured."}
    last = curve[-1]
    if last["accuracy"] > LARGE_EPS_MAX_ACCURACY:
        return {
            "ok": False,
            "message": f"Accuracy is still {last['accuracy']:.3f} at eps {last['eps']:g}, where "
            "it should be about 0, which suggests masked gradients.",
        }
    return {"ok": True, "message": f"Accuracy reaches {last['accuracy']:.3f} at eps {last['eps']:g}."}


def _check_black_box(rep: dict[str, Any]) -> dict[str, Any]:
    attacks = rep.get("attacks", {})
    # Keys with "@" use another threat model than Square's, so they are not comparable.
    white = [
        acc for key, acc in attacks.items() if "@" not in key and (key.startswith("pgd-") or key in WHITE_BOX)
    ]
    stages = {s["attack"]: s["robust_accuracy"] for s in rep.get("autoattack_breakdown") or []}
    if "square" in stages and "fab-t" in stages:
        gain = stages["fab-t"] - stages["square"]
        if gain > BLACK_BOX_TOLERANCE + 1e-9:
            return {
                "ok": False,
                "message": f"Square broke {gain:.1%} of the points that survived the white-box "
                "attacks of AutoAttack, which suggests masked gradients.",
            }
    if "square" in attacks and white and attacks["square"] < min(white) - BLACK_BOX_TOLERANCE - 1e-9:
        return {
            "ok": False,
            "message": f"Black-box Square accuracy ({attacks['square']:.3f}) is below the best "
            f"white-box attack ({min(white):.3f}), which suggests masked gradients.",
        }
    return {"ok": True, "message": "The black-box attack does not beat the white-box attacks."}


def _check_below_clean(rep: dict[str, Any]) -> dict[str, Any]:
    worst = max(rep.get("attacks", {}).items(), key=lambda kv: kv[1], default=None)
    if worst is not None and worst[1] > rep["clean_accuracy"] + 1e-9:
        return {
            "ok": False,
            "message": f"Accuracy under {worst[0]} ({worst[1]:.3f}) is above clean accuracy "
            f"({rep['clean_accuracy']:.3f}), which means the evaluation is broken.",
        }
    return {"ok": True, "message": "No attack raises accuracy above clean accuracy."}


_CHECKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "accuracy_falls_with_eps": _check_curve,
    "reaches_zero_at_large_eps": _check_large_eps,
    "black_box_not_better": _check_black_box,
    "robust_not_above_clean": _check_below_clean,
}


# ----------------------------------------------------------------------------- gradients


def input_gradients(
    model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500
) -> tuple[Tensor, Tensor]:
    """Per-sample cross-entropy (true labels) and its input gradient g(x) = ∇ₓℓ(f, x, y).

    Returns CPU tensors ``(loss of shape (N,), grad of x's shape)``. Summing the
    per-sample losses before differentiating gives each sample its own gradient.
    """
    x, y = _on(model, x, y)
    losses, grads = [], []
    with model_mode(model), torch.enable_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            xb = xb.clone().requires_grad_(True)
            loss = F.cross_entropy(model(xb), yb, reduction="none")
            (grad,) = torch.autograd.grad(loss.sum(), xb)
            losses.append(loss.detach().cpu())
            grads.append(grad.cpu())
    return torch.cat(losses), torch.cat(grads)


def gradient_alignment(
    student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500
) -> dict[str, float]:
    """How well the student's input gradients match the teacher's (what IGA trains for).

    Returns:
        Means over the points of ‖g_s − g_t‖₁ (``l1``), ‖g_s − g_t‖₂ (``l2``) and
        cos(g_s, g_t) (``cosine``).
    """
    _, g_s = input_gradients(student, x, y, batch_size=batch_size)
    _, g_t = input_gradients(teacher, x, y, batch_size=batch_size)
    diff = (g_s - g_t).flatten(1)
    cosine = F.cosine_similarity(g_s.flatten(1), g_t.flatten(1), dim=1, eps=1e-12)
    return {"l1": _mean(diff.abs().sum(1)), "l2": _mean(diff.norm(dim=1)), "cosine": _mean(cosine)}


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
    x, y = _on(model, x, y)
    starts = x_start.to(x.device) if x_start is not None else None
    gen = _generator(x.device, seed)
    out = []
    with model_mode(model), torch.enable_grad():
        for i, (xb, yb) in enumerate(zip(x.split(batch_size), y.split(batch_size), strict=True)):
            extra = starts[i * batch_size : i * batch_size + len(xb)] if starts is not None else None
            out.append(
                _linearity_batch(
                    model, xb, yb, PGD(eps, norm, steps=steps, step_size=step_size, generator=gen), extra
                )
            )
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
) -> Tensor:
    """PGD-``steps`` adversarial points of ``model`` (CPU tensor, same shape as ``x``)."""
    x, y = _on(model, x, y)
    attack = PGD(eps, norm, steps=steps, generator=_generator(x.device, seed))
    return torch.cat(
        [attack(model, xb, yb).cpu() for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)]
    )


def per_sample_loss(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500) -> Tensor:
    """Per-sample cross-entropy with the true labels (CPU tensor of shape (N,))."""
    x, y = _on(model, x, y)
    with model_mode(model), torch.no_grad():
        return torch.cat(
            [
                F.cross_entropy(model(xb), yb, reduction="none").cpu()
                for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
            ]
        )


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
) -> dict[str, float]:
    """The local-linearity bound of method.md §4 next to the measured adversarial losses.

    Per sample, max_{‖δ‖≤ε} ℓ_s(x+δ) ≤ ℓ_s(x) + ε‖g_t‖_* + ε‖g_s − g_t‖_* + γ_s(ε, x), where
    ‖·‖_* is the dual norm (L1 for an L∞ ball, L2 for an L2 ball). ``bound`` is its mean;
    ``measured_loss`` / ``teacher_measured_loss`` are the mean PGD-20 losses of student
    and teacher; ``linearity_*`` the mean γ of each model.
    """
    loss_s, g_s = input_gradients(student, x, y, batch_size=batch_size)
    _, g_t = input_gradients(teacher, x, y, batch_size=batch_size)
    dual = 1 if norm == "Linf" else 2
    g_t_norm = g_t.flatten(1).norm(p=dual, dim=1)
    diff_norm = (g_s - g_t).flatten(1).norm(p=dual, dim=1)
    kw: dict[str, Any] = dict(norm=norm, batch_size=batch_size, seed=seed)
    adv_s = adversarial_examples(student, x, y, eps, **kw)
    adv_t = adversarial_examples(teacher, x, y, eps, **kw)
    gamma_s = local_linearity(student, x, y, eps, steps=steps, x_start=adv_s, **kw)
    gamma_t = local_linearity(teacher, x, y, eps, steps=steps, x_start=adv_t, **kw)
    return {
        "linearity_student": _mean(gamma_s),
        "linearity_teacher": _mean(gamma_t),
        "bound": _mean(loss_s + eps * g_t_norm + eps * diff_norm + gamma_s),
        "measured_loss": _mean(per_sample_loss(student, adv_s, y, batch_size=batch_size)),
        "teacher_measured_loss": _mean(per_sample_loss(teacher, adv_t, y, batch_size=batch_size)),
    }


# ----------------------------------------------------------------------------- randomized smoothing


def certify_smoothing(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    sigma: float,
    *,
    n0: int = 100,
    n: int = 100,
    alpha: float = 0.001,
    num_classes: int | None = None,
    batch_size: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Randomized-smoothing certification (Cohen, Rosenfeld & Kolter 2019, CERTIFY).

    Per point: guess the top class from ``n0`` noisy samples x + N(0, σ²I), count it in
    ``n`` fresh samples, take the one-sided Clopper–Pearson lower bound p_A at level
    1 − ``alpha``, and certify the L2 radius σ·Φ⁻¹(p_A), abstaining when p_A < 1/2.

    Returns:
        ``sigma``, ``n_points``, ``certified_accuracy`` (correct and not abstained),
        ``mean_radius`` (average certified radius: 0 for wrong or abstained points) and
        ``curve``: certified accuracy at radii 0..4σ.
    """
    from scipy.stats import beta, norm

    x, y = _on(model, x, y)
    gen = _generator(x.device, seed)
    radii = []
    with model_mode(model), torch.no_grad():
        for xi, yi in zip(x, y, strict=True):
            guess = int(_noisy_counts(model, xi, sigma, n0, num_classes, batch_size, gen).argmax())
            n_a = int(_noisy_counts(model, xi, sigma, n, num_classes, batch_size, gen)[guess].item())
            p_a = beta.ppf(alpha, n_a, n - n_a + 1) if n_a > 0 else 0.0
            certified = p_a >= 0.5 and guess == int(yi)
            radii.append(sigma * float(norm.ppf(p_a)) if certified else -1.0)
    return _smoothing_summary(np.array(radii), sigma)


def _noisy_counts(
    model: nn.Module,
    x: Tensor,
    sigma: float,
    samples: int,
    num_classes: int | None,
    batch_size: int,
    gen: torch.Generator,
) -> Tensor:
    """Class counts of the model's predictions on ``samples`` Gaussian-noised copies of ``x``."""
    preds = []
    for start in range(0, samples, batch_size):
        count = min(batch_size, samples - start)
        noise = torch.randn((count, *x.shape), generator=gen, device=x.device) * sigma
        preds.append(model(x.unsqueeze(0) + noise).argmax(1))
    preds_t = torch.cat(preds)
    return torch.bincount(preds_t, minlength=num_classes or int(preds_t.max()) + 1)


def _smoothing_summary(radii: np.ndarray, sigma: float) -> dict[str, Any]:
    """radii: certified radius per point, −1 where the point is wrong or abstained."""
    grid = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0]
    n = max(len(radii), 1)
    return {
        "sigma": float(sigma),
        "n_points": int(len(radii)),
        "certified_accuracy": float((radii >= 0).sum() / n),
        "mean_radius": float(np.clip(radii, 0, None).sum() / n),
        "curve": [
            {"radius": round(sigma * r, 6), "certified_accuracy": float((radii >= sigma * r).sum() / n)}
            for r in grid
        ],
    }


# ----------------------------------------------------------------------------- cost


def model_stats(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    latency: bool = True,
    repeats: int = 30,
    warmup: int = 5,
    max_seconds: float = 3.0,
) -> dict[str, Any]:
    """Parameters, MACs and measured CPU latency at batch 1 (design.md §9: real numbers).

    MACs are FlopCounterMode's FLOPs / 2 for one input. Latency is the median of up to
    ``repeats`` timed forward passes on a CPU copy of the model, after ``warmup`` passes,
    stopping early after ``max_seconds``; None when ``latency`` is False.
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    x = torch.rand((1, *input_shape), device=model_device(model))
    with model_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    stats: dict[str, Any] = {
        "params": int(params),
        "macs": int(counter.get_total_flops() // 2),
        "latency_ms": None,
        "latency_batch": 1,
    }
    if latency:
        stats["latency_ms"] = cpu_latency_ms(
            model, input_shape, repeats=repeats, warmup=warmup, max_seconds=max_seconds
        )
    return stats


def cpu_latency_ms(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    repeats: int = 30,
    warmup: int = 5,
    max_seconds: float = 3.0,
) -> float:
    """Median wall-clock milliseconds of one batch-1 forward pass on CPU."""
    cpu_model = model if model_device(model).type == "cpu" else copy.deepcopy(model).cpu()
    x = torch.rand((1, *input_shape))
    times: list[float] = []
    with model_mode(cpu_model), torch.inference_mode():
        for _ in range(warmup):
            cpu_model(x)
        deadline = time.perf_counter() + max_seconds
        while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
            start = time.perf_counter()
            cpu_model(x)
            times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


# ----------------------------------------------------------------------------- the report


class _Progress:
    """Turns finished stages into ``on_progress`` calls with a percentage."""

    def __init__(self, on_progress: Progress | None, total: int):
        self.on_progress, self.total, self.done = on_progress, max(total, 1), 0

    def __call__(self, stage: str) -> None:
        if self.on_progress is not None:
            self.on_progress(
                {
                    "phase": "evaluate",
                    "stage": stage,
                    "percent": round(100.0 * min(self.done, self.total) / self.total, 2),
                }
            )
        self.done += 1


def _threat(cfg: EvalConfig) -> AttackSpec:
    return cfg.attacks[0] if cfg.attacks else AttackSpec("pgd")


def evaluate_model(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: EvalConfig,
    *,
    n_classes: int,
    progress: _Progress | None = None,
    label: str = "model",
    square_queries: int = SQUARE_QUERIES,
) -> dict[str, Any]:
    """The per-model part of the report (clean, attacks, ε-curve, smoothing, stats)."""
    progress = progress or _Progress(None, 1)
    threat = _threat(cfg)
    common = dict(batch_size=cfg.batch_size, seed=cfg.seed)
    progress(f"{label}: clean accuracy")
    rep: dict[str, Any] = {
        "clean_accuracy": clean_accuracy(model, x, y, batch_size=cfg.batch_size),
        "attacks": {},
        "autoattack_breakdown": [],
    }
    for spec in cfg.attacks:
        key = attack_key(spec, threat)
        progress(f"{label}: {key}")
        res = robust_accuracy(model, x, y, spec, n_classes=n_classes, square_queries=square_queries, **common)
        rep["attacks"][key] = res["accuracy"]
        if res["breakdown"] is not None:
            rep["autoattack_breakdown"] = res["breakdown"]
    progress(f"{label}: eps curve")
    grid = (
        with_large_eps(cfg.eps_curve, threat.norm)
        if cfg.eps_curve
        else default_eps_grid(threat.eps, threat.norm)
    )
    rep["eps_curve"] = eps_curve(
        model, x, y, norm=threat.norm, eps_grid=grid, steps=cfg.curve_attack_steps, **common
    )
    progress(f"{label}: randomized smoothing")
    rep["smoothing"] = None
    if cfg.smoothing_sigma > 0 and cfg.smoothing_points > 0:
        k = cfg.smoothing_points
        rep["smoothing"] = certify_smoothing(
            model,
            x[:k],
            y[:k],
            cfg.smoothing_sigma,
            n0=cfg.smoothing_samples,
            n=cfg.smoothing_samples,
            num_classes=n_classes,
            **common,
        )
    progress(f"{label}: size and latency")
    rep["stats"] = model_stats(model, tuple(x.shape[1:]), latency=cfg.latency)
    return rep


class ReportCache(Protocol):
    """Where a frozen model's evaluation is kept between jobs (see `teacher_fingerprint`)."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, report: dict[str, Any]) -> None: ...


class DirectoryReportCache:
    """One JSON file per key in a local folder; written atomically, unreadable files count as misses."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, report: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(report, fh)
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def teacher_fingerprint(
    model: nn.Module, x: Tensor, y: Tensor, cfg: EvalConfig, square_queries: int
) -> str:
    """A key for one model's evaluation: its weights and buffers, the exact points, the settings.

    Every distill job evaluates its (frozen) teacher on the same points with the same attacks,
    and AutoAttack on the teacher is the largest single cost of a report for a big teacher, so
    the worker keeps this evaluation (`evaluate(..., teacher_cache=...)`). Anything that could
    change the numbers is in the key: parameters, buffers, inputs, labels, EvalConfig, Square's
    budget, the report schema, torch's version and the device type.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for t in (x, y):
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    settings = {"cfg": dataclasses.asdict(cfg), "square_queries": square_queries, "schema": SCHEMA,
                "torch": torch.__version__, "device": next(model.parameters(), x).device.type}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def evaluate(
    model: nn.Module,
    data: DataBundle,
    cfg: EvalConfig,
    *,
    teacher: nn.Module | None = None,
    on_progress: Progress | None = None,
    square_queries: int = SQUARE_QUERIES,
    teacher_cache: ReportCache | None = None,
) -> dict[str, Any]:
    """Build the robustness report (docs/contracts.md, schema ``kdiga.report/1``).

    Args:
        model: The student (or the only model), taking [0, 1] pixels.
        data: Its dataset; the first ``cfg.max_points`` test points are used.
        cfg: What to measure. The first attack sets the threat model (norm, ε).
        teacher: Measured on the same points; enables ``alignment`` when ``cfg.alignment``.
        on_progress: Called with ``{"phase": "evaluate", "stage", "percent"}`` per stage.
        square_queries: Square's query budget (AutoAttack's standard is 5000); a
            ``cfg.square_queries`` field, if EvalConfig has one, takes precedence.
        teacher_cache: Where the teacher's own evaluation is looked up and kept, keyed by
            `teacher_fingerprint`; the report's ``teacher_evaluation`` says whether it was reused.

    An ``autoattack`` entry runs APGD and FAB for ``spec.steps`` iterations: the
    standard version uses 100, so pass ``AttackSpec("autoattack", steps=100)`` for the
    headline number (AttackSpec's default of 20 gives a cheaper, weaker AutoAttack).

    Returns:
        The report, made of plain Python types only.
    """
    x, y = evaluation_points(data, cfg.max_points)
    # Forward-compatible: an EvalConfig that grows a square_queries field takes precedence.
    square_queries = int(getattr(cfg, "square_queries", None) or square_queries)
    names = {"student": model} | ({"teacher": teacher} if teacher is not None else {})
    with_alignment = teacher is not None and cfg.alignment
    progress = _Progress(on_progress, len(names) * (4 + len(cfg.attacks)) + int(with_alignment))
    threat = _threat(cfg)
    models: dict[str, Any] = {}
    cache_note: dict[str, Any] | None = None
    for name, m in names.items():
        key = cached = None
        if name == "teacher" and teacher_cache is not None:
            key = teacher_fingerprint(m, x, y, cfg, square_queries)
            cached = teacher_cache.get(key)
            cache_note = {"cached": cached is not None, "key": key}
        if cached is not None:
            models[name] = cached
            progress.done += 4 + len(cfg.attacks) - 1
            progress(f"{name}: reused from an earlier job's evaluation")
            continue
        models[name] = evaluate_model(
            m, x, y, cfg, n_classes=data.num_classes, progress=progress, label=name,
            square_queries=square_queries,
        )
        if key is not None:
            teacher_cache.put(key, models[name])  # type: ignore[union-attr]
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "n_points": int(len(y)),
        "threat_model": {"norm": threat.norm, "eps": float(threat.eps)},
        "models": models,
    }
    if cache_note is not None:
        report["teacher_evaluation"] = cache_note
    if with_alignment:
        progress("alignment")
        assert teacher is not None
        report["alignment"] = gradient_alignment(
            model, teacher, x, y, batch_size=cfg.batch_size
        ) | linearity_bound(
            model,
            teacher,
            x,
            y,
            threat.eps,
            norm=threat.norm,
            steps=cfg.linearity_steps,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        )
    report["sanity"] = sanity_flags(models)
    progress("done")
    return report
