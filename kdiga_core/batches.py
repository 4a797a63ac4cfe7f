"""Where the training loop's batches come from: in-memory tensors or a streaming DataLoader.

`train` asks `batch_source(data, ...)` for an object with:

- ``n`` (training samples) and ``steps_per_epoch``;
- ``epoch(epoch, generator)``: yields, per optimizer step, a list of micro-batches
  ``(x, y, index)`` already on the device; ``x`` may be uint8 (`data.pixels` makes floats),
  ``index`` is the rows in the training set (None when the source cannot say: no teacher cache);
- ``augment(x, generator, cfg)``: the augmentation still to apply on the device (in memory: the
  preset on whole batches; streaming: nothing, the loader's workers did it);
- ``cacheable``: whether the same rows come back unchanged every epoch (a teacher cache can hold them);
  ``row_numel`` and ``num_classes`` size that cache (`cache_policy`), ``precompute_teacher(objective,
  batch_size=...)`` builds it; ``streaming`` says which path this is.

The in-memory path draws its order (and its augmentation) from the run's generator exactly as
before, so resumed runs stay bit-identical; the streaming path seeds its loader from (seed, epoch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from kdiga_core import distributed
from kdiga_core.config import TrainConfig
from kdiga_core.data import augment_batch, pixels
from kdiga_core.errors import KdigaError

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor, Tensor | None]


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

    def epoch(self, epoch: int, generator: torch.Generator) -> Iterator[list[Batch]]:
        order = distributed.epoch_order(self.n, epoch=epoch, seed=self.cfg.seed, generator=generator, ctx=self.ctx)
        for group in distributed.accumulation_groups(order, self.cfg):
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

    def epoch(self, epoch: int, generator: torch.Generator) -> Iterator[list[Batch]]:
        loader = self.data.train_loader(epoch=epoch, seed=self.cfg.seed, batch_size=self.cfg.batch_size,
                                        workers=self.workers, pin=self.device.type == "cuda", hflip=self.cfg.hflip,
                                        ctx=self.ctx)
        group: list[Batch] = []
        for batch in self.start(loader):
            if batch is None:  # every image of this batch was unreadable
                continue
            x, y, rows = batch
            group.append((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                          rows if self.cacheable else None))
            if len(group) == self.cfg.grad_accum_steps:
                yield group
                group = []
        if group:
            yield group

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
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
