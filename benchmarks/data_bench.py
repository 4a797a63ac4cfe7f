"""The streaming input pipeline at two dataset sizes: peak memory stays flat, and the loader keeps up.

`python -m benchmarks.data_bench [--sizes 10000,100000] [--workers N] [--batch 128] [--json]`

For each size, a CIFAR-shaped image folder (32x32x3 PNGs, 10 classes, ``train/`` + ``val/``) is
generated on local disk, validated as a dataset by reference, and streamed for one epoch by the
job's loader (`batches.StreamingBatches`: DataLoader workers, decode, preset ``cifar``) in a fresh
process, which reports its peak RSS (and its loader workers' peak) and the loader's images/s. The
training step's images/s (a KDIGA step, cnn_small student and teacher, on this machine's device)
says whether the loader or the model is the bottleneck.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = 10
UNIQUE = 512  # distinct PNGs written over and over: generation stays cheap, decoding is the same work


def make_folder(root: Path, n_train: int, n_val: int = 1000) -> Path:
    """A CIFAR-shaped image folder of ``n_train`` + ``n_val`` 32x32 RGB PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(UNIQUE):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, format="PNG")
        pool.append(out.getvalue())
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / split / f"c{i % CLASSES}" / f"{i:07d}.png").write_bytes(pool[i % UNIQUE])
    return root


def measure(root: Path, *, workers: int, batch: int) -> dict[str, Any]:
    """One epoch of the job's streaming loader over ``root``, in this process (run it in a fresh one)."""
    import torch

    from kdiga_core import distributed
    from kdiga_core.batches import StreamingBatches
    from kdiga_core.config import TrainConfig
    from kdiga_core.data_ref import validate_reference
    from kdiga_core.data_stream import open_reference

    ref = {"kind": "image_folder", "uri": root.as_uri(), "storage_options": {}, "validate_max_images": 2000}
    info = validate_reference(ref)
    data = open_reference({**ref, **info, "name": root.name}, img_size=32, preset="cifar")
    cfg = TrainConfig(batch_size=batch, augmentation="cifar", loader_workers=workers)
    source = StreamingBatches(data, cfg, torch.device("cpu"), distributed.context())
    started, images = time.perf_counter(), 0
    for group in source.epoch(0, torch.Generator()):
        images += sum(len(y) for _, y, _ in group)
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": round(seconds, 2), "loader_images_per_s": round(images / seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "loader_workers_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "workers": workers}


def step_images_per_s(batch: int, steps: int = 5) -> dict[str, Any]:
    """Images/s of a KDIGA training step (cnn_small -> cnn_small, 32x32x3) on this machine's device."""
    import torch

    from kdiga_core.config import ObjectiveConfig
    from kdiga_core.models import create_model
    from kdiga_core.objectives import build_objective
    from kdiga_core.train import resolve_device

    device = resolve_device("auto")
    torch.manual_seed(0)
    student = create_model("cnn_small", num_classes=CLASSES, in_chans=3, img_size=32).to(device)
    teacher = create_model("cnn_small", num_classes=CLASSES, in_chans=3, img_size=32).to(device)
    objective = build_objective(ObjectiveConfig(method="kdiga", gamma=1.0), student, teacher)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    x, y = torch.rand(batch, 3, 32, 32, device=device), torch.randint(0, CLASSES, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        objective(x, y, progress=1.0)["loss"].backward()
        optimizer.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"device": str(device), "step_images_per_s": round(batch * steps / (time.perf_counter() - started), 1)}


def run(sizes: list[int], *, workers: int, batch: int, log: Any = print) -> dict[str, Any]:
    """Generate, measure in a fresh process each, clean up; plus the training step's rate."""
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="kdiga-data-bench-") as tmp:
            log(f"data: generating {n} images")
            root = make_folder(Path(tmp) / f"cifar-shaped-{n}", n)
            log(f"data: streaming {n} images with {workers} loader worker(s)")
            cmd = [sys.executable, "-m", "benchmarks.data_bench", "--measure", str(root), "--workers", str(workers),
                   "--batch", str(batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
            rows.append({"train_images": n, **json.loads(out.stdout.strip().splitlines()[-1])})
            shutil.rmtree(root, ignore_errors=True)
    return {"rows": rows, "step": step_images_per_s(batch)}


def markdown(result: dict[str, Any]) -> str:
    step = result["step"]
    lines = ["| train images | loader workers | loader images/s | peak RSS, job process (MB) | "
             "peak RSS, one loader worker (MB) | training step images/s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['train_images']} | {r['workers']} | {r['loader_images_per_s']} | {r['peak_rss_mb']} | "
                     f"{r['loader_workers_peak_rss_mb']} | {step['step_images_per_s']} ({step['device']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), workers=args.workers, batch=args.batch)))  # noqa: T201
        return 0
    result = run([int(s) for s in args.sizes.split(",")], workers=args.workers, batch=args.batch,
                 log=lambda m: print(m, file=sys.stderr, flush=True))  # noqa: T201
    print(json.dumps(result) if args.json else markdown(result))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
