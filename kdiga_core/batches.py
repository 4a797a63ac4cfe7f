"""Where the training loop's batches come from: in-memory tensors or a streaming DataLoader.

`train` asks `batch_source(data, ...)` for an object with:

- ``n`` (training samples) and ``steps_per_epoch``;
- ``epoch(epoch, generator, resume=None)``: yields, per optimizer step, a list of micro-batches
  ``(x, y, index)`` already on the device; ``x`` may be uint8 (`data.pixels` makes floats),
  ``index`` is the rows in the training set (None when the source cannot say: no teacher cache).
  ``resume`` (a `ResumePoint`, from a checkpoint written inside the epoch) starts at the step after
  it with the same order: in memory the order is drawn again from the generator's state at the
  epoch's start (the generator itself stays where the checkpoint left it); streaming, an image
  folder's sampler (seeded by (seed, epoch)) skips the indices of the batches already consumed,
  never read, and WebDataset shards (no index) read those batches again and drop them (several
  ranks: the same number on each; every rank also ends its epoch after the same loader batches);
- ``batches_done``: the loader batches the steps yielded so far this epoch consumed (unreadable ones
  included), what a checkpoint inside the epoch records as ``ResumePoint.batches``;
- ``augment(x, generator, cfg)``: the augmentation still to apply on the device (in memory: the
  preset on whole batches; streaming: nothing, the loader's workers did it);
- ``cacheable``: whether the same rows come back unchanged every epoch (a teacher cache can hold them);
  ``row_numel`` and ``num_classes`` size that cache (`cache_policy`), ``precompute_teacher(objective,
  batch_size=...)`` builds it; ``streaming`` says which path this is.

The in-memory path draws its order (and its augmentation) from the run's generator exactly as
before, so resumed runs stay bit-identical; the streaming path seeds its loader from (seed, epoch)
and each image's random transform from (seed, epoch, row), so a run resumed inside an epoch sees
the same batches whatever its loader workers.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdiga_core import distributed
from kdiga_core.config import TrainConfig
from kdiga_core.data import augment_batch, pixels
from kdiga_core.errors import DataError, KdigaError

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor, Tensor | None]


@dataclass(frozen=True)
class ResumePoint:
    """Where a checkpoint written inside an epoch left it: ``step`` optimizer steps done, the run's
    generator state at the epoch's start (``order_state``: the in-memory order is drawn from it) and
    the loader batches consumed (``batches``: streaming; None: ``step`` x grad_accum_steps)."""

    step: int
    order_state: Tensor | None = None
    batches: int | None = None


def random_resized_crop_batch(x: Tensor, generator: torch.Generator | None, *, hflip: bool = True,
                              scale: tuple[float, float] = (0.08, 1.0),
                              ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """RandomResizedCrop (+ flip) of a whole batch on its device: one box per image, bilinear, via roi_align."""
    from torchvision.ops import roi_align

    n, _, h, w = x.shape
    area = torch.empty(n).uniform_(*scale, generator=generator) * h * w
    log_r = torch.empty(n).uniform_(torch.log(torch.tensor(ratio[0])).item(), torch.log(torch.tensor(ratio[1])).item(),
                                    generator=generator)
    aspect = torch.exp(log_r)
    cw = torch.sqrt(area * aspect).clamp(1, w)
    ch = torch.sqrt(area / aspect).clamp(1, h)
    x0 = torch.rand(n, generator=generator) * (w - cw)
    y0 = torch.rand(n, generator=generator) * (h - ch)
    boxes = torch.stack([torch.arange(n, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1).to(x.device, x.dtype)
    out = roi_align(x, boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    if hflip:
        flips = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(flips[:, None, None, None], out.flip(3), out)
    return out


class InMemoryBatches:
    """Rows of in-memory tensors (uint8 or float) moved to the device once, indexed per micro-batch."""

    cacheable, streaming = True, False

    def __init__(self, data: Any, cfg: TrainConfig, device: torch.device, ctx: distributed.RankContext):
        self.x, self.y = data.x_train.to(device), data.y_train.to(device)
        self.cfg, self.ctx, self.device = cfg, ctx, device
        self.n = len(self.x)
        self.steps_per_epoch = distributed.steps_per_epoch(self.n, cfg, ctx) if self.n else 0
        self.row_numel = int(self.x[0].numel()) if self.n else 0
        self.num_classes = int(getattr(data, "num_classes", 0) or (int(self.y.max()) + 1 if self.n else 0))
        self.batches_done = 0

    def epoch(self, epoch: int, generator: torch.Generator, resume: ResumePoint | None = None) -> Iterator[list[Batch]]:
        """The epoch's steps; the order is drawn now (the generator's first draw of the epoch)."""
        order = self._order(epoch, generator, resume.order_state if resume is not None else None)
        start = resume.step if resume is not None else 0
        groups = itertools.islice(distributed.accumulation_groups(order, self.cfg), start, None)
        self.batches_done = start * self.cfg.grad_accum_steps
        return self._steps(groups)

    def _order(self, epoch: int, generator: torch.Generator, order_state: Tensor | None) -> Tensor:
        if order_state is None:
            return distributed.epoch_order(self.n, epoch=epoch, seed=self.cfg.seed, generator=generator, ctx=self.ctx)
        now = generator.get_state()  # resumed inside the epoch: draw the same order, then come back here
        generator.set_state(order_state)
        try:
            return distributed.epoch_order(self.n, epoch=epoch, seed=self.cfg.seed, generator=generator, ctx=self.ctx)
        finally:
            generator.set_state(now)

    def _steps(self, groups: Iterator[list[Tensor]]) -> Iterator[list[Batch]]:
        for group in groups:
            self.batches_done += len(group)
            yield [(self.x[i], self.y[i], i) for i in (index.to(self.device) for index in group)]

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        preset = self.cfg.preset
        if preset == "cifar":
            return augment_batch(x, generator, pad=max(1, x.shape[-1] // 8), hflip=self.cfg.hflip)
        if preset == "imagenet":
            return random_resized_crop_batch(x, generator, hflip=self.cfg.hflip)
        return x

    def precompute_teacher(self, objective: Any, *, batch_size: int) -> None:
        """The teacher cache over every row (sharded over the ranks, then gathered)."""
        distributed.precompute_teacher(objective, self.x, self.y, batch_size=batch_size, ctx=self.ctx)


class StreamingBatches:
    """Batches from `ReferenceData.train_loader`: decoded and augmented in loader processes.

    ``cacheable`` (a teacher cache, when the job asks for one) only for an image folder (whose loader
    gives each image's row back) without augmentation, on one device.

    Several ranks must take the same number of steps, or one waits in a collective for a peer that
    has finished its epoch: on shards every rank stops after ``rank_batches`` loader batches (the
    fewest any rank reads in any epoch of the run, agreed by one all-reduce), and a batch none of
    whose images could be decoded is stood in for by the rank's previous one (one device: skipped).
    """

    streaming = True

    def __init__(self, data: Any, cfg: TrainConfig, device: torch.device, ctx: distributed.RankContext):
        from kdiga_core.data_stream import loader_workers, start_loader

        self.start = start_loader

        self.data, self.cfg, self.ctx, self.device = data, cfg, ctx, device
        self.n = int(data.train_size)
        self.steps_per_epoch = distributed.steps_per_epoch(self.n, cfg, ctx) if self.n else 0
        self.row_numel, self.num_classes = data.in_chans * data.img_size ** 2, data.num_classes
        self.workers = loader_workers(cfg.loader_workers)
        self.cacheable = data.kind == "image_folder" and cfg.preset == "none" and not ctx.distributed
        self.rank_batches: int | None = None  # several ranks on shards: the loader batches every rank takes
        if data.kind == "webdataset" and ctx.distributed and self.n:
            self.rank_batches = self._agreed_batches()
            self.steps_per_epoch = math.ceil(self.rank_batches / cfg.grad_accum_steps)
        self.batches_done = 0
        self._last: Batch | None = None  # several ranks: the batch that stands in for an unreadable one
        self._owed = 0  # unreadable batches to stand in for once a readable one comes

    def _agreed_batches(self) -> int:
        """The fewest loader batches any rank reads in any epoch of the run: a constant, so the steps per
        epoch (the progress and the learning rate schedule) are the same every epoch and on every rank."""
        mine = min(self.data.rank_batches(epoch=e, seed=self.cfg.seed, batch_size=self.cfg.batch_size,
                                          workers=self.workers, ctx=self.ctx) for e in range(max(1, self.cfg.epochs)))
        agreed = distributed.all_reduce_min(mine, self.ctx)
        if agreed == 0:
            raise DataError("A device's training shards hold no samples in some epoch; use fewer devices or "
                             "shards of similar sizes.")
        if self.ctx.is_main:
            log.info("shards on %d ranks: every rank takes %d loader batches an epoch (of %d read on its "
                     "own at most, %d samples in all)", self.ctx.world_size, agreed, mine, self.n)
        return agreed

    def epoch(self, epoch: int, generator: torch.Generator,  # noqa: ARG002 (one signature for both sources)
              resume: ResumePoint | None = None) -> Iterator[list[Batch]]:
        """The epoch's steps; resumed inside it, the sampler skips the batches already consumed."""
        skip = 0
        if resume is not None:
            skip = resume.batches if resume.batches is not None else resume.step * self.cfg.grad_accum_steps
        # an image folder skips them in its sampler; shards have no index: their batches are read again
        # (the same, each item's transform seeded) and dropped (several ranks: the same number on each)
        skippable = self.data.kind == "image_folder"
        loader = self.data.train_loader(epoch=epoch, seed=self.cfg.seed, batch_size=self.cfg.batch_size,
                                        workers=self.workers, pin=self.device.type == "cuda", hflip=self.cfg.hflip,
                                        ctx=self.ctx, skip_batches=skip if skippable else 0)
        self.batches_done = skip if skippable else 0
        self._last, self._owed = None, 0
        return self._steps(loader, drop=0 if skippable else skip)

    def _steps(self, loader: Any, drop: int) -> Iterator[list[Batch]]:
        group: list[Batch] = []
        limit = self.rank_batches
        for batch in self.start(loader):
            self.batches_done += 1
            if self.batches_done > drop:  # shards resumed inside the epoch: the first `drop` were trained on
                for micro in self._micro(batch):
                    group.append(micro)
                    if len(group) == self.cfg.grad_accum_steps:
                        yield group
                        group = []
            if limit is not None and self.batches_done >= limit:  # every rank stops here (the rest: left out)
                break
        if limit is not None and self.batches_done < limit:
            raise DataError("The training shards changed since the dataset was validated; register it again.")
        if self._owed:
            raise DataError("No image this device read in this epoch could be decoded.")
        if group:
            yield group

    def _micro(self, batch: tuple[Tensor, Tensor, Tensor] | None) -> list[Batch]:
        """The micro-batches one loader batch gives: itself on the device; none for a batch of unreadable
        images on one device, the previous batch again on several (every rank takes the same steps)."""
        if batch is None:
            if not self.ctx.distributed:
                return []
            if self._last is None:
                self._owed += 1
                return []
            return [self._last]
        x, y, rows = batch
        self._last = (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                      rows if self.cacheable else None)
        owed, self._owed = self._owed, 0
        return [self._last] * (1 + owed)

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:  # noqa: ARG002 (the workers augment)
        return x  # the loader's workers applied the preset

    def precompute_teacher(self, objective: Any, *, batch_size: int) -> None:
        """One streamed pass (loader order, rows given back) into a host-memory cache of every row."""
        from kdiga_core.objectives import TeacherCache

        if objective.teacher is None:
            return
        loader = self.data.train_loader(epoch=0, seed=self.cfg.seed, batch_size=batch_size, workers=self.workers,
                                        pin=self.device.type == "cuda", hflip=False, ctx=self.ctx)
        batches = (b for b in self.start(loader) if b is not None)
        objective.cache = TeacherCache.build_from(objective.teacher, batches, self.n, device=self.device,
                                                  need_grad=objective.needs_teacher_grads())


def batch_source(data: Any, cfg: TrainConfig, *, device: torch.device,
                 ctx: distributed.RankContext) -> InMemoryBatches | StreamingBatches:
    """The streaming source for data read in place (``data.streaming``), else the in-memory one."""
    source = (StreamingBatches if getattr(data, "streaming", False) else InMemoryBatches)(data, cfg, device, ctx)
    if source.n == 0:
        raise KdigaError("The training split is empty.")
    return source


def as_input(x: Tensor) -> Tensor:
    """A batch as the model takes it: float [0, 1] pixels (channels-last on CUDA)."""
    x = pixels(x)
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cuda" else x
