"""The robustness-vs-ε curve: PGD robust accuracy at a grid of radii, up to one where any model breaks."""

from __future__ import annotations

from torch import Tensor, nn

from kdiga_core.config import AttackSpec, EvalConfig, Norm
from kdiga_core.evaluate.accuracy import robust_accuracy
from kdiga_core.evaluate.partials import ModelPartials
from kdiga_core.evaluate.progress import Ticker

LARGE_EPS = {"Linf": 0.5, "L2": 8.0}  # a radius at which any classifier should be broken


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


def curve_grid(cfg: EvalConfig) -> tuple[float, ...]:
    """The radii of a report's curve: ``cfg.eps_curve`` (plus the large radius) or the default grid."""
    threat = cfg.attacks[0] if cfg.attacks else AttackSpec("pgd")
    return with_large_eps(cfg.eps_curve, threat.norm) if cfg.eps_curve else default_eps_grid(threat.eps, threat.norm)


def curve_part(eps: float) -> str:
    """The progress label of one radius of the curve."""
    return f"eps {eps:.4g}"


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
    progress: Ticker | None = None,
    partials: ModelPartials | None = None,
) -> list[dict[str, float]]:
    """Robust accuracy under PGD-``steps`` at each radius of ``eps_grid`` (one progress part per radius).

    ``partials``: where each radius keeps its per-point results after each batch (`partials`).
    """
    curve = []
    for eps in eps_grid:
        spec = AttackSpec("pgd", norm=norm, eps=float(eps), steps=steps)
        tick = _part(progress, curve_part(eps))
        slot = partials.slot(f"eps curve: {curve_part(eps)}", spec, batch_size=batch_size, seed=seed) \
            if partials is not None else None
        acc = robust_accuracy(model, x, y, spec, batch_size=batch_size, seed=seed, progress=tick,
                              partial=slot)["accuracy"]
        curve.append({"eps": float(eps), "accuracy": acc})
    return curve


def _part(progress: Ticker | None, part: str) -> Ticker | None:
    """The ticker of one radius: ``progress``'s, with that radius as the part."""
    if progress is None:
        return None
    return lambda done, total, _part=None: progress(done, total, part=part)
