"""WebDataset shards on several devices (issue 12): each rank reads its own shards, every rank takes
the same steps, and too few shards is one sentence. The loader tests give the rank explicitly
(no process group); one group of 2 real gloo ranks checks the agreement and a whole distill job."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import shard_ranks  # noqa: E402
from data_ref_helpers import write_shards  # noqa: E402
from test_distributed import found, run_ranks  # noqa: E402

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
    for epoch in range(3):
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


@pytest.mark.timeout(300)
def test_uneven_shards_on_two_gloo_ranks_take_the_same_steps_and_a_distill_job_succeeds(tmp_path):
    from safetensors.torch import save_file

    from kdiga_core.config import ModelSpec
    from kdiga_core.models import build_model

    teacher_spec = {"arch": "cnn_tiny", "num_classes": 3, "in_chans": 3, "img_size": 32}
    torch.manual_seed(0)
    teacher = build_model(ModelSpec(**teacher_spec))
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "teacher.safetensors"))
    dataset = _dataset(write_shards(tmp_path / "wds", [3, 11, 6, 9, 4, 7]))
    (tmp_path / "args.json").write_text(json.dumps({"dataset": dataset, "teacher": str(tmp_path / "teacher.safetensors"),
                                                    "teacher_spec": teacher_spec}))
    run_ranks(shard_ranks.uneven_shards, tmp_path)
    zero, one = found(tmp_path, "shards", 0), found(tmp_path, "shards", 1)
    assert zero["own"] != one["own"]  # read on their own, the ranks' epochs would differ in length (a hang)
    agreed = min(zero["own"] + one["own"])
    assert zero["agreed"] == one["agreed"] == agreed > 0
    steps = -(-agreed // 1)  # grad_accum_steps 1: a step per loader batch
    assert zero["steps_per_epoch"] == one["steps_per_epoch"] == steps
    assert zero["steps"] == one["steps"] == [steps] * shard_ranks.EPOCHS
    assert all(0 < n <= 4 * steps for n in zero["samples"] + one["samples"])
    job = zero["job"]  # rank 0 writes the model card; both ranks trained the same steps without hanging
    assert job["compute"]["world_size"] == 2 and job["steps"] > 0 and 0.0 <= job["accuracy"] <= 1.0
    assert one["job"]["steps"] is None  # the other rank writes nothing
