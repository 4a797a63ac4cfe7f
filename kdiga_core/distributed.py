"""One job on many devices: torch.distributed set-up, rank facts, sharding and reductions.

A job on several devices runs one process per device ("rank"), started by torchrun (the worker's
`worker.torchrun`); each process calls `init_from_env` once and then the same library code as a
one-device job. The training loop asks `context()` and uses the helpers below, so without
torchrun (world size 1) every helper is the identity and nothing changes.

What DDP changes, and why it is done this way (measured with 2 gloo ranks on CPU; the numbers
are reproduced by ``tests/core/test_distributed.py``):

- The student is wrapped in `DistributedDataParallel` with ``static_graph=False``. With
  ``static_graph=True`` DDP silently skips the gradient all-reduce once ``torch.autograd.grad``
  on the inputs runs inside the step (KDIGA's input gradient, the inner PGD of ARD/RSLAD): the
  gradients of a cnn_tiny student after 2 steps then have cosine 0.91 (exact IGA) and 0.28
  (finite difference) to a single process on the concatenated batch, against 1.0000 with
  ``static_graph=False`` (issue 12 measured 0.75 on another student).
- The teacher is replicated on every rank, without a DDP wrapper: it is frozen, so there is no
  gradient of its to reduce.
- IGA is reduced per sample (a mean over the batch, which DDP's gradient average splits
  exactly). The author's reduction, one Frobenius norm over the whole batch divided by B², is
  not a mean over samples, so it depends on the number of ranks: `check_supported` refuses it.
- BatchNorm normalises with each rank's own batch statistics (SyncBatchNorm has no double
  backward, pytorch#61222); DDP broadcasts rank 0's running statistics at every forward, so the
  model that is saved and evaluated is rank 0's. With BatchNorm a DDP step is therefore not the
  step of one process on the concatenated batch (gradient cosine 0.29 on resnet_small, exact IGA,
  8 images per rank); BENCHMARKS.md ("ddp: per-rank BatchNorm") has the measured effect on the
  student's accuracy.
- Evaluation is shared out too: each rank measures every world-th point, and the accuracies,
  means over points, are gathered as point-weighted means (`combine_model_report`).
- FSDP has no double backward (pytorch PR #120926) and torch.compile drops higher-order graphs
  (pytorch#181581): neither is used on the exact-IGA path.

`batch_size` is per device; one optimizer step sees ``batch_size × world_size ×
grad_accum_steps`` samples (`batch_plan`), and ``lr_scaling`` says whether the learning rate
follows that multiple (linear, Goyal et al. 2017; sqrt, Krizhevsky 2014) or stays as given.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from kdiga_core.config import ObjectiveConfig, TrainConfig
from kdiga_core.errors import KdigaError

__all__ = [
    "RankContext", "accumulation_groups", "agree", "all_reduce_min", "all_reduce_sums", "batch_plan",
    "broadcast_model", "check_supported", "combine_model_report", "context", "epoch_order", "evaluation_share",
    "init_from_env", "is_main", "lr_scale", "precompute_teacher", "sampler", "seed_epoch", "steps_per_epoch",
    "sync_on", "teardown", "wrap",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; a hung collective ends the attempt after this


@dataclass(frozen=True)
class RankContext:
    """Where this process stands in its job: rank, world size, backend and device.

    Attributes:
        rank: This process's rank (0 is the main rank, the only one that writes anything).
        world_size: Number of processes (devices) of the job.
        local_rank: Rank on this node (the GPU index under NCCL).
        local_world_size: Processes on this node.
        backend: ``nccl``, ``gloo``, or None for a job without torch.distributed.
        device: The device this rank trains on (None without torch.distributed).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: torch.device | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def describe(self) -> dict[str, Any]:
        """The facts a report records: world size, nodes, devices per node, backend."""
        return {"world_size": self.world_size, "nodes": self.nodes, "devices_per_node": self.local_world_size,
                "backend": self.backend or "none"}


# ----------------------------------------------------------------------------- set-up


def context() -> RankContext:
    """This process's `RankContext` (world size 1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return RankContext()
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return RankContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
                       backend=backend, device=device)


def is_main() -> bool:
    """True on rank 0, and in any process without torch.distributed."""
    return context().is_main


def init_from_env(device: str = "auto", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> RankContext:
    """Join the job's process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...).

    Args:
        device: The job's ``train.device``: ``auto`` takes NCCL with one GPU per local rank when
            CUDA is there, else gloo with one CPU process per "device"; ``cpu`` forces gloo.
        timeout_s: How long a collective may wait for its peers before it fails (a dead host or
            a hung rank then ends the attempt for every rank instead of blocking it for ever).

    Raises:
        KdigaError: A GPU was asked for and this node has fewer GPUs than local ranks.
    """
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    backend = _backend_for(device, local_world)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    else:
        _share_cores(local_world)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=torch.device("cuda", local_rank) if backend == "nccl" else None)
    ctx = context()
    log.info("joined the process group: rank %d of %d (%s on %s)", ctx.rank, ctx.world_size, backend, ctx.device)
    return ctx


def _backend_for(device: str, local_world: int) -> str:
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "gloo"
    if device not in ("auto", "cuda"):
        raise KdigaError(f"train.device '{device}' names one device; a job on several devices takes "
                         "'auto', 'cuda' or 'cpu' and gives each rank its own.")
    gpus = torch.cuda.device_count()
    if gpus < local_world:
        raise KdigaError(f"The job asks for {local_world} devices per node but this node has {gpus} GPUs.")
    return "nccl"


def _share_cores(local_world: int) -> None:
    """On CPU, split this node's cores between its ranks (an explicit OMP_NUM_THREADS wins)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, local_world)))


def teardown() -> None:
    """Leave the process group (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- checks and batch plan


AUTHOR_ON_DEVICES = ("iga_reduction 'author' divides one norm over the whole batch by its squared size, which "
                     "cannot be split across devices; use 'per_sample' for a job on several devices.")
SWEEP_ON_DEVICES = ("objective.gamma 'auto' (the default) chooses γ by a sweep that runs on one device; give "
                    "objective.gamma a number for a job on several devices, e.g. the γ a one-device job chose.")


def check_supported(obj_cfg: ObjectiveConfig, ctx: RankContext) -> None:
    """Refuse what cannot be split across ranks (see the module docstring).

    The γ sweep (kdiga_core.sweep) keeps one Optuna journal in the job's checkpoint folder and trains
    its trials one after another; its ranks would share the journal, so it is not run under DDP.
    """
    if not ctx.distributed or obj_cfg.method != "kdiga":
        return
    if obj_cfg.iga_reduction == "author":
        raise KdigaError(AUTHOR_ON_DEVICES)
    if obj_cfg.sweeps_gamma:
        raise KdigaError(SWEEP_ON_DEVICES)


def lr_scale(train_cfg: TrainConfig, world_size: int) -> float:
    """The learning rate's multiplier: 1, or the effective batch's multiple of ``batch_size`` (linear, sqrt)."""
    multiple = world_size * train_cfg.grad_accum_steps
    if train_cfg.lr_scaling == "linear":
        return float(multiple)
    if train_cfg.lr_scaling == "sqrt":
        return math.sqrt(multiple)
    return 1.0


def batch_plan(train_cfg: TrainConfig, ctx: RankContext | None = None) -> dict[str, Any]:
    """What one optimizer step sees and the learning rate it uses, for the report."""
    ctx = ctx or context()
    scale = lr_scale(train_cfg, ctx.world_size)
    return {**ctx.describe(), "per_device_batch_size": train_cfg.batch_size,
            "grad_accum_steps": train_cfg.grad_accum_steps,
            "effective_batch_size": train_cfg.batch_size * ctx.world_size * train_cfg.grad_accum_steps,
            "lr": train_cfg.lr, "lr_scaling": train_cfg.lr_scaling, "effective_lr": train_cfg.lr * scale}


# ----------------------------------------------------------------------------- the model


def wrap(model: nn.Module, ctx: RankContext) -> nn.Module:
    """`model` in DistributedDataParallel when there are several ranks, else `model` itself.

    ``static_graph=False`` on purpose: see the module docstring (measured, silently wrong when on).
    """
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device is not None and ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, static_graph=False)


def sync_on(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Gradient accumulation: skip DDP's all-reduce on every micro-batch of a step but the last."""
    if last or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


# ----------------------------------------------------------------------------- data


def sampler(dataset: Any, *, seed: int, shuffle: bool = True, ctx: RankContext | None = None,
            drop_last: bool = False) -> DistributedSampler | None:
    """A `DistributedSampler` giving this rank its shard of `dataset`, or None for one rank.

    For a DataLoader: call ``set_epoch(epoch)`` on it before each epoch. Every rank gets the same
    number of samples (a few are repeated when the size does not divide), so the ranks take the
    same number of steps and their collectives pair up.
    """
    ctx = ctx or context()
    if not ctx.distributed:
        return None
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed,
                              drop_last=drop_last)


def epoch_order(n: int, *, epoch: int, seed: int, generator: torch.Generator, ctx: RankContext) -> Tensor:
    """The in-memory path's sample order for one epoch: this rank's shard, shuffled.

    One rank: a permutation drawn from `generator` (what a resumed run replays). Several: the
    `DistributedSampler` shard for (seed, epoch), a pure function of them.
    """
    if not ctx.distributed:
        return torch.randperm(n, generator=generator)
    shard = sampler(range(n), seed=seed, ctx=ctx)
    assert shard is not None
    shard.set_epoch(epoch)
    return torch.tensor(list(shard), dtype=torch.long)


def steps_per_epoch(n: int, train_cfg: TrainConfig, ctx: RankContext) -> int:
    """Optimizer steps in one epoch of `n` samples: this rank's shard in micro-batches, grouped."""
    shard = math.ceil(n / ctx.world_size)
    return math.ceil(math.ceil(shard / train_cfg.batch_size) / train_cfg.grad_accum_steps)


def accumulation_groups(order: Tensor, train_cfg: TrainConfig) -> Iterator[list[Tensor]]:
    """The micro-batches of `order`, ``grad_accum_steps`` at a time (the last group may be shorter)."""
    micro = list(order.split(train_cfg.batch_size))
    k = train_cfg.grad_accum_steps
    for start in range(0, len(micro), k):
        yield micro[start:start + k]


def seed_epoch(generator: torch.Generator, *, seed: int, epoch: int, ctx: RankContext) -> None:
    """Several ranks: reseed each rank's generator per epoch, so ranks draw different noise and a
    run resumed at an epoch boundary draws what it would have drawn. One rank: untouched (its
    state is in the checkpoint)."""
    if ctx.distributed:
        generator.manual_seed(((seed * 1_000_003) + epoch) * 4_096 + ctx.rank)


def precompute_teacher(objective: Any, x: Tensor, y: Tensor, *, batch_size: int, ctx: RankContext) -> None:
    """`objective.precompute_teacher` over the whole set, each rank computing a 1/world part.

    The parts are gathered so every rank holds the whole cache (a rank's shard changes every
    epoch): the teacher pass costs 1/world of one process's instead of a full pass per rank.
    """
    if not ctx.distributed:
        objective.precompute_teacher(x, y, batch_size=batch_size)
        return
    n, world = len(x), ctx.world_size
    per = math.ceil(n / world)
    rows = torch.arange(world * per).clamp(max=n - 1)[ctx.rank * per:(ctx.rank + 1) * per]
    objective.precompute_teacher(x[rows.to(x.device)], y[rows.to(y.device)], batch_size=batch_size)
    cache = objective.cache
    if cache is None:
        return
    cache.logits = _all_gather_rows(cache.logits, ctx)[:n]
    if cache.grads is not None:
        cache.grads = _all_gather_rows(cache.grads, ctx)[:n]


def _all_gather_rows(part: Tensor, ctx: RankContext) -> Tensor:
    """Gather host rows (any dtype) through the backend's device in float32; back on the host as they were."""
    sent = part.to(ctx.device, torch.float32).contiguous()
    parts = [torch.empty_like(sent) for _ in range(ctx.world_size)]
    dist.all_gather(parts, sent)
    return torch.cat(parts).to(part.device, part.dtype)


# ----------------------------------------------------------------------------- evaluation


def evaluation_share(index: Tensor, n_all: int, ctx: RankContext) -> Tensor:
    """This rank's part of `index` (positions among `n_all` evaluation points): every world-th one
    from its rank. All of it on one rank, and on every rank when there are fewer points than ranks
    (then `combine_model_report` is the identity and no rank waits for another)."""
    if not ctx.distributed or n_all < ctx.world_size:
        return index
    return index[ctx.rank::ctx.world_size]


def combine_model_report(rep: dict[str, Any], n_mine: int, n_smoothing: int, ctx: RankContext,
                         n_all: int) -> dict[str, Any]:
    """One model's report measured on each rank's share, made the report of all the points.

    Every accuracy in it (clean, per attack, AutoAttack's stages, the ε-curve, smoothing's certified
    accuracies and mean radius) is a mean over points, so the whole set's is the mean of the ranks'
    weighted by their points (one all-reduce); smoothing's count adds up.
    """
    if not ctx.distributed or n_all < ctx.world_size:
        return rep
    slots = _accuracy_slots(rep)
    smoothing = rep.get("smoothing") or {}
    weighted = {f"{i:06d}": container[key] * (n_smoothing if in_smoothing else n_mine)
                for i, (container, key, in_smoothing) in enumerate(slots)}
    sums = all_reduce_sums({**weighted, "n": n_mine, "n_smoothing": n_smoothing}, ctx)
    for i, (container, key, in_smoothing) in enumerate(slots):
        total = sums["n_smoothing"] if in_smoothing else sums["n"]
        container[key] = sums[f"{i:06d}"] / total if total else container[key]
    if smoothing:
        smoothing["n_points"] = int(sums["n_smoothing"])
    return rep


def _accuracy_slots(rep: dict[str, Any]) -> list[tuple[dict[str, Any], str, bool]]:
    """(container, key, belongs to smoothing) of every point-averaged number of a model's report,
    in the same order on every rank."""
    slots: list[tuple[dict[str, Any], str, bool]] = [(rep, "clean_accuracy", False)]
    slots += [(rep["attacks"], key, False) for key in sorted(rep.get("attacks") or {})]
    slots += [(stage, "robust_accuracy", False) for stage in rep.get("autoattack_breakdown") or []]
    slots += [(point, "accuracy", False) for point in rep.get("eps_curve") or []]
    smoothing = rep.get("smoothing") or {}
    if smoothing:
        slots += [(smoothing, "certified_accuracy", True), (smoothing, "mean_radius", True)]
        slots += [(point, "certified_accuracy", True) for point in smoothing.get("curve") or []]
    return slots


def broadcast_model(model: nn.Module, ctx: RankContext) -> None:
    """Give every rank rank 0's parameters and buffers (BatchNorm's running statistics drift apart in
    the last step, each rank updating its own), so that each measures the model rank 0 saves."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


# ----------------------------------------------------------------------------- agreement and reductions


def agree(ask: Callable[[], bool] | None, ctx: RankContext) -> bool:
    """Rank 0's answer to `ask()`, on every rank (one broadcast), e.g. "was the job cancelled?".

    Only rank 0 reads the job's row; broadcasting its answer makes every rank stop at the same
    step, so none is left waiting in a collective for a peer that has gone.
    """
    answer = bool(ask()) if ask is not None and ctx.is_main else False
    if not ctx.distributed:
        return answer
    flag = torch.tensor([int(answer)], dtype=torch.int32, device=_comm_device(ctx))
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def all_reduce_sums(values: dict[str, Tensor | float], ctx: RankContext) -> dict[str, float]:
    """Sum each named value over the ranks (one all-reduce); plain floats without torch.distributed."""
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).detach().cpu().reshape(())
                           for k in keys]) if keys else torch.zeros(0, dtype=torch.float64)
    if ctx.distributed and keys:
        stacked = stacked.to(_comm_device(ctx))
        dist.all_reduce(stacked)
    return {k: float(v) for k, v in zip(keys, stacked.tolist(), strict=True)}


def all_reduce_min(value: int, ctx: RankContext) -> int:
    """The least of an integer over the ranks (one all-reduce), e.g. the batches every rank can
    read; the value itself on one rank."""
    if not ctx.distributed:
        return value
    least = torch.tensor([value], dtype=torch.int64, device=_comm_device(ctx))
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    return int(least.item())


def _comm_device(ctx: RankContext) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    return ctx.device if ctx.backend == "nccl" and ctx.device is not None else torch.device("cpu")
