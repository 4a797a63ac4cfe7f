"""The seam between the worker and the library: one function per job kind.

The worker knows rows, storage and queues; this module knows models, data and training. What
comes in is typed (`JobInputs`: local paths and specs; `JobHooks`: the callbacks), what goes out
is plain dicts and local paths, so the worker stays thin and a notebook can call these too.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdiga_core import data as data_mod
from kdiga_core import distributed, formats, models
from kdiga_core import evaluate as evaluate_mod
from kdiga_core.artifacts import ARTIFACT_KINDS, artifact
from kdiga_core.config import EvalConfig, ModelSpec, ObjectiveConfig, TrainConfig
from kdiga_core.errors import CancelledError, KdigaError
from kdiga_core.models import NormalizedModel
from kdiga_core.train import TrainResult, resolve_device, train

__all__ = ["ARTIFACT_KINDS", "JOB_KINDS", "METHODS_BY_KIND", "JobHooks", "JobInputs", "JobProgress", "ModelInput",
           "headline_metrics", "load_data", "run_job", "validate_dataset", "validate_teacher"]

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
        teacher_cache_budget_bytes: Host memory a training run's teacher cache may take
            (`cache_policy`; None: its default).
    """

    dataset: dict[str, Any]
    teacher: ModelInput | None = None
    model_dir: Path | None = None
    initial_student: ModelInput | None = None
    allow_torchscript: bool = False
    teacher_cache_dir: Path | None = None
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
        on_checkpoint: Called with the checkpoint folder after each epoch's checkpoint.
        time_left: Seconds the job may still run (None: no limit); the γ sweep stops early to
            leave the final run its time.
    """

    on_step: StepFn | None = None
    should_cancel: Callable[[], bool] | None = None
    on_checkpoint: Callable[[Path], None] | None = None
    time_left: Callable[[], float | None] | None = None


def validate_teacher(path: str | Path, spec: dict[str, Any] | None,
                     *, allow_torchscript: bool = False) -> dict[str, Any]:
    """Load an uploaded teacher once to prove it works; return what the row should hold."""
    fmt = formats.sniff_format(path)
    model = ModelInput(Path(path), spec).load(allow_torchscript=allow_torchscript)
    model.eval()
    x = torch.rand(2, *model.spec.input_shape)
    with torch.no_grad():
        logits = model(x)
    if logits.ndim != 2 or logits.shape[1] != model.spec.num_classes:
        raise KdigaError(f"The model returns outputs of shape {tuple(logits.shape)}, "
                         f"expected (batch, {model.spec.num_classes}) logits.")
    return {"format": fmt, "spec": model.spec.to_dict(), "params": models.count_parameters(model)}


def validate_dataset(dataset: dict[str, Any]) -> dict[str, Any]:
    """Load a dataset once; return its summary (classes, shapes, split sizes).

    A dataset by reference (``uri``) is listed or streamed instead (`data_ref.validate_reference`):
    its summary also holds the ``layout`` (counts per split and class, image sizes, corrupt files).
    """
    if dataset.get("uri"):
        from kdiga_core.data_ref import validate_reference

        return validate_reference(dataset)
    return load_data(dataset).summary()


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
    (`evaluate.expected_seconds`). Writing the files
    afterwards (about a second for our models) is not a phase of its own. Outside training (which
    checks itself), it also stops the job when ``should_cancel`` says so.
    """

    def __init__(self, hooks: JobHooks, *, train: bool, eval_seconds: float, sweep: bool = False):
        self.hooks = hooks
        self.seconds = {"train": 0.0, "evaluate": float(eval_seconds)}
        self.fraction = {"train": 0.0 if train else 1.0, "evaluate": 0.0}
        if sweep:  # γ "auto": the sweep runs before training (kdiga_core.sweep)
            self.seconds, self.fraction = {"sweep": 0.0, **self.seconds}, {"sweep": 0.0, **self.fraction}
        self.job_percent = 0.0

    def __call__(self, progress: dict[str, Any]) -> None:
        if progress["phase"] != "train":
            self.check_cancel()
        self._update(progress["phase"], float(progress.get("percent") or 0.0) / 100.0, progress.get("eta_s"))
        if self.hooks.on_step is not None:
            self.hooks.on_step({**progress, **self._overall()})

    def check_cancel(self) -> None:
        """Raise `CancelledError` when ``should_cancel`` says so."""
        if self.hooks.should_cancel is not None and self.hooks.should_cancel():
            raise CancelledError("The job was cancelled.")

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
    eval_cfg: EvalConfig = field(init=False)

    def __post_init__(self) -> None:
        self.eval_cfg = EvalConfig.from_dict(self.spec.get("evaluation"))

    @property
    def out(self) -> Path:
        return self.workdir / "out"

    @property
    def cache(self) -> evaluate_mod.ReportCache | None:
        folder = self.inputs.teacher_cache_dir
        return evaluate_mod.DirectoryReportCache(folder) if folder is not None else None


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
    job = _open(kind, spec, Path(workdir), inputs, hooks or JobHooks())
    result = _evaluate_only(job) if kind == "evaluate" else _train_and_report(job, resume)
    result["metrics"]["wall_s"] = round(time.monotonic() - started, 2)
    return result


def _open(kind: str, spec: dict[str, Any], workdir: Path, inputs: JobInputs, hooks: JobHooks) -> _Job:
    workdir.mkdir(parents=True, exist_ok=True)
    teacher = None
    if inputs.teacher is not None:
        teacher = inputs.teacher.load(allow_torchscript=inputs.allow_torchscript).eval()
    train_cfg = TrainConfig.from_dict(spec.get("train"))
    # a dataset read in place takes its size from the job (else the teacher's, else the evaluated model's)
    img_size = train_cfg.img_size or (teacher.spec.img_size if teacher is not None else _bundle_img_size(inputs))
    data = load_data(inputs.dataset, img_size=img_size, preset=train_cfg.preset)
    if teacher is not None:
        _check_compatible(teacher.spec, data, "teacher")
    return _Job(kind, spec, workdir, inputs, hooks, data, teacher)


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
    student = _initial_student(job) or _build_student(job.spec.get("student") or {}, job.data)
    sweeping = objective.sweeps_gamma and teacher is not None
    if sweeping and getattr(job.data, "streaming", False):
        raise KdigaError("gamma \"auto\" needs a dataset held in memory; give a number for objective.gamma.")
    progress = JobProgress(job.hooks, train=True, sweep=sweeping,
                           eval_seconds=_expected(student, teacher, job, resolve_device(train_cfg.device)))
    sweep = _choose_gamma(student, teacher, objective, train_cfg, job, progress) if sweeping else None
    if sweep is not None:
        objective = sweep.final_objective(objective)
    result = train(student, job.data, objective, train_cfg, teacher=teacher, on_step=progress,
                   should_cancel=job.hooks.should_cancel, checkpoint_dir=job.workdir / "checkpoint",
                   on_checkpoint=job.hooks.on_checkpoint, resume=resume,
                   teacher_cache_budget=job.inputs.teacher_cache_budget_bytes)
    # evaluated where it was trained (DDP: each rank its share of the points); the bundle export takes its
    # own CPU copy
    report = _report(result.model.eval(), teacher, job, progress)
    if not distributed.is_main():  # DDP: rank 0 alone writes the files
        return {"artifacts": [], "metrics": {}, "report": {}}
    if sweep is not None:
        points = evaluate_mod.evaluation_points(job.data, job.eval_cfg.max_points, seed=job.eval_cfg.seed)
        report["gamma_sweep"] = sweep.finish(report, points.x, points.y)
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
    return evaluate_mod.expected_seconds(model, job.data, job.eval_cfg, teacher=teacher)


def _build_student(student: dict[str, Any], data: data_mod.DataBundle) -> NormalizedModel:
    if not student.get("arch"):
        raise KdigaError("The job needs student.arch, the architecture to train.")
    spec = ModelSpec(arch=student["arch"], num_classes=data.num_classes, in_chans=data.in_chans,
                     img_size=data.img_size, mean=student.get("mean"), std=student.get("std"),
                     class_names=tuple(data.class_names) if data.class_names else None)
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
    progress = JobProgress(job.hooks, train=False, eval_seconds=_expected(model, reference, job, resolve_device()))
    report = _report(model, reference, job, progress)
    progress.check_cancel()
    artifacts = _write_report(report, job.out, job.spec, {"kind": "evaluate", "dataset": job.data.name})
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
    return evaluate_mod.evaluate(model, job.data, job.eval_cfg, teacher=teacher, on_progress=progress,
                                 teacher_cache=job.cache)


def _export(job: _Job, result: TrainResult, objective: ObjectiveConfig, train_cfg: TrainConfig,
            report: dict[str, Any], progress: JobProgress, sweep: Any = None) -> dict[str, Any]:
    """The model bundle and the report files, each artifact with its kind."""
    progress.check_cancel()
    name, kind = ("student", "student_weights") if job.kind == "distill" else ("model", "model_weights")
    training = {"kind": job.kind, "objective": objective.to_dict(), "train": train_cfg.to_dict(),
                "dataset": job.data.name, "steps": result.steps, "seconds": round(result.seconds, 2),
                "resumed_from_step": result.resumed_from_step, "compute": distributed.batch_plan(train_cfg),
                "labels": dict(job.spec.get("labels") or {})}
    if sweep is not None:  # the model card says γ was chosen, and how long choosing took
        training["gamma_auto"] = {"chosen": sweep.gamma, "sweep_seconds": round(sweep.seconds, 2)}
    report["compute"] = training["compute"]  # devices, effective batch and learning rate, in the report
    headline = headline_metrics(report)
    artifacts = formats.save_model_bundle(result.model, job.out, name=name, weights_kind=kind, training=training,
                                          metrics=headline)
    artifacts += _write_report(report, job.out, job.spec, training)
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
    context = {"job": training, "evaluation": spec.get("evaluation") or {}}
    _atomic_write(html_path, render_report_html(report, title="KDIGA robustness report", context=context))
    return [artifact(json_path, "report_json"), artifact(html_path, "report_html")]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
