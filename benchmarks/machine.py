"""Describe the machine a benchmark ran on, and measure its fp32 matmul rate.

The description goes at the top of every BENCHMARKS.md entry so that numbers from
different machines are never compared by accident; the matmul rate is the ceiling
that the achieved FLOP/s of a training step is compared against.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MachineInfo:
    """What a reader needs to judge a benchmark's numbers."""

    cpu_model: str
    logical_cpus: int
    torch_threads: int
    torch_version: str
    device: str
    python: str
    load_average: tuple[float, float, float]
    date_utc: str

    def markdown(self) -> str:
        """A bullet list for the report header."""
        load = ", ".join(f"{v:.2f}" for v in self.load_average)
        return "\n".join([
            f"- date (UTC): {self.date_utc}",
            f"- CPU: {self.cpu_model}, {self.logical_cpus} logical cores visible, torch threads {self.torch_threads}",
            f"- device: {self.device}",
            f"- torch {self.torch_version}, Python {self.python}",
            f"- load average (1, 5, 15 min) at the start: {load}",
        ])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(device: str = "cpu") -> MachineInfo:
    """Snapshot of the machine now."""
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return MachineInfo(
        cpu_model=cpu_model(),
        logical_cpus=os.cpu_count() or 1,
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        device=name,
        python=platform.python_version(),
        load_average=os.getloadavg(),
        date_utc=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
    )


def other_processes_busy() -> str:
    """One line on competing CPU load: the 1-minute load average against the cores, and how many
    other processes are runnable right now (read from /proc, no psutil dependency)."""
    me = os.getpid()
    running = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        running += state == "R"
    load1 = os.getloadavg()[0]
    return f"1-min load {load1:.2f} on {os.cpu_count()} cores; {running} other runnable process(es) at this moment"


def matmul_flops(size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Measured fp32 matmul rate in FLOP/s: median over `repeats` of one size×size @ size×size product."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)  # warm-up (thread pool, caches)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times)
