"""One short GPU run: matmul ceilings, a CIFAR-shaped epoch per method with augmentation, evaluation rate.

`python -m benchmarks.gpu_quick --out results.json [--n 5120] [--batch 128]` on a CUDA machine
(falls back to the CPU at --tiny for a test). ResNet-18 teacher -> MobileNetV2 student on generated
32x32x3 data (random weights: this measures cost, not accuracy), bf16 autocast and channels_last as
`kdiga_core.train` uses on CUDA. Per method: the second epoch's wall time (the first includes
cuDNN autotuning), images/s, peak GPU memory, and the step's FLOPs against the measured bf16 rate.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from kdiga_core.config import ObjectiveConfig, TrainConfig
from kdiga_core.data import DataBundle
from kdiga_core.models import create_model
from kdiga_core.objectives import build_objective
from kdiga_core.train import train

METHODS = ("ce", "kd", "kdiga", "kdiga_bank", "ard", "rslad", "pgd_at")
BANK_K = 4  # kdiga_bank: the default of an augmented KDIGA job (kdiga_core.defaults.BANK_K)


def matmul_tflops(device: str, dtype: torch.dtype, size: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e12


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_data(n: int, classes: int = 10) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataBundle(name="cifar-shaped", x_train=x, y_train=y, x_test=x[:1000], y_test=y[:1000],
                      num_classes=classes, class_names=None)


def objective_cfg(method: str) -> ObjectiveConfig:
    """The method's objective; kdiga_bank is KDIGA reading the teacher bank (its build is outside the epoch)."""
    bank = {"method": "kdiga", "teacher_bank_k": BANK_K} if method == "kdiga_bank" else {"method": method}
    # a fixed γ: the default "auto" runs the γ sweep first, which is not an epoch of the method
    return ObjectiveConfig(**bank, gamma=1.0, attack_eps=8 / 255, attack_step=2 / 255, attack_steps=10)


def step_flops(method: str, student, teacher, x, y) -> float:
    uses_teacher = method in ("kd", "kdiga", "kdiga_bank", "ard", "rslad")
    obj = build_objective(objective_cfg(method), student, teacher if uses_teacher else None,
                          generator=torch.Generator().manual_seed(0))
    index = None
    if method == "kdiga_bank":  # the step reads the teacher's outputs: count the student's work only
        obj.precompute_teacher(x, y)
        index = torch.arange(len(x))
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            out = obj(x, y, progress=1.0, index=index)
        out["loss"].backward()
    student.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run_method(method: str, data: DataBundle, device: str, batch: int) -> dict:
    torch.manual_seed(0)
    teacher = create_model("resnet18", 10, in_chans=3, img_size=32).eval()
    student = create_model("mobilenetv2_100", 10, in_chans=3, img_size=32)
    cfg = TrainConfig(epochs=2, batch_size=batch, optimizer="sgd", lr=0.05, augment=True, device=device, seed=0,
                      cache_teacher=False)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = train(student, data, objective_cfg(method), cfg, teacher=teacher if method != "ce" and method != "pgd_at" else None)
    epoch_s = result.history[-1]["seconds"]
    x, y = data.x_train[:batch].to(device), data.y_train[:batch].to(device)
    try:
        flops = step_flops(method, student.train(), teacher.to(device), x, y)
    except RuntimeError:  # the flop counter cannot follow every double-backward graph
        flops = float("nan")
    steps = -(-len(data.x_train) // batch)
    return {"method": method, "epoch_s": epoch_s, "images_per_s": len(data.x_train) / epoch_s,
            "step_ms": 1000 * epoch_s / steps, "step_gflop": flops / 1e9,
            "achieved_tflops": flops * steps / epoch_s / 1e12,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None}


def eval_rate(device: str, n: int) -> dict:
    from kdiga_core.attacks import PGD

    student = create_model("mobilenetv2_100", 10, in_chans=3, img_size=32).to(device).eval()
    x, y = torch.rand(n, 3, 32, 32, device=device), torch.randint(0, 10, (n,), device=device)
    attack = PGD(eps=8 / 255, norm="Linf", steps=20, step_size=2.5 * (8 / 255) / 20)
    attack(student, x[:64], y[:64])
    sync(device)
    start = time.perf_counter()
    for i in range(0, n, 500):
        attack(student, x[i:i + 500], y[i:i + 500])
    sync(device)
    pgd_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, 500):
            student(x[i:i + 500]).argmax(1)
    sync(device)
    return {"pgd20_points_per_s": n / pgd_s, "clean_images_per_s": n / (time.perf_counter() - start)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=5120)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    n, size = (64, 256) if args.tiny else (args.n, 8192)
    results: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                     "torch": torch.__version__, "n": n, "batch": args.batch}
    torch.backends.cuda.matmul.allow_tf32 = False
    results["matmul_tflops"] = {"bf16": matmul_tflops(device, torch.bfloat16, size),
                                "fp32": matmul_tflops(device, torch.float32, size)}
    print(json.dumps(results), flush=True)
    results["evaluation"] = eval_rate(device, 256 if args.tiny else 4000)
    print(json.dumps(results["evaluation"]), flush=True)
    results["methods"] = []
    for method in args.methods.split(","):
        row = run_method(method, make_data(n), device, min(args.batch, n))
        row["fraction_of_bf16_matmul"] = row["achieved_tflops"] / results["matmul_tflops"]["bf16"]
        results["methods"].append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
