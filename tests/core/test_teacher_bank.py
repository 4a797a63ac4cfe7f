"""Teacher bank: augmentations replayed exactly, outputs equal to the teacher's on them, budget, training."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdiga_core.config import ObjectiveConfig, TrainConfig
from kdiga_core.data import augment_batch
from kdiga_core.errors import KdigaError
from kdiga_core.objectives import build_objective, teacher_outputs
from kdiga_core.teacher_bank import TeacherBank, apply_augmentation, bank_bytes, draw_augmentations

torch.set_num_threads(1)


def tiny_cnn(seed=0, classes=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1, stride=2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(96, classes))


def images(n=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def build(x, y, **kw):
    args = {"k": 3, "pad": 1, "hflip": True, "need_grad": True, "device": torch.device("cpu"), "seed": 4, "batch_size": 7}
    return TeacherBank.build(tiny_cnn(seed=1), x, y, **{**args, **kw})


def test_replayed_augmentation_is_the_data_pipelines():
    """Given augment_batch's own draws, the bank's gather gives the same pixels."""
    x, _ = images()
    expected = augment_batch(x, torch.Generator().manual_seed(9), pad=2, hflip=True)
    gen = torch.Generator().manual_seed(9)
    offsets = torch.randint(0, 5, (2, len(x)), generator=gen)
    flips = torch.rand(len(x), generator=gen) < 0.5
    params = torch.stack([offsets[0], offsets[1], flips.long()], dim=1)
    assert torch.equal(apply_augmentation(x, params, pad=2), expected)


@pytest.mark.parametrize("on_disk", [False, True])
def test_bank_rows_are_the_teachers_outputs_on_the_replayed_input(tmp_path, on_disk):
    x, y = images()
    budget = 0 if on_disk else None  # a zero memory budget sends it to the memory-mapped files
    bank = build(x, y, directory=tmp_path, budget_bytes=budget)
    assert (bank.stats["kept_in"] == "memory") != on_disk
    assert bank.stats["bytes"] == bank_bytes(20, 3, 5, (1, 8, 8), grads=True)
    index = torch.tensor([4, 0, 19, 7])
    x_aug, rows = bank.replay(x[index], index, torch.Generator().manual_seed(0))
    z_t, g_t = teacher_outputs(tiny_cnn(seed=1), x_aug, y[index], need_grad=True)
    z_b, g_b = bank.lookup(rows)
    assert torch.allclose(z_b, z_t, atol=0.02, rtol=0.01)  # bf16 storage: ~3 significant digits
    assert torch.allclose(g_b, g_t, atol=1e-3, rtol=0.02)
    assert set((rows % 3).tolist()) <= {0, 1, 2} and torch.equal(rows // 3, index)
    if on_disk:
        assert (tmp_path / "grads.npy").exists()
        bank.close()
        assert not (tmp_path / "grads.npy").exists()


def test_draws_cover_the_k_augmentations_and_are_seeded():
    params = draw_augmentations(50, 4, pad=2, hflip=True, generator=torch.Generator().manual_seed(1))
    again = draw_augmentations(50, 4, pad=2, hflip=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(params, again) and params.shape == (50, 4, 3)
    assert params[..., :2].min() >= 0 and params[..., :2].max() <= 4 and set(params[..., 2].unique().tolist()) == {0, 1}
    no_flip = draw_augmentations(50, 4, pad=2, hflip=False, generator=torch.Generator().manual_seed(1))
    assert no_flip[..., 2].abs().sum() == 0


def test_a_bank_over_every_budget_is_one_sentence():
    x, y = images()
    with pytest.raises(KdigaError, match=r"^The teacher bank needs \d+ MiB.*teacher_bank_k\.$"):
        build(x, y, budget_bytes=0)


def test_the_objective_reads_the_bank_like_the_cache():
    x, y = images()
    bank = build(x, y)
    objective = build_objective(ObjectiveConfig(method="kdiga", gamma=2.0, gamma_warmup=0.0), tiny_cnn(), tiny_cnn(seed=1))
    index = torch.arange(8)
    x_aug, rows = bank.replay(x[index], index, torch.Generator().manual_seed(3))
    fresh = objective(x_aug, y[index], progress=1.0)
    objective.cache = bank
    banked = objective(x_aug, y[index], progress=1.0, index=rows)
    assert banked["loss"].item() == pytest.approx(fresh["loss"].item(), rel=2e-3)


def test_training_with_a_bank_replays_and_cleans_up(tmp_path, caplog):
    from kdiga_core.train import train

    x, y = images(40)
    data = SimpleNamespace(x_train=x, y_train=y)
    cfg = TrainConfig(epochs=2, batch_size=8, augment=True, device="cpu", lr=0.05)
    obj = ObjectiveConfig(method="kdiga", gamma=1.0, gamma_warmup=0.0, teacher_bank_k=2)
    with caplog.at_level("INFO", logger="kdiga_core.teacher_bank"):
        result = train(tiny_cnn(), data, obj, cfg, teacher=tiny_cnn(seed=1), checkpoint_dir=tmp_path / "checkpoint")
    assert result.steps == 10 and all(h["iga"] > 0 for h in result.history)
    assert "teacher bank built: 40 samples × 2 augmentations" in caplog.text
    assert not any((tmp_path / "checkpoint").glob("*.npy"))  # never in the uploaded folder


def test_a_resumed_run_with_a_bank_is_bit_identical(tmp_path):
    from kdiga_core.train import train

    x, y = images(24)
    data = SimpleNamespace(x_train=x, y_train=y)
    cfg = TrainConfig(epochs=2, batch_size=8, augment=True, device="cpu", lr=0.05)
    obj = ObjectiveConfig(method="kdiga", gamma=1.0, gamma_warmup=0.0, teacher_bank_k=3, iga_every=2)
    whole = train(tiny_cnn(), data, obj, cfg, teacher=tiny_cnn(seed=1)).model
    ckpt = tmp_path / "checkpoint"
    train(tiny_cnn(), data, obj, cfg, teacher=tiny_cnn(seed=1), checkpoint_dir=ckpt, stop_after_epoch=1)
    resumed = train(tiny_cnn(), data, obj, cfg, teacher=tiny_cnn(seed=1), checkpoint_dir=ckpt, resume=True).model
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bank_files_stay_out_of_the_uploaded_checkpoint_tree(tmp_path):
    from kdiga_core.teacher_bank import for_training

    x, y = images()
    objective = build_objective(ObjectiveConfig(method="kdiga", gamma=1.0), tiny_cnn(), tiny_cnn(seed=1))
    trial = tmp_path / "job" / "checkpoint" / "sweep" / "trial-3"  # where the γ sweep trains a trial
    bank = for_training(objective, x, y, k=2, augment=True, hflip=True, seed=0, device=torch.device("cpu"),
                        checkpoint_dir=trial, budget_bytes=0)  # no memory: the memory-mapped files
    assert objective.cache is bank and bank.stats["kept_in"] == str(tmp_path / "job" / "teacher_bank-rank0")
    assert not list((tmp_path / "job" / "checkpoint").rglob("*.npy"))
    bank.close()
