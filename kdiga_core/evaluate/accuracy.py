"""Clean and robust accuracy, and the sampling error of an accuracy measured on n points."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kdiga_core.attacks import (
    SQUARE_QUERIES,
    AutoAttackPoint,
    build_attack,
    model_mode,
    predict,
    run_autoattack,
)
from kdiga_core.config import AttackSpec
from kdiga_core.evaluate.common import batch_seed, mean, on_model_device, seeded_generator
from kdiga_core.evaluate.partials import Slot, masks, to_bits
from kdiga_core.evaluate.progress import Ticker


def sampling_error(p: float, n: int) -> float:
    """Half-width of the 95% normal interval of an accuracy p measured on n points: 1.96·sqrt(p(1−p)/n).

    The error of the sample of points, not of the attack: another draw of n test points would
    give an accuracy within about this much of p, 19 times out of 20.
    """
    return 1.96 * math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else 0.0


def clean_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500,
                   progress: Ticker | None = None) -> float:
    """Fraction of ``x`` classified correctly (no-grad batches, eval mode, on the model's device)."""
    x, y = on_model_device(model, x, y)
    correct = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    with model_mode(model):
        for start in range(0, len(x), batch_size):
            end = min(start + batch_size, len(x))
            correct[start:end] = predict(model, x[start:end], batch_size) == y[start:end]
            if progress is not None:
                progress(end, len(x))
    return mean(correct)


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
    progress: Ticker | None = None,
    partial: Slot | None = None,
) -> dict[str, Any]:
    """Accuracy under one attack, on the model's device.

    A point counts as robust when it is classified correctly both clean and attacked. Batch ``i``
    of an attack is seeded with ``batch_seed(seed, i)`` (AutoAttack: its members reseed at every
    call), so a batch gives the same result whichever batches ran before it.

    Args:
        progress: Told the points done after each batch (AutoAttack: per member attack, as parts).
        partial: Where the per-point results are kept after each batch (`partials.Slot`); what it
            holds already is not measured again.

    Returns:
        ``{"accuracy": float, "breakdown": list | None}`` (the breakdown for AutoAttack).
    """
    x, y = on_model_device(model, x, y)
    if spec.name == "autoattack":
        start = _autoattack_start(partial.load(), len(y), y.device) if partial is not None else None
        res = run_autoattack(model, x, y, spec.eps, spec.norm, seed=seed, n_classes=n_classes, steps=spec.steps,
                             n_queries=square_queries, batch_size=batch_size, progress=_parts(progress),
                             start=start, on_batch=_autoattack_keeper(partial))
        return {"accuracy": float(res["robust_accuracy"]), "breakdown": res["breakdown"]}
    kept = _single_start(partial.load(), len(y), y.device) if partial is not None else None
    with model_mode(model):
        clean = kept[0] if kept is not None else predict(model, x, batch_size) == y
        robust = kept[1] if kept is not None else clean.clone()
        first = kept[2] if kept is not None else 0
        # Only points classified correctly count, so only they are attacked (as AutoAttack does):
        # a robust model misclassifies 10-20% of clean points, which PGD would attack for nothing.
        chunks = clean.nonzero().flatten().split(batch_size)
        total, done = int(clean.sum()), sum(len(chunk) for chunk in chunks[:first])
        if progress is not None:
            progress(done, total)
        for i in range(first, len(chunks)):
            chunk, batch = chunks[i], batch_seed(seed, i)
            attack = build_attack(
                spec, n_classes=n_classes, seed=batch, n_queries=square_queries,
                generator=seeded_generator(x.device, batch),
                stop_when_misclassified=True,  # a point counts as broken by the first iterate that breaks it
            )
            robust[chunk] = predict(model, attack(model, x[chunk], y[chunk]), batch_size) == y[chunk]
            done += len(chunk)
            if partial is not None:
                partial.save({"attack": spec.name, "batches": i + 1, "clean": to_bits(clean), "robust": to_bits(robust)})
            if progress is not None:
                progress(done, total)
    return {"accuracy": mean(robust), "breakdown": None}


def _single_start(state: dict[str, Any] | None, n: int, device: torch.device) -> tuple[Tensor, Tensor, int] | None:
    """(clean, robust, batches done) of a kept single-attack state (None: start from the beginning)."""
    kept = masks(state, ("clean", "robust"), n, device)
    if state is None or kept is None or not isinstance(state.get("batches"), int):
        return None
    return kept["clean"], kept["robust"], int(state["batches"])


def _autoattack_start(state: dict[str, Any] | None, n: int, device: torch.device) -> AutoAttackPoint | None:
    """The point a kept AutoAttack state says the run had reached (None: start from the beginning)."""
    kept = masks(state, ("clean", "entering", "robust"), n, device)
    if state is None or kept is None or state.get("attack") != "autoattack":
        return None
    if not all(isinstance(state.get(k), int) for k in ("member", "batches")) or not isinstance(
            state.get("breakdown"), list):
        return None
    return AutoAttackPoint(int(state["member"]), int(state["batches"]), kept["clean"], kept["entering"],
                           kept["robust"], list(state["breakdown"]))


def _autoattack_keeper(partial: Slot | None) -> Callable[[AutoAttackPoint], None] | None:
    """Keeps each point AutoAttack reaches in ``partial``."""
    if partial is None:
        return None
    return lambda p: partial.save({"attack": "autoattack", "member": p.member, "batches": p.batches,
                                   "clean": to_bits(p.clean), "entering": to_bits(p.entering),
                                   "robust": to_bits(p.robust), "breakdown": p.breakdown})


def _parts(progress: Ticker | None):
    """AutoAttack's (attack, done, total) callback as ticks of the attack's part."""
    if progress is None:
        return None
    return lambda name, done, total: progress(done, total, part=name)
