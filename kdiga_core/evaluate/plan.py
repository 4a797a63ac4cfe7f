"""The expected cost of each stage of a report, so that its progress moves roughly linearly in time.

A stage runs some forward-pass equivalents per point (an input gradient is about three: forward
and backward) in calls of at most a batch of points. Its cost is ``points × per_point + calls ×
per_call`` in each model's measured `Speed`: for small models and small survivor sets the fixed
cost of a call, not arithmetic, sets the time. These are worst-case estimates: `progress.Tracker`
prices a stage again when it starts on fewer points (PGD attacks the correctly classified points
only, AutoAttack's later attacks the survivors only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kdiga_core.attacks import AUTOATTACK_ORDER, AUTOATTACK_TARGETS
from kdiga_core.config import AttackSpec, EvalConfig
from kdiga_core.evaluate.accuracy import attack_key
from kdiga_core.evaluate.curves import curve_grid, curve_part
from kdiga_core.evaluate.progress import stage_label
from kdiga_core.evaluate.stats import Speed

FORWARD, GRADIENT = 1.0, 3.0
FAB_STEP = 4.0  # a forward, the gradients of the target margins, and FAB's projection
LATENCY_PASSES = 40.0  # timed batch-1 forwards of the latency measurement
MEASURED_LOSS_STEPS = 20  # PGD steps of the measured loss that the bound is compared with


@dataclass(frozen=True)
class StageCost:
    """What one stage costs: ``passes`` forward-pass equivalents per point over ``points`` points, in
    calls of ``batch`` points (``calls`` per batch: ``passes`` unless said otherwise)."""

    speed: Speed
    points: int
    passes: float
    batch: int
    calls: float | None = None

    def seconds(self, points: int | None = None) -> float:
        """Expected seconds on ``points`` points (default: as planned)."""
        n = self.points if points is None else points
        calls = (self.passes if self.calls is None else self.calls) * math.ceil(n / max(self.batch, 1))
        return self.passes * n * self.speed.per_point + calls * self.speed.per_call


Plan = dict[str, StageCost]  # stage label -> its cost


def attack_passes(spec: AttackSpec, n_classes: int, square_queries: int) -> dict[str | None, float]:
    """Per point, the forward-pass equivalents of each part of one attack (None: no parts)."""
    if spec.name == "autoattack":
        return {part: _member_passes(part, spec, n_classes, square_queries) for part in AUTOATTACK_ORDER}
    if spec.name in AUTOATTACK_ORDER:
        return {None: FORWARD + _member_passes(spec.name, spec, n_classes, square_queries)}
    steps = 1 if spec.name == "fgsm" else int(spec.steps or 1)
    return {None: FORWARD + steps * GRADIENT}


def _member_passes(name: str, spec: AttackSpec, n_classes: int, square_queries: int) -> float:
    runs = int(spec.steps or 1) * (spec.restarts if spec.name != "autoattack" else 1)
    targets = min(AUTOATTACK_TARGETS, n_classes - 1)
    passes = {"apgd-ce": runs * GRADIENT, "apgd-t": runs * targets * GRADIENT if n_classes >= 4 else 0.0,
              "fab-t": runs * targets * FAB_STEP, "square": square_queries * FORWARD}
    return passes[name]


def model_plan(role: str, cfg: EvalConfig, n: int, n_classes: int, speed: Speed) -> Plan:
    """The stages of `evaluate_model` for one model."""
    threat = cfg.attacks[0] if cfg.attacks else AttackSpec("pgd")
    cost = lambda passes: StageCost(speed, n, passes, cfg.batch_size)  # noqa: E731 -- one line per stage below
    plan: Plan = {f"{role}: clean accuracy": cost(FORWARD)}
    for spec in cfg.attacks:
        for part, passes in attack_passes(spec, n_classes, cfg.square_queries).items():
            plan[stage_label(f"{role}: {attack_key(spec, threat)}", part)] = cost(passes)
    for eps in curve_grid(cfg):
        plan[stage_label(f"{role}: eps curve", curve_part(eps))] = cost(
            FORWARD + (cfg.curve_attack_steps * GRADIENT if eps > 0 else 0.0))
    if cfg.smoothing_sigma > 0 and cfg.smoothing_points > 0:
        samples = cfg.smoothing_samples  # twice per point (selection, then estimation), point by point
        plan[f"{role}: randomized smoothing"] = StageCost(
            speed, min(cfg.smoothing_points, n), 2.0 * samples, 1, 2.0 * math.ceil(samples / cfg.batch_size))
    plan[f"{role}: size and latency"] = StageCost(speed, 1, FORWARD + LATENCY_PASSES * cfg.latency, 1)
    return plan


def alignment_plan(cfg: EvalConfig, n: int, speeds: dict[str, Speed]) -> Plan:
    """The stages of the alignment block, for the student's and the teacher's speeds."""
    ascent = 2 * (cfg.linearity_steps + 1) * GRADIENT  # two starts, the last iterate evaluated too
    plan: Plan = {}
    for role, speed in speeds.items():
        plan[f"{role}: input gradients"] = StageCost(speed, n, GRADIENT, cfg.batch_size)
    for role, speed in speeds.items():
        plan[f"{role}: measured PGD-{MEASURED_LOSS_STEPS} loss"] = StageCost(
            speed, n, MEASURED_LOSS_STEPS * GRADIENT + 2 * FORWARD, cfg.batch_size)
        plan[f"{role}: local linearity"] = StageCost(speed, n, ascent, cfg.batch_size)
    return plan
