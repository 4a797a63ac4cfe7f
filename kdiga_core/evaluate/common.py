"""Small helpers shared by the measurement modules."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

SCHEMA = "kdiga.report/1"


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def on_model_device(model: nn.Module, *tensors: Tensor) -> list[Tensor]:
    """``tensors`` moved to the model's device: every measurement runs where the model is."""
    device = model_device(model)
    return [t.to(device) for t in tensors]


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch`` of a measurement seeded with ``seed``.

    A function of the two alone: a batch draws the same random start whichever batches ran before it
    in this process, so a run resumed after its kept batches gives the numbers of an uninterrupted one.
    """
    return (int(seed) * 1_000_003 + int(batch)) % (1 << 63)


def mean(values: Tensor) -> float:
    """The mean as a Python float (0.0 for no values)."""
    return float(values.float().mean().item()) if values.numel() else 0.0


def batches(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x, y)`` in consecutive batches of at most ``batch_size`` points."""
    return zip(x.split(batch_size), y.split(batch_size), strict=True)
