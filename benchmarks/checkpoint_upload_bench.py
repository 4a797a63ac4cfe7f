"""Bytes a job's checkpoint uploads send during evaluation, before and after incremental uploads.

`python -m benchmarks.checkpoint_upload_bench [--arch resnet18] [--evals 5] [--points 10000]`

A training checkpoint of a timm model (random init, 10 classes) with an SGD-momentum optimizer that
has taken a step is written by `kdiga_core.train.save_checkpoint` and uploaded to a file:// store.
Then evaluation checkpoints follow, each rewriting the per-attack partial files (one JSON per slot,
per-point bits for `--points` points, growing batch by batch: a stand-in for
kdiga_core.evaluate.partials, whose files are of that size) and handing the folder over again.
"Before" is the earlier layout, replayed: every file of the folder uploaded at every checkpoint.
"After" is worker.checkpoints.upload_checkpoint with the uploader's hash cache; bytes are counted
through the store. As in a job, the training checkpoint's upload comes right after the weights were
written (too fresh for HashCache to remember their digest), the first evaluation checkpoint a while
later (here 2.1 s: it hashes the weights once more and remembers them), the later ones find them cached.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch

from kdiga_core.train import save_checkpoint
from kdiga_service.storage import ArtifactStore, StoredObject
from worker import checkpoints

SLOTS = ("teacher-clean", "student-clean", "student-pgd", "student-autoattack")


class CountingStore(ArtifactStore):
    def __init__(self, url: str):
        super().__init__(url)
        self.sent = 0

    def write_stream(self, key: str, chunks: Any, *, max_bytes: int | None = None) -> StoredObject:
        stored = super().write_stream(key, chunks, max_bytes=max_bytes)
        self.sent += stored.size_bytes
        return stored


def _every_file(store: ArtifactStore, job_id: str, folder: Path, n: int) -> None:
    """The earlier upload_checkpoint: every file into a fresh folder, then the pointer."""
    files = checkpoints.checkpoint_files(folder)
    for name in files:
        store.upload_file(folder / name, f"jobs/{job_id}/checkpoint/e{n:05d}/{name}")
    store.write_bytes(f"jobs/{job_id}/checkpoint/latest.json", json.dumps({"folder": f"e{n:05d}", "files": files}).encode())
    if n > 0:
        store.delete_prefix(f"jobs/{job_id}/checkpoint/e{n - 1:05d}")


def _training(folder: Path, arch: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # momentum buffers exist, as after any training step
    save_checkpoint(folder, model=model, optimizer=opt, generator=torch.Generator().manual_seed(0),
                    meta={"epoch": 10, "global_step": 1000})


def _partials(folder: Path, done: int, points: int) -> None:
    for slot in SLOTS:
        path = folder / "eval" / "partial" / f"{slot}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"slot": slot, "done": done, "bits": "10" * (done // 2)}))
        tmp.replace(path)


def run(arch: str, evals: int, points: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "checkpoint"
        _training(folder, arch)
        size = sum((folder / n).stat().st_size for n in checkpoints.checkpoint_files(folder))
        before, after = CountingStore(f"file://{root / 'before'}"), CountingStore(f"file://{root / 'after'}")
        hashes = checkpoints.HashCache()
        _every_file(before, "job", folder, 0)
        checkpoints.upload_checkpoint(after, "job", folder, hashes=hashes)
        rows = []
        for i in range(1, evals + 1):
            if i == 1:
                time.sleep(HASH_WAIT_S)  # a real checkpoint interval is much longer than the cache margin
            _partials(folder, points * i // evals, points)
            before.sent = after.sent = 0
            t0 = time.perf_counter()
            _every_file(before, "job", folder, i)
            t1 = time.perf_counter()
            hashed = hashes.hashed_bytes
            checkpoints.upload_checkpoint(after, "job", folder, hashes=hashes)
            t2 = time.perf_counter()
            rows.append({"checkpoint": i, "before_bytes": before.sent, "after_bytes": after.sent,
                         "before_s": round(t1 - t0, 3), "after_s": round(t2 - t1, 3),
                         "after_hashed_bytes": hashes.hashed_bytes - hashed})
        back = root / "back"
        assert checkpoints.download_checkpoint(after, "job", back)
        same = all((back / n).read_bytes() == (folder / n).read_bytes() for n in checkpoints.checkpoint_files(folder))
        return {"arch": arch, "training_checkpoint_bytes": size, "points": points, "evaluation_checkpoints": rows,
                "download_complete": same, "torch_threads": torch.get_num_threads()}


HASH_WAIT_S = 2.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--evals", type=int, default=5)
    parser.add_argument("--points", type=int, default=10000)
    args = parser.parse_args()
    print(json.dumps(run(args.arch, args.evals, args.points), indent=1))


if __name__ == "__main__":
    main()
