"""What validation refuses: unusable models (non-finite weights, normalisation or outputs) and
models or datasets above the operator's caps (classes, input channels, parameters, memory).

Each check raises `KdigaError` with one sentence; the worker records it on the row and the
upload ends `invalid`, so nothing unusable is ever marked `ready` (issue 16).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdiga_core.errors import KdigaError


@dataclass(frozen=True)
class Limits:
    """Operator caps (None: no cap); the service fills them from its settings.

    Attributes:
        max_classes: most classes of a teacher or a dataset.
        max_in_chans: most input channels.
        max_params: most parameters of a teacher.
        max_memory_bytes: most bytes a teacher may hold (weights and buffers) plus, for ONNX,
            the largest tensor a shape-driven node may build (estimated before it is built).
    """

    max_classes: int | None = None
    max_in_chans: int | None = None
    max_params: int | None = None
    max_memory_bytes: int | None = None


NO_LIMITS = Limits()


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB' (messages only)."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns first


def check_shape_caps(what: str, num_classes: int | None, in_chans: int | None, limits: Limits) -> None:
    """Classes and input channels within the caps (before anything of that size is built)."""
    if limits.max_classes is not None and num_classes is not None and num_classes > limits.max_classes:
        raise KdigaError(f"The {what} has {num_classes} classes, above this service's limit of "
                         f"{limits.max_classes} (KDIGA_MAX_CLASSES).")
    if limits.max_in_chans is not None and in_chans is not None and in_chans > limits.max_in_chans:
        raise KdigaError(f"The {what} takes {in_chans} input channels, above this service's limit of "
                         f"{limits.max_in_chans} (KDIGA_MAX_INPUT_CHANNELS).")


def check_weights(model: nn.Module, limits: Limits) -> None:
    """Parameter count and memory within the caps; every weight and buffer finite."""
    params = sum(p.numel() for p in model.parameters())
    if limits.max_params is not None and params > limits.max_params:
        raise KdigaError(f"The teacher has {params:,} parameters, above this service's limit of "
                         f"{limits.max_params:,} (KDIGA_MAX_TEACHER_PARAMS).")
    state = model.state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values())
    if limits.max_memory_bytes is not None and size > limits.max_memory_bytes:
        raise KdigaError(f"The teacher's weights take {human_bytes(size)}, above this service's limit of "
                         f"{human_bytes(limits.max_memory_bytes)} (KDIGA_MAX_TEACHER_MEMORY_BYTES).")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise KdigaError(f"The teacher's weights hold non-finite values (NaN or Inf) in '{name}'; "
                             "a model trained into NaN cannot teach.")


def check_normalisation(mean: Any, std: Any) -> None:
    """The mean/std the model normalises with: finite, and std strictly positive."""
    for name, value in (("mean", mean), ("std", std)):
        values = [float(v) for v in torch.as_tensor(value).reshape(-1)]
        if not all(math.isfinite(v) for v in values):
            raise KdigaError(f"The teacher's normalisation {name} {values} is not finite.")
    if any(float(s) <= 0 for s in torch.as_tensor(std).reshape(-1)):
        raise KdigaError("The teacher's normalisation std must be positive in every channel.")


def check_outputs(logits: torch.Tensor) -> None:
    """The probe batch's logits are all finite."""
    if not bool(torch.isfinite(logits).all()):
        raise KdigaError("The teacher outputs non-finite logits (NaN or Inf) on a probe batch of "
                         "random images in [0, 1].")


@contextmanager
def onnx_memory_limit(limits: Limits) -> Iterator[None]:
    """While loading and probing an ONNX graph: refuse a node before it builds a tensor above the cap."""
    from kdiga_core.onnx_import import allocation_limit

    with allocation_limit(limits.max_memory_bytes):
        yield
