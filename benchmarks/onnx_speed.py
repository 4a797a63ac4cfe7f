"""ONNX teachers against their safetensors twins: the same weights, evaluated both ways (issue 17.3).

`python -m benchmarks.onnx_speed [--models resnet18,mobilenetv3_small_100] [--batch 64] [--repeats 5]`

Each model is built once (timm, 3x32x32, 10 classes, eval mode), saved as safetensors and exported to
ONNX by the legacy and the dynamo exporter, then loaded back the way a teacher upload is
(`formats.load_model`). What evaluation does per batch is timed: a forward pass without gradients
(clean accuracy, the cache) and a forward + input gradient (every attack step). The three loaded
models run interleaved (A, B, C, A, B, C, ...) so load from other processes hits them alike; each
time is the median of the repeats after one warm-up. Target: ONNX within 2x of safetensors.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kdiga_core.config import ModelSpec
from kdiga_core.formats import load_model

TARGET_RATIO = 2.0
VIT = {"img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 192, "num_heads": 3}


def _loaded(name: str, folder: Path) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    kwargs = VIT if name.startswith("vit") else {}
    net = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    spec = ModelSpec(arch=name, num_classes=10, in_chans=3, img_size=32)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / f"{name}.safetensors"))
    models = {"safetensors": load_model(folder / f"{name}.safetensors", spec)} if not kwargs else {}
    if kwargs:  # timm's kwargs are not part of a ModelSpec: wrap the same net directly
        from kdiga_core.models import NormalizedModel

        models["safetensors"] = NormalizedModel(net, spec).eval()
    for exporter in ("legacy", "dynamo"):
        path = folder / f"{name}-{exporter}.onnx"
        extra = {"dynamo": True, "external_data": False} if exporter == "dynamo" else {"dynamo": False}
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.rand(2, 3, 32, 32),), str(path), opset_version=18, **extra)
        models[f"onnx ({exporter})"] = load_model(path, ModelSpec(arch="onnx", num_classes=10, in_chans=3,
                                                                   img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3))
    return models


def _forward(model, x, y) -> None:
    with torch.no_grad():
        model(x)


def _input_grad(model, x, y) -> None:
    x = x.clone().requires_grad_(True)
    torch.autograd.grad(F.cross_entropy(model(x), y), x)


def measure(name: str, batch: int, repeats: int) -> list[list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        models = _loaded(name, Path(tmp))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    ref = models["safetensors"](x)
    for label, m in models.items():  # the same weights: the same logits
        torch.testing.assert_close(m(x), ref, atol=1e-3, rtol=1e-3, msg=f"{name} {label}")
    rows = []
    for what, fn in (("forward", _forward), ("forward + input gradient", _input_grad)):
        times: dict[str, list[float]] = {k: [] for k in models}
        for i in range(repeats + 1):
            for label, m in models.items():
                start = time.perf_counter()
                fn(m, x, y)
                if i:  # the first round warms up
                    times[label].append(1000 * (time.perf_counter() - start))
        base = statistics.median(times["safetensors"])
        for label in models:
            ms = statistics.median(times[label])
            ratio = ms / base
            rows.append([name, what, label, f"{ms:.1f}", f"{ratio:.2f}×",
                         "–" if label == "safetensors" else ("met" if ratio <= TARGET_RATIO else "**missed**")])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenetv3_small_100,vit_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [r for name in args.models.split(",") for r in measure(name, args.batch, args.repeats)]
    header = ["model", "work", "loaded from", "ms (median)", "vs safetensors", f"≤ {TARGET_RATIO:g}×"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch}, 3x32x32, median of {args.repeats}")  # noqa: T201
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
