"""The robustness report: every measurement of every model, on one set of points, with progress.

`evaluate` returns the ``kdiga.report/1`` dict of docs/contracts.md, made of plain Python types
only so that ``json.dumps`` works. Teacher and student are measured on the same seeded,
class-stratified sample of the test split (`points`), so their numbers are comparable
(method.md §5), and each accuracy comes with its sampling error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdiga_core import distributed
from kdiga_core.config import AttackSpec, EvalConfig
from kdiga_core.data import DataBundle
from kdiga_core.evaluate.accuracy import attack_key, clean_accuracy, robust_accuracy, sampling_error
from kdiga_core.evaluate.alignment import alignment_report
from kdiga_core.evaluate.cache import ReportCache, teacher_fingerprint
from kdiga_core.evaluate.common import SCHEMA
from kdiga_core.evaluate.curves import curve_grid, eps_curve
from kdiga_core.evaluate.partials import PartialStore
from kdiga_core.evaluate.plan import Plan, alignment_plan, model_plan
from kdiga_core.evaluate.points import EvalPoints, evaluation_points
from kdiga_core.evaluate.progress import Progress, Tracker
from kdiga_core.evaluate.sanity import report_sanity
from kdiga_core.evaluate.smoothing import certify_smoothing, smoothing_sample
from kdiga_core.evaluate.stats import Speed, forward_speed, model_stats

CALIBRATION_POINTS = 64  # points of the timed forward passes that weigh each model's stages


def threat_model(cfg: EvalConfig) -> AttackSpec:
    """The report's threat model (norm, ε): the first attack's."""
    return cfg.attacks[0] if cfg.attacks else AttackSpec("pgd")


def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, cfg: EvalConfig, *, n_classes: int,
                   tracker: Tracker | None = None, label: str = "model",
                   partials: PartialStore | None = None) -> dict[str, Any]:
    """The per-model part of the report: clean and robust accuracy with their sampling errors, the
    ε-curve, smoothing on a stratified sub-sample, and size and latency.

    ``partials``: where each attack (and each radius of the ε-curve) keeps its per-point results
    after each batch; what it holds for this model and these points is not measured again.
    """
    tracker = tracker or Tracker(None, {})
    ctx, n_all, x_all, y_all = distributed.context(), len(y), x, y  # DDP: each rank measures its share
    mine = distributed.evaluation_share(torch.arange(n_all, device=y.device), n_all, ctx)
    x, y = x[mine], y[mine]
    # DDP: nothing is kept (rank 0 alone has the job's checkpoint folder)
    kept = partials.model(model, x, y) if partials is not None and not ctx.distributed else None
    common: dict[str, Any] = {"batch_size": cfg.batch_size, "seed": cfg.seed}
    rep: dict[str, Any] = {"clean_accuracy": clean_accuracy(model, x, y, batch_size=cfg.batch_size,
                                                            progress=tracker.stage(f"{label}: clean accuracy")),
                           "attacks": {}, "autoattack_breakdown": []}
    for spec in cfg.attacks:
        key = attack_key(spec, threat_model(cfg))
        slot = kept.slot(key, spec, square_queries=cfg.square_queries, n_classes=n_classes, **common) \
            if kept is not None else None
        res = robust_accuracy(model, x, y, spec, n_classes=n_classes, square_queries=cfg.square_queries,
                              progress=tracker.stage(f"{label}: {key}"), partial=slot, **common)
        rep["attacks"][key] = res["accuracy"]
        rep["autoattack_breakdown"] = res["breakdown"] or rep["autoattack_breakdown"]
    rep["eps_curve"] = eps_curve(model, x, y, norm=threat_model(cfg).norm, eps_grid=curve_grid(cfg),
                                 steps=cfg.curve_attack_steps, progress=tracker.stage(f"{label}: eps curve"),
                                 partials=kept, **common)
    rep["smoothing"] = _smoothing(model, x_all, y_all, cfg, n_classes, tracker, label, ctx)
    rep = distributed.combine_model_report(rep, len(y), (rep["smoothing"] or {}).get("n_points", 0), ctx, n_all)
    rep["sampling_error"] = _sampling_errors(rep, n_all)
    tracker.stage(f"{label}: size and latency")
    rep["stats"] = model_stats(model, tuple(x.shape[1:]), latency=cfg.latency) if ctx.is_main else {}
    return rep


def _sampling_errors(rep: dict[str, Any], n: int) -> dict[str, float]:
    """±1.96·sqrt(p(1−p)/n) of the clean accuracy (key ``clean``) and of each attack's accuracy."""
    accuracies = {"clean": rep["clean_accuracy"], **rep["attacks"]}
    return {key: round(sampling_error(p, n), 6) for key, p in accuracies.items()}


def _smoothing(model: nn.Module, x: Tensor, y: Tensor, cfg: EvalConfig, n_classes: int, tracker: Tracker,
               label: str, ctx: distributed.RankContext | None = None) -> dict[str, Any] | None:
    if cfg.smoothing_sigma <= 0 or cfg.smoothing_points <= 0:
        return None
    idx = smoothing_sample(y, cfg.smoothing_points, cfg.seed)
    idx = distributed.evaluation_share(idx, len(y), ctx or distributed.context())  # DDP: this rank's share
    return certify_smoothing(model, x[idx], y[idx], cfg.smoothing_sigma, n0=cfg.smoothing_samples,
                             n=cfg.smoothing_samples, num_classes=n_classes, batch_size=cfg.batch_size,
                             seed=cfg.seed, progress=tracker.stage(f"{label}: randomized smoothing"))


def evaluation_plan(roles: dict[str, nn.Module], points: EvalPoints, cfg: EvalConfig, n_classes: int,
                    alignment: bool) -> Plan:
    """Every stage of the report with its expected cost, in each model's measured speed."""
    sample = points.x[: min(cfg.batch_size, CALIBRATION_POINTS)]
    speeds = {role: forward_speed(m, sample) for role, m in roles.items()}
    plan: Plan = {}
    for role in roles:
        plan |= model_plan(role, cfg, len(points), n_classes, speeds[role])
    return plan | (alignment_plan(cfg, len(points), speeds) if alignment else {})


def expected_seconds(model: nn.Module, data: DataBundle, cfg: EvalConfig, *,
                     teacher: nn.Module | None = None) -> float:
    """What `evaluate` should take with these models where they are now: its plan's total (a worst
    case: it counts every point in every attack, and a teacher measured again)."""
    roles = {"student": model} | ({"teacher": teacher} if teacher is not None else {})
    points = evaluation_points(data, cfg.max_points, seed=cfg.seed)
    plan = evaluation_plan(roles, points, cfg, data.num_classes, teacher is not None and cfg.alignment)
    return sum(cost.seconds() for cost in plan.values())


def evaluate(
    model: nn.Module,
    data: DataBundle,
    cfg: EvalConfig,
    *,
    teacher: nn.Module | None = None,
    on_progress: Progress | None = None,
    teacher_cache: ReportCache | None = None,
    role: str = "student",
    partials: PartialStore | None = None,
) -> dict[str, Any]:
    """Build the robustness report (docs/contracts.md, schema ``kdiga.report/1``).

    Every measurement runs on the device of the model it measures; move the models first.

    Args:
        model: The student (or the only model), taking [0, 1] pixels.
        data: Its dataset; ``cfg.max_points`` test points are sampled, stratified by class, with
            ``cfg.seed`` (`evaluation_points`), and the report's ``points`` block says how.
        cfg: What to measure. The first attack sets the threat model (norm, ε);
            ``cfg.square_queries`` is Square's budget.
        teacher: Measured on the same points; enables ``alignment`` when ``cfg.alignment``.
        on_progress: Called often with ``{"phase": "evaluate", "stage", "percent", "eta_s",
            "points_done", "points_total"}`` (`progress.Tracker`); callers throttle.
        teacher_cache: Where the teacher's own evaluation is looked up and kept, keyed by
            `teacher_fingerprint`; the report's ``teacher_evaluation`` says whether it was reused.
        role: The model's key in ``models`` and in its progress stages: ``student`` for a distilled
            student, ``model`` for a model trained from scratch or evaluated on its own.
        partials: Where every attack keeps its per-point results after each batch (`PartialStore`,
            a job's ``checkpoint/eval/partial/``): a run given the store of a stopped one measures
            only the batches it had not kept, and ends with the same report.

    An ``autoattack`` entry runs APGD and FAB for ``spec.steps`` iterations: the
    standard version uses 100, so pass ``AttackSpec("autoattack", steps=100)`` for the
    headline number (AttackSpec's default of 20 gives a cheaper, weaker AutoAttack).

    Returns:
        The report, made of plain Python types only.
    """
    if role == "teacher":
        raise ValueError("The evaluated model's role cannot be 'teacher'; that name is the reference's.")
    points, threat = evaluation_points(data, cfg.max_points, seed=cfg.seed), threat_model(cfg)
    roles = {role: model} | ({"teacher": teacher} if teacher is not None else {})
    with_alignment = teacher is not None and cfg.alignment
    tracker = Tracker(on_progress, evaluation_plan(roles, points, cfg, data.num_classes, with_alignment))
    report: dict[str, Any] = {"schema": SCHEMA, "n_points": len(points),
                              "points": points.summary(data.num_classes, data.class_names),
                              "threat_model": {"norm": threat.norm, "eps": float(threat.eps)}}
    report["models"], cache_note = _measure(roles, points, cfg, data.num_classes, tracker, teacher_cache, partials)
    if cache_note is not None:
        report["teacher_evaluation"] = cache_note
    if not distributed.is_main():  # DDP: the rest is rank 0's alone, whose report is the job's
        return report
    if with_alignment:
        assert teacher is not None
        report["alignment"] = alignment_report(model, teacher, points.x, points.y, threat.eps, norm=threat.norm,
                                               steps=cfg.linearity_steps, batch_size=cfg.batch_size, seed=cfg.seed,
                                               stages=tracker.stage, role=role)
    report["sanity"] = report_sanity(report)
    tracker.finish(len(points))
    return report


def _measure(roles: dict[str, nn.Module], points: EvalPoints, cfg: EvalConfig, n_classes: int, tracker: Tracker,
             cache: ReportCache | None, partials: PartialStore | None = None
             ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Each model's part of the report; the teacher's from ``cache`` when it holds it."""
    models: dict[str, Any] = {}
    note = None
    for role, m in roles.items():
        key = teacher_fingerprint(m, points.x, points.y, cfg) if role == "teacher" and cache is not None else None
        cached = cache.get(key) if cache is not None and key is not None else None
        if key is not None:  # DDP: rank 0's cache decides for every rank (they measure together or not at all)
            cached = _agreed(cached)
        if key is not None:
            note = {"cached": cached is not None, "key": key}
        if cached is not None:
            tracker.skip(model_plan(role, cfg, len(points), n_classes, Speed(0.0, 0.0)),
                         f"{role}: reused from an earlier job's evaluation")
            models[role] = cached
            continue
        models[role] = evaluate_model(m, points.x, points.y, cfg, n_classes=n_classes, tracker=tracker, label=role,
                                      partials=partials)
        if cache is not None and key is not None and distributed.is_main():
            cache.put(key, models[role])
    return models, note


def _agreed(cached: dict[str, Any] | None) -> dict[str, Any] | None:
    """The cached evaluation if rank 0 has one (an empty stand-in on a rank without it), else None."""
    ctx = distributed.context()
    if not distributed.agree(lambda: cached is not None, ctx):
        return None
    return cached if cached is not None else {}

