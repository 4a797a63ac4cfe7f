"""What each gloo rank of tests/core/test_shard_ranks.py runs (a module, so spawned ranks can import it).

Each rank reads ``<out>/args.json`` and writes ``<out>/shards-rank<r>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ddp_ranks import join, save
from kdiga_core import distributed, jobs
from kdiga_core.batches import StreamingBatches
from kdiga_core.config import TrainConfig
from kdiga_core.data_stream import open_reference

EPOCHS, BATCH = 3, 4
WORKERS = (2, 0)  # loader workers of rank 0 and rank 1: different on purpose (their batch counts differ)


def uneven_shards(rank: int, world: int, port: int, out: str) -> None:
    """Iterate every epoch of a `StreamingBatches` over uneven shards, then run a whole distill job."""
    ctx = join(rank, world, port)
    try:
        args = json.loads(Path(out, "args.json").read_text())
        data = open_reference(args["dataset"], img_size=16, preset="none")
        cfg = TrainConfig(epochs=EPOCHS, batch_size=BATCH, device="cpu", img_size=16, loader_workers=WORKERS[rank])
        source = StreamingBatches(data, cfg, torch.device("cpu"), ctx)
        own = [data.rank_batches(epoch=e, seed=cfg.seed, batch_size=BATCH, workers=source.workers, ctx=ctx)
               for e in range(EPOCHS)]
        steps, samples = [], []
        for epoch in range(EPOCHS):
            groups = list(source.epoch(epoch, torch.Generator()))
            steps.append(len(groups))
            samples.append(sum(len(y) for group in groups for _, y, _ in group))
        found = {"own": own, "agreed": source.rank_batches, "steps_per_epoch": source.steps_per_epoch,
                 "steps": steps, "samples": samples}
        found["job"] = distill(args, Path(out) / f"work{rank}")
        save(out, "shards", rank, found)
    finally:
        distributed.teardown()


def distill(args: dict, workdir: Path) -> dict:
    """The same `run_job` a worker's rank runs (worker.rank), over the shards, 2 epochs."""
    spec = {"student": {"arch": "cnn_tiny"},
            "objective": {"method": "kdiga", "gamma": 1.0, "iga_mode": "finite_difference"},
            "train": {"epochs": 2, "batch_size": BATCH, "lr": 0.05, "device": "cpu", "img_size": 32,
                      "augmentation": "cifar", "loader_workers": 0},
            "evaluation": {"max_points": 6, "attacks": [{"name": "fgsm", "eps": 0.03}], "alignment": False,
                           "latency": False}}
    teacher = jobs.ModelInput(Path(args["teacher"]), args["teacher_spec"])
    result = jobs.run_job("distill", spec, workdir, jobs.JobInputs(args["dataset"], teacher=teacher))
    card = next((a["path"] for a in result["artifacts"] if a["kind"] == "model_card"), None)
    training = json.loads(Path(card).read_text())["training"] if card else {}
    return {"steps": training.get("steps"), "compute": training.get("compute"),
            "accuracy": result["metrics"].get("student_clean_accuracy")}
