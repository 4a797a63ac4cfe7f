"""Teacher bank: the teacher's outputs for K fixed augmentations of every training sample.

With augmentation the teacher sees a new input every step, so `TeacherCache` (one entry per
sample) cannot be used and the teacher's forward + input backward is paid on every step: most of
an augmented KDIGA step (issue 13). The bank draws, once, K augmentations per sample (crop offsets
and a flip, the same random crop + flip as `data.augment_batch`), runs the teacher over all N·K of
them, and keeps logits (and input gradients, for KDIGA) in bf16: in host memory when they fit the
memory budget, else in a memory-mapped file in the job's scratch folder. Each epoch draws one of
the K per sample and replays that exact augmentation on the student's input, so the teacher's
outputs are those of the student's input, bit for bit the same pixels.

Row ``i·K + k`` holds sample i under augmentation k, so the bank is a `TeacherCache` indexed by
row: the objectives read it with the same ``index`` they read the plain cache with.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kdiga_core.data import pixels
from kdiga_core.errors import KdigaError
from kdiga_core.objectives import TeacherCache, teacher_outputs

__all__ = ["TeacherBank", "apply_augmentation", "bank_bytes", "build_beside", "draw_augmentations", "for_training"]

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.25  # of the memory available when the bank is built: the rest is the job's
BYTES = 2  # bf16


def draw_augmentations(n: int, k: int, *, pad: int, hflip: bool, generator: torch.Generator) -> Tensor:
    """(n, k, 3) int16: row offset, column offset (0..2·pad) and flip (0/1) of each sample's k augmentations."""
    offsets = torch.randint(0, 2 * pad + 1, (n, k, 2), generator=generator)
    flips = (torch.rand(n, k, generator=generator) < 0.5) if hflip else torch.zeros(n, k, dtype=torch.bool)
    return torch.cat([offsets, flips.unsqueeze(-1).long()], dim=-1).to(torch.int16)


def apply_augmentation(x: Tensor, params: Tensor, pad: int) -> Tensor:
    """Crop (zero padding `pad`) and flip each image of `x` as `params` (n, 3) says.

    The same single gather as `data.augment_batch`: given that function's draws, the same pixels.
    """
    n, _, h, w = x.shape
    params = params.to(device=x.device, dtype=torch.long)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    rows = params[:, 0:1] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(params[:, 2:3].bool(), cols.flip(1), cols)
    cols = params[:, 1:2] + cols
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def bank_bytes(n: int, k: int, num_classes: int, input_shape: tuple[int, ...], *, grads: bool) -> int:
    """Bytes the bank takes: bf16 logits (and input gradients) for n·k rows, plus the int16 parameters."""
    per_row = num_classes + (math.prod(input_shape) if grads else 0)
    return n * k * (per_row * BYTES + 3 * 2)


def available_memory() -> int:
    """Bytes of memory available now (Linux: MemAvailable; elsewhere the free physical pages)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _teacher_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """The teacher side is first-order: bf16 autocast on CUDA; CPU stays float32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Rows:
    """A (rows, *shape) bf16 array in host memory or in a memory-mapped file (numpy has no bf16:
    the file holds its bits as int16)."""

    def __init__(self, rows: int, shape: tuple[int, ...], path: Path | None, pin: bool):
        self.path = path
        if path is None:
            self.data: Tensor | np.memmap = torch.empty((rows, *shape), dtype=torch.bfloat16, pin_memory=pin)
        else:
            self.data = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(rows, *shape))

    def write(self, rows: slice, values: Tensor) -> None:
        values = values.detach().to("cpu", torch.bfloat16)
        if isinstance(self.data, Tensor):
            self.data[rows] = values
        else:
            self.data[rows] = values.view(torch.int16).numpy()

    def read(self, rows: Tensor, device: torch.device) -> Tensor:
        if isinstance(self.data, Tensor):
            part = self.data[rows]
        else:  # numpy sorts nothing out for us: a gather of the rows this batch needs
            part = torch.from_numpy(np.ascontiguousarray(self.data[rows.numpy()])).view(torch.bfloat16)
        return part.to(device, non_blocking=True).float()


class TeacherBank(TeacherCache):
    """Teacher logits (and input gradients) for K fixed augmentations of each of N samples.

    Attributes:
        k: augmentations per sample; params: (N, K, 3) int16 (see `draw_augmentations`);
        pad: the crop's zero padding; stats: build seconds, bytes and where it is kept (for the log).
    """

    def __init__(self, logits: _Rows, grads: _Rows | None, params: Tensor, pad: int, device: torch.device,
                 stats: dict):
        super().__init__(logits, grads, device)  # type: ignore[arg-type] -- rows read through `lookup`
        self.params, self.k, self.pad, self.device, self.stats = params, params.shape[1], pad, device, stats

    @classmethod
    def build(cls, teacher: nn.Module, x: Tensor, y: Tensor, *, k: int, pad: int, hflip: bool, need_grad: bool,
              device: torch.device, seed: int, directory: Path | None = None, budget_bytes: int | None = None,
              batch_size: int = 256) -> TeacherBank:
        """Draw K augmentations per sample (from `seed`, so a resumed job rebuilds the same bank) and
        run the teacher over all of them.

        Host memory when the bank fits `budget_bytes` (default: a quarter of the available memory);
        otherwise a memory-mapped file in `directory` when its disk has room; otherwise a one-sentence
        `KdigaError` that says how much it needs.
        """
        n = len(x)
        teacher.eval()  # frozen: batch-norm running statistics, whatever mode it came in
        params = draw_augmentations(n, k, pad=pad, hflip=hflip, generator=torch.Generator().manual_seed(seed))
        num_classes = _num_classes(teacher, pixels(x[:1].to(device)))
        size = bank_bytes(n, k, num_classes, tuple(x.shape[1:]), grads=need_grad)
        where = _placement(size, directory, budget_bytes)
        pin = device.type == "cuda"
        logits = _Rows(n * k, (num_classes,), where / "logits.npy" if where else None, pin)
        grads = _Rows(n * k, tuple(x.shape[1:]), where / "grads.npy" if where else None, pin) if need_grad else None
        started = time.perf_counter()
        _fill(teacher, x, y, params, pad, logits, grads, device, batch_size)
        stats = {"seconds": round(time.perf_counter() - started, 3), "bytes": size, "rows": n * k,
                 "k": k, "kept_in": "memory" if where is None else str(where)}
        log.info("teacher bank built: %d samples × %d augmentations, %.1f MiB in %s, %.2f s",
                 n, k, size / 2**20, stats["kept_in"], stats["seconds"])
        return cls(logits, grads, params, pad, device, stats)

    def replay(self, x: Tensor, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw one of the K augmentations per sample, apply it to `x` (the samples `index`, un-augmented)
        and return the augmented batch with its bank rows (what `lookup` reads)."""
        which = torch.randint(0, self.k, (len(index),), generator=generator)
        index = index.cpu()
        x_aug = apply_augmentation(x, self.params[index, which], self.pad)
        return x_aug, index * self.k + which

    def lookup(self, index: Tensor) -> tuple[Tensor, Tensor | None]:
        rows = index.cpu()
        logits = self.logits.read(rows, self.device)  # type: ignore[attr-defined]
        return logits, None if self.grads is None else self.grads.read(rows, self.device)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Remove the memory-mapped files (host-memory banks are freed with the object)."""
        for rows in (self.logits, self.grads):
            path = getattr(rows, "path", None)
            if path is not None:
                rows.data = None  # type: ignore[union-attr] -- drop the mapping before unlinking
                path.unlink(missing_ok=True)


def _num_classes(teacher: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return int(teacher(x).shape[1])


def _placement(size: int, directory: Path | None, budget_bytes: int | None) -> Path | None:
    """None (host memory) or the folder of the memory-mapped files; refuses what fits neither."""
    budget = int(MEMORY_SHARE * available_memory()) if budget_bytes is None else budget_bytes
    if size <= budget:
        return None
    mib = size / 2**20
    if directory is None:
        raise KdigaError(f"The teacher bank needs {mib:.0f} MiB, more than its memory budget of "
                         f"{budget / 2**20:.0f} MiB; lower objective.teacher_bank_k.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if size > 0.9 * free:
        raise KdigaError(f"The teacher bank needs {mib:.0f} MiB, more than the memory budget "
                         f"({budget / 2**20:.0f} MiB) and the scratch disk's free space "
                         f"({free / 2**20:.0f} MiB); lower objective.teacher_bank_k.")
    return directory


def _fill(teacher: nn.Module, x: Tensor, y: Tensor, params: Tensor, pad: int, logits: _Rows,
          grads: _Rows | None, device: torch.device, batch_size: int) -> None:
    """Teacher outputs for every (sample, augmentation), in fixed order: row i·K + k."""
    n, k = params.shape[:2]
    if device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    for j in range(k):
        for start in range(0, n, batch_size):
            end = min(n, start + batch_size)
            xb = apply_augmentation(pixels(x[start:end].to(device)), params[start:end, j], pad)
            if device.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _teacher_precision(device):
                z, g = teacher_outputs(teacher, xb, y[start:end].to(device), need_grad=grads is not None)
            rows = slice(start * k + j, (end - 1) * k + j + 1, k)
            logits.write(rows, z)
            if grads is not None and g is not None:
                grads.write(rows, g)


def for_training(objective, x: Tensor, y: Tensor, *, k: int, augment: bool, hflip: bool, seed: int,
                 device: torch.device, checkpoint_dir: str | Path | None, rank: int = 0,
                 budget_bytes: int | None = None) -> TeacherBank | None:
    """The bank the training loop replays, set as the objective's cache; None when it does not apply
    (no augmentation, K = 0 or a method without a teacher).

    Its files go beside the job's checkpoint folder, not in it: that folder (with the γ sweep's
    trial folders inside it) is uploaded after every epoch.
    Under torch.distributed every rank builds the whole bank (each rank's shard changes every epoch).
    """
    if objective.teacher is None or not augment or k == 0:
        return None
    bank = build_beside(objective.teacher, x, y, k=k, hflip=hflip, seed=seed, device=device,
                        need_grad=objective.needs_teacher_grads(), checkpoint_dir=checkpoint_dir,
                        name=f"teacher_bank-rank{rank}", budget_bytes=budget_bytes)
    objective.cache = bank
    return bank


def build_beside(teacher: nn.Module, x: Tensor, y: Tensor, *, k: int, hflip: bool, seed: int,
                 device: torch.device, need_grad: bool, checkpoint_dir: str | Path | None, name: str,
                 budget_bytes: int | None = None) -> TeacherBank:
    """`TeacherBank.build` with train's padding (img_size // 8) and its files, when memory-mapped, in
    folder ``name`` beside the job's checkpoint folder. The γ sweep builds one for all its trials."""
    directory = None if checkpoint_dir is None else _scratch(Path(checkpoint_dir)) / name
    return TeacherBank.build(teacher, x, y, k=k, pad=max(1, x.shape[-1] // 8), hflip=hflip, need_grad=need_grad,
                             device=device, seed=seed, directory=directory, budget_bytes=budget_bytes)


def _scratch(checkpoint_dir: Path) -> Path:
    """The folder holding the job's ``checkpoint`` folder (the sweep's trials live deeper inside it)."""
    for folder in (checkpoint_dir, *checkpoint_dir.parents):
        if folder.name == "checkpoint":
            return folder.parent
    return checkpoint_dir.parent
