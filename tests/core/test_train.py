"""The training loop: learning, progress dicts, cancellation, checkpoints and exact resume."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdiga_core.config import ObjectiveConfig, TrainConfig
from kdiga_core.errors import CancelledError, KdigaError, StoppedError
from kdiga_core.train import lr_at, resolve_device, train

CONTRACT_KEYS = {"phase", "epoch", "epochs", "step", "steps_per_epoch", "global_step", "total_steps", "percent",
                 "eta_s", "lr", "loss"}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the loop leaves an explicit choice alone
    torch.set_num_threads(1)


def toy_data(n=96, seed=0):
    """Two classes separable by mean brightness, 1x8x8 images."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = (torch.rand(n, 1, 8, 8, generator=gen) * 0.5 + 0.5 * y.view(-1, 1, 1, 1)).clamp(0, 1)
    return SimpleNamespace(x_train=x, y_train=y, x_test=x, y_test=y)


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 2))


def cfg(**kw):
    return TrainConfig(**{**{"epochs": 3, "batch_size": 32, "lr": 0.05, "device": "cpu"}, **kw})


def test_ce_training_learns_and_reports_progress():
    seen = []
    result = train(tiny(), toy_data(), ObjectiveConfig(method="ce"), cfg(epochs=4), on_step=seen.append)
    assert result.steps == 12 and len(seen) == 12 and len(result.history) == 4
    assert CONTRACT_KEYS | {"ce"} <= set(seen[0])
    assert all(isinstance(v, (int, float, str)) for v in seen[0].values())
    assert seen[-1]["percent"] == pytest.approx(100.0) and seen[-1]["eta_s"] == pytest.approx(0.0)
    assert (seen[0]["epoch"], seen[0]["step"], seen[-1]["epoch"], seen[-1]["step"]) == (1, 1, 4, 3)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[-1]["train_accuracy"] > 0.9
    assert not result.model.training


def test_kdiga_with_cached_teacher_runs_and_warms_up_gamma():
    data = toy_data()
    teacher = train(tiny(1), data, ObjectiveConfig(method="ce"), cfg(epochs=2)).model
    seen = []
    obj = ObjectiveConfig(method="kdiga", gamma=1.0, gamma_warmup=0.5, iga_mode="finite_difference")
    result = train(tiny(), data, obj, cfg(epochs=2), teacher=teacher, on_step=seen.append)
    assert {"ce", "kd", "iga", "gamma"} <= set(seen[0])
    assert seen[0]["gamma"] == 0.0 and seen[-1]["gamma"] == 1.0
    assert math.isfinite(result.history[-1]["loss"])


def test_cancel_is_checked_between_steps():
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        train(tiny(), toy_data(), ObjectiveConfig(method="ce"), cfg(), should_cancel=cancel)
    assert len(calls) == 3


@pytest.mark.parametrize("optimizer,augment", [("sgd", False), ("adamw", True)])
def test_resume_after_interruption_is_bit_identical(tmp_path, optimizer, augment):
    data = toy_data()
    teacher = train(tiny(1), data, ObjectiveConfig(method="ce"), cfg(epochs=1)).model
    obj = ObjectiveConfig(method="kdiga", gamma=0.5, gamma_warmup=0.3, iga_mode="finite_difference")
    tcfg = cfg(epochs=3, optimizer=optimizer, augment=augment, hflip=augment, lr=0.01 if optimizer == "adamw" else 0.05)

    full = train(tiny(), data, obj, tcfg, teacher=teacher).model

    steps = []
    checkpoints = []
    with pytest.raises(CancelledError):  # stop at the first step of epoch 3, after epoch 2's checkpoint
        train(tiny(), data, obj, tcfg, teacher=teacher, checkpoint_dir=tmp_path, on_checkpoint=checkpoints.append,
              on_step=steps.append, should_cancel=lambda: len(steps) >= 6)
    assert checkpoints == [tmp_path, tmp_path]
    meta = json.loads((tmp_path / "last.json").read_text())
    assert (meta["epoch"], meta["global_step"]) == (2, 6)

    resumed = train(tiny(seed=123), data, obj, tcfg, teacher=teacher, checkpoint_dir=tmp_path, resume=True)
    assert resumed.steps == 9 and len(resumed.history) == 3
    for (name, a), b in zip(full.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("optimizer,augment,stops", [("sgd", False, [4]), ("adamw", True, [2, 7, 8])])
def test_stopped_inside_an_epoch_resumes_bit_identically(tmp_path, optimizer, augment, stops):
    """A stop after step k (inside an epoch: 4 steps an epoch here) writes a checkpoint with the
    epoch's RNG start state and the step within it; resumed runs see the same batches and noise and
    end with the weights, history and step count of an uninterrupted run."""
    data = toy_data(n=128)
    teacher = train(tiny(1), data, ObjectiveConfig(method="ce"), cfg(epochs=1)).model
    obj = ObjectiveConfig(method="kdiga", gamma=0.5, gamma_warmup=0.3, iga_mode="finite_difference")
    tcfg = cfg(epochs=3, optimizer=optimizer, augment=augment, hflip=augment, lr=0.01 if optimizer == "adamw" else 0.05)
    full = train(tiny(), data, obj, tcfg, teacher=teacher)

    steps: list[dict] = []
    for i, k in enumerate(stops):  # each run stops after global step k, the next one resumes from there
        with pytest.raises(StoppedError, match=f"The budget is spent; training stopped after step {k} of 12"):
            train(tiny(seed=0 if i == 0 else 50 + i), data, obj, tcfg, teacher=teacher, checkpoint_dir=tmp_path,
                  resume=True,
                  on_step=steps.append,
                  should_stop=lambda k=k: "The budget is spent." if steps[-1]["global_step"] >= k else None)
        meta = json.loads((tmp_path / "last.json").read_text())
        assert meta["global_step"] == k
        assert (meta.get("partial") or {}).get("step") == (k % 4 or None)
    resumed = train(tiny(seed=99), data, obj, tcfg, teacher=teacher, checkpoint_dir=tmp_path, resume=True,
                    on_step=steps.append)
    assert [s["global_step"] for s in steps] == list(range(1, 13))  # every step ran exactly once
    assert resumed.steps == 12 and resumed.resumed_from_step == stops[-1]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)


def test_checkpoints_every_n_seconds_inside_an_epoch(tmp_path):
    """checkpoint_every_s=0: a checkpoint after every step (inside an epoch: with `partial`)."""
    saved = []
    train(tiny(), toy_data(n=128), ObjectiveConfig(method="ce"), cfg(epochs=2), checkpoint_dir=tmp_path,
          checkpoint_every_s=1e-9, on_checkpoint=lambda d: saved.append(json.loads((d / "last.json").read_text())))
    assert [m["global_step"] for m in saved] == list(range(1, 9))
    assert [(m.get("partial") or {}).get("step") for m in saved] == [1, 2, 3, None, 1, 2, 3, None]
    assert [m["epoch"] for m in saved] == [0, 0, 0, 1, 1, 1, 1, 2]


def test_stop_after_the_last_step_is_no_stop(tmp_path):
    """A budget spent at the very end of training does not stop it: the trained model is returned."""
    steps: list[dict] = []
    result = train(tiny(), toy_data(), ObjectiveConfig(method="ce"), cfg(epochs=1), checkpoint_dir=tmp_path,
                   on_step=steps.append, should_stop=lambda: "spent" if steps[-1]["global_step"] == 3 else None)
    assert result.steps == 3


def test_resume_refuses_a_different_configuration(tmp_path):
    data = toy_data()
    train(tiny(), data, ObjectiveConfig(method="ce"), cfg(epochs=1), checkpoint_dir=tmp_path)
    with pytest.raises(KdigaError, match="different configuration"):
        train(tiny(), data, ObjectiveConfig(method="ce"), cfg(epochs=1, lr=0.2), checkpoint_dir=tmp_path, resume=True)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    result = train(tiny(), toy_data(), ObjectiveConfig(method="ce"), cfg(epochs=1), checkpoint_dir=tmp_path / "none",
                   resume=True)
    assert result.steps == 3


def test_checkpoint_has_no_pickle(tmp_path):
    train(tiny(), toy_data(), ObjectiveConfig(method="ce"), cfg(epochs=1), checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors"]
    assert json.loads((tmp_path / "last.json").read_text())["format"] == "kdiga.checkpoint/1"


def test_lr_schedules():
    assert lr_at(cfg(schedule="constant"), 5, 10) == 0.05
    assert lr_at(cfg(schedule="cosine"), 0, 10) == pytest.approx(0.05)
    assert lr_at(cfg(schedule="cosine"), 5, 10) == pytest.approx(0.025)
    step = cfg(schedule="step", step_milestones=(0.5, 0.75), step_gamma=0.1)
    assert [lr_at(step, s, 8) for s in (0, 3, 4, 6)] == pytest.approx([0.05, 0.05, 0.005, 0.0005])


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(KdigaError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_a_nan_input_stops_training_naming_the_step_and_part():
    data = toy_data()
    data.x_train = data.x_train.clone()
    data.x_train[:] = float("nan")  # every batch: the first step already fails
    seen = []
    with pytest.raises(KdigaError) as err:
        train(tiny(), data, ObjectiveConfig(method="ce"), cfg(epochs=3), on_step=seen.append)
    assert str(err.value) == ("Training stopped at step 1 (epoch 1): the loss part 'ce' was nan (not finite); "
                              "lower the learning rate, or check the data and the teacher.")
    assert seen == []  # it failed before reporting a NaN as progress


def test_a_diverging_learning_rate_stops_within_the_epoch_naming_the_first_bad_step():
    seen = []
    with pytest.raises(KdigaError, match=r"^Training stopped at step (\d+) \(epoch 1\): the loss part '\w+' was "
                                         r"(nan|inf|-inf) \(not finite\)") as err:
        train(tiny(), toy_data(), ObjectiveConfig(method="ce"), cfg(epochs=5, lr=1e30), on_step=seen.append)
    step = int(str(err.value).split()[4])
    assert 2 <= step <= 3 and len(seen) < 3  # 3 steps per epoch: it never reached epoch 2
    assert all(math.isfinite(v) for p in seen for v in p.values() if isinstance(v, float))


def test_loss_parts_are_read_once_per_progress_interval_not_every_step(monkeypatch):
    """Reading a device scalar waits for the device: the loop reads at step 1, when progress is due,
    and at each epoch's end; between reads the progress dicts carry the last values read."""
    from kdiga_core import train as train_mod

    reads = []
    original = train_mod._LossWatch.read
    monkeypatch.setattr(train_mod, "PROGRESS_READ_S", 3600.0)
    monkeypatch.setattr(train_mod._LossWatch, "read", lambda self: (reads.append(1), original(self))[1])
    seen = []
    data = toy_data(n=320)  # 10 steps of 32 per epoch
    train(tiny(), data, ObjectiveConfig(method="ce"), cfg(epochs=2), on_step=seen.append)
    assert len(seen) == 20 and len(reads) == 4
    assert seen[1]["ce"] == seen[0]["ce"] and seen[9]["ce"] != seen[0]["ce"]
