"""The WebDataset-shards scenario of the gloo ranks of tests/core/test_distributed.py (`ddp_ranks.every_scenario`).

`prepare` writes uneven shards, a teacher and ``args.json`` before the ranks start; each rank then
writes ``<out>/shards-rank<r>.json``.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import torch

from kdiga_core import distributed, jobs
from kdiga_core.batches import StreamingBatches
from kdiga_core.config import TrainConfig

EPOCHS, BATCH = 3, 4
SIZES = [3, 11, 6, 9, 4, 7]  # samples per training shard: uneven on purpose
WORKERS = (2, 0)  # loader workers of rank 0 and rank 1: different on purpose (their batch counts differ)
TEACHER = {"arch": "cnn_tiny", "num_classes": 3, "in_chans": 3, "img_size": 32}


def prepare(out: Path) -> None:
    """Uneven shards (validated), a teacher's weights, and what the ranks read of them."""
    from data_ref_helpers import write_shards
    from safetensors.torch import save_file

    from kdiga_core.config import ModelSpec
    from kdiga_core.data_ref import validate_reference
    from kdiga_core.models import build_model

    torch.manual_seed(0)
    teacher = build_model(ModelSpec(**TEACHER))
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(out / "teacher.safetensors"))
    ref = {"kind": "webdataset", "uri": write_shards(out / "wds", SIZES).as_uri(), "storage_options": {},
           "max_corrupt_fraction": 0.05, "validate_max_images": 1000}
    dataset = {**ref, **validate_reference(ref), "name": "wds"}
    (out / "shards-args.json").write_text(json.dumps({"dataset": dataset, "teacher": str(out / "teacher.safetensors")}))


def shard_streams(ctx: distributed.RankContext, out: str) -> None:
    """Every epoch of a `StreamingBatches` over the uneven shards, then a whole distill job (`run_job`,
    as a worker's rank runs it) on both ranks."""
    from kdiga_core.data_stream import open_reference

    # loader workers fork, as in a torchrun rank (a process mp.spawn started would spawn them: seconds each)
    multiprocessing.set_start_method("fork", force=True)
    args = json.loads(Path(out, "shards-args.json").read_text())
    data = open_reference(args["dataset"], img_size=16, preset="none")
    cfg = TrainConfig(epochs=EPOCHS, batch_size=BATCH, device="cpu", img_size=16, loader_workers=WORKERS[ctx.rank])
    source = StreamingBatches(data, cfg, torch.device("cpu"), ctx)
    own = [data.rank_batches(epoch=e, seed=cfg.seed, batch_size=BATCH, workers=source.workers, ctx=ctx)
           for e in range(EPOCHS)]
    steps, samples = [], []
    for epoch in range(EPOCHS):
        groups = list(source.epoch(epoch, torch.Generator()))
        steps.append(len(groups))
        samples.append(sum(len(y) for group in groups for _, y, _ in group))
    found = {"own": own, "agreed": source.rank_batches, "steps_per_epoch": source.steps_per_epoch,
             "steps": steps, "samples": samples, "job": _distill(args, Path(out) / f"shards-work{ctx.rank}")}
    Path(out, f"shards-rank{ctx.rank}.json").write_text(json.dumps(found))
    # rank 0 alone exported the model (ONNX included): wait for it outside a collective, whose timeout is short
    deadline = time.monotonic() + 120
    while not Path(out, "shards-rank0.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def _distill(args: dict, workdir: Path) -> dict:
    spec = {"student": {"arch": "cnn_tiny"},
            "objective": {"method": "kdiga", "gamma": 1.0, "iga_mode": "finite_difference"},
            "train": {"epochs": 2, "batch_size": BATCH, "lr": 0.05, "device": "cpu", "img_size": 32,
                      "augmentation": "cifar", "loader_workers": 0},
            "evaluation": {"max_points": 6, "attacks": [{"name": "fgsm", "eps": 0.03}], "alignment": False,
                           "latency": False}}
    teacher = jobs.ModelInput(Path(args["teacher"]), TEACHER)
    steps: list[int] = []
    hooks = jobs.JobHooks(on_step=lambda p: steps.append(p.get("steps_per_epoch", 0)) if p.get("phase") == "train"
                          else None)
    result = jobs.run_job("distill", spec, workdir, jobs.JobInputs(args["dataset"], teacher=teacher), hooks=hooks)
    card = next((a["path"] for a in result["artifacts"] if a["kind"] == "model_card"), None)
    training = json.loads(Path(card).read_text())["training"] if card else {}
    return {"steps": training.get("steps"), "world_size": (training.get("compute") or {}).get("world_size"),
            "steps_per_epoch": sorted(set(steps)), "accuracy": result["metrics"].get("student_clean_accuracy"),
            "points": (result["report"].get("points") or {}).get("per_class")}
