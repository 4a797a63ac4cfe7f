"""What a model costs: parameters, MACs and measured latency (design.md §9: real numbers, not nominal)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdiga_core.attacks import model_mode
from kdiga_core.evaluate.common import model_device


def forward_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one input: FlopCounterMode's FLOPs / 2."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand((1, *input_shape), device=model_device(model))
    with model_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops() // 2)


@dataclass(frozen=True)
class Speed:
    """How long a model's forward passes take on its device: a fixed cost per call (Python,
    kernel launches) plus a cost per point."""

    per_call: float
    per_point: float


def forward_speed(model: nn.Module, x: Tensor, *, repeats: int = 2) -> Speed:
    """`Speed` from timed no-grad forward passes of one point and of all of ``x`` (after a warm-up).

    What weighs a model's stages in the progress of a report: measured, since for small models
    and small batches per-call overhead rather than arithmetic sets the time.
    """
    x = x.to(model_device(model))
    with model_mode(model), torch.no_grad():
        one, many = _forward_seconds(model, x[:1], repeats), _forward_seconds(model, x, repeats)
    per_point = max(many - one, 0.0) / max(len(x) - 1, 1)
    return Speed(per_call=max(one - per_point, 1e-9), per_point=max(per_point, 1e-12))


def _forward_seconds(model: nn.Module, x: Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
    return min(times[1:])  # the first pass warms up (allocator, kernels, lazy initialisation)


def model_stats(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    latency: bool = True,
    repeats: int = 30,
    warmup: int = 5,
    max_seconds: float = 3.0,
) -> dict[str, Any]:
    """Parameters, MACs and measured CPU latency at batch 1 (design.md §9: real numbers).

    MACs are FlopCounterMode's FLOPs / 2 for one input. Latency is the median of up to
    ``repeats`` timed forward passes on a CPU copy of the model, after ``warmup`` passes,
    stopping early after ``max_seconds``; None when ``latency`` is False.
    """
    stats: dict[str, Any] = {
        "params": int(sum(p.numel() for p in model.parameters())),
        "macs": forward_macs(model, input_shape),
        "latency_ms": None,
        "latency_batch": 1,
    }
    if latency:
        stats["latency_ms"] = cpu_latency_ms(
            model, input_shape, repeats=repeats, warmup=warmup, max_seconds=max_seconds
        )
    return stats


def cpu_latency_ms(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    repeats: int = 30,
    warmup: int = 5,
    max_seconds: float = 3.0,
) -> float:
    """Median wall-clock milliseconds of one batch-1 forward pass on CPU."""
    cpu_model = model if model_device(model).type == "cpu" else copy.deepcopy(model).cpu()
    x = torch.rand((1, *input_shape))
    times: list[float] = []
    with model_mode(cpu_model), torch.inference_mode():
        for _ in range(warmup):
            cpu_model(x)
        deadline = time.perf_counter() + max_seconds
        while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
            start = time.perf_counter()
            cpu_model(x)
            times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))
