"""The seam between the worker and the library: one function per job kind.

The worker knows rows, storage and queues; this module knows models, data and
training. Everything crossing the seam is a plain dict or a local path, so the
worker can stay thin and these functions can be called from a notebook.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdiga_core import data as data_mod
from kdiga_core import evaluate as evaluate_mod
from kdiga_core import formats, models
from kdiga_core.config import EvalConfig, ModelSpec, ObjectiveConfig, TrainConfig
from kdiga_core.errors import KdigaError
from kdiga_core.train import resolve_device, train

log = logging.getLogger(__name__)

JOB_KINDS = ("distill", "adversarial_train", "evaluate")
DISTILL_METHODS = ("ce", "kd", "kdiga", "ard", "rslad")
TEACHER_METHODS = ("pgd_at", "trades", "ce")
METHODS_BY_KIND = {"distill": DISTILL_METHODS, "adversarial_train": TEACHER_METHODS, "evaluate": ()}

StepFn = Callable[[dict[str, Any]], None]


def validate_teacher(path: str | Path, spec: dict[str, Any] | None,
                     *, allow_torchscript: bool = False) -> dict[str, Any]:
    """Load an uploaded teacher once to prove it works; return what the row should hold."""
    fmt = formats.sniff_format(path)
    model_spec = ModelSpec.from_dict(spec) if spec and spec.get("arch") else None
    model = formats.load_model(path, model_spec, allow_torchscript=allow_torchscript)
    model.eval()
    x = torch.rand(2, *model.spec.input_shape)
    with torch.no_grad():
        logits = model(x)
    if logits.ndim != 2 or logits.shape[1] != model.spec.num_classes:
        raise KdigaError(f"The model returns outputs of shape {tuple(logits.shape)}, "
                         f"expected (batch, {model.spec.num_classes}) logits.")
    return {"format": fmt, "spec": model.spec.to_dict(), "params": models.count_parameters(model)}


def validate_dataset(dataset: dict[str, Any]) -> dict[str, Any]:
    """Load a dataset once; return its summary (classes, shapes, split sizes)."""
    return load_data(dataset).summary()


def load_data(dataset: dict[str, Any]) -> data_mod.DataBundle:
    """`dataset` is `{"kind": digits|cifar10|cifar100|npz|image_folder_zip, "path": ..., "meta": {...}}`."""
    meta = dict(dataset.get("meta") or {})
    return data_mod.load_dataset(dataset["kind"], dataset.get("path"), **meta)


def run_job(kind: str, spec: dict[str, Any], workdir: str | Path, *, dataset: dict[str, Any],
            teacher_path: str | Path | None = None, teacher_spec: dict[str, Any] | None = None,
            model_dir: str | Path | None = None, on_step: StepFn | None = None,
            should_cancel: Callable[[], bool] | None = None,
            on_checkpoint: Callable[[Path], None] | None = None, resume: bool = False,
            allow_torchscript: bool = False, teacher_cache_dir: str | Path | None = None,
            student_path: str | Path | None = None, student_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one job end to end in `workdir`; return artifacts (name -> path), metrics and the report.

    distill: teacher (teacher_path) -> student (spec["student"]) with spec["objective"].
    adversarial_train: a robust model from scratch (spec["student"] is its architecture).
    evaluate: the model in `model_dir` (a saved bundle) or the teacher file, against the teacher if both.

    `teacher_cache_dir`: where the teacher's evaluation is kept between jobs (the same teacher,
    points and settings give the same numbers, so a second student of one teacher skips it).
    `student_path` / `student_spec`: weights (an uploaded model of the same architecture as
    spec["student"]["arch"]) that initialise the student instead of a random draw.
    """
    if kind not in JOB_KINDS:
        raise KdigaError(f"Unknown job kind '{kind}'; valid names are: {', '.join(JOB_KINDS)}.")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    notify = on_step or (lambda _p: None)
    started = time.monotonic()
    data = load_data(dataset)
    teacher = _load_teacher(teacher_path, teacher_spec, data, allow_torchscript)
    cache = evaluate_mod.DirectoryReportCache(teacher_cache_dir) if teacher_cache_dir is not None else None
    if kind == "evaluate":
        result = _evaluate_only(spec, data, teacher, model_dir, workdir, notify, cache)
    else:
        initial = _load_initial_student(student_path, student_spec, spec.get("student") or {}, data,
                                        allow_torchscript)
        result = _train_and_report(kind, spec, data, teacher, workdir, notify,
                                   should_cancel, on_checkpoint, resume, cache, initial)
    result["metrics"]["wall_s"] = round(time.monotonic() - started, 2)
    return result


def _load_teacher(path, spec, data, allow_torchscript):
    if path is None:
        return None
    model_spec = ModelSpec.from_dict(spec) if spec and spec.get("arch") else None
    teacher = formats.load_model(path, model_spec, allow_torchscript=allow_torchscript)
    _check_compatible(teacher.spec, data, "teacher")
    return teacher.eval()


def _check_compatible(spec: ModelSpec, data: data_mod.DataBundle, role: str) -> None:
    data_shape = (data.in_chans, data.img_size, data.img_size)
    if tuple(spec.input_shape) != data_shape:
        raise KdigaError(f"The {role} expects inputs of shape {tuple(spec.input_shape)} "
                         f"but the dataset has {data_shape}.")
    if spec.num_classes != data.num_classes:
        raise KdigaError(f"The {role} has {spec.num_classes} classes but the dataset has {data.num_classes}.")


def _train_and_report(kind, spec, data, teacher, workdir, notify, should_cancel, on_checkpoint, resume, cache,
                      initial=None):
    objective = ObjectiveConfig.from_dict(spec.get("objective"))
    _check_method(kind, objective.method, teacher)
    train_cfg = TrainConfig.from_dict(spec.get("train"))
    student = initial if initial is not None else _build_student(spec.get("student") or {}, data)
    result = train(student, data, objective, train_cfg, teacher=teacher if kind == "distill" else None,
                   on_step=notify, should_cancel=should_cancel, checkpoint_dir=workdir / "checkpoint",
                   on_checkpoint=on_checkpoint, resume=resume)
    model = result.model.cpu().eval()
    eval_cfg = EvalConfig.from_dict(spec.get("evaluation"))
    report = _report(model, data, eval_cfg, teacher if kind == "distill" else None, notify, cache)
    name = "student" if kind == "distill" else "model"
    training = {"kind": kind, "objective": objective.to_dict(), "train": train_cfg.to_dict(),
                "dataset": data.name, "steps": result.steps, "seconds": round(result.seconds, 2)}
    headline = headline_metrics(report)
    artifacts = formats.save_model_bundle(model, workdir / "out", name=name, training=training,
                                          metrics=headline)
    artifacts = {Path(p).name: Path(p) for p in artifacts.values()}
    artifacts.update(_write_report(report, workdir / "out", spec, training))
    return {"artifacts": artifacts, "metrics": headline, "report": report,
            "model_spec": model.spec.to_dict(), "model_file": f"{name}.safetensors"}


def _check_method(kind: str, method: str, teacher) -> None:
    if kind == "distill":
        if method not in DISTILL_METHODS:
            raise KdigaError(f"Method '{method}' cannot distill; use one of: {', '.join(DISTILL_METHODS)}.")
        if teacher is None and method != "ce":
            raise KdigaError(f"Method '{method}' needs a teacher; give teacher_id.")
    elif method not in TEACHER_METHODS:
        raise KdigaError(f"Method '{method}' cannot train a model from scratch; "
                         f"use one of: {', '.join(TEACHER_METHODS)}.")


def _build_student(student: dict[str, Any], data: data_mod.DataBundle):
    if not student.get("arch"):
        raise KdigaError("The job needs student.arch, the architecture to train.")
    spec = ModelSpec(arch=student["arch"], num_classes=data.num_classes, in_chans=data.in_chans,
                     img_size=data.img_size, mean=student.get("mean"), std=student.get("std"),
                     class_names=tuple(data.class_names) if data.class_names else None)
    return models.build_model(spec)


def _load_initial_student(path, spec, student, data, allow_torchscript):
    """The uploaded weights that start the student's training, checked against student.arch, or None."""
    if path is None:
        return None
    model_spec = ModelSpec.from_dict(spec) if spec and spec.get("arch") else None
    model = formats.load_model(path, model_spec, allow_torchscript=allow_torchscript)
    arch = student.get("arch")
    if arch and model.spec.arch != arch:
        raise KdigaError(f"The student's initial weights (student.weights_id) are a '{model.spec.arch}' "
                         f"model but student.arch is '{arch}'; give the same architecture.")
    _check_compatible(model.spec, data, "student's initial model")
    if not any(p.requires_grad for p in model.parameters()):
        raise KdigaError("The student's initial weights (student.weights_id) have no trainable parameters "
                         "(an ONNX or TorchScript upload); upload safetensors weights instead.")
    return model.train()


def _evaluate_only(spec, data, teacher, model_dir, workdir, notify, cache):
    eval_cfg = EvalConfig.from_dict(spec.get("evaluation"))
    if model_dir is not None:
        model = formats.load_model_bundle(model_dir)
        _check_compatible(model.spec, data, "model")
        reference = teacher
    elif teacher is not None:
        model, reference = teacher, None
    else:
        raise KdigaError("An evaluate job needs a model: give model.teacher_id or model.job_id.")
    report = _report(model.eval(), data, eval_cfg, reference, notify, cache)
    artifacts = _write_report(report, workdir / "out", spec, {"kind": "evaluate", "dataset": data.name})
    return {"artifacts": artifacts, "metrics": headline_metrics(report), "report": report}


def _report(model, data, eval_cfg, teacher, notify, cache=None):
    device = resolve_device("auto")
    log.info("evaluating on %s", device)
    return evaluate_mod.evaluate(model, data, eval_cfg, teacher=teacher, on_progress=notify, teacher_cache=cache)


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
                  training: dict[str, Any]) -> dict[str, Path]:
    from kdiga_core.report_html import render_report_html

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    _atomic_write(json_path, json.dumps(report, indent=2, sort_keys=True))
    context = {"job": training, "evaluation": spec.get("evaluation") or {}}
    _atomic_write(html_path, render_report_html(report, title="KDIGA robustness report", context=context))
    return {"report.json": json_path, "report.html": html_path}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
