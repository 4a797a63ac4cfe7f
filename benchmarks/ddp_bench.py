"""Scaling of one KDIGA training job over devices: 1 rank against all of them, images/s.

    python -m benchmarks.ddp_bench --out ddp.json            # on a GPU machine: 1 GPU vs every GPU (NCCL)
    python -m benchmarks.ddp_bench --device cpu --out ddp.json  # on CPU: 1 rank vs 2 gloo ranks, 1 core each

Each world size is its own `torchrun --standalone` launch of this module's rank mode, running the
service's own training loop (`kdiga_core.train.train`: DDP, DistributedSampler shards, the
rank-0 cancel broadcast, all-reduced metrics) on synthetic CIFAR-shaped data with augmentation,
so the teacher runs at every step as in a real KDIGA job. The per-device batch is fixed (weak
scaling, as DDP is used): images/s counts every rank's images over the timed steps, after
warm-up steps, from rank 0's per-step clock (the loop synchronises each step to report it).
Scaling efficiency = images/s on N devices / (N × images/s on 1). On a CPU machine shared with
other processes a process's share of the cores grows with the number of processes, which inflates
that ratio; `cpu_time_efficiency` (images per CPU-second of all ranks, N against 1) does not depend
on that share (on a GPU it only counts the host's work).

The JSON written to --out holds the machine, the settings and one entry per world size. The
``batchnorm`` mode (``--mode batchnorm``) trains a BatchNorm student on digits on 1 process
and on 2 gloo ranks with the same effective batch, over seeds, and compares their accuracy:
the measured effect of per-rank BatchNorm (kdiga_core.distributed's docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- settings


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every rank of every world size runs (one dict, passed to the ranks as JSON)."""
    gpu = args.device != "cpu" and _cuda_count() > 0
    quick = args.quick
    return {
        "device": "cuda" if gpu else "cpu",
        "student": args.student or ("resnet18" if gpu else "cnn_small"),
        "teacher": args.teacher or ("resnet50" if gpu else "cnn_medium"),
        "img_size": 32, "in_chans": 3, "num_classes": 10,
        "batch_size": args.batch_size or (128 if gpu else (8 if quick else 32)),
        "warmup_steps": max(1, args.warmup_steps) if args.warmup_steps is not None else (1 if quick else 5),
        "timed_steps": args.steps or (3 if quick else (50 if gpu else 20)),
        "method": "kdiga", "iga_mode": "auto", "augment": True, "bf16": True,
        "threads_per_rank": 1 if not gpu else None,
    }


def world_sizes(cfg: dict[str, Any], requested: str | None) -> list[int]:
    """1 and every device: the GPUs of this machine, or 2 CPU ranks."""
    if requested:
        return [int(w) for w in requested.split(",")]
    every = _cuda_count() if cfg["device"] == "cuda" else 2
    return sorted({1, max(1, every)})


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ----------------------------------------------------------------------------- one rank


def rank_main(cfg_path: str, out_path: str) -> None:
    """One rank of one world size (started by torchrun): train, time rank 0's steps, write JSON."""
    import torch

    from kdiga_core import distributed
    from kdiga_core.config import ObjectiveConfig, TrainConfig
    from kdiga_core.models import create_model
    from kdiga_core.train import train

    cfg = json.loads(Path(cfg_path).read_text())
    if cfg["threads_per_rank"]:
        torch.set_num_threads(cfg["threads_per_rank"])
    ctx = distributed.init_from_env(cfg["device"], timeout_s=600)
    steps = cfg["warmup_steps"] + cfg["timed_steps"]
    n = steps * cfg["batch_size"] * ctx.world_size
    gen = torch.Generator().manual_seed(0)
    shape = (cfg["in_chans"], cfg["img_size"], cfg["img_size"])
    data = SimpleNamespace(x_train=torch.rand(n, *shape, generator=gen),
                           y_train=torch.randint(0, cfg["num_classes"], (n,), generator=gen))
    torch.manual_seed(0)
    student = create_model(cfg["student"], cfg["num_classes"], in_chans=cfg["in_chans"], img_size=cfg["img_size"])
    teacher = create_model(cfg["teacher"], cfg["num_classes"], in_chans=cfg["in_chans"], img_size=cfg["img_size"])
    train_cfg = TrainConfig(epochs=1, batch_size=cfg["batch_size"], lr=0.05, device=cfg["device"],
                            augment=cfg["augment"], bf16=cfg["bf16"], hflip=True)
    obj = ObjectiveConfig(method=cfg["method"], iga_mode=cfg["iga_mode"], gamma=5.0, gamma_warmup=0.0)
    clock: list[float] = []
    # every rank's CPU seconds from the first timed step on: the teacher runs once a step (augmentation on)
    cpu_at_step: list[float] = []
    teacher.register_forward_pre_hook(lambda *_: cpu_at_step.append(time.process_time()))
    started = time.perf_counter()
    train(student, data, obj, train_cfg, teacher=teacher, on_step=lambda _p: clock.append(time.perf_counter()))
    wall = time.perf_counter() - started
    mine = time.process_time() - cpu_at_step[cfg["warmup_steps"]]
    cpu_s = distributed.all_reduce_sums({"cpu_s": mine}, ctx)["cpu_s"]
    if ctx.is_main:
        Path(out_path).write_text(json.dumps({**_timing(clock, cfg, ctx, wall), "cpu_s_timed_all_ranks": cpu_s}))
    distributed.teardown()


def _timing(clock: list[float], cfg: dict[str, Any], ctx, wall: float) -> dict[str, Any]:
    timed = clock[cfg["warmup_steps"]:]
    step_s = [b - a for a, b in zip(clock[cfg["warmup_steps"] - 1:], timed, strict=False)] if len(timed) else []
    seconds = timed[-1] - clock[cfg["warmup_steps"] - 1] if timed and cfg["warmup_steps"] else None
    images = len(step_s) * cfg["batch_size"] * ctx.world_size
    return {"world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
            "steps_timed": len(step_s), "images_timed": images,
            "images_per_s": images / seconds if seconds else None,
            "step_ms_median": 1e3 * statistics.median(step_s) if step_s else None,
            "train_wall_s": round(wall, 2)}


# ----------------------------------------------------------------------------- the launcher


def launch(world: int, cfg: dict[str, Any], workdir: Path, timeout_s: float) -> dict[str, Any]:
    """One world size: torchrun with `world` ranks on this machine; rank 0's timing."""
    return _launch_mode("scaling", world, cfg, workdir, timeout_s)


def _launch_mode(mode: str, world: int, cfg: dict[str, Any], workdir: Path, timeout_s: float) -> Any:
    cfg_path, out_path = workdir / "cfg.json", workdir / f"world{world}.json"
    cfg_path.write_text(json.dumps(cfg))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "benchmarks.ddp_bench", "--mode", mode, "--rank-run", str(cfg_path), str(out_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if cfg.get("threads_per_rank") or mode == "batchnorm":
        env["OMP_NUM_THREADS"] = str(cfg.get("threads_per_rank") or 1)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"torchrun with {world} rank(s) failed (code {proc.returncode}):\n{proc.stderr[-3000:]}")
    found = json.loads(out_path.read_text())
    return {**found, "launch_wall_s": round(time.perf_counter() - started, 2)} if isinstance(found, dict) else found


def machine(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from benchmarks.machine import cpu_model

    gpus = [torch.cuda.get_device_name(i) for i in range(_cuda_count())]
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "gpus": gpus, "torch": torch.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def scaling(cfg: dict[str, Any], worlds: list[int], timeout_s: float, log=print) -> dict[str, Any]:
    """Every world size, then the scaling efficiency of the largest against 1."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="kdiga-ddp-bench-") as tmp:
        for world in worlds:
            log(f"ddp bench: {world} rank(s) on {cfg['device']} ...")
            runs.append(launch(world, cfg, Path(tmp), timeout_s))
    for run in runs:
        run["images_per_cpu_s"] = run["images_timed"] / run["cpu_s_timed_all_ranks"]
    by_world = {r["world_size"]: r for r in runs}
    one, top = by_world.get(1), by_world.get(max(by_world))
    efficiency = cpu_efficiency = None
    if one and top and top["world_size"] > 1 and one["images_per_s"] and top["images_per_s"]:
        efficiency = top["images_per_s"] / (top["world_size"] * one["images_per_s"])
        cpu_efficiency = top["images_per_cpu_s"] / one["images_per_cpu_s"]
    note = None if len(by_world) > 1 else "only one device here: no scaling to measure, images/s of 1 rank only"
    return {"settings": cfg, "machine": machine(cfg), "runs": runs, "scaling_efficiency": efficiency,
            "cpu_time_efficiency": cpu_efficiency, "note": note}


# ----------------------------------------------------------------------------- per-rank BatchNorm

BN_ARCHS = ("resnet_small", "cnn_small")  # with BatchNorm, and without it (the control)
BN_EFFECTIVE_BATCH = 64


def bn_rank_main(cfg_path: str, out_path: str) -> None:
    """One rank of the BatchNorm comparison: KDIGA on digits, then rank 0's test accuracy (clean, PGD)."""
    import torch
    from safetensors.torch import load_file

    from kdiga_core import distributed
    from kdiga_core.attacks import build_attack
    from kdiga_core.config import AttackSpec, ObjectiveConfig, TrainConfig
    from kdiga_core.data import load_builtin
    from kdiga_core.models import create_model
    from kdiga_core.train import train

    cfg = json.loads(Path(cfg_path).read_text())
    torch.set_num_threads(1)
    ctx = distributed.init_from_env("cpu", timeout_s=600)
    data = load_builtin("digits")
    teacher = create_model("cnn_medium", 10, in_chans=1, img_size=8)
    teacher.load_state_dict(load_file(cfg["teacher"]))
    found = []
    for seed in range(cfg["seeds"]):
        torch.manual_seed(seed)
        student = create_model(cfg["arch"], 10, in_chans=1, img_size=8)
        train_cfg = TrainConfig(epochs=cfg["epochs"], batch_size=BN_EFFECTIVE_BATCH // ctx.world_size, lr=0.05,
                                seed=seed, device="cpu")
        objective = ObjectiveConfig(method="kdiga", gamma=1.0, iga_mode="exact")
        train(student, data, objective, train_cfg, teacher=teacher)
        x, y = data.x_test, data.y_test
        with torch.no_grad():
            clean = (student(x).argmax(1) == y).float().mean().item()
        x_adv = build_attack(AttackSpec("pgd", eps=0.1, steps=10), seed=seed)(student, x, y)
        with torch.no_grad():
            found.append({"clean": clean, "pgd": (student(x_adv).argmax(1) == y).float().mean().item()})
    if ctx.is_main:
        Path(out_path).write_text(json.dumps(found))
    distributed.teardown()


def batchnorm_effect(seeds: int, epochs: int, timeout_s: float, log=print) -> dict[str, Any]:
    """KDIGA students with and without BatchNorm, 1 process vs 2 gloo ranks at the same effective
    batch (64 vs 2 × 32) and learning rate, over seeds: test accuracy mean ± std."""
    from safetensors.torch import save_file

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kdiga-bn-bench-") as tmp:
        teacher = Path(tmp) / "teacher.safetensors"
        save_file(_digits_teacher(), str(teacher))
        for arch in BN_ARCHS:
            for world in (1, 2):
                log(f"batchnorm bench: {arch}, {world} rank(s), {seeds} seeds ...")
                cfg = {"arch": arch, "seeds": seeds, "epochs": epochs, "teacher": str(teacher)}
                runs = _launch_mode("batchnorm", world, cfg, Path(tmp), timeout_s)
                results[f"{arch} x{world}"] = {k: _mean_std([r[k] for r in runs]) for k in ("clean", "pgd")}
    return {"settings": {"seeds": seeds, "epochs": epochs, "effective_batch": BN_EFFECTIVE_BATCH,
                         "objective": "kdiga exact, gamma 1", "teacher": "cnn_medium, 10 epochs CE on digits",
                         "attack": "PGD-10, Linf eps 0.1, digits test split"}, "results": results}


def _digits_teacher() -> dict[str, Any]:
    """A cnn_medium trained on digits (CE, 10 epochs, seed 0): the teacher of every run."""
    import torch

    from kdiga_core.config import ObjectiveConfig, TrainConfig
    from kdiga_core.data import load_builtin
    from kdiga_core.models import create_model
    from kdiga_core.train import train

    torch.manual_seed(0)
    model = create_model("cnn_medium", 10, in_chans=1, img_size=8)
    train(model, load_builtin("digits"), ObjectiveConfig(method="ce"), TrainConfig(epochs=10, batch_size=64,
                                                                                  lr=0.05, device="cpu"))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ddp_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where the JSON result goes")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--worlds", default=None, help="comma-separated world sizes (default: 1 and every device)")
    parser.add_argument("--student", default=None)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="per device")
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per world size")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--mode", default="scaling", choices=["scaling", "batchnorm"],
                        help="scaling: images/s over world sizes; batchnorm: accuracy of per-rank BatchNorm")
    parser.add_argument("--seeds", type=int, default=3, help="batchnorm: seeds per configuration")
    parser.add_argument("--epochs", type=int, default=10, help="batchnorm: training epochs")
    parser.add_argument("--rank-run", nargs=2, metavar=("CFG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.rank_run and not args.out:
        parser.error("--out is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rank_run:
        (bn_rank_main if args.mode == "batchnorm" else rank_main)(*args.rank_run)
        return 0
    if args.mode == "batchnorm":
        result = batchnorm_effect(args.seeds, args.epochs, args.timeout_s,
                                  log=lambda m: print(m, file=sys.stderr, flush=True))  # noqa: T201
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result["results"], indent=1))  # noqa: T201 - a command-line tool
        return 0
    cfg = settings(args)
    result = scaling(cfg, world_sizes(cfg, args.worlds), args.timeout_s,
                     log=lambda m: print(m, file=sys.stderr, flush=True))  # noqa: T201 - a command-line tool
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"runs": result["runs"], "scaling_efficiency": result["scaling_efficiency"]}, indent=1))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
