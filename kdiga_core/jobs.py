"""The seam between the worker and the library: one function per job kind.

The worker knows rows, storage and queues; this module knows models, data and training. What
comes in is typed (`JobInputs`: local paths and specs; `JobHooks`: the callbacks), what goes out
is plain dicts and local paths, so the worker stays thin and a notebook can call these too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdiga_core import data as data_mod
from kdiga_core import defaults, distributed, formats, models, provenance
from kdiga_core import evaluate as evaluate_mod
from kdiga_core import limits as limits_mod
from kdiga_core.artifacts import ARTIFACT_KINDS, artifact
from kdiga_core.config import AttackSpec, EvalConfig, LimitsConfig, ModelSpec, ObjectiveConfig, TrainConfig
from kdiga_core.errors import CancelledError, KdigaError, StoppedError
from kdiga_core.limits import NO_LIMITS, Limits
from kdiga_core.models import NormalizedModel
from kdiga_core.train import TrainResult, resolve_device, train

__all__ = ["ARTIFACT_KINDS", "JOB_KINDS", "METHODS_BY_KIND", "JobHooks", "JobInputs", "JobProgress", "ModelInput",
           "Stopper", "headline_metrics", "load_data", "run_job", "validate_dataset", "validate_teacher"]

log = logging.getLogger(__name__)

# The one definition of which methods each job kind accepts (the API reads it through the catalog).
METHODS_BY_KIND: dict[str, tuple[str, ...]] = {
    "distill": ("ce", "kd", "kdiga", "ard", "rslad"),
    "adversarial_train": ("pgd_at", "trades", "ce"),
    "evaluate": (),
}
JOB_KINDS: tuple[str, ...] = tuple(METHODS_BY_KIND)
# A phase's own rate replaces its estimate made beforehand once this much of it is done.
RATE_AFTER = 0.05
# What writing the files is expected to take before it starts (the ONNX export and its onnxruntime check of
# a small CNN took 2-5 s on a busy 2-core machine); its own rate replaces this once the weights are out.
EXPORT_EXPECTED_S = 4.0
REPORT_EXPECTED_S = 1.5  # rendering report.html's plots
# A run stops this long (at most; a tenth of a short limit) before the service's time limit, to write
# and upload its checkpoint before the limit interrupts it.
LIMIT_MARGIN_S = 60.0

StepFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ModelInput:
    """A model file on local disk and, for weights-only files (safetensors), its `ModelSpec` fields."""

    path: Path
    spec: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def load(self, *, allow_torchscript: bool = False) -> NormalizedModel:
        """The model, wrapped to take [0, 1] pixels (`formats.load_model`)."""
        spec = ModelSpec.from_dict(self.spec) if self.spec and self.spec.get("arch") else None
        return formats.load_model(self.path, spec, allow_torchscript=allow_torchscript)


@dataclass(frozen=True)
class JobInputs:
    """Everything a job reads, as local files.

    Attributes:
        dataset: ``{"kind": digits|cifar10|cifar100|npz|image_folder_zip, "path": ..., "meta": {...}}``.
        teacher: distill: the teacher. evaluate: the reference measured next to ``model_dir``'s
            model, or the model evaluated when there is no ``model_dir``.
        model_dir: evaluate: a saved bundle (`formats.load_model_bundle`) to evaluate.
        initial_student: Weights that start the student instead of a random draw (an uploaded
            model of the architecture ``spec["student"]["arch"]``).
        allow_torchscript: The operator allows TorchScript files.
        teacher_cache_dir: Where the teacher's evaluation is kept between jobs (the same teacher,
            points and settings give the same numbers, so a second student of one teacher skips it).
        about: What the caller knows of the job, for the report's ``about`` block and the model card's
            lineage (`provenance.about`): ``{"job": {id, name}, "teacher": {id, name, source_job_id},
            "model": {id, name, source_job_id}, "dataset": {id, name, sha256, size_bytes},
            "service_version"}``, each part optional.
        teacher_cache_budget_bytes: Host memory a training run's teacher cache may take
            (`cache_policy`; None: its default).
    """

    dataset: dict[str, Any]
    teacher: ModelInput | None = None
    model_dir: Path | None = None
    initial_student: ModelInput | None = None
    allow_torchscript: bool = False
    teacher_cache_dir: Path | None = None
    about: dict[str, Any] | None = None
    teacher_cache_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("model_dir", "teacher_cache_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))


@dataclass(frozen=True)
class JobHooks:
    """How a job talks to its caller.

    Attributes:
        on_step: Receives progress dicts (docs/contracts.md, on_step): often; callers throttle.
        should_cancel: True stops the job with `CancelledError` (checked every training step,
            every evaluation batch, and before the files are written).
        on_checkpoint: Called with the checkpoint folder after each epoch's checkpoint, and during
            evaluation (its finished batches, ``checkpoint/eval/``) at most once per
            ``limits.checkpoint_every_s`` and when it stops or fails.
        time_left: Seconds the job may still run (None: no limit); the γ sweep stops early to
            leave the final run its time, and training stops (resumable) shortly before it.
        after_training: Called once training has ended, its last checkpoint handed to
            ``on_checkpoint``, before evaluation starts: the worker waits here until that checkpoint
            is stored, so a failure in evaluation keeps the trained weights.
    """

    on_step: StepFn | None = None
    should_cancel: Callable[[], bool] | None = None
    on_checkpoint: Callable[[Path], None] | None = None
    time_left: Callable[[], float | None] | None = None
    after_training: Callable[[], None] | None = None


class Stopper:
    """``should_stop()`` for a run: a sentence once the job's time budget (``limits.time_budget_s``)
    is spent or the service's time limit is near, else None."""

    def __init__(self, budget_s: float | None, time_left: Callable[[], float | None] | None):
        self.started, self.budget_s, self.time_left = time.monotonic(), budget_s, time_left
        first = time_left() if time_left is not None else None
        self.margin_s = min(LIMIT_MARGIN_S, 0.1 * first) if first is not None else 0.0

    def __call__(self) -> str | None:
        if self.budget_s is not None and time.monotonic() - self.started >= self.budget_s:
            return f"The job reached its time budget of {self.budget_s:g} seconds (limits.time_budget_s)"
        left = self.time_left() if self.time_left is not None else None
        if left is not None and left <= self.margin_s:
            return "The job reached the service's time limit for one run"
        return None


def validate_teacher(path: str | Path, spec: dict[str, Any] | None, *, allow_torchscript: bool = False,
                     limits: Limits = NO_LIMITS) -> dict[str, Any]:
    """Load an uploaded teacher once to prove it works; return what the row should hold.

    Refuses (`KdigaError`, one sentence) a model above the operator's `limits`, with non-finite
    weights or normalisation, or whose logits on a probe batch are not finite (`kdiga_core.limits`).
    """
    fmt = formats.sniff_format(path)
    if spec:  # caps on what the metadata declares, before a model of that size is built
        limits_mod.check_shape_caps("teacher", spec.get("num_classes"), spec.get("in_chans"), limits)
    with limits_mod.onnx_memory_limit(limits):
        model = ModelInput(Path(path), spec).load(allow_torchscript=allow_torchscript)
        model.eval()
        limits_mod.check_shape_caps("teacher", model.spec.num_classes, model.spec.in_chans, limits)
        limits_mod.check_normalisation(model.mean, model.std)  # its own sentence, before the weights'
        limits_mod.check_weights(model, limits)
        x = torch.rand(2, *model.spec.input_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(x)
    if logits.ndim != 2 or logits.shape[1] != model.spec.num_classes:
        raise KdigaError(f"The model returns outputs of shape {tuple(logits.shape)}, "
                         f"expected (batch, {model.spec.num_classes}) logits.")
    limits_mod.check_outputs(logits)
    return {"format": fmt, "spec": model.spec.to_dict(), "params": models.count_parameters(model)}


def validate_dataset(dataset: dict[str, Any], *, limits: Limits = NO_LIMITS) -> dict[str, Any]:
    """Load a dataset once; return its summary (classes, shapes, split sizes), or refuse one above
    the caps on classes and input channels (before its summary, which lists every class, is built).

    A dataset by reference (``uri``) is listed or streamed instead (`data_ref.validate_reference`):
    its summary also holds the ``layout`` (counts per split and class, image sizes, corrupt files).
    """
    if dataset.get("uri"):
        from kdiga_core.data_ref import validate_reference

        summary = validate_reference(dataset)
        limits_mod.check_shape_caps("dataset", summary["num_classes"], 3, limits)  # references decode to RGB
        return summary
    bundle = load_data(dataset)
    limits_mod.check_shape_caps("dataset", bundle.num_classes, bundle.in_chans, limits)
    return bundle.summary()


def load_data(dataset: dict[str, Any], *, img_size: int | None = None, preset: str = "none") -> Any:
    """`dataset` is `{"kind": digits|cifar10|cifar100|npz|image_folder_zip, "path": ..., "meta": {...}}`
    (a `DataBundle` in memory), or `{"kind": image_folder|webdataset, "uri": ..., "layout": ...}` (a
    `data_stream.ReferenceData` read in place at ``img_size`` with the augmentation ``preset``)."""
    if dataset.get("uri"):
        from kdiga_core.data_stream import open_reference

        if img_size is None:
            raise KdigaError("A dataset by reference needs train.img_size (or a teacher whose input size it takes).")
        return open_reference(dataset, img_size=img_size, preset=preset)
    meta = dict(dataset.get("meta") or {})
    return data_mod.load_dataset(dataset["kind"], dataset.get("path"), **meta)


# ----------------------------------------------------------------------------- progress


class JobProgress:
    """One percent and ETA for the whole job, across its phases: train, then evaluate.

    Each phase's ``percent`` and ``eta_s`` stay its own (train's over its steps, evaluate's over its
    stages); this adds ``job_percent`` and ``job_eta_s`` to every progress dict. A phase weighs its
    expected seconds: its own rate (the seconds left over the fraction left) as soon as it reports an
    ETA, or, for evaluation, once `RATE_AFTER` of it is done; before that its plan
    (`evaluate.expected_seconds`). Writing the files (``export``: the model bundle, then the report)
    is the last phase, its stages reported by `export_stage`. Outside training (which
    checks itself), it also stops the job when ``should_cancel`` says so.
    """

    def __init__(self, hooks: JobHooks, *, train: bool, eval_seconds: float, sweep: bool = False,
                 export_seconds: float | None = None, should_stop: Callable[[], str | None] | None = None):
        self.hooks, self.should_stop, self.trains = hooks, should_stop, train
        export = export_seconds if export_seconds is not None else (
            (EXPORT_EXPECTED_S if train else 0.0) + REPORT_EXPECTED_S)
        self.seconds = {"train": 0.0, "evaluate": float(eval_seconds), "export": export}
        self.fraction = {"train": 0.0 if train else 1.0, "evaluate": 0.0, "export": 0.0}
        self._export_started: float | None = None
        if sweep:  # γ "auto": the sweep runs before training (kdiga_core.sweep)
            self.seconds, self.fraction = {"sweep": 0.0, **self.seconds}, {"sweep": 0.0, **self.fraction}
        self.job_percent = 0.0

    def __call__(self, progress: dict[str, Any]) -> None:
        if progress["phase"] != "train":
            self.check_cancel()
            self.check_stop(progress["phase"])
        self._update(progress["phase"], float(progress.get("percent") or 0.0) / 100.0, progress.get("eta_s"))
        if self.hooks.on_step is not None:
            self.hooks.on_step({**progress, **self._overall()})

    def export_stage(self, stage: str, fraction: float) -> None:
        """Progress of writing the files: ``stage`` starts at ``fraction`` of the export phase."""
        now = time.monotonic()
        self._export_started = self._export_started if self._export_started is not None else now
        elapsed = now - self._export_started
        eta = elapsed * (1.0 - fraction) / fraction if fraction > 0 else self.seconds["export"]
        self({"phase": "export", "stage": stage, "percent": round(100.0 * fraction, 2), "eta_s": round(eta, 1)})

    def check_cancel(self) -> None:
        """Raise `CancelledError` when ``should_cancel`` says so."""
        if self.hooks.should_cancel is not None and self.hooks.should_cancel():
            raise CancelledError("The job was cancelled.")

    def check_stop(self, phase: str) -> None:
        """Raise `StoppedError` between evaluation batches once the budget is spent.

        Not in the γ sweep: it keeps its own clock (``time_left``) and a trial ended by an exception
        would be recorded as failed; a spent budget stops the final training at its first step.
        """
        if phase != "evaluate" or not distributed.is_main():  # DDP: rank 0 stops and records it
            return
        why = self.should_stop() if self.should_stop is not None else None
        if not why:
            return
        if self.trains:
            raise StoppedError(f"{why} during evaluation; the trained weights and the evaluation's finished "
                               "batches are kept, and resuming the job continues its evaluation.")
        raise StoppedError(f"{why} during evaluation; its finished batches are kept, and resuming the job "
                           "continues it.")

    def _update(self, phase: str, fraction: float, eta: float | None) -> None:
        self.fraction[phase] = min(max(fraction, 0.0), 1.0)
        # An ETA rounded to 0 says nothing of the rate; one from the first few percent (warm-up, the
        # cheap first stages) says less than an estimate made beforehand, when there is one.
        trusted = fraction >= RATE_AFTER or not self.seconds[phase]
        if eta and trusted and 0.0 < fraction < 1.0:
            self.seconds[phase] = float(eta) / (1.0 - fraction)  # the phase's own rate, whole phase

    def _overall(self) -> dict[str, float]:
        total = sum(self.seconds.values())
        done = sum(self.fraction[p] * s for p, s in self.seconds.items())
        fraction = done / total if total > 0 else min(self.fraction.values())
        self.job_percent = max(self.job_percent, round(100.0 * fraction, 2))
        left = sum((1.0 - self.fraction[p]) * s for p, s in self.seconds.items())
        return {"job_percent": self.job_percent, "job_eta_s": round(left, 1)}


# ----------------------------------------------------------------------------- jobs


@dataclass
class _Job:
    """One job's settings, inputs and loaded data, passed between the steps below."""

    kind: str
    spec: dict[str, Any]
    workdir: Path
    inputs: JobInputs
    hooks: JobHooks
    data: data_mod.DataBundle
    teacher: NormalizedModel | None
    should_stop: Stopper
    eval_cfg: EvalConfig = field(init=False)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # attacks left out for their time budget

    def __post_init__(self) -> None:
        self.eval_cfg = EvalConfig.from_dict(self.spec.get("evaluation"))

    def drop_costly_attacks(self, model: torch.nn.Module, teacher: torch.nn.Module | None) -> float:
        """Leave out each attack whose share of the evaluation plan exceeds its ``max_seconds`` (the
        defaults give the full AutoAttack one); returns the expected seconds of what is left."""
        total = evaluate_mod.expected_seconds(model, self.data, self.eval_cfg, teacher=teacher)
        for spec in [a for a in self.eval_cfg.attacks if a.max_seconds is not None]:
            rest = tuple(a for a in self.eval_cfg.attacks if a is not spec)
            if not rest:
                continue
            without = dataclasses.replace(self.eval_cfg, attacks=rest)
            left = evaluate_mod.expected_seconds(model, self.data, without, teacher=teacher)
            over = total - left > float(spec.max_seconds or 0)
            if distributed.agree(lambda over=over: over, distributed.context()):  # DDP: rank 0 decides for all
                self.skipped.append(_skipped(spec, total - left))
                self.eval_cfg, total = without, left
        return total

    @property
    def role(self) -> str:
        """The measured model's name in the report and the metrics: a distilled ``student``, else ``model``."""
        return "student" if self.kind == "distill" else "model"

    @property
    def out(self) -> Path:
        return self.workdir / "out"

    def partials(self) -> evaluate_mod.PartialStore:
        """Where the evaluation keeps each batch's per-point results: the job's ``checkpoint/eval/partial/``,
        handed to ``on_checkpoint`` at most once per ``limits.checkpoint_every_s`` (and when it stops)."""
        checkpoint, on_checkpoint = self.workdir / "checkpoint", self.hooks.on_checkpoint
        every = LimitsConfig.from_dict(self.spec.get("limits")).checkpoint_every_s
        on_keep = (lambda: on_checkpoint(checkpoint)) if on_checkpoint is not None else None
        return evaluate_mod.PartialStore(checkpoint / "eval" / "partial", on_keep=on_keep, every_s=every)

    @property
    def cache(self) -> evaluate_mod.ReportCache:
        folder = self.inputs.teacher_cache_dir
        shared = evaluate_mod.DirectoryReportCache(folder) if folder is not None else None
        return JobReportCache(self.workdir / "checkpoint", shared, self.hooks.on_checkpoint)


class JobReportCache:
    """The teacher's evaluation kept in the job's checkpoint (``checkpoint/eval/<key>.json``, stored
    with it through ``on_checkpoint``) as well as in the worker's cache between jobs: a job stopped
    or failed after its teacher was measured reuses that measurement when resumed, on any worker."""

    def __init__(self, checkpoint_dir: Path, shared: evaluate_mod.ReportCache | None,
                 on_checkpoint: Callable[[Path], None] | None):
        self.checkpoint_dir, self.shared, self.on_checkpoint = checkpoint_dir, shared, on_checkpoint
        self.mine = evaluate_mod.DirectoryReportCache(checkpoint_dir / "eval")

    def get(self, key: str) -> dict[str, Any] | None:
        found = self.mine.get(key)
        return found if found is not None or self.shared is None else self.shared.get(key)

    def put(self, key: str, report: dict[str, Any]) -> None:
        self.mine.put(key, report)
        if self.shared is not None:
            self.shared.put(key, report)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.checkpoint_dir)


def _skipped(spec: AttackSpec, seconds: float) -> dict[str, Any]:
    return {"attack": spec.name, "norm": spec.norm, "eps": spec.eps, "expected_s": round(seconds, 1),
            "max_seconds": spec.max_seconds,
            "why": f"{spec.name} was expected to take {seconds:.0f} s, over its budget of {spec.max_seconds:g} s "
                   "(evaluation.attacks[].max_seconds); ask for it without max_seconds to run it"}


def run_job(kind: str, spec: dict[str, Any], workdir: str | Path, inputs: JobInputs,
            hooks: JobHooks | None = None, *, resume: bool = False) -> dict[str, Any]:
    """Run one job end to end in ``workdir``, on the device training uses (CUDA when available).

    distill: the teacher (``inputs.teacher``) -> a student (``spec["student"]``) with ``spec["objective"]``.
    adversarial_train: a robust model from scratch (``spec["student"]`` is its architecture).
    evaluate: the model in ``inputs.model_dir``, or the teacher file, against the teacher if both.

    Args:
        kind: One of `JOB_KINDS`; its methods are `METHODS_BY_KIND`.
        spec: The job's spec: ``student``, ``objective``, ``train``, ``evaluation`` dicts.
        workdir: A local folder for checkpoints (``checkpoint/``) and outputs (``out/``).
        inputs: What the job reads. hooks: How it reports, is cancelled and checkpoints.
        resume: Continue training from the checkpoint in ``workdir/checkpoint`` if there is one.

    Returns:
        ``{"artifacts": [{"name", "path", "kind"}], "metrics", "report"}``; for the kinds that make
        a model, also ``"model_spec"`` and ``"model_file"`` (its weights' file name). Each artifact's
        kind is one of `ARTIFACT_KINDS`.
    """
    if kind not in METHODS_BY_KIND:
        raise KdigaError(f"Unknown job kind '{kind}'; valid names are: {', '.join(JOB_KINDS)}.")
    started = time.monotonic()
    hooks = hooks or JobHooks()
    stopper = Stopper(LimitsConfig.from_dict(spec.get("limits")).time_budget_s, hooks.time_left)
    job = _open(kind, spec, Path(workdir), inputs, hooks, stopper)
    result = _evaluate_only(job) if kind == "evaluate" else _train_and_report(job, resume)
    result["metrics"]["wall_s"] = round(time.monotonic() - started, 2)
    return result


def _open(kind: str, spec: dict[str, Any], workdir: Path, inputs: JobInputs, hooks: JobHooks,
          stopper: Stopper) -> _Job:
    workdir.mkdir(parents=True, exist_ok=True)
    teacher = None
    if inputs.teacher is not None:
        teacher = inputs.teacher.load(allow_torchscript=inputs.allow_torchscript).eval()
    train_cfg = TrainConfig.from_dict(spec.get("train"))
    # a dataset read in place takes its size from the job (else the teacher's, else the evaluated model's)
    img_size = train_cfg.img_size or (teacher.spec.img_size if teacher is not None else _bundle_img_size(inputs))
    data = load_data(inputs.dataset, img_size=img_size, preset=train_cfg.preset)
    # what the request left out, sized to this data (the API has already done so for its jobs)
    spec = defaults.resolve(kind, spec, defaults.DataFacts.from_summary(data.summary()))
    if teacher is not None:
        _check_compatible(teacher.spec, data, "teacher")
    return _Job(kind, spec, workdir, inputs, hooks, data, teacher, stopper)


def _bundle_img_size(inputs: JobInputs) -> int | None:
    """The input size on an evaluated bundle's model card (evaluate jobs without a teacher)."""
    card = inputs.model_dir / "model_card.json" if inputs.model_dir is not None else None
    if card is None or not card.is_file():
        return None
    size = (json.loads(card.read_text(encoding="utf-8")).get("spec") or {}).get("img_size")
    return int(size) if size else None


def _check_compatible(spec: ModelSpec, data: data_mod.DataBundle, role: str) -> None:
    data_shape = (data.in_chans, data.img_size, data.img_size)
    if tuple(spec.input_shape) != data_shape:
        raise KdigaError(f"The {role} expects inputs of shape {tuple(spec.input_shape)} "
                         f"but the dataset has {data_shape}.")
    if spec.num_classes != data.num_classes:
        raise KdigaError(f"The {role} has {spec.num_classes} classes but the dataset has {data.num_classes}.")


def _check_method(kind: str, method: str, teacher: NormalizedModel | None) -> None:
    allowed = METHODS_BY_KIND[kind]
    if method not in allowed:
        what = "distill" if kind == "distill" else "train a model from scratch"
        raise KdigaError(f"Method '{method}' cannot {what}; use one of: {', '.join(allowed)}.")
    if kind == "distill" and teacher is None and method != "ce":
        raise KdigaError(f"Method '{method}' needs a teacher; give teacher_id.")


def _train_and_report(job: _Job, resume: bool) -> dict[str, Any]:
    objective = ObjectiveConfig.from_dict(job.spec.get("objective"))
    teacher = job.teacher if job.kind == "distill" else None
    _check_method(job.kind, objective.method, teacher)
    distributed.check_supported(objective, distributed.context())  # DDP: before the γ sweep would start
    train_cfg = TrainConfig.from_dict(job.spec.get("train"))
    torch.manual_seed(train_cfg.seed)  # the student's initial draw too: one seed gives one model in any process
    student = _initial_student(job) or _build_student(job.spec.get("student") or {}, job.data)
    sweeping = objective.sweeps_gamma and teacher is not None
    if sweeping and getattr(job.data, "streaming", False):
        raise KdigaError("gamma \"auto\" needs a dataset held in memory; give a number for objective.gamma.")
    progress = JobProgress(job.hooks, train=True, sweep=sweeping, should_stop=job.should_stop,
                           eval_seconds=_expected(student, teacher, job, resolve_device(train_cfg.device)))
    sweep = _choose_gamma(student, teacher, objective, train_cfg, job, progress) if sweeping else None
    if sweep is not None:
        objective = sweep.final_objective(objective)
    result = train(student, job.data, objective, train_cfg, teacher=teacher, on_step=progress,
                   should_cancel=job.hooks.should_cancel, checkpoint_dir=job.workdir / "checkpoint",
                   on_checkpoint=job.hooks.on_checkpoint, resume=resume, should_stop=job.should_stop,
                   checkpoint_every_s=LimitsConfig.from_dict(job.spec.get("limits")).checkpoint_every_s,
                   teacher_cache_budget=job.inputs.teacher_cache_budget_bytes)
    if job.hooks.after_training is not None:  # the trained weights are stored before evaluation starts
        job.hooks.after_training()
    # evaluated where it was trained (DDP: each rank its share of the points); the bundle export takes its
    # own CPU copy
    report = _report(result.model.eval(), teacher, job, progress)
    if not distributed.is_main():  # DDP: rank 0 alone writes the files
        return {"artifacts": [], "metrics": {}, "report": {}}
    if sweep is not None:
        points = evaluate_mod.evaluation_points(job.data, job.eval_cfg.max_points, seed=job.eval_cfg.seed)
        report["gamma_sweep"] = sweep.finish(report, points.x, points.y)
        report["sanity"] = evaluate_mod.report_sanity(report)  # now with the KD reference's check
    return _export(job, result, objective, train_cfg, report, progress, sweep)


def _choose_gamma(student: NormalizedModel, teacher: NormalizedModel, objective: ObjectiveConfig,
                  train_cfg: TrainConfig, job: _Job, progress: JobProgress) -> Any:
    """γ "auto": the sweep (kdiga_core.sweep) in checkpoint/sweep/, scored at the report's threat model."""
    from kdiga_core.sweep import choose_gamma

    hooks = {"on_step": progress, "should_cancel": job.hooks.should_cancel,
             "on_checkpoint": job.hooks.on_checkpoint, "time_left": job.hooks.time_left}
    return choose_gamma(student, teacher, job.data, objective, train_cfg, job.workdir / "checkpoint" / "sweep",
                        attack=evaluate_mod.threat_model(job.eval_cfg), hooks=hooks)


def _expected(model: torch.nn.Module, teacher: torch.nn.Module | None, job: _Job, device: torch.device) -> float:
    """The evaluation's expected seconds on ``device`` (moves the models there, as training would)."""
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    return job.drop_costly_attacks(model, teacher)


def _build_student(student: dict[str, Any], data: data_mod.DataBundle) -> NormalizedModel:
    if not student.get("arch"):
        raise KdigaError("The job needs student.arch, the architecture to train.")
    spec = ModelSpec(arch=student["arch"], num_classes=data.num_classes, in_chans=data.in_chans,
                     img_size=data.img_size, mean=student.get("mean"), std=student.get("std"),
                     class_names=tuple(data.class_names) if data.class_names else None, kwargs=student.get("kwargs"))
    return models.build_model(spec)


def _initial_student(job: _Job) -> NormalizedModel | None:
    """The uploaded weights that start the student's training, checked against student.arch, or None."""
    if job.inputs.initial_student is None:
        return None
    model = job.inputs.initial_student.load(allow_torchscript=job.inputs.allow_torchscript)
    arch = (job.spec.get("student") or {}).get("arch")
    if arch and model.spec.arch != arch:
        raise KdigaError(f"The student's initial weights (student.weights_id) are a '{model.spec.arch}' "
                         f"model but student.arch is '{arch}'; give the same architecture.")
    _check_compatible(model.spec, job.data, "student's initial model")
    if not any(p.requires_grad for p in model.parameters()):
        raise KdigaError("The student's initial weights (student.weights_id) have no trainable parameters "
                         "(an ONNX or TorchScript upload); upload safetensors weights instead.")
    return model.train()


def _evaluate_only(job: _Job) -> dict[str, Any]:
    model, reference = _models_to_evaluate(job)
    progress = JobProgress(job.hooks, train=False, should_stop=job.should_stop,
                           eval_seconds=_expected(model, reference, job, resolve_device()))
    report = _report(model, reference, job, progress)
    progress.check_cancel()
    progress.export_stage("report", 0.0)
    report["about"] = _about(job, {job.role: model, "teacher": reference}, _evaluated_sha256(job))
    artifacts = _write_report(report, job.out, job.spec, {"kind": "evaluate", "dataset": job.data.name,
                                                          "threat_model": job.spec.get("threat_model"),
                                                          "defaulted": list(job.spec.get("defaulted") or [])})
    progress.export_stage("done", 1.0)
    return {"artifacts": artifacts, "metrics": headline_metrics(report), "report": report}


def _models_to_evaluate(job: _Job) -> tuple[NormalizedModel, NormalizedModel | None]:
    """(the model, the teacher it is compared with or None)."""
    if job.inputs.model_dir is not None:
        model = formats.load_model_bundle(job.inputs.model_dir)
        _check_compatible(model.spec, job.data, "model")
        return model.eval(), job.teacher
    if job.teacher is not None:
        return job.teacher, None
    raise KdigaError("An evaluate job needs a model: give model.teacher_id or model.job_id.")


def _report(model: torch.nn.Module, teacher: torch.nn.Module | None, job: _Job,
            progress: JobProgress) -> dict[str, Any]:
    log.info("evaluating on %s", evaluate_mod.model_device(model))
    partials = job.partials()
    try:
        report = evaluate_mod.evaluate(model, job.data, job.eval_cfg, teacher=teacher, on_progress=progress,
                                       teacher_cache=job.cache, role=job.role, partials=partials)
    except CancelledError:
        raise
    except Exception:  # a stop, a time limit or a failure: the batches measured go with the checkpoint
        partials.flush()
        raise
    report["threat_model_spec"] = job.spec.get("threat_model")
    report["defaulted"] = list(job.spec.get("defaulted") or [])  # the settings sized to the data
    report["skipped_attacks"] = list(job.skipped)
    return report


def _about(job: _Job, models_by_role: dict[str, torch.nn.Module | None], sha256: dict[str, str | None]
           ) -> dict[str, Any]:
    """The report's ``about`` block: the job, each model with its arch, parameters and sha256, the dataset."""
    known = job.inputs.about or {}
    entries = {}
    for role, model in models_by_role.items():
        if model is not None:
            said = known.get("teacher" if role == "teacher" else "model") or {}
            entries[role] = provenance.model_entry(model, sha256=sha256.get(role), known=said)
    summary = job.data.summary()
    dataset = {"name": job.data.name} | {k: summary[k] for k in ("num_classes", "input_shape", "train_size",
                                                                 "test_size")}
    return provenance.about(job.kind, known, entries, dataset)


def _teacher_sha256(job: _Job) -> str | None:
    return provenance.file_sha256(job.inputs.teacher.path) if job.inputs.teacher is not None else None


def _evaluated_sha256(job: _Job) -> dict[str, str | None]:
    """The sha256 of each evaluated model's weights: the bundle's (from its checked card) or the file's."""
    teacher = _teacher_sha256(job)
    if job.inputs.model_dir is None:
        return {job.role: teacher}
    card = json.loads((job.inputs.model_dir / "model_card.json").read_text(encoding="utf-8"))
    files = card.get("files") or {}
    weights = next((n for n, f in files.items() if n.endswith(".safetensors")), None) or next(iter(files), None)
    return {job.role: (files.get(weights) or {}).get("sha256"), "teacher": teacher}


def _lineage(about: dict[str, Any]) -> dict[str, Any]:
    """The model card's lineage: the teacher it learned from (id, sha256, arch) and the data it saw."""
    out: dict[str, Any] = {"job": about["job"], "dataset": about["dataset"],
                           "service_version": about["service_version"]}
    if "teacher" in about["models"]:
        out["teacher"] = about["models"]["teacher"]
    return out


def _export(job: _Job, result: TrainResult, objective: ObjectiveConfig, train_cfg: TrainConfig,
            report: dict[str, Any], progress: JobProgress, sweep: Any = None) -> dict[str, Any]:
    """The model bundle and the report files, each artifact with its kind."""
    progress.export_stage("model weights, ONNX and model card", 0.0)
    name, kind = ("student", "student_weights") if job.kind == "distill" else ("model", "model_weights")
    training = {"kind": job.kind, "objective": objective.to_dict(), "train": train_cfg.to_dict(),
                "dataset": job.data.name, "steps": result.steps, "seconds": round(result.seconds, 2),
                "resumed_from_step": result.resumed_from_step, "compute": distributed.batch_plan(train_cfg),
                "labels": dict(job.spec.get("labels") or {}), "threat_model": job.spec.get("threat_model"),
                "defaulted": list(job.spec.get("defaulted") or []), "skipped_attacks": list(job.skipped)}
    if job.kind == "distill" and job.teacher is not None:  # what the teacher normalised with, defaulted or not
        training["teacher_normalisation"] = formats.card_normalisation(job.teacher)
    if sweep is not None:  # the model card says γ was chosen, and how long choosing took
        training["gamma_auto"] = {"chosen": sweep.gamma, "sweep_seconds": round(sweep.seconds, 2)}
    report["compute"] = training["compute"]  # devices, effective batch and learning rate, in the report
    about = _about(job, {job.role: result.model, "teacher": job.teacher if job.kind == "distill" else None},
                   {"teacher": _teacher_sha256(job)})
    training["lineage"] = _lineage(about)
    headline = headline_metrics(report)
    artifacts = formats.save_model_bundle(result.model, job.out, name=name, weights_kind=kind, training=training,
                                          metrics=headline)
    weights = next(a for a in artifacts if a["kind"] == kind)
    about["models"][job.role]["sha256"] = provenance.file_sha256(weights["path"])
    report["about"] = about
    progress.export_stage("report", EXPORT_EXPECTED_S / (EXPORT_EXPECTED_S + REPORT_EXPECTED_S))
    artifacts += _write_report(report, job.out, job.spec, training)
    progress.export_stage("done", 1.0)
    return {"artifacts": artifacts, "metrics": headline, "report": report,
            "model_spec": result.model.spec.to_dict(), "model_file": f"{name}.safetensors"}


def headline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a job row shows: clean and per-attack accuracy of each model."""
    out: dict[str, Any] = {"n_points": report.get("n_points"), "threat_model": report.get("threat_model")}
    for role, entry in report.get("models", {}).items():
        out[f"{role}_clean_accuracy"] = entry.get("clean_accuracy")
        for attack, acc in (entry.get("attacks") or {}).items():
            out[f"{role}_{attack}_accuracy"] = acc
        stats = entry.get("stats") or {}
        out[f"{role}_params"] = stats.get("params")
    return out


def _write_report(report: dict[str, Any], out_dir: Path, spec: dict[str, Any],
                  training: dict[str, Any]) -> list[dict[str, Any]]:
    from kdiga_core.report_html import render_report_html

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    _atomic_write(json_path, json.dumps(report, indent=2, sort_keys=True))
    context = {"job": {k: v for k, v in training.items() if k != "lineage"}, "evaluation": spec.get("evaluation") or {}}
    _atomic_write(html_path, render_report_html(report, title="KDIGA robustness report", context=context))
    return [artifact(json_path, "report_json"), artifact(html_path, "report_html")]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
