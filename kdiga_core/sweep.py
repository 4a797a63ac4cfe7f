"""Choose γ for the user: a successive-halving sweep over a γ grid, scored on held-out training data.

``objective.gamma: "auto"`` runs this before the job's training (kdiga_core.jobs):

1. A seeded, class-stratified validation split is held out of the *training* split
   (`validation_split`); the report's test points are never looked at.
2. The KD student (γ = 0) is trained first, to the end of a trial: it is the reference of the
   default rule, and the first arrival that the pruner always promotes.
3. KDIGA trials over the γ grid, each on the same initial weights and the same schedule (the job's
   TrainConfig, shortened to `SweepPlan.trial_epochs` so the whole job fits the budget), are scored
   at the rungs of successive halving on clean and PGD accuracy of the validation split. The weak
   ones stop early.
4. The rule picks γ among the trials that reached the last rung (`select`); the job then trains
   its student with that γ on the full training data.

The search loop is Optuna's (``SuccessiveHalvingPruner``, i.e. ASHA, Li et al. 2020; Optuna rather
than Ray Tune: one in-process study, no cluster, and a journal file that travels with the job's
checkpoint) with its journal storage in the job's checkpoint folder: every report and decision is
on disk, so a worker that crashed resumes without re-running finished trials (the running trial
continues from its own training checkpoint). The trials run one at a time, largest γ first
(`run_order`), so only one trial's weights exist at once. Two additions of ours, each small and
explained where it lives: a trial that leaves the allowed clean drop stops counting at the rungs it
passed before (`_withdraw`), and the drop is widened by its sampling error before the last rung
(`rung_slack`).

Cost: the plan counts every optimizer step of a trial as one step of the job's own training run
(a KD step is cheaper than a KDIGA step, so this overcounts) and a validation evaluation as half a
step per batch pass of its attack; `make_plan` sizes the trials so the expected cost, plus the
final run, fills 90% of ``sweep.budget`` runs, and a hard cap at the full budget stops the sweep if
ASHA promotes more than expected (the report then lists what was not tried).
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdiga_core.config import AttackSpec, ObjectiveConfig, SweepConfig, TrainConfig
from kdiga_core.data import DataBundle, pixels
from kdiga_core.errors import CancelledError, KdigaError
from kdiga_core.evaluate import clean_accuracy, robust_accuracy, stratified_order
from kdiga_core.train import resolve_device, train

__all__ = ["SweepPlan", "SweepOutcome", "choose_gamma", "make_plan", "rule_score", "select",
           "validation_split", "work_multiple"]

log = logging.getLogger(__name__)

STUDY_NAME = "gamma"
JOURNAL_FILE = "optuna.journal"
KD_GAMMA = 0.0
TIME_RESERVE = 1.25  # the final run's expected seconds are multiplied by this before the sweep spends time
COMPLETE, PRUNED, STOPPED, NOT_RUN = "complete", "pruned", "stopped", "not_run"

COLLAPSED_SCORE = -0.5  # rule_score puts students outside the allowed drop at -1 and below
RUNG_KEY_PREFIX = "completed_rung_"  # optuna.pruners.SuccessiveHalvingPruner's record of a rung's score
WITHDRAWN = -1e9

Hooks = dict[str, Any]


def work_multiple(objective: dict[str, Any] | None) -> float:
    """How many training runs a job with this objective costs (the API's work estimate multiplies by it)."""
    cfg = ObjectiveConfig.from_dict(objective)
    return cfg.sweep_config().budget if cfg.sweeps_gamma else 1.0


# ----------------------------------------------------------------------------- the validation split


def validation_split(y: Tensor, n_val: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train rows, validation rows) of a training split: ``n_val`` rows held out, class-stratified.

    The first ``n_val`` rows of `stratified_order` (round robin over the classes, each in a seeded
    random order: the report's own way of drawing test points), so the held-out rows keep the class
    proportions to one row per class. Only rows of the training split are drawn: the report's test
    points cannot be among them.
    """
    order = stratified_order(y, seed)
    return order[n_val:].sort().values, order[:n_val].sort().values


@dataclass(frozen=True)
class SweepData:
    """The sweep's training bundle (the training split less the validation rows) and the validation points."""

    train: DataBundle
    x_val: Tensor
    y_val: Tensor
    val_index: Tensor

    @classmethod
    def split(cls, data: DataBundle, cfg: SweepConfig) -> SweepData:
        n = len(data.y_train)
        n_val = min(cfg.validation_points, max(data.num_classes, round(cfg.validation_fraction * n)))
        if n - n_val < data.num_classes:
            raise KdigaError(f"The training split ({n} images) is too small to hold out a validation split "
                             "for the γ sweep; give a number for objective.gamma.")
        keep, val = validation_split(data.y_train, n_val, cfg.seed)
        bundle = DataBundle(f"{data.name} (sweep training rows)", data.x_train[keep], data.y_train[keep],
                            data.x_train[val], data.y_train[val], data.num_classes, data.class_names)
        return cls(bundle, pixels(data.x_train[val]), data.y_train[val], val)  # uint8 storage -> floats

    def summary(self, cfg: SweepConfig) -> dict[str, Any]:
        counts = torch.bincount(self.y_val, minlength=self.train.num_classes).tolist()
        return {"n": len(self.y_val), "fraction": round(len(self.y_val) / (len(self.y_val) + len(self.train.y_train)), 4),
                "seed": cfg.seed, "source": "training split", "per_class": counts}


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class SweepPlan:
    """What the sweep will run and what it may spend, in optimizer steps of the job's training.

    Attributes:
        gammas: KDIGA trials in the order they run (the KD reference, γ = 0, runs before them).
        trial_epochs: epochs of every trial's schedule (its cosine and γ warm-up span these).
        rungs: epochs at which trials are scored; the last is `trial_epochs`.
        run_steps: one training run of the job (its epochs on the full training split).
        budget_steps: what trials and their evaluations may spend: (budget − 1) runs.
        steps_per_epoch: of a trial (on the sweep's training rows).
        eval_steps: one validation evaluation, counted in steps (one per batch pass of its attack).
    """

    gammas: tuple[float, ...]
    trial_epochs: int
    rungs: tuple[int, ...]
    reduction_factor: int
    run_steps: int
    budget_steps: float
    steps_per_epoch: int
    eval_steps: float

    def segment_steps(self, start_epoch: int, end_epoch: int) -> float:
        """Steps to train a trial from ``start_epoch`` to ``end_epoch`` and score it there."""
        return (end_epoch - start_epoch) * self.steps_per_epoch + self.eval_steps

    def expected_steps(self) -> float:
        """Successive halving's cost with ⌈n/η^k⌉ trials at rung k (rounded up: ASHA promotes a little more)."""
        n, total, previous = len(self.gammas), self.segment_steps(0, self.trial_epochs), 0
        total += (len(self.rungs) - 1) * self.eval_steps  # the KD reference is scored at every rung
        for k, rung in enumerate(self.rungs):
            total += math.ceil(n / self.reduction_factor**k) * self.segment_steps(previous, rung)
            previous = rung
        return total

    def to_dict(self) -> dict[str, Any]:
        return {"gammas": list(self.gammas), "trial_epochs": self.trial_epochs, "rungs": list(self.rungs),
                "reduction_factor": self.reduction_factor, "run_steps": self.run_steps,
                "budget_steps": round(self.budget_steps, 1), "expected_steps": round(self.expected_steps(), 1)}


def rungs_for(trial_epochs: int, eta: int) -> tuple[int, ...]:
    """Rungs ending at ``trial_epochs``: at most three, ``first·η^k`` before the last (Optuna's promotion steps)."""
    count = max(1, min(3, int(math.log(max(trial_epochs, 1), eta)) + 1))
    first = max(1, round(trial_epochs / eta ** (count - 1)))
    early = tuple(r for r in (first * eta**k for k in range(count - 1)) if r < trial_epochs)
    return early + (trial_epochs,)


def run_order(grid: tuple[float, ...]) -> tuple[float, ...]:
    """The order the KDIGA trials run in: descending γ.

    Robust accuracy rises with γ until clean accuracy collapses (REPRODUCTION.md's sweep), and ASHA
    promotes a trial that beats what reached its rung before. From the top, the collapsed γ values
    stop at the first rung, the largest γ that still learns is promoted, and every smaller γ must
    beat it to continue, which few do: the sweep costs about two full trials. Ascending order would
    promote every γ in turn (each beats the last) and cost the whole grid.
    """
    return tuple(sorted(grid, reverse=True))


MIN_TRIAL_FRACTION = 0.5  # a trial's schedule spans at least half the final run's epochs
# The plan fills 90% of the sweep's share: the rest is for what it does not count (the teacher's
# linearity estimate, checkpoint writes, the pruner's bookkeeping). Measured on digits: with 100%
# the whole job took 3.05x one run's wall time for a 2.99x step count (REPRODUCTION.md).
PLAN_FILL = 0.9


def thinned(grid: tuple[float, ...], count: int) -> tuple[float, ...]:
    """``count`` values of ``grid`` spread evenly over it (both ends kept)."""
    if count >= len(grid):
        return grid
    if count == 1:
        return (grid[len(grid) // 2],)
    return tuple(grid[round(i * (len(grid) - 1) / (count - 1))] for i in range(count))


def make_plan(cfg: SweepConfig, train_cfg: TrainConfig, *, n_train: int, n_sweep_train: int,
              n_val: int) -> SweepPlan:
    """The plan whose expected cost, with the final run, fits ``cfg.budget`` runs.

    Trials keep at least half the final run's epochs (shorter schedules favour small γ: a γ that
    needs the whole warm-up to fit would look collapsed); within that, as many γ values as fit
    (the grid thinned evenly when it must be), then the longest trials.
    """
    run_steps = train_cfg.epochs * math.ceil(n_train / train_cfg.batch_size)
    steps_per_epoch = math.ceil(n_sweep_train / train_cfg.batch_size)
    # a PGD iteration (one forward and one input backward, ≈ 3 forwards) costs about half an exact KDIGA
    # step (≈ 6 forwards, method.md §3b); the clean pass adds one more iteration's worth
    eval_steps = n_val * (cfg.attack_steps + 2) / (2 * train_cfg.batch_size)
    budget = (cfg.budget - 1.0) * run_steps
    grid, shortest = cfg.grid(), max(1, math.ceil(MIN_TRIAL_FRACTION * train_cfg.epochs))
    for count in range(len(grid), 0, -1):
        gammas = run_order(thinned(grid, count))
        for epochs in range(train_cfg.epochs, shortest - 1, -1):
            plan = SweepPlan(gammas, epochs, rungs_for(epochs, cfg.reduction_factor), cfg.reduction_factor,
                             run_steps, budget, steps_per_epoch, eval_steps)
            if plan.expected_steps() <= PLAN_FILL * budget:
                return plan
    raise KdigaError(f"sweep.budget ({cfg.budget:g} training runs) cannot fit even one γ trial of "
                     f"{shortest} epochs next to the KD reference; raise sweep.budget or give a number for gamma.")


# ----------------------------------------------------------------------------- the rule


RULE_TEXT = {
    "robust_within_clean_drop": "the most robust student whose clean validation accuracy is within {drop:.1f} "
                                "points of {reference}",
    "max_robust": "the most robust student, whatever its clean accuracy",
    "max_clean_plus_robust": "the student with the largest clean + robust validation accuracy",
}
REFERENCE_TEXT = {"kd": "the KD student's",
                  "kd_or_teacher": "the KD student's (or of the teacher's, when the teacher is less accurate)"}


def rule_text(cfg: SweepConfig) -> str:
    return RULE_TEXT[cfg.rule].format(drop=100 * cfg.max_clean_drop, reference=REFERENCE_TEXT[cfg.clean_reference])


def reference_clean(kd_clean: float, teacher_clean: float | None, cfg: SweepConfig) -> float:
    """The clean accuracy the allowed drop is measured from (`SweepConfig.clean_reference`).

    The teacher's accuracy on the validation rows can only be flattering (it may have trained on them),
    so taking the lower of the two never loosens the rule by more than the teacher's true accuracy allows.
    """
    if cfg.clean_reference == "kd_or_teacher" and teacher_clean is not None:
        return min(kd_clean, teacher_clean)
    return kd_clean


def feasible(clean: float, kd_clean: float, cfg: SweepConfig, slack: float = 0.0) -> bool:
    """Whether a student's clean accuracy is within the allowed drop (plus ``slack``) of the KD student's."""
    return cfg.rule != "robust_within_clean_drop" or clean >= kd_clean - cfg.max_clean_drop - slack - 1e-9


def rule_score(clean: float, robust: float, kd_clean: float, cfg: SweepConfig, slack: float = 0.0) -> float:
    """One number per trial, larger is better: what the pruner compares at a rung.

    Under the default rule a student outside the allowed drop scores below every student inside it
    (−1 minus its shortfall), so successive halving stops the collapsed ones first. ``slack`` widens
    the drop at the rungs before the last, where both students are still learning.
    """
    if cfg.rule == "max_robust":
        return robust
    if cfg.rule == "max_clean_plus_robust":
        return clean + robust
    if feasible(clean, kd_clean, cfg, slack):
        return robust
    return -1.0 - (kd_clean - cfg.max_clean_drop - slack - clean)


def rung_slack(kd_clean: float, n_val: int) -> float:
    """The drop's widening at an intermediate rung: the 95% sampling error of a difference of two accuracies.

    Early in training two students' clean accuracies move by a few points from epoch to epoch; only a
    gap beyond that noise says a γ is collapsing (a collapse is tens of points: REPRODUCTION.md).
    """
    p = min(max(kd_clean, 0.0), 1.0)
    return 1.96 * math.sqrt(2.0 * p * (1.0 - p) / max(n_val, 1))


def select(rows: list[dict[str, Any]], cfg: SweepConfig, teacher_clean: float | None = None) -> dict[str, Any]:
    """Pick γ from the trials that reached the last rung, by ``cfg.rule``.

    Args:
        rows: one per trial: ``gamma``, ``state``, ``clean``, ``robust`` (at the trial's last rung).
            The KD reference is the row with gamma 0; it always qualifies under the default rule.

    Returns:
        ``{"gamma", "clean", "robust", "reason"}``; ties go to the smaller γ (cheaper, less risky).
    """
    kd = next((r for r in rows if r["gamma"] == KD_GAMMA), None)
    finished = [r for r in rows if r["state"] == COMPLETE]
    if kd is None or kd["state"] != COMPLETE:
        raise KdigaError("The γ sweep has no finished KD reference to compare with.")
    ref = reference_clean(kd["clean"], teacher_clean, cfg)
    pool = [r for r in finished if feasible(r["clean"], ref, cfg) or r["gamma"] == KD_GAMMA]
    best = max(pool, key=lambda r: (rule_score(r["clean"], r["robust"], ref, cfg), -r["gamma"]))
    return {"gamma": best["gamma"], "clean": best["clean"], "robust": best["robust"], "reference_clean": ref,
            "reason": _reason(best, kd, rows, pool, cfg, ref)}


def _reason(best: dict[str, Any], kd: dict[str, Any], rows: list[dict[str, Any]],
            pool: list[dict[str, Any]], cfg: SweepConfig, ref: float) -> str:
    finished = [r for r in rows if r["state"] == COMPLETE]
    rule = rule_text(cfg)
    if best["gamma"] != KD_GAMMA:
        return (f"γ = {best['gamma']:g} is {rule}: {100 * best['robust']:.1f}% robust and {100 * best['clean']:.1f}% "
                f"clean on the validation split, against the KD student's {100 * kd['robust']:.1f}% and "
                f"{100 * kd['clean']:.1f}%.")
    untried = [f"{r['gamma']:g}" for r in rows
               if r["state"] == NOT_RUN or (r["state"] == STOPPED and r.get("stopped_by") in ("budget", "time"))]
    tried = [r for r in finished if r["gamma"] != KD_GAMMA]
    if not tried and untried:
        return "The sweep's budget or the job's time ran out before any γ > 0 finished: γ = 0 (plain KD) is kept."
    cut = f" The budget or the job's time ran out before γ = {', '.join(untried)} finished." if untried else ""
    if tried and len(pool) == 1:
        return (f"No γ kept clean validation accuracy within {100 * cfg.max_clean_drop:.1f} points of "
                f"{100 * ref:.1f}% ({rule}): γ = 0 (plain KD) is kept.{cut}")
    return f"No γ made the student more robust than plain KD under the rule ({rule}): γ = 0 is kept.{cut}"


def pareto_front(rows: list[dict[str, Any]]) -> list[float]:
    """γ values of the finished trials that no other finished trial beats on both clean and robust accuracy."""
    done = [r for r in rows if r["state"] == COMPLETE]
    front = [r for r in done if not any(o["clean"] >= r["clean"] and o["robust"] >= r["robust"]
                                        and (o["clean"], o["robust"]) != (r["clean"], r["robust"]) for o in done)]
    return sorted(r["gamma"] for r in front)


# ----------------------------------------------------------------------------- running the trials


@dataclass
class SweepOutcome:
    """What the sweep hands to the job: the γ to train with, the report section, the KD reference."""

    gamma: float
    report: dict[str, Any]
    cfg: SweepConfig
    kd_reference: nn.Module | None = None
    seconds: float = 0.0

    def final_objective(self, objective: ObjectiveConfig) -> ObjectiveConfig:
        """The job's objective with γ fixed to the choice (plain KD when the rule kept γ = 0)."""
        if self.gamma == KD_GAMMA:
            return replace(objective, method="kd", gamma=0.0, sweep=None)
        return replace(objective, gamma=self.gamma, sweep=None)

    def finish(self, report: dict[str, Any], x: Tensor, y: Tensor) -> dict[str, Any]:
        """The report's section, with the final student checked against the KD reference on the test points."""
        from kdiga_core import transfer

        final = transfer.check_final(report, transfer.kd_clean_on(self.kd_reference, x, y), self.cfg)
        section = copy.deepcopy(self.report)
        section["final_check"] = final
        verdict = section["transfer"]["verdict"]
        if final["sentence"]:
            verdict["reasons"].append(final["sentence"])
        if final["collapsed"]:
            verdict["transfers"] = False
            verdict["summary"] = "the final student lost clean accuracy: " + final["sentence"]
        return section


@dataclass
class _Context:
    """One sweep's fixed inputs and running counters."""

    student: nn.Module
    teacher: nn.Module
    objective: ObjectiveConfig
    trial_cfg: TrainConfig
    cfg: SweepConfig
    plan: SweepPlan
    data: SweepData
    attack: AttackSpec
    directory: Path
    hooks: Hooks
    teacher_clean: float | None = None
    overhead_seconds: float = 0.0  # the teacher's diagnosis and the shared bank's build: spent, but not training steps
    seconds_per_step: list[float] = field(default_factory=list)
    stopped_by: str | None = None
    bank: Any = None  # one teacher bank for every trial (`_shared_bank`)

    def cancelled(self) -> bool:
        check = self.hooks.get("should_cancel")
        return bool(check is not None and check())

    def checkpoint(self) -> None:
        """Hand the whole sweep folder (journal and trial checkpoints) to the caller, e.g. to upload it."""
        upload = self.hooks.get("on_checkpoint")
        if upload is not None:
            upload(self.directory.parent)


def choose_gamma(student: nn.Module, teacher: nn.Module, data: DataBundle, objective: ObjectiveConfig,
                 train_cfg: TrainConfig, directory: str | Path, *, attack: AttackSpec,
                 hooks: Hooks | None = None) -> SweepOutcome:
    """Run the γ sweep for a kdiga job with gamma "auto" and return the chosen γ with its evidence.

    Args:
        student: the job's initial student (not modified: each trial trains a copy).
        teacher: the frozen teacher.
        data: the job's data; only its training split is used.
        objective: the job's objective (kdiga, gamma "auto"); its other fields apply to every trial.
        train_cfg: the job's TrainConfig; trials use it with fewer epochs (`make_plan`).
        directory: where the Optuna journal and the running trial's checkpoint live (a folder
            inside the job's checkpoint folder, so the worker uploads it and a resumed job reads it).
        attack: the report's threat model; trials are scored with PGD-``sweep.attack_steps`` at it.
        hooks: ``on_step``, ``should_cancel``, ``on_checkpoint`` (called with the job's checkpoint
            folder after every decision), ``time_left`` (seconds the job may still run, or None).
    """
    import optuna

    from kdiga_core import transfer

    started = time.monotonic()
    cfg = objective.sweep_config()
    sweep_data = SweepData.split(data, cfg)
    plan = make_plan(cfg, train_cfg, n_train=len(data.y_train), n_sweep_train=len(sweep_data.train.y_train),
                     n_val=len(sweep_data.y_val))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ctx = _Context(student, teacher.eval(), objective, replace(train_cfg, epochs=plan.trial_epochs), cfg, plan,
                   sweep_data, AttackSpec("pgd", norm=attack.norm, eps=attack.eps, steps=cfg.attack_steps),
                   directory, dict(hooks or {}))
    log.info("γ sweep: %s", plan.to_dict())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(directory, plan)
    facts_started = time.monotonic()
    teacher_facts = transfer.teacher_facts(teacher, sweep_data.x_val, sweep_data.y_val, ctx.attack)
    ctx.overhead_seconds = time.monotonic() - facts_started
    ctx.teacher_clean = teacher_facts["clean_accuracy"]
    ctx.bank = _shared_bank(ctx)
    try:
        kd_model = _run_trial(ctx, study, KD_GAMMA)
        for gamma in plan.gammas:
            if ctx.stopped_by is not None:
                break
            _run_trial(ctx, study, gamma)
    finally:
        if ctx.bank is not None:
            ctx.bank.close()
    rows = _rows(study, plan.gammas)
    choice = select(rows, cfg, ctx.teacher_clean)
    section = _section(ctx, rows, choice, teacher_facts, time.monotonic() - started)
    _progress(ctx, f"chose γ = {choice['gamma']:g}; {section['transfer']['verdict']['summary']}", 100.0)
    log.info("γ sweep chose %s: %s", choice["gamma"], choice["reason"])
    return SweepOutcome(choice["gamma"], section, cfg, kd_model, time.monotonic() - started)


def _open_study(directory: Path, plan: SweepPlan):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(directory / JOURNAL_FILE)))
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=plan.rungs[0],
                                                    reduction_factor=plan.reduction_factor)
    return optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize", pruner=pruner,
                               load_if_exists=True)


def _choices(plan: SweepPlan) -> tuple[float, ...]:
    return (KD_GAMMA, *plan.gammas)


def _open_trial(study, gamma: float, plan: SweepPlan):
    """The trial for ``gamma``: None when it already finished, the running one after a crash, else a new one."""
    import optuna
    from optuna.trial import TrialState

    for frozen in study.get_trials(deepcopy=False):
        if frozen.params.get("gamma") == gamma:
            if frozen.state == TrialState.RUNNING:
                return optuna.trial.Trial(study, frozen._trial_id)
            return None
    study.enqueue_trial({"gamma": gamma}, skip_if_exists=True)
    trial = study.ask()
    trial.suggest_categorical("gamma", _choices(plan))
    return trial


def _run_trial(ctx: _Context, study, gamma: float) -> nn.Module | None:
    """Train one trial rung by rung until it finishes, is pruned, or the budget/time runs out."""
    from optuna.trial import TrialState

    trial = _open_trial(study, gamma, ctx.plan)
    folder = ctx.directory / f"trial-{_choices(ctx.plan).index(gamma)}"
    if trial is None:
        return _reload_kd(ctx, folder) if gamma == KD_GAMMA else None
    model = copy.deepcopy(ctx.student)
    done_epochs = max(study._storage.get_trial(trial._trial_id).intermediate_values, default=0)
    # a crash between a rung's report and its decision: take the decision now (a repeat is a no-op)
    if 0 < done_epochs < ctx.plan.rungs[-1] and _pruned(trial, gamma):
        study.tell(trial, state=TrialState.PRUNED)
        return _finish(ctx, folder, model, keep=False)
    for rung in ctx.plan.rungs:
        if rung <= done_epochs:
            continue
        if not _affordable(ctx, study, gamma, done_epochs, rung):
            study._storage.set_trial_user_attr(trial._trial_id, "stopped_by", ctx.stopped_by)
            study.tell(trial, state=TrialState.FAIL)
            return _finish(ctx, folder, model, keep=False)
        try:
            clean, robust = _train_segment(ctx, model, gamma, folder, rung, study)
        except KdigaError as exc:  # e.g. a non-finite loss: this γ diverged; the others may not
            if gamma == KD_GAMMA:
                raise
            log.warning("γ sweep: γ=%g stopped: %s", gamma, exc)
            study._storage.set_trial_user_attr(trial._trial_id, "stopped_by", f"training failed: {exc}")
            study.tell(trial, state=TrialState.FAIL)
            return _finish(ctx, folder, model, keep=False)
        _report(ctx, study, trial, gamma, rung, clean, robust)
        done_epochs = rung
        if rung < ctx.plan.rungs[-1] and _pruned(trial, gamma):  # a trial at the last rung has finished
            study.tell(trial, state=TrialState.PRUNED)
            return _finish(ctx, folder, model, keep=False)
        ctx.checkpoint()
    study.tell(trial, study._storage.get_trial(trial._trial_id).intermediate_values[done_epochs])
    return _finish(ctx, folder, model, keep=gamma == KD_GAMMA)


def _pruned(trial, gamma: float) -> bool:
    """The pruner's decision at the trial's last report; the KD reference is the baseline, never stopped.

    The KD reference is asked too (and, running first, always promoted) so that its scores are
    among the values the later trials compete with at each rung.
    """
    decision = trial.should_prune()
    return decision and gamma != KD_GAMMA


def _shared_bank(ctx: _Context) -> Any:
    """With the teacher bank on, one bank over the sweep's training rows for every trial and rung
    (each `train` call would build its own: K teacher passes each time, more than a short trial's
    epochs recompute). Its build counts as overhead, like the teacher's diagnosis."""
    from kdiga_core import teacher_bank

    if not ctx.objective.teacher_bank_k or ctx.trial_cfg.preset != "cifar":
        return None
    started = time.monotonic()
    bank = teacher_bank.build_beside(
        ctx.teacher, ctx.data.train.x_train, ctx.data.train.y_train, k=ctx.objective.teacher_bank_k,
        hflip=ctx.trial_cfg.hflip, seed=ctx.trial_cfg.seed, device=resolve_device(ctx.trial_cfg.device),
        need_grad=ctx.objective.iga_noise_eps == 0,  # KDIGA's trials read its gradients, the KD trial its logits
        checkpoint_dir=ctx.directory, name="teacher_bank-sweep")
    ctx.overhead_seconds += time.monotonic() - started
    return bank


def _trial_objective(ctx: _Context, gamma: float) -> ObjectiveConfig:
    if gamma == KD_GAMMA:
        return replace(ctx.objective, method="kd", gamma=0.0, sweep=None)
    return replace(ctx.objective, gamma=gamma, sweep=None)


def _train_segment(ctx: _Context, model: nn.Module, gamma: float, folder: Path, rung: int,
                   study) -> tuple[float, float]:
    """Continue the trial's schedule up to epoch ``rung`` (from its checkpoint) and score it."""
    if ctx.cancelled():
        raise CancelledError("The job was cancelled.")
    started = time.monotonic()
    epochs_before = _checkpoint_epoch(folder)
    before = _spent_steps(study, ctx) - epochs_before * ctx.plan.steps_per_epoch

    def on_step(progress: dict[str, Any]) -> None:
        done = before + progress["global_step"]
        _progress(ctx, f"γ = {gamma:g}: epoch {progress['epoch']}/{ctx.plan.trial_epochs}",
                  100.0 * min(1.0, done / max(1.0, ctx.plan.budget_steps)))

    train(model, ctx.data.train, _trial_objective(ctx, gamma), ctx.trial_cfg, teacher=ctx.teacher,
          on_step=on_step, should_cancel=ctx.hooks.get("should_cancel"), checkpoint_dir=folder,
          on_checkpoint=lambda _d: ctx.checkpoint(), resume=True, stop_after_epoch=rung, shared_bank=ctx.bank)
    clean = clean_accuracy(model, ctx.data.x_val, ctx.data.y_val)
    robust = robust_accuracy(model, ctx.data.x_val, ctx.data.y_val, ctx.attack, seed=ctx.cfg.seed)["accuracy"]
    steps = ctx.plan.segment_steps(epochs_before, rung)
    ctx.seconds_per_step.append((time.monotonic() - started) / max(1.0, steps))
    return clean, robust


def _checkpoint_epoch(folder: Path) -> int:
    import json

    try:
        return int(json.loads((folder / "last.json").read_text(encoding="utf-8"))["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def _report(ctx: _Context, study, trial, gamma: float, rung: int, clean: float, robust: float) -> None:
    """Record a rung's numbers on the trial and give the pruner its score."""
    kd_clean = clean if gamma == KD_GAMMA else _kd_value(study, rung)
    kd_clean = reference_clean(kd_clean, ctx.teacher_clean, ctx.cfg)
    slack = 0.0 if rung == ctx.plan.rungs[-1] else rung_slack(kd_clean, len(ctx.data.y_val))
    score = rule_score(clean, robust, kd_clean, ctx.cfg, slack)
    study._storage.set_trial_user_attr(trial._trial_id, f"rung_{rung}", {"clean": clean, "robust": robust})
    trial.report(score, rung)
    if score < COLLAPSED_SCORE:
        _withdraw(study, trial)
    log.info("γ sweep: γ=%g epoch %d clean %.4f robust %.4f score %.4f", gamma, rung, clean, robust, score)


def _withdraw(study, trial) -> None:
    """A trial that left the allowed drop stops competing at the rungs it passed before.

    Optuna's ASHA keeps each trial's score at every rung it completed (system attributes
    ``completed_rung_<k>``) and promotes a later trial only if it beats them. A γ that looked best
    early and collapsed later would otherwise keep smaller γ values from being promoted past the
    rungs where it won; its early scores were a promise that did not hold, so they become the
    lowest possible. (This relies on the attribute names of optuna 5.0's pruner, pinned and tested.)
    """
    frozen = study._storage.get_trial(trial._trial_id)
    for key in frozen.system_attrs:
        if key.startswith(RUNG_KEY_PREFIX):
            study._storage.set_trial_system_attr(trial._trial_id, key, WITHDRAWN)


def _kd_value(study, rung: int) -> float:
    for frozen in study.get_trials(deepcopy=False):
        if frozen.params.get("gamma") == KD_GAMMA and f"rung_{rung}" in frozen.user_attrs:
            return float(frozen.user_attrs[f"rung_{rung}"]["clean"])
    raise KdigaError("The γ sweep's KD reference has no score at this rung.")


def _affordable(ctx: _Context, study, gamma: float, start: int, rung: int) -> bool:
    """Whether the next segment fits the step budget and, with the final run, the job's time left."""
    if gamma == KD_GAMMA:  # the reference every choice needs; the plan always has room for it
        return True
    if ctx.stopped_by is not None:
        return False
    steps = ctx.plan.segment_steps(start, rung)
    if _spent_steps(study, ctx) + steps > ctx.plan.budget_steps + 1e-6:
        ctx.stopped_by = "budget"
        return False
    time_left = ctx.hooks.get("time_left")
    left = time_left() if time_left is not None else None
    if left is not None and ctx.seconds_per_step:
        rate = max(ctx.seconds_per_step)
        if left < rate * (steps + TIME_RESERVE * ctx.plan.run_steps):
            ctx.stopped_by = "time"
            return False
    return True


def _spent_steps(study, ctx: _Context) -> float:
    """Steps spent so far: the trials' from what the journal records (so a resumed job counts what came
    before), plus the teacher's diagnosis converted at the slowest rate seen (it costs time, not steps)."""
    total = sum(_row_steps({"history": [{"epoch": e} for e in sorted(frozen.intermediate_values)]}, ctx.plan)
                for frozen in study.get_trials(deepcopy=False))
    return total + _overhead_steps(ctx)


def _overhead_steps(ctx: _Context) -> float:
    if not ctx.seconds_per_step:
        return 0.0
    return ctx.overhead_seconds / max(ctx.seconds_per_step)


def _finish(ctx: _Context, folder: Path, model: nn.Module, *, keep: bool) -> nn.Module | None:
    """Drop a finished trial's training checkpoint (the journal keeps its numbers); keep the KD reference's."""
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    ctx.checkpoint()
    return model.eval() if keep else None


def _reload_kd(ctx: _Context, folder: Path) -> nn.Module | None:
    """The finished KD reference after a resume, from its kept checkpoint (None if it is gone)."""
    from safetensors.torch import load_file

    path = folder / "last.safetensors"
    if not path.exists():
        return None
    model = copy.deepcopy(ctx.student)
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return model.eval()


def _progress(ctx: _Context, stage: str, percent: float) -> None:
    """A ``phase: sweep`` progress dict; its ETA is the budget left at the slowest rate seen so far."""
    on_step = ctx.hooks.get("on_step")
    if on_step is not None:
        left = (1.0 - percent / 100.0) * ctx.plan.budget_steps
        eta = round(max(ctx.seconds_per_step) * left, 1) if ctx.seconds_per_step and percent < 100.0 else None
        on_step({"phase": "sweep", "stage": stage, "percent": round(percent, 2), "eta_s": eta})


# ----------------------------------------------------------------------------- the report section


def _rows(study, gammas: tuple[float, ...]) -> list[dict[str, Any]]:
    """One row per trial, ascending γ: its state, its numbers at the last rung it reached, its history."""
    from optuna.trial import TrialState

    states = {TrialState.COMPLETE: COMPLETE, TrialState.PRUNED: PRUNED, TrialState.FAIL: STOPPED}
    rows = []
    for frozen in study.get_trials(deepcopy=False):
        if "gamma" not in frozen.params or frozen.state not in states:
            continue
        history = [{"epoch": int(k[5:]), **v} for k, v in frozen.user_attrs.items() if k.startswith("rung_")]
        history.sort(key=lambda h: h["epoch"])
        last = history[-1] if history else {"epoch": 0, "clean": None, "robust": None}
        rows.append({"gamma": float(frozen.params["gamma"]), "method": "kd" if frozen.params["gamma"] == 0 else "kdiga",
                     "state": states[frozen.state], "epochs": last["epoch"], "clean": last["clean"],
                     "robust": last["robust"], "history": history,
                     "stopped_by": frozen.user_attrs.get("stopped_by")})
    seen = {r["gamma"] for r in rows}
    rows += [{"gamma": g, "method": "kdiga", "state": NOT_RUN, "epochs": 0, "clean": None, "robust": None,
              "history": [], "stopped_by": None} for g in gammas if g not in seen]
    return sorted(rows, key=lambda r: r["gamma"])


def _section(ctx: _Context, rows: list[dict[str, Any]], choice: dict[str, Any], teacher_facts: dict[str, Any],
             seconds: float) -> dict[str, Any]:
    """The report's ``gamma_sweep`` block (docs/contracts.md)."""
    import optuna

    from kdiga_core import transfer

    spent = sum(_row_steps(r, ctx.plan) for r in rows) + _overhead_steps(ctx)
    kd = next(r for r in rows if r["gamma"] == KD_GAMMA)
    verdict = transfer.verdict(teacher_facts, kd, choice, rows, ctx.cfg,
                               student_params=_params(ctx.student), teacher_params=_params(ctx.teacher))
    return {
        "rule": {"name": ctx.cfg.rule, "max_clean_drop": ctx.cfg.max_clean_drop, "text": rule_text(ctx.cfg)},
        "chosen": choice,
        "trials": rows,
        "pareto_gammas": pareto_front(rows),
        "validation": ctx.data.summary(ctx.cfg) | {"attack": f"pgd-{ctx.cfg.attack_steps}",
                                                  "norm": ctx.attack.norm, "eps": ctx.attack.eps},
        "plan": ctx.plan.to_dict(),
        "cost": {"budget_runs": ctx.cfg.budget, "sweep_steps": round(spent, 1),
                 "sweep_runs": round(spent / ctx.plan.run_steps, 3),
                 "job_runs": round(1.0 + spent / ctx.plan.run_steps, 3), "sweep_seconds": round(seconds, 2),
                 "diagnosis_seconds": round(ctx.overhead_seconds, 2),
                 "stopped_by": ctx.stopped_by},
        "search": {"library": f"optuna {optuna.__version__}", "pruner": "SuccessiveHalvingPruner (ASHA)",
                   "order": "KD reference, then descending γ"},
        "transfer": {"teacher": teacher_facts, "verdict": verdict},
    }


def _row_steps(row: dict[str, Any], plan: SweepPlan) -> float:
    total, previous = 0.0, 0
    for h in row["history"]:
        total += plan.segment_steps(previous, h["epoch"])
        previous = h["epoch"]
    return total


def _params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
