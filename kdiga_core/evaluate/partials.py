"""Per-batch partial results of an evaluation, kept so that a stopped or failed job resumes it.

An attack measures its points batch by batch (`accuracy.robust_accuracy`: PGD and the other single
attacks, AutoAttack member by member, each radius of the ε-curve). After each batch it keeps which
points are still robust in a `Slot` whose key holds everything that decides them: the model's
weights and buffers, the exact points, torch's version and the device type (`PartialStore.model`),
then the attack's spec and settings (`ModelPartials.slot`). A run that finds its slot starts after
the last kept batch; as each batch's randomness is seeded by its index (`common.batch_seed`), it
ends with the numbers of an uninterrupted run. A slot of another key is never read.

Slots are written atomically after every batch (small: a character per point) but handed to
``on_keep`` (the job's checkpoint upload) at most once per ``every_s`` seconds, and by
`PartialStore.flush` when a run stops or fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdiga_core.config import AttackSpec
from kdiga_core.evaluate.cache import DirectoryReportCache, hash_model_and_points
from kdiga_core.evaluate.common import SCHEMA, model_device

FORMAT = 1  # the slots' shape: a slot of another format is never read


class PartialStore:
    """The slots of one evaluation in a folder (the job's ``checkpoint/eval/partial/``).

    Args:
        directory: Where the slots are kept, one JSON file per key.
        on_keep: Called when kept slots should be stored elsewhere (the job's checkpoint upload).
        every_s: Call ``on_keep`` at most this often while measuring (None: only at `flush`).
    """

    def __init__(self, directory: str | Path, *, on_keep: Callable[[], None] | None = None,
                 every_s: float | None = None):
        self.files = DirectoryReportCache(directory)
        self.on_keep, self.every_s = on_keep, every_s
        self.kept_at, self.pending = time.monotonic(), False

    def model(self, model: nn.Module, x: Tensor, y: Tensor) -> ModelPartials:
        """The slots of one model measured on the points ``x``, ``y``."""
        digest = hashlib.sha256()
        hash_model_and_points(digest, model, x, y)
        digest.update(json.dumps({"format": FORMAT, "schema": SCHEMA, "torch": torch.__version__,
                                  "device": model_device(model).type}, sort_keys=True).encode())
        return ModelPartials(self, digest.hexdigest())

    def load(self, key: str) -> dict[str, Any] | None:
        found = self.files.get(key)
        ok = isinstance(found, dict) and found.get("format") == FORMAT and found.get("key") == key
        return found if ok else None

    def save(self, key: str, state: dict[str, Any]) -> None:
        self.files.put(key, {**state, "format": FORMAT, "key": key})
        self.pending = True
        if self.every_s is not None and time.monotonic() - self.kept_at >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Hand what was kept since the last hand-off to ``on_keep`` (a stop: before the run ends)."""
        if self.pending and self.on_keep is not None:
            self.on_keep()
        self.kept_at, self.pending = time.monotonic(), False


@dataclass(frozen=True)
class ModelPartials:
    """The slots of one model on one set of points (``key``: its weights, the points, torch, the device)."""

    store: PartialStore
    key: str

    def slot(self, label: str, spec: AttackSpec, **settings: Any) -> Slot:
        """The slot of the attack ``spec`` measured as ``label`` with ``settings`` (batch size, seed...)."""
        blob = {"model": self.key, "label": label, "spec": dataclasses.asdict(spec), "settings": settings}
        return Slot(self.store, hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest())


@dataclass(frozen=True)
class Slot:
    """Where one attack on one model keeps its state after each batch."""

    store: PartialStore
    key: str

    def load(self) -> dict[str, Any] | None:
        return self.store.load(self.key)

    def save(self, state: dict[str, Any]) -> None:
        self.store.save(self.key, state)


def to_bits(mask: Tensor) -> str:
    """A bool mask as a string of '0' and '1', one character per point."""
    return (mask.to(device="cpu", dtype=torch.uint8) + ord("0")).numpy().tobytes().decode("ascii")


def masks(state: dict[str, Any] | None, names: Iterable[str], n: int,
          device: torch.device) -> dict[str, Tensor] | None:
    """The masks ``names`` of a kept state, each of ``n`` points, on ``device``; None if any is not
    such a mask (nothing kept, or a state that does not fit these points: measured again)."""
    if state is None:
        return None
    out = {}
    for name in names:
        bits = state.get(name)
        if not isinstance(bits, str) or len(bits) != n or set(bits) - {"0", "1"}:
            return None
        raw = torch.tensor(list(bits.encode("ascii")), dtype=torch.uint8) if n else torch.zeros(0, dtype=torch.uint8)
        out[name] = (raw == ord("1")).to(device)
    return out
