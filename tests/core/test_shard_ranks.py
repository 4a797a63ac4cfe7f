"""WebDataset shards on several devices (issue 12): each rank reads its own shards, and too few shards
is one sentence. These give the rank explicitly (no process group); the group of 2 real gloo ranks
of test_distributed.py checks that every rank takes the same steps and a whole distill job succeeds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from data_ref_helpers import write_shards  # noqa: E402

from kdiga_core.data_ref import validate_reference  # noqa: E402
from kdiga_core.data_stream import open_reference  # noqa: E402
from kdiga_core.distributed import RankContext  # noqa: E402
from kdiga_core.errors import DataError  # noqa: E402


def _dataset(root: Path) -> dict:
    ref = {"kind": "webdataset", "uri": root.as_uri(), "storage_options": {}, "max_corrupt_fraction": 0.05,
           "validate_max_images": 1000}
    return {**ref, **validate_reference(ref), "name": "wds"}


def _read(data, *, epoch: int, rank: int, world: int, workers: int) -> tuple[list[bytes], int]:
    """The images (as bytes: every generated one is distinct) one rank reads in an epoch, and its batches."""
    ctx = RankContext(rank=rank, world_size=world)
    batches = list(data.train_loader(epoch=epoch, seed=0, batch_size=4, workers=workers, pin=False, ctx=ctx))
    assert len(batches) == data.rank_batches(epoch=epoch, seed=0, batch_size=4, workers=workers, ctx=ctx)
    return [x.numpy().tobytes() for b in batches for x in b[0]], len(batches)


def test_ranks_read_disjoint_shards_that_cover_the_split(tmp_path):
    dataset = _dataset(write_shards(tmp_path / "wds", [9] * 4))
    assert dataset["layout"]["train_shard_sizes"] == {f"train/train-{k:06d}.tar": 9 for k in range(4)}
    data = open_reference(dataset, img_size=16, preset="none")
    whole, _ = _read(data, epoch=0, rank=0, world=1, workers=0)
    assert len(whole) == len(set(whole)) == 36
    rank_zero = []
    for epoch in range(2):
        parts = [_read(data, epoch=epoch, rank=rank, world=2, workers=2)[0] for rank in (0, 1)]
        assert len(parts[0]) == len(parts[1]) == 18
        assert not set(parts[0]) & set(parts[1]) and set(parts[0]) | set(parts[1]) == set(whole)
        rank_zero.append(frozenset(parts[0]))
    assert len(set(rank_zero)) > 1  # the shards are dealt again every epoch


def test_fewer_shards_than_devices_is_one_sentence(tmp_path):
    data = open_reference(_dataset(write_shards(tmp_path / "wds", [5, 5])), img_size=16, preset="none")
    three = RankContext(rank=0, world_size=3)
    sentence = (r"^The dataset has 2 training shards, fewer than the job's 3 devices; each device reads whole "
                r"shards, so use at most 2 or split the set into more shards\.$")
    with pytest.raises(DataError, match=sentence):
        data.train_loader(epoch=0, seed=0, batch_size=4, workers=0, pin=False, ctx=three)
    with pytest.raises(DataError, match=sentence):
        data.rank_batches(epoch=0, seed=0, batch_size=4, workers=0, ctx=three)
    two = RankContext(rank=1, world_size=2)
    assert data.rank_workers(8, two) == 1  # one loader worker per shard the rank reads, at most
    data.layout.pop("train_shard_sizes")  # validated before the sizes were recorded
    with pytest.raises(DataError, match="register it again to train on several devices"):
        data.rank_batches(epoch=0, seed=0, batch_size=4, workers=0, ctx=two)


def test_every_rank_takes_its_steps_even_past_unreadable_batches(tmp_path):
    """One device skips a batch none of whose images decoded; several ranks stand in the previous one
    (or, first in the epoch, the next one), so no rank takes fewer steps; a loader that ends before
    the agreed batches (shards changed since validation) is one sentence, not a hang."""
    import torch
    from data_ref_helpers import write_image_folder

    from kdiga_core.batches import StreamingBatches
    from kdiga_core.config import TrainConfig

    root = write_image_folder(tmp_path / "folder", per_class=(2, 1))
    ref = {"kind": "image_folder", "uri": root.as_uri(), "storage_options": {}, "max_corrupt_fraction": 0.05,
           "validate_max_images": 100}
    data = open_reference({**ref, **validate_reference(ref), "name": "f"}, img_size=16, preset="none")
    cfg = TrainConfig(batch_size=2, device="cpu", loader_workers=0)
    y, rows = torch.tensor([0, 1]), torch.tensor([0, 1])
    batches = [None, (torch.full((2, 3, 16, 16), 1, dtype=torch.uint8), y, rows), None,
               (torch.full((2, 3, 16, 16), 2, dtype=torch.uint8), y, rows)]

    def seen(ctx) -> list[int]:
        source = StreamingBatches(data, cfg, torch.device("cpu"), ctx)
        return [int(x[0, 0, 0, 0]) for group in source._steps(batches, drop=0) for x, _, _ in group]

    assert seen(RankContext()) == [1, 2]
    assert seen(RankContext(rank=0, world_size=2)) == [1, 1, 1, 2]
    def agreed(batches_every_rank_takes: int) -> StreamingBatches:
        source = StreamingBatches(data, cfg, torch.device("cpu"), RankContext(rank=0, world_size=2))
        source.rank_batches = batches_every_rank_takes  # what shards agree at set-up
        return source

    with pytest.raises(DataError, match="^The training shards changed since the dataset was validated"):
        list(agreed(5)._steps(batches, drop=0))
    assert len(list(agreed(3)._steps(batches, drop=0))) == 3  # every rank stops there, the rest left out
