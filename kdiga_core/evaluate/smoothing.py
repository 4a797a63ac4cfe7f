"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): a model-agnostic certified L2 radius.

Certification costs two Monte-Carlo passes per point, so reports certify a sub-sample: a
stratified one (`smoothing_sample`), like the evaluation points themselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdiga_core.attacks import model_mode
from kdiga_core.evaluate.common import on_model_device, seeded_generator
from kdiga_core.evaluate.points import stratified_order
from kdiga_core.evaluate.progress import Ticker


def smoothing_sample(y: Tensor, k: int, seed: int) -> Tensor:
    """Indices of a class-stratified sub-sample of ``k`` of the points labelled ``y`` (never the first k)."""
    return stratified_order(y, seed)[:k]


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
    progress: Ticker | None = None,
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

    x, y = on_model_device(model, x, y)
    gen = seeded_generator(x.device, seed)
    radii = []
    with model_mode(model), torch.no_grad():
        for xi, yi in zip(x, y, strict=True):
            guess = int(_noisy_counts(model, xi, sigma, n0, num_classes, batch_size, gen).argmax())
            n_a = int(_noisy_counts(model, xi, sigma, n, num_classes, batch_size, gen)[guess].item())
            p_a = beta.ppf(alpha, n_a, n - n_a + 1) if n_a > 0 else 0.0
            certified = p_a >= 0.5 and guess == int(yi)
            radii.append(sigma * float(norm.ppf(p_a)) if certified else -1.0)
            if progress is not None:
                progress(len(radii), len(x))
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
