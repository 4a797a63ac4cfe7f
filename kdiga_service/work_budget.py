"""How much work a job asks for, checked before it is queued (pure Python: the API imports no torch).

Two checks, both from the job's spec (the API's normalised request, defaults written out):

1. **Parameter maxima** (`check_parameters`): each parameter that multiplies work has an
   operator-set ceiling (`KDIGA_MAX_EPOCHS`, ...); the first one exceeded is named in one sentence.
2. **Expected work** (`estimate_work`), in *passes*: one pass is one forward or one backward
   computation of one sample through one network. The sum over the key's active jobs plus the new
   one must stay within `KDIGA_MAX_WORK_PER_KEY`.

The formula (an upper bound: AutoAttack's later attacks run only on points that survived the
earlier ones, and cached teacher outputs are not subtracted):

    work = training + evaluation
    training   = epochs × train_size × passes_per_sample(method) × runs
        runs = objective.sweep.budget for kdiga with gamma "auto" (the KD reference, the γ trials and
               the final run together, kdiga_core.sweep keeps within it; the API writes the default
               sweep out), else 1
        ce 2 (student forward + backward) · kd 3 (+ teacher forward)
        kdiga 8 (teacher forward + input-gradient backward 2; student forward, input-gradient
                backward and the double backward through it ≈ 6 student forwards, design.md §8)
        pgd_at 2K+2 · trades 2K+4 · ard 2K+5 · rslad 2K+5   (K = objective.attack_steps)
    evaluation = models × P × (1 + Σ attacks + curve) + models × S × 2·samples + alignment
        P = min(max_points, test_size); models = 2 with a teacher in the report, else 1
        attack pgd:          restarts × (2·steps + 1)      (steps default 20); fgsm restarts × 3
        attack square:       restarts × square_queries   · apgd-t, fab-t: restarts × 18·steps
        attack autoattack:   restarts × 38·steps + square_queries   (apgd-ce 2s, apgd-t and fab-t
                             9 target classes × 2s each; steps default 100)
        curve = grid points × (2·curve_attack_steps + 1)   (grid: eps_curve + 1, or 8 by default)
        S = min(smoothing_points, P) when smoothing_sigma > 0, else 0
        alignment (with a teacher) = P × (4 + 2·linearity_steps)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HUNDRED_STEPS = ("autoattack", "apgd-ce", "apgd-t", "fab-t")  # kdiga_core AttackSpec: 100 steps, else 20
TARGET_CLASSES = 9  # the standard AutoAttack's targeted attacks try the top 9 other classes
DEFAULT_CURVE_POINTS = 8  # kdiga_core.evaluate.curves.default_eps_grid: 7 radii from 0 to 4ε plus a large one
# Passes per training sample: a fixed part, and the part paid per inner attack step (fwd + bwd).
TRAINING_PASSES = {
    "ce": (2, 0), "kd": (3, 0), "kdiga": (8, 0),
    "pgd_at": (2, 2), "trades": (4, 2), "ard": (5, 2), "rslad": (5, 2),
}


@dataclass(frozen=True)
class JobLimits:
    """The operator's ceilings (each a `KDIGA_*` setting of the same name)."""

    max_epochs: int
    min_batch_size: int
    max_train_attack_steps: int
    max_attack_iterations: int
    max_attacks: int
    max_eval_points: int
    max_smoothing_samples: int
    max_smoothing_points: int
    max_linearity_steps: int
    max_eps_curve_points: int
    max_curve_attack_steps: int
    max_square_queries: int
    max_work_per_key: int

    @classmethod
    def from_settings(cls, settings: Any) -> JobLimits:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class WorkEstimate:
    """Expected passes of a job, split by phase."""

    training: int
    evaluation: int

    @property
    def total(self) -> int:
        return self.training + self.evaluation


def _setting(name: str) -> str:
    return f"KDIGA_{name.upper()}"


def _above(path: str, value: int, limit: int, name: str) -> str | None:
    if value > limit:
        return f"'{path}' is {value}, above this server's maximum of {limit} ({_setting(name)})."
    return None


def _attack_steps(attack: dict[str, Any]) -> int:
    steps = attack.get("steps")
    if steps is None:
        return 100 if attack.get("name") in HUNDRED_STEPS else 20
    return int(steps)


def check_parameters(spec: dict[str, Any], limits: JobLimits) -> str | None:
    """One sentence naming the first parameter above (or below) its ceiling, or None."""
    train, objective = spec.get("train") or {}, spec.get("objective") or {}
    evaluation = spec.get("evaluation") or {}
    checks = []
    if train:
        checks.append(_above("train.epochs", int(train.get("epochs", 0)), limits.max_epochs, "max_epochs"))
        if int(train.get("batch_size", limits.min_batch_size)) < limits.min_batch_size:
            checks.append(f"'train.batch_size' is {train['batch_size']}, below this server's minimum of "
                          f"{limits.min_batch_size} ({_setting('min_batch_size')}).")
    if objective:
        checks.append(_above("objective.attack_steps", int(objective.get("attack_steps", 0)),
                             limits.max_train_attack_steps, "max_train_attack_steps"))
    checks += _evaluation_checks(evaluation, limits)
    return next((c for c in checks if c), None)


def _evaluation_checks(evaluation: dict[str, Any], limits: JobLimits) -> list[str | None]:
    attacks = evaluation.get("attacks") or []
    checks = [_above("evaluation.attacks (count)", len(attacks), limits.max_attacks, "max_attacks")]
    for i, attack in enumerate(attacks):
        iterations = _attack_steps(attack) * int(attack.get("restarts", 1))
        checks.append(_above(f"evaluation.attacks[{i}] steps × restarts", iterations,
                             limits.max_attack_iterations, "max_attack_iterations"))
    for field, name in (("max_points", "max_eval_points"), ("smoothing_samples", "max_smoothing_samples"),
                        ("smoothing_points", "max_smoothing_points"), ("linearity_steps", "max_linearity_steps"),
                        ("curve_attack_steps", "max_curve_attack_steps"), ("square_queries", "max_square_queries")):
        checks.append(_above(f"evaluation.{field}", int(evaluation.get(field, 0)), getattr(limits, name), name))
    checks.append(_above("evaluation.eps_curve (points)", len(evaluation.get("eps_curve") or []),
                         limits.max_eps_curve_points, "max_eps_curve_points"))
    return checks


def training_passes(spec: dict[str, Any], train_size: int) -> int:
    """Passes of the training phase (0 for an evaluate job)."""
    train, objective = spec.get("train") or {}, spec.get("objective") or {}
    if not train or not objective:
        return 0
    fixed, per_step = TRAINING_PASSES.get(str(objective.get("method")), (8, 2))
    per_sample = fixed + per_step * int(objective.get("attack_steps", 0))
    return int(int(train.get("epochs", 0)) * train_size * per_sample * training_runs(objective))


def training_runs(objective: dict[str, Any]) -> float:
    """Training runs of the job's TrainConfig the objective costs: a γ sweep's budget, else 1."""
    if objective.get("method") == "kdiga" and objective.get("gamma") == "auto":
        return float((objective.get("sweep") or {}).get("budget", 1.0))
    return 1.0


def _attack_passes(attack: dict[str, Any], square_queries: int) -> int:
    steps, restarts = _attack_steps(attack), int(attack.get("restarts", 1))
    if attack.get("name") == "autoattack":
        return restarts * (2 + 2 * 2 * TARGET_CLASSES) * steps + square_queries
    if attack.get("name") == "square":
        return restarts * square_queries
    if attack.get("name") == "fgsm":
        return restarts * 3
    if attack.get("name") in ("apgd-t", "fab-t"):
        return restarts * 2 * TARGET_CLASSES * steps
    return restarts * (2 * steps + 1)


def evaluation_passes(evaluation: dict[str, Any], test_size: int, *, with_teacher: bool) -> int:
    """Passes of the report: every measurement on every model, over the evaluated points."""
    points = min(int(evaluation.get("max_points", 0)), test_size)
    models = 2 if with_teacher else 1
    square = int(evaluation.get("square_queries", 0))
    attacks = sum(_attack_passes(a, square) for a in evaluation.get("attacks") or [])
    grid = len(evaluation.get("eps_curve") or []) + 1 if evaluation.get("eps_curve") else DEFAULT_CURVE_POINTS
    curve = grid * (2 * int(evaluation.get("curve_attack_steps", 0)) + 1)
    per_model = points * (1 + attacks + curve)
    if float(evaluation.get("smoothing_sigma", 0) or 0) > 0:
        per_model += min(int(evaluation.get("smoothing_points", 0)), points) * 2 * int(
            evaluation.get("smoothing_samples", 0))
    alignment = points * (4 + 2 * int(evaluation.get("linearity_steps", 0)))
    return models * per_model + (alignment if with_teacher and evaluation.get("alignment") else 0)


def estimate_work(spec: dict[str, Any], *, train_size: int, test_size: int) -> WorkEstimate:
    """The expected passes of a job spec on a dataset of these split sizes."""
    model = spec.get("model") or {}
    with_teacher = bool(spec.get("teacher_id") or model.get("teacher_id"))
    return WorkEstimate(
        training=training_passes(spec, train_size),
        evaluation=evaluation_passes(spec.get("evaluation") or {}, test_size, with_teacher=with_teacher),
    )


def budget_problem(new: WorkEstimate, active_total: int, active_count: int, limits: JobLimits) -> tuple[str, bool] | None:
    """(sentence, retry_later) when the job does not fit the key's budget, else None.

    `retry_later` is True when the job alone fits and only the key's active jobs are in the way.
    """
    budget = limits.max_work_per_key
    what = (f"This job's expected work is {new.total:.3g} passes (training {new.training:.3g}, "
            f"evaluation {new.evaluation:.3g})")
    if new.total > budget:
        return (f"{what}, above the per-key budget of {budget:.3g} ({_setting('max_work_per_key')}); "
                "lower epochs, attack steps or evaluation points."), False
    if new.total + active_total > budget:
        return (f"{what}; with your {active_count} active job(s) ({active_total:.3g} passes) it would exceed "
                f"the per-key budget of {budget:.3g} ({_setting('max_work_per_key')}); wait for one to finish."), True
    return None
