"""Where a frozen model's evaluation is kept between jobs, and the key that says it still applies.

Every distill job evaluates its (frozen) teacher on the same points with the same attacks, and
AutoAttack on the teacher is the largest single cost of a report for a big teacher, so the
worker keeps that evaluation (`evaluate(..., teacher_cache=...)`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kdiga_core.config import EvalConfig
from kdiga_core.evaluate.common import SCHEMA

# The per-model report's shape: entries of another shape are never reused (2: stratified points,
# sampling errors).
ENTRY_FORMAT = 2


class ReportCache(Protocol):
    """Where a frozen model's evaluation is kept between jobs (see `teacher_fingerprint`)."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, report: dict[str, Any]) -> None: ...


class DirectoryReportCache:
    """One JSON file per key in a local folder; written atomically, unreadable files count as misses."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, report: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(report, fh)
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def tensor_bytes(t: Tensor) -> Any:
    """The raw bytes of a tensor of any shape and dtype, as a uint8 array that hashlib reads in place
    (no copy beyond the move to the CPU: the points of a large evaluation are gigabytes).

    Flattened first: ``view(torch.uint8)`` refuses 0-dim tensors (BatchNorm's
    ``num_batches_tracked``), and bf16 has no numpy dtype to go through.
    """
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def teacher_fingerprint(model: nn.Module, x: Tensor, y: Tensor, cfg: EvalConfig) -> str:
    """A key for one model's evaluation: its weights and buffers, the exact points, the settings.

    Anything that could change the numbers is in the key: parameters, buffers, inputs, labels,
    EvalConfig (Square's budget included), the report schema and entry format, torch's version
    and the device type.
    """
    digest = hashlib.sha256()
    hash_model_and_points(digest, model, x, y)
    settings = {"cfg": dataclasses.asdict(cfg), "schema": SCHEMA, "entry": ENTRY_FORMAT,
                "torch": torch.__version__, "device": next(model.parameters(), x).device.type}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def hash_model_and_points(digest: Any, model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Feed ``digest`` the model's parameters and buffers (by name), then the points and labels."""
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor_bytes(tensor))
    for t in (x, y):
        digest.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(tensor_bytes(t))
