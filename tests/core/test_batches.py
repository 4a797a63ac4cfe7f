"""The training loop's input seam: uint8 rows in memory, device-side presets, the teacher cache policy."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from kdiga_core import cache_policy, distributed
from kdiga_core.batches import InMemoryBatches, random_resized_crop_batch
from kdiga_core.config import ObjectiveConfig, TrainConfig
from kdiga_core.data import DataBundle, pixels
from kdiga_core.models import create_model
from kdiga_core.objectives import build_objective
from kdiga_core.train import train


def _bundles() -> tuple[DataBundle, DataBundle]:
    """The same 8-bit images stored as uint8 and as float32 (what the loaders did before)."""
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, (96, 3, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 3, 96)
    xt8 = rng.integers(0, 256, (24, 3, 8, 8), dtype=np.uint8)
    yt = rng.integers(0, 3, 24)
    as_u8 = DataBundle("u8", torch.from_numpy(x8), torch.from_numpy(y), torch.from_numpy(xt8), torch.from_numpy(yt), 3)
    as_f32 = DataBundle("f32", torch.from_numpy(x8.astype(np.float32) / np.float32(255)), torch.from_numpy(y),
                        torch.from_numpy(xt8.astype(np.float32) / np.float32(255)), torch.from_numpy(yt), 3)
    return as_u8, as_f32


@pytest.mark.parametrize("augmentation", ["none", "cifar", "imagenet"])
def test_uint8_rows_train_exactly_like_float_rows(augmentation):
    as_u8, as_f32 = _bundles()
    assert as_u8.x_train.element_size() * 4 == as_f32.x_train.element_size()  # 4x smaller in memory
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, device="cpu", augmentation=augmentation)
    weights = []
    for data in (as_u8, as_f32):
        torch.manual_seed(0)
        model = create_model("cnn_tiny", num_classes=3, in_chans=3, img_size=8)
        weights.append(train(model, data, ObjectiveConfig(method="ce"), cfg).model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_random_resized_crop_batch_is_seeded_and_keeps_the_shape():
    x = torch.rand(5, 3, 16, 16)
    a = random_resized_crop_batch(x, torch.Generator().manual_seed(1))
    b = random_resized_crop_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def _plan(cfg: TrainConfig, budget: int | None, caplog) -> cache_policy.CachePlan:
    data = _bundles()[0]
    teacher = create_model("cnn_tiny", num_classes=3, in_chans=3, img_size=8)
    obj_cfg = ObjectiveConfig(method="kdiga", gamma=1.0, iga_mode="finite_difference")
    objective = build_objective(obj_cfg, create_model("cnn_tiny", num_classes=3, in_chans=3, img_size=8), teacher)
    source = InMemoryBatches(data, cfg, torch.device("cpu"), distributed.context())
    with caplog.at_level(logging.INFO, logger="kdiga_core.cache_policy"):
        return cache_policy.plan(objective, obj_cfg, cfg, source, budget_bytes=budget)


def test_teacher_cache_only_where_it_fits_and_the_estimate_is_logged(caplog):
    need = 96 * (3 + 3 * 8 * 8) * 2  # rows x (logits + input gradient) x 2 bytes
    fits = _plan(TrainConfig(), need, caplog)
    assert fits.use and fits.estimate_bytes == need
    assert f"teacher cache on: {need / 2**20:.1f} MiB of host memory" in caplog.text
    too_big = _plan(TrainConfig(), need - 1, caplog)
    assert not too_big.use and "more than the budget" in too_big.reason
    assert not _plan(TrainConfig(augmentation="cifar"), None, caplog).use  # inputs change every epoch
    assert not _plan(TrainConfig(cache_teacher=False), None, caplog).use


def test_pixels_turns_uint8_into_unit_floats():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert pixels(x).dtype == torch.float32 and pixels(x).tolist() == pytest.approx([0.0, 0.2, 1.0])
    f = torch.rand(2, 2)
    assert pixels(f) is f
