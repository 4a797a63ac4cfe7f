"""The training loop: one function that reads top to bottom (nanoGPT-style, style.md habit 9).

`train` fits a student (or a teacher, for pgd_at/trades) with any objective from
`kdiga_core.objectives`. It knows nothing about databases or queues: progress goes out through
`on_step`, cancellation comes in through `should_cancel`, and checkpoints are two plain files
(safetensors + JSON, no pickle) written after every epoch and, with `checkpoint_every_s`, also
inside an epoch, from which `resume=True` continues bit-identically on CPU. `should_stop` ends a
run at a safe point (after such a checkpoint) with `StoppedError`: a time budget, not a failure.

Everything random (shuffling, augmentation, attack starts, input noise) draws from one CPU
`torch.Generator` seeded from `TrainConfig.seed`, whose state is part of the checkpoint; the
learning rate is a pure function of the global step. Together they make a resumed run replay
exactly what an uninterrupted run would have done. A checkpoint written inside an epoch also keeps
the generator's state at the start of that epoch (to draw the same permutation again), the step
within the epoch and the epoch's running sums, so a run resumed there sees the same batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kdiga_core import cache_policy, distributed, teacher_bank
from kdiga_core.batches import ResumePoint, as_input, batch_source
from kdiga_core.config import ObjectiveConfig, TrainConfig
from kdiga_core.data import pixels
from kdiga_core.errors import CancelledError, KdigaError, StoppedError
from kdiga_core.objectives import build_objective

__all__ = ["TrainResult", "train", "resolve_device", "lr_at", "save_checkpoint", "load_checkpoint"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "kdiga.checkpoint/1"
WEIGHTS_FILE, META_FILE = "last.safetensors", "last.json"


@dataclass
class TrainResult:
    """What `train` returns: the trained model (in eval mode), one dict per epoch, and totals."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    resumed_from_step: int = 0  # the global step a resumed run started from (0: from scratch)


# ----------------------------------------------------------------------------- device and schedule


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → the first CUDA device when there is one, else CPU; 'cpu', 'cuda', 'cuda:N' as asked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdigaError(f"Device '{name}' was requested but no CUDA GPU is available.")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise KdigaError(f"Unknown device '{name}'; use auto, cpu, cuda or cuda:N.") from exc


def _use_all_cores() -> None:
    """On CPU, one intra-op thread per core this process may run on (cgroups/taskset aware).

    An explicit OMP_NUM_THREADS wins: the operator (or a test) has already chosen.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate before optimizer step `step` (0-based): a pure function, so resume is exact.

    cosine: lr·½(1 + cos(π·t)); step: lr·step_gamma^(number of milestones passed); t = step/total.
    """
    t = step / max(1, total_steps)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** sum(t >= m for m in cfg.step_milestones)
    return cfg.lr


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _autocast(device: torch.device, cfg: TrainConfig) -> contextlib.AbstractContextManager:
    # bf16 only on CUDA: CPU bf16 is slower than fp32 on most CPUs and changes results
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- checkpoints


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary sibling, then rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split the optimizer state into tensors (for safetensors) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, meta: dict[str, Any],
                    extra: dict[str, Tensor] | None = None) -> None:
    """Write last.safetensors (model, optimizer and RNG tensors) then last.json, each atomically.

    The JSON is written second and names the same global step as the safetensors metadata, so a
    crash between the two renames is detected on load instead of mixing two epochs. `extra`:
    more tensors (named ``rng.*``), e.g. the generator's state at the start of the epoch.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    optim_tensors, optim_meta = _optimizer_tensors(optimizer)
    tensors.update(optim_tensors)
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors.update(extra or {})
    # clone: safetensors refuses tensors that share storage (tied weights) or are not contiguous
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    step = str(meta["global_step"])
    _atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"global_step": step}))
    body = json.dumps({"format": CHECKPOINT_FORMAT, **meta, "optimizer": optim_meta}, indent=1)
    _atomic_write(directory / META_FILE, lambda p: p.write_text(body))


def load_checkpoint(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> dict[str, Any] | None:
    """Restore model, optimizer and RNG state from `directory`; None when there is no checkpoint.

    A checkpoint written inside an epoch also returns the generator's state at that epoch's start
    as ``meta["epoch_rng"]``.
    """
    directory = Path(directory)
    if not (directory / META_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
        return None
    meta = json.loads((directory / META_FILE).read_text())
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
        saved_step = (f.metadata() or {}).get("global_step")
    if meta.get("format") != CHECKPOINT_FORMAT or saved_step != str(meta.get("global_step")):
        raise KdigaError("The checkpoint files are inconsistent or from another version; start without resume.")
    tensors = load_file(str(directory / WEIGHTS_FILE))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    if "rng.epoch_start" in tensors:
        meta["epoch_rng"] = tensors["rng.epoch_start"]
    return meta


def _check_same_run(meta: dict[str, Any], obj_cfg: ObjectiveConfig, train_cfg: TrainConfig,
                    world_size: int = 1) -> None:
    """A resumed run must use the configuration it was started with (the schedule depends on it)."""
    same = lambda a, b: json.loads(json.dumps(a)) == json.loads(json.dumps(b))  # noqa: E731 -- tuples vs lists
    if meta.get("world_size", 1) != world_size:
        raise KdigaError(f"The checkpoint was made on {meta.get('world_size', 1)} devices, not {world_size}; "
                         "start without resume.")
    # a field added since the checkpoint was written counts as its default
    saved_train = {k: v for k, v in {**TrainConfig().to_dict(), **meta["train"]}.items() if k != "device"}
    wanted_train = {k: v for k, v in train_cfg.to_dict().items() if k != "device"}
    saved_objective = {**ObjectiveConfig().to_dict(), **meta["objective"]}
    if not (same(saved_objective, obj_cfg.to_dict()) and same(saved_train, wanted_train)):
        raise KdigaError("The checkpoint was made with a different configuration; start without resume.")


# ----------------------------------------------------------------------------- the loop


def train(
    student: nn.Module,
    data: Any,
    obj_cfg: ObjectiveConfig,
    train_cfg: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    checkpoint_dir: str | Path | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    teacher_cache_budget: int | None = None,
    should_stop: Callable[[], str | None] | None = None,
    checkpoint_every_s: float | None = None,
    shared_bank: teacher_bank.TeacherBank | None = None,
) -> TrainResult:
    """Train `student` on `data.x_train`/`data.y_train` with the objective `obj_cfg.method`.

    Args:
        student: model taking [0, 1] pixels; trained in place (and moved to the device).
        data: a `DataBundle` (x_train, y_train tensors; uint8 or float pixels) or a dataset read in
            place (`data_stream.ReferenceData`, streamed); `batches.batch_source` picks the path.
        obj_cfg: the loss and its hyperparameters.
        train_cfg: epochs, optimizer, schedule, batch size, seed, device.
        teacher: frozen teacher for kd/kdiga/ard/rslad.
        on_step: called after every optimizer step with the progress dict of docs/contracts.md.
        should_cancel: checked before every step; True raises `CancelledError`.
        checkpoint_dir: where last.safetensors/last.json go after each epoch (None: no checkpoints).
        on_checkpoint: called with `checkpoint_dir` after each checkpoint (e.g. to upload it).
        resume: continue from the checkpoint in `checkpoint_dir` when there is one.
        stop_after_epoch: return after this epoch of the schedule (the schedule still spans
            `train_cfg.epochs`); with `checkpoint_dir` and `resume`, a later call continues it.
            The γ sweep uses this to score trials at the rungs of successive halving.
        teacher_cache_budget: host bytes the teacher cache may take (`cache_policy`; None: its default).
        should_stop: checked after every step (on several devices: after every epoch); a sentence
            (why) stops the run: a checkpoint is written, then `StoppedError` is raised, and a
            later call with `resume` continues from that step.
        checkpoint_every_s: also write a checkpoint inside an epoch once this many seconds have
            passed since the last one (one device only; on several, epoch ends only).
        shared_bank: a teacher bank the caller built over these same rows with this job's K,
            padding, flips and seed (`teacher_bank.build_beside`); used instead of building one,
            and left open (the γ sweep's trials share one).

    Returns:
        TrainResult with the student in eval mode and per-epoch history.
    """
    ctx = distributed.context()  # DDP: rank facts; world size 1 without torchrun
    distributed.check_supported(obj_cfg, ctx)
    device = ctx.device if ctx.distributed else resolve_device(train_cfg.device)
    if device.type == "cpu" and not ctx.distributed:
        _use_all_cores()
    generator = torch.Generator().manual_seed(train_cfg.seed)
    torch.manual_seed(train_cfg.seed)  # only dropout-like layers draw from the global RNG

    student.to(device)
    if device.type == "cuda":
        student.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device)  # DDP: replicated on every rank, never wrapped (it has no gradient)
        if device.type == "cuda":  # its first-order side runs under the step's bf16 autocast
            teacher.to(memory_format=torch.channels_last)
    model = distributed.wrap(student, ctx)  # DDP: the objective trains through the wrapper
    objective = build_objective(obj_cfg, model, teacher, generator=generator)
    optimizer = _make_optimizer(student, train_cfg)

    source = batch_source(data, train_cfg, device=device, ctx=ctx)  # in memory, or a streaming DataLoader
    steps_per_epoch = source.steps_per_epoch
    total_steps = train_cfg.epochs * steps_per_epoch
    lr_scale = distributed.lr_scale(train_cfg, ctx.world_size)
    history: list[dict[str, float]] = []
    start_epoch, global_step, seconds_before = 0, 0, 0.0
    partial: dict[str, Any] | None = None  # where a checkpoint written inside an epoch left it

    if resume and checkpoint_dir is not None:
        meta = load_checkpoint(checkpoint_dir, model=student, optimizer=optimizer, generator=generator)
        if meta is not None:
            _check_same_run(meta, obj_cfg, train_cfg, ctx.world_size)
            start_epoch, global_step = meta["epoch"], meta["global_step"]
            history, seconds_before = meta["history"], meta["seconds"]
            partial = {**meta["partial"], "rng": meta["epoch_rng"]} if meta.get("partial") else None
            log.info("resuming from epoch %d (step %d)", start_epoch, global_step)
    resumed_from = global_step

    # Without augmentation the teacher sees the same inputs every epoch: compute it once, where it fits
    # (not for a run resumed after its last epoch: only its evaluation is left).
    use_cache = start_epoch < train_cfg.epochs and cache_policy.plan(
        objective, obj_cfg, train_cfg, source, budget_bytes=teacher_cache_budget).use
    if use_cache:
        source.precompute_teacher(objective, batch_size=max(256, train_cfg.batch_size))
    # With pad-crop-flip augmentation on in-memory rows: K fixed augmentations per sample, the teacher
    # run over them once (kdiga_core.teacher_bank); streaming and other presets recompute the teacher.
    # `shared_bank`: one built by the caller over these same rows (the γ sweep's trials share it)
    bank, own_bank = None, False
    if not source.streaming and train_cfg.preset == "cifar":
        if shared_bank is not None and obj_cfg.teacher_bank_k and objective.teacher is not None:
            objective.cache = bank = shared_bank
        else:
            bank = teacher_bank.for_training(objective, source.x, source.y, k=obj_cfg.teacher_bank_k,
                                             augment=True, hflip=train_cfg.hflip, seed=train_cfg.seed,
                                             device=device, checkpoint_dir=checkpoint_dir, rank=ctx.rank)
            own_bank = bank is not None

    started, session_steps = time.perf_counter(), 0
    last_saved = time.monotonic()
    mid_epoch = checkpoint_dir is not None and not ctx.distributed  # DDP: other ranks' RNGs are not saved

    def checkpoint(epoch_done: int, extra: dict[str, Tensor] | None = None, **more: Any) -> None:
        nonlocal last_saved
        if checkpoint_dir is not None and ctx.is_main:  # DDP: rank 0 alone writes
            meta = {"epoch": epoch_done, "global_step": global_step, "objective": obj_cfg.to_dict(),
                    "train": train_cfg.to_dict(), "history": history, "world_size": ctx.world_size,
                    "seconds": seconds_before + time.perf_counter() - started, **more}
            save_checkpoint(checkpoint_dir, model=student, optimizer=optimizer, generator=generator, meta=meta,
                            extra=extra)
            if on_checkpoint is not None:
                on_checkpoint(Path(checkpoint_dir))
        last_saved = time.monotonic()

    for epoch in range(start_epoch, train_cfg.epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        student.train()
        watch = _LossWatch(device, epoch=epoch + 1, check=not ctx.distributed)
        distributed.seed_epoch(generator, seed=train_cfg.seed, epoch=epoch, ctx=ctx)
        # the generator's state before the epoch's order is drawn (in memory: the first draw of `epoch`)
        epoch_rng = partial["rng"] if partial is not None else generator.get_state()
        sums, correct, seen, micro, skip, seconds_in = _epoch_sums(partial, device)
        # resumed inside the epoch: the same order again, from the step after the checkpoint's
        batches = source.epoch(epoch, generator, None if partial is None else ResumePoint(
            skip, order_state=partial["rng"], batches=partial.get("batches")))
        partial = None
        epoch_started = time.perf_counter() - seconds_in
        lr = lr_at(train_cfg, max(global_step - 1, 0), total_steps) * lr_scale  # no step left: the last one's
        for step, micro_batches in enumerate(batches, start=skip + 1):
            if distributed.agree(should_cancel, ctx):  # rank 0 asks, every rank stops at this step
                raise CancelledError("Training was cancelled.")
            lr = lr_at(train_cfg, global_step, total_steps) * lr_scale
            for group in optimizer.param_groups:
                group["lr"] = lr

            optimizer.zero_grad(set_to_none=True)
            for i, (x, y, index) in enumerate(micro_batches):
                with distributed.sync_on(model, last=i == len(micro_batches) - 1):  # DDP: one all-reduce a step
                    out = _micro_step(objective, source, x, y, index, train_cfg, generator,
                                      progress=min(1.0, global_step / total_steps),
                                      cached=use_cache, scale=len(micro_batches), step=global_step, bank=bank)
                # keep running sums on the device: the host reads them only when progress is due
                parts = {k: v.detach() if isinstance(v, Tensor) else v for k, v in out.items() if k != "logits"}
                for key, v in parts.items():
                    sums[key] = sums.get(key, 0.0) + torch.as_tensor(v, device=device, dtype=torch.float32).detach()
                watch.add(parts, global_step + 1)
                correct += (out["logits"].argmax(1) == y).sum()
                seen, micro = seen + len(y), micro + 1
            optimizer.step()
            global_step += 1
            session_steps += 1

            if step == 1 or step == steps_per_epoch or watch.due():  # one device sync, not one per step
                watch.read()
            if on_step is not None and ctx.is_main:
                elapsed = time.perf_counter() - started
                on_step({
                    "phase": "train", "epoch": epoch + 1, "epochs": train_cfg.epochs, "step": step,
                    "steps_per_epoch": steps_per_epoch, "global_step": global_step, "total_steps": total_steps,
                    "percent": min(100.0, 100.0 * global_step / total_steps),
                    "eta_s": elapsed / session_steps * (total_steps - global_step), "lr": lr,
                    **watch.values,
                })

            if step < steps_per_epoch and not ctx.distributed:  # DDP: at the epoch's end below
                why = should_stop() if should_stop is not None else None
                if why or (mid_epoch and checkpoint_every_s and time.monotonic() - last_saved >= checkpoint_every_s):
                    checkpoint(epoch, {"rng.epoch_start": epoch_rng}, partial={
                        "step": step, "sums": {k: float(v) for k, v in sums.items()}, "correct": float(correct),
                        "seen": seen, "micro": micro, "batches": source.batches_done,
                        "seconds": time.perf_counter() - epoch_started})
                if why:
                    raise StoppedError(_stopped(why, global_step, total_steps))

        if watch.pending:  # the epoch's last steps are checked even if no progress read fell after them
            watch.read()
        # DDP: checked once per epoch, on every rank alike (a NaN on one rank makes every sum NaN)
        totals = distributed.all_reduce_sums({**sums, "_correct": correct, "_seen": seen, "_micro": micro}, ctx)
        if ctx.distributed:
            watch.check_totals(totals)
        record = {"epoch": epoch + 1, "lr": lr, "seconds": time.perf_counter() - epoch_started,
                  "train_accuracy": totals.pop("_correct") / totals.pop("_seen"),
                  **{k: v / totals["_micro"] for k, v in totals.items() if k != "_micro"}}
        history.append(record)
        log.info("epoch %d/%d %s", epoch + 1, train_cfg.epochs, record)
        checkpoint(epoch + 1)
        more = epoch + 1 < min(train_cfg.epochs, stop_after_epoch or train_cfg.epochs)
        if more and (why := _agreed_stop(should_stop, ctx)):  # DDP: rank 0 decides, every rank stops
            raise StoppedError(_stopped(why, global_step, total_steps))

    if bank is not None and own_bank:
        bank.close()
    distributed.broadcast_model(student, ctx)  # DDP: every rank returns rank 0's model, running stats included
    student.eval()
    return TrainResult(model=student, history=history, steps=global_step,
                       seconds=seconds_before + time.perf_counter() - started, resumed_from_step=resumed_from)


def _epoch_sums(partial: dict[str, Any] | None,
                device: torch.device) -> tuple[dict[str, Tensor], Tensor, int, int, int, float]:
    """(loss sums, correct, seen, micro-batches, steps done, seconds) of the epoch so far: zeros, or
    what a checkpoint inside the epoch recorded (float32 values, so the sums continue exactly)."""
    if partial is None:
        return {}, torch.zeros((), device=device), 0, 0, 0, 0.0
    as32 = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
    return ({k: as32(v) for k, v in partial["sums"].items()}, as32(partial["correct"]), int(partial["seen"]),
            int(partial["micro"]), int(partial["step"]), float(partial["seconds"]))


def _agreed_stop(should_stop: Callable[[], str | None] | None, ctx: Any) -> str | None:
    """Rank 0's `should_stop()`, on every rank (one broadcast at an epoch's end)."""
    why = should_stop() if should_stop is not None and ctx.is_main else None
    if not ctx.distributed:
        return why
    return (why or "The job reached its time budget") if distributed.agree(lambda: bool(why), ctx) else None


def _stopped(why: str, global_step: int, total_steps: int) -> str:
    return (f"{why.rstrip('.')}; training stopped after step {global_step} of {total_steps} and saved a "
            "checkpoint, and resuming the job continues from there.")


def _micro_step(objective: Any, source: Any, x: Tensor, y: Tensor, index: Tensor | None, train_cfg: TrainConfig,
                generator: torch.Generator, *, progress: float, cached: bool, scale: int, step: int = 0,
                bank: Any = None) -> dict[str, Any]:
    """Forward and backward of one micro-batch; the loss is divided by the micro-batches of its step."""
    if bank is not None and index is not None:  # replay the banked augmentation; teacher outputs by bank row
        x, index = bank.replay(pixels(x), index, generator)
        x, cached = as_input(x), True
    else:
        x = as_input(source.augment(pixels(x), generator))  # uint8 rows become floats here, on the device
    if x.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(x.device, train_cfg):
        out = objective(x, y, progress=progress, index=index if cached else None, step=step)
    (out["loss"] / scale if scale > 1 else out["loss"]).backward()
    return out


# How often the host reads the loss parts (one device sync) for progress and the non-finite check.
PROGRESS_READ_S = 1.0


class _LossWatch:
    """The loss parts of one epoch, kept on the device and read only when progress is due.

    Reading a CUDA scalar waits for the GPU, so reading every part every step (``float(loss)``)
    serialises the host and the device. Instead each step adds a few tiny device ops: the latest
    values, and per part the first step whose value was not finite. `read` fetches both (one sync)
    and, unless `check` is off (DDP: see `check_totals`), fails with a sentence naming that step.
    """

    def __init__(self, device: torch.device, *, epoch: int, check: bool = True):
        self.device, self.epoch, self.check = device, epoch, check
        self.keys: tuple[str, ...] = ()
        self.latest: Tensor | None = None
        self.first_bad: Tensor | None = None  # per part: first global step with a non-finite value, or -1
        self.bad_value: Tensor | None = None
        self.plain: dict[str, float] = {}  # parts that are Python numbers (e.g. γ) need no device
        self.values: dict[str, float] = {}
        self.last_read = time.perf_counter()
        self.pending = False  # steps added since the last read

    def add(self, parts: dict[str, Any], step: int) -> None:
        tensors = {k: v for k, v in parts.items() if isinstance(v, Tensor)}
        self.plain = {k: float(v) for k, v in parts.items() if not isinstance(v, Tensor)}
        keys = tuple(tensors)
        if keys != self.keys and self.latest is not None:
            self.read()  # the objective changed its parts: settle the old ones first
        if keys != self.keys or self.first_bad is None:
            self.keys = keys
            self.first_bad = torch.full((len(keys),), -1, dtype=torch.int64, device=self.device)
            self.bad_value = torch.zeros(len(keys), device=self.device)
        self.pending = True
        if not keys:
            return
        latest = torch.stack([t.reshape(()).to(self.device, torch.float32) for t in tensors.values()])
        newly_bad = ~torch.isfinite(latest) & (self.first_bad < 0)
        self.first_bad = torch.where(newly_bad, step, self.first_bad)
        self.bad_value = torch.where(newly_bad, latest, self.bad_value)  # type: ignore[arg-type]
        self.latest = latest

    def due(self) -> bool:
        return time.perf_counter() - self.last_read >= PROGRESS_READ_S

    def read(self) -> None:
        """Fetch the latest values (one device sync); raise if a part was ever not finite."""
        self.last_read, self.pending = time.perf_counter(), False
        if self.latest is not None and self.first_bad is not None:
            self.values = dict(zip(self.keys, self.latest.tolist(), strict=True))
            if self.check:
                self._raise_if_bad(self.first_bad.tolist())
        self.values.update(self.plain)

    def check_totals(self, totals: dict[str, float]) -> None:
        """DDP: the epoch's all-reduced sums; every rank sees the same ones, so all stop together."""
        if all(math.isfinite(v) for v in totals.values()):
            return
        if self.first_bad is not None:
            self._raise_if_bad(self.first_bad.tolist())
        part = next(k for k, v in totals.items() if not math.isfinite(v))
        raise KdigaError(f"Training stopped in epoch {self.epoch}: the loss part '{part}' was not finite on "
                         "another device; lower the learning rate, or check the data and the teacher.")

    def _raise_if_bad(self, first_bad: list[int]) -> None:
        # the earliest step; at a tie, a named part (ce, kd, iga, ...) says more than their sum 'loss'
        bad = [(step, key == "loss", i, key) for i, (step, key) in enumerate(zip(first_bad, self.keys, strict=True))
               if step >= 0]
        if not bad:
            return
        step, _, i, key = min(bad)
        value = float(self.bad_value[i]) if self.bad_value is not None else math.nan
        raise KdigaError(f"Training stopped at step {step} (epoch {self.epoch}): the loss part '{key}' was {value} "
                         "(not finite); lower the learning rate, or check the data and the teacher.")
