"""Training-step time of CE, KD and KDIGA (ours and the reference), per student of a zoo.

One row per (student, input shape). Every mode gets its own copy of the same initial
student and its own SGD optimiser; the modes' steps are interleaved round-robin
(mode A, B, C, A, B, C, ...) so that a burst of load from other processes hits every
mode alike, and each mode's time is the median of its repeats after warm-up.

Modes (teacher: timm resnet18, frozen, eval mode):
    ce           plain cross-entropy
    kd           Hinton KD, teacher forward every step
    kd_cached    KD with the teacher's logits read from a cache
    ref          reference KDIGA (benchmarks/reference_kdiga.py): double backprop, teacher recomputed
    auto         our KDIGA objective, iga_mode "auto" (exact where double backward exists), teacher recomputed
    fd           our KDIGA objective, iga_mode "finite_difference", teacher recomputed
    auto_cached  our KDIGA, "auto", teacher logits + input gradients cached: what `train` runs by default
    fd_cached    our KDIGA, "finite_difference", cached

The parameter-gradient cosine between ours and the reference is taken on fresh copies of the
initial student, on the same batch, with γ at its full value (progress = 1).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.reference_kdiga import reference_kdiga_loss
from kdiga_core.config import ModelSpec, ObjectiveConfig
from kdiga_core.models import NormalizedModel, create_model
from kdiga_core.objectives import build_objective

BATCH = 64
NUM_CLASSES = 10
TEACHER = "resnet18"
INPUTS = {"32x32x3": (3, 32), "8x8x1": (1, 8)}
# in order of priority: when a time budget runs out, the last ones are left out
ZOO = ("cnn_small", "resnet18", "test_vit", "mobilenetv2_100", "efficientnet_b0", "mobilenetv3_small_100")
QUICK_ZOO = ("cnn_small",)
MODES = ("ce", "kd", "kd_cached", "ref", "auto", "fd", "auto_cached", "fd_cached")
KDIGA = {"alpha": 0.5, "tau": 1.0, "gamma": 10.0}


def make_model(name: str, in_chans: int, img_size: int) -> nn.Module:
    """A freshly initialised [0, 1]-input model; `test_vit` gets 4-pixel patches (2 on 8x8 inputs).

    timm's fused attention is switched off for the ViT, as `kdiga_core.models` does for every
    timm model (its CPU kernel has no double backward).
    """
    if name != "test_vit":
        return create_model(name, NUM_CLASSES, in_chans=in_chans, img_size=img_size)
    patch = 4 if img_size >= 16 else 2
    net = timm.create_model("test_vit", pretrained=False, num_classes=NUM_CLASSES, in_chans=in_chans,
                            img_size=img_size, patch_size=patch)
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return NormalizedModel(net, ModelSpec(arch="test_vit", num_classes=NUM_CLASSES, in_chans=in_chans,
                                          img_size=img_size))


def model_label(name: str, img_size: int) -> str:
    return f"test_vit (patch {4 if img_size >= 16 else 2})" if name == "test_vit" else name


@dataclass
class StepRow:
    """One (student, input) row: median seconds per mode, cosines, FLOPs and failures."""

    student: str
    inputs: str
    params_m: float
    times: dict[str, float] = field(default_factory=dict)  # wall seconds, median
    cpu_times: dict[str, float] = field(default_factory=dict)  # process CPU seconds (all threads), median
    flops: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    cosine: dict[str, float] = field(default_factory=dict)
    auto_resolved: str = ""
    repeats: int = 0
    teacher: str = TEACHER
    skipped: bool = False  # not measured: the time budget ran out first

    def ratio(self, slow: str, fast: str, *, cpu: bool = False) -> float | None:
        """times[slow] / times[fast] (CPU times with `cpu`), or None when either is missing."""
        times = self.cpu_times if cpu else self.times
        if slow in times and fast in times and times[fast] > 0:
            return times[slow] / times[fast]
        return None


# ----------------------------------------------------------------------------- the modes


class OursLoss:
    """Our objective as a zero-argument loss; the teacher cache is built here, outside any timing."""

    def __init__(self, cfg: ObjectiveConfig, student: nn.Module, teacher: nn.Module, x, y, *, cached: bool):
        self.objective = build_objective(cfg, student, teacher)
        self.x, self.y, self.index = x, y, None
        if cached:
            self.objective.precompute_teacher(x, y, batch_size=len(x))
            self.index = torch.arange(len(x))

    def __call__(self) -> torch.Tensor:
        return self.objective(self.x, self.y, progress=1.0, index=self.index)["loss"]

    @property
    def iga_mode(self) -> str:
        """Which IGA mode the objective resolved to ("exact" / "finite_difference"; "" before a call)."""
        return str(getattr(self.objective, "mode", "") or "")


def build_loss(mode: str, student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor
               ) -> Callable[[], torch.Tensor]:
    """The loss closure of one mode, bound to its own student."""
    kdiga = dict(method="kdiga", **KDIGA)
    if mode == "ref":
        return lambda: reference_kdiga_loss(student, teacher, x, y, **KDIGA)["loss"]
    if mode == "ce":
        return OursLoss(ObjectiveConfig(method="ce"), student, teacher, x, y, cached=False)
    if mode in ("kd", "kd_cached"):
        cfg = ObjectiveConfig(method="kd", alpha=KDIGA["alpha"], tau=KDIGA["tau"])
        return OursLoss(cfg, student, teacher, x, y, cached=mode == "kd_cached")
    iga_mode = "auto" if mode.startswith("auto") else "finite_difference"
    cfg = ObjectiveConfig(iga_mode=iga_mode, **kdiga)
    return OursLoss(cfg, student, teacher, x, y, cached=mode.endswith("_cached"))


def make_step(loss_fn: Callable[[], torch.Tensor], student: nn.Module) -> Callable[[], None]:
    """A full training step: zero_grad, loss, backward, SGD update."""
    opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9, weight_decay=2e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def param_grads(loss_fn: Callable[[], torch.Tensor], student: nn.Module) -> torch.Tensor:
    """All parameter gradients of one loss evaluation, flattened into one vector."""
    student.zero_grad(set_to_none=True)
    loss_fn().backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in student.parameters()])


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks refuse
    `torch.autograd.grad` (which every KDIGA step calls): all FLOPs go to "Global"."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def count_flops(step: Callable[[], None]) -> float:
    """FLOPs of one step as counted by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()  # per-module attribution is not needed, only the total
    with counter:
        step()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- one row


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]


def bench_row(name: str, inputs: str, *, modes=MODES, repeats: int = 5, warmup: int = 1,
              with_flops: bool = True, seed: int = 0, teacher_name: str = TEACHER) -> StepRow:
    """Measure every mode for one student and input shape (see the module docstring)."""
    student0, teacher, x, y = bench_inputs(name, inputs, teacher_name, seed)
    row = StepRow(model_label(name, INPUTS[inputs][1]), inputs,
                  sum(p.numel() for p in student0.parameters()) / 1e6, teacher=teacher_name)

    steps: dict[str, Callable[[], None]] = {}
    for mode in modes:
        student = copy.deepcopy(student0)
        try:
            loss_fn = build_loss(mode, student, teacher, x, y)
            step = make_step(loss_fn, student)
            for _ in range(warmup):
                step()
        except (RuntimeError, NotImplementedError) as exc:
            row.failures[mode] = _short_error(exc)
            continue
        steps[mode] = step
        if mode == "auto" and isinstance(loss_fn, OursLoss):
            row.auto_resolved = loss_fn.iga_mode
    # auto == fd when the student has no double backward: do not time the same thing twice
    if row.auto_resolved == "finite_difference":
        for twin in ("fd", "fd_cached"):
            steps.pop(twin, None)

    samples: dict[str, list[float]] = {m: [] for m in steps}
    cpu_samples: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(repeats):
        for mode, step in steps.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            samples[mode].append(time.perf_counter() - start)
            cpu_samples[mode].append(time.process_time() - cpu_start)
    row.times = {m: statistics.median(v) for m, v in samples.items()}
    row.cpu_times = {m: statistics.median(v) for m, v in cpu_samples.items()}
    row.repeats = repeats
    if row.auto_resolved == "finite_difference":
        for twin, src in (("fd", "auto"), ("fd_cached", "auto_cached")):
            if src in row.times:
                row.times[twin] = row.times[src]
                row.cpu_times[twin] = row.cpu_times[src]
    if with_flops:
        row.flops = {m: count_flops(s) for m, s in steps.items()}
    row.cosine = gradient_cosines(student0, teacher, x, y, modes=[m for m in ("auto", "fd") if m in row.times])
    return row


def gradient_cosines(student0: nn.Module, teacher: nn.Module, x, y, *, modes) -> dict[str, float]:
    """Cosine between the reference's parameter gradient and each of ours (same start, same batch)."""
    try:
        ref_student = copy.deepcopy(student0)
        g_ref = param_grads(build_loss("ref", ref_student, teacher, x, y), ref_student)
    except (RuntimeError, NotImplementedError):
        return {}
    out = {}
    for mode in modes:
        student = copy.deepcopy(student0)
        g = param_grads(build_loss(mode, student, teacher, x, y), student)
        out[mode] = float(F.cosine_similarity(g.double(), g_ref.double(), dim=0))  # fp32 sums can exceed 1
    return out


FLOPS_ZOO = ("cnn_small", "resnet18", "test_vit")  # rows whose FLOPs are counted (one extra step per mode)


# (student, input) rows in order of priority: with a time budget, the last ones are left out
PRIORITY = (("cnn_small", "32x32x3"), ("resnet18", "32x32x3"), ("cnn_small", "8x8x1"), ("test_vit", "8x8x1"),
            ("mobilenetv3_small_100", "8x8x1"), ("mobilenetv2_100", "8x8x1"), ("test_vit", "32x32x3"),
            ("efficientnet_b0", "8x8x1"), ("mobilenetv2_100", "32x32x3"), ("resnet18", "8x8x1"),
            ("mobilenetv3_small_100", "32x32x3"), ("efficientnet_b0", "32x32x3"))


def run(*, quick: bool = False, zoo=None, inputs=None, repeats: int | None = None,
        with_flops: bool = True, teacher: str = TEACHER, budget_s: float | None = None,
        log=print) -> list[StepRow]:
    """All rows: the zoo × input shapes (quick: cnn_small only, fewer repeats).

    Rows run in `PRIORITY` order (then any others). With `budget_s`, no new row starts once
    that many seconds have passed; the rows left out come back with `skipped` set, so the
    table can say so. Rows are returned sorted by input shape, then zoo order.
    """
    zoo = tuple(zoo or (QUICK_ZOO if quick else ZOO))
    inputs = tuple(inputs or INPUTS)
    wanted = [(m, i) for i in inputs for m in zoo]
    order = [r for r in PRIORITY if r in wanted] + [r for r in wanted if r not in PRIORITY]
    repeats = repeats or (2 if quick else 3)
    rows = []
    started = time.perf_counter()
    for name, shape in order:
        if budget_s is not None and time.perf_counter() - started > budget_s:
            rows.append(StepRow(model_label(name, INPUTS[shape][1]), shape, 0.0, skipped=True, teacher=teacher))
            continue
        start = time.perf_counter()
        row = bench_row(name, shape, repeats=repeats, warmup=1, teacher_name=teacher,
                        with_flops=with_flops and (quick or name in FLOPS_ZOO))
        log(f"  step {row.student} {shape}: {time.perf_counter() - start:.1f} s")
        rows.append(row)
    rank = {(model_label(m, INPUTS[i][1]), i): (list(INPUTS).index(i), zoo.index(m)) for m, i in wanted}
    return sorted(rows, key=lambda r: rank[(r.student, r.inputs)])


def bench_inputs(name: str, inputs: str, teacher_name: str, seed: int):
    """(student in train mode, frozen teacher, a random batch, its labels) for one row or ablation."""
    in_chans, img_size = INPUTS[inputs]
    torch.manual_seed(seed)
    student = make_model(name, in_chans, img_size).train()
    teacher = make_model(teacher_name, in_chans, img_size).eval().requires_grad_(False)
    x = torch.rand(BATCH, in_chans, img_size, img_size)
    y = torch.randint(0, NUM_CLASSES, (BATCH,))
    return student, teacher, x, y


def interleaved_medians(steps: dict, repeats: int) -> dict:
    """Run each (already warmed-up) step once per round, `repeats` rounds; the median time of each."""
    samples: dict = {k: [] for k in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def channels_last_ablation(name: str = "resnet18", inputs: str = "32x32x3", *, modes=("kd_cached", "auto_cached"),
                           repeats: int = 3, teacher_name: str = TEACHER, seed: int = 0) -> list[tuple[str, float, float]]:
    """Step time with NCHW vs channels_last student, teacher and batch (CPU): [(mode, nchw_s, cl_s)].

    `kdiga_core.train` uses channels_last on CUDA only; this measures whether it pays on CPU too.
    Both layouts run interleaved, after one warm-up step each.
    """
    student0, teacher0, x, y = bench_inputs(name, inputs, teacher_name, seed)
    steps = {}
    for mode in modes:
        for layout in ("nchw", "cl"):
            student, teacher, xb = copy.deepcopy(student0), copy.deepcopy(teacher0), x
            if layout == "cl":
                fmt = torch.channels_last
                student, teacher, xb = student.to(memory_format=fmt), teacher.to(memory_format=fmt), x.contiguous(
                    memory_format=fmt)
            steps[(mode, layout)] = make_step(build_loss(mode, student, teacher, xb, y), student)
            steps[(mode, layout)]()
    med = interleaved_medians(steps, repeats)
    return [(m, med[(m, "nchw")], med[(m, "cl")]) for m in modes]


def threads_ablation(name: str, inputs: str, *, modes=("kd_cached", "auto_cached"), threads=(1, 2),
                     repeats: int = 3, teacher_name: str = TEACHER, seed: int = 0
                     ) -> list[tuple[str, dict[int, float]]]:
    """Step time at each intra-op thread count, interleaved in one process: [(mode, {threads: s})].

    `kdiga_core.train` uses one thread per core on CPU; this shows what that buys on this machine.
    """
    student0, teacher, x, y = bench_inputs(name, inputs, teacher_name, seed)
    before = torch.get_num_threads()
    steps = {}
    for mode in modes:
        student = copy.deepcopy(student0)
        steps[mode] = make_step(build_loss(mode, student, teacher, x, y), student)
    samples: dict[tuple[str, int], list[float]] = {(m, n): [] for m in modes for n in threads}
    try:
        for n in threads:  # warm-up at every thread count (each has its own pool state)
            torch.set_num_threads(n)
            for step in steps.values():
                step()
        for _ in range(repeats):
            for mode, step in steps.items():
                for n in threads:
                    torch.set_num_threads(n)
                    start = time.perf_counter()
                    step()
                    samples[(mode, n)].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return [(m, {n: statistics.median(samples[(m, n)]) for n in threads}) for m in modes]


def precision_ablation(name: str = "resnet18", inputs: str = "32x32x3", *, modes=("kd_cached", "auto_cached"),
                       repeats: int = 3, teacher_name: str = TEACHER, seed: int = 0) -> dict:
    """fp32 vs bf16 autocast on CPU, interleaved: {"rows": [(mode, fp32_s, bf16_s)], "ref_s", "cosine"}.

    `kdiga_core.train` autocasts to bf16 on CUDA only; this measures what it would buy on a CPU with
    bf16 instructions, and how far a bf16 KDIGA gradient lands from the fp32 reference's
    ("cosine": parameter-gradient cosine of bf16 `auto_cached` against fp32 `ref`).
    """
    student0, teacher, x, y = bench_inputs(name, inputs, teacher_name, seed)

    def in_precision(step: Callable[[], None], precision: str) -> Callable[[], None]:
        if precision == "fp32":
            return step

        def bf16_step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                step()
        return bf16_step

    steps = {}
    for mode, precision in [(m, p) for m in modes for p in ("fp32", "bf16")] + [("ref", "fp32")]:
        student = copy.deepcopy(student0)
        steps[(mode, precision)] = in_precision(make_step(build_loss(mode, student, teacher, x, y), student), precision)
        steps[(mode, precision)]()
    med = interleaved_medians(steps, repeats)
    s_ref, s_bf = copy.deepcopy(student0), copy.deepcopy(student0)
    g_ref = param_grads(build_loss("ref", s_ref, teacher, x, y), s_ref)
    loss_bf = build_loss("auto_cached", s_bf, teacher, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g_bf = param_grads(loss_bf, s_bf)
    cosine = float(torch.nn.functional.cosine_similarity(g_ref, g_bf.float(), dim=0))
    return {"rows": [(m, med[(m, "fp32")], med[(m, "bf16")]) for m in modes], "ref_s": med[("ref", "fp32")],
            "cosine": cosine}


def compile_ablation(name: str = "resnet18", inputs: str = "32x32x3", *, modes=("kd_cached", "auto_cached"),
                     repeats: int = 3, teacher_name: str = TEACHER, seed: int = 0) -> list[dict]:
    """Eager vs `torch.compile`d student forward (inductor, CPU), interleaved after the compile.

    Returns one dict per mode: eager_s, compiled_s (None if compiling failed), compile_s (the first
    compiled step, which compiles), cosine (parameter gradients, compiled vs eager) and error.
    """
    student0, teacher, x, y = bench_inputs(name, inputs, teacher_name, seed)
    rows = []
    for mode in modes:
        row: dict = {"mode": mode, "eager_s": None, "compiled_s": None, "compile_s": None, "cosine": None,
                     "error": ""}
        eager_student, compiled_student = copy.deepcopy(student0), copy.deepcopy(student0)
        eager = make_step(build_loss(mode, eager_student, teacher, x, y), eager_student)
        eager()
        try:
            torch._dynamo.reset()
            compiled_student.forward = torch.compile(compiled_student.forward)
            compiled_loss = build_loss(mode, compiled_student, teacher, x, y)
            compiled = make_step(compiled_loss, compiled_student)
            start = time.perf_counter()
            compiled()
            row["compile_s"] = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - a failure to compile is a result to report
            row["error"] = _short_error(exc)
            compiled = None
        samples: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(repeats):
            for key, step in (("eager", eager), ("compiled", compiled)):
                if step is None:
                    continue
                start = time.perf_counter()
                step()
                samples[key].append(time.perf_counter() - start)
        row["eager_s"] = statistics.median(samples["eager"])
        if compiled is not None:
            row["compiled_s"] = statistics.median(samples["compiled"])
            a, b = copy.deepcopy(student0), copy.deepcopy(student0)
            b.forward = torch.compile(b.forward)
            g_eager = param_grads(build_loss(mode, a, teacher, x, y), a)
            g_comp = param_grads(build_loss(mode, b, teacher, x, y), b)
            row["cosine"] = float(torch.nn.functional.cosine_similarity(g_eager, g_comp, dim=0))
        rows.append(row)
    return rows
