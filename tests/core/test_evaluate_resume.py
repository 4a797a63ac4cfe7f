"""A stopped evaluation resumes after its last kept batch and ends with the uninterrupted run's report."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from kdiga_core import evaluate as E
from kdiga_core.config import AttackSpec, EvalConfig
from kdiga_core.data import DataBundle

torch.set_num_threads(1)

EPS = 0.22  # where the toy model below is partly robust: AutoAttack's later members break a few more points
ATTACK_STAGES = ("pgd-", "autoattack (", "eps curve (")


class Stop(Exception):
    """What the test's hook raises to stop a run (a job raises `StoppedError` at the same place)."""


def _toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes, each a bright column band on a noisy 8x8 image (separable)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.4
    for c in range(4):
        x[y == c, :, :, 2 * c: 2 * c + 2] += 0.5
    return x.clamp(0, 1), y


def _train(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _cfg(**kw) -> EvalConfig:
    base = {"attacks": (AttackSpec("pgd", eps=EPS, steps=5), AttackSpec("autoattack", eps=EPS, steps=3)),
            "max_points": 24, "eps_curve": (0.0, EPS), "curve_attack_steps": 3, "square_queries": 30,
            "batch_size": 4, "smoothing_sigma": 0.0, "latency": False}
    return EvalConfig(**(base | kw))


def _is_batch(event: dict) -> bool:
    """A tick after a measured batch of an attack (a fresh run's start ticks say 0 points done)."""
    return any(s in event["stage"] for s in ATTACK_STAGES) and event["points_done"] > 0


@pytest.fixture(scope="module")
def toy():
    x, y = _toy_data(200, 0)
    x_test, y_test = _toy_data(40, 1)
    data = DataBundle("toy", x, y, x_test, y_test, 4)
    model = _train(x, y)
    events: list[dict] = []
    report = E.evaluate(model, data, _cfg(), on_progress=events.append)  # uninterrupted, nothing kept
    return data, model, report, events


def _stages(events: list[dict]) -> list[str]:
    """The stage labels in the order they ran."""
    return [e["stage"] for i, e in enumerate(events) if i == 0 or events[i - 1]["stage"] != e["stage"]]


def _measured(model: nn.Module, data: DataBundle, cfg: EvalConfig, store: E.PartialStore | None = None):
    """The report and the number of progress ticks (one per measured batch, plus each stage's start)."""
    events: list[dict] = []
    return E.evaluate(model, data, cfg, on_progress=events.append, partials=store), len(events)


def _stopping_after(k: int, events: list[dict]):
    """A progress hook that records, then stops the run on the k-th measured batch (kept just before)."""
    def hook(event: dict) -> None:
        events.append(event)
        if sum(map(_is_batch, events)) == k and _is_batch(event):
            raise Stop

    return hook


@pytest.mark.parametrize("stage, nth", [("pgd-5", 2), ("autoattack (APGD-T)", 2), ("autoattack (APGD-T)", 3),
                                        ("autoattack (Square)", 1), ("eps curve (eps 0.22)", 1)])
def test_a_stopped_evaluation_resumes_after_its_last_kept_batch(toy, tmp_path, stage, nth):
    data, model, full, full_events = toy
    batches = [e for e in full_events if _is_batch(e)]
    in_stage = [i for i, e in enumerate(batches) if e["stage"] == f"student: {stage}"]
    assert len(in_stage) >= nth, f"the toy run has {len(in_stage)} batches in {stage}"
    k = in_stage[nth - 1] + 1  # batches measured (and kept) when the run stops

    first: list[dict] = []
    with pytest.raises(Stop):
        E.evaluate(model, data, _cfg(), on_progress=_stopping_after(k, first), partials=E.PartialStore(tmp_path))
    assert first[-1]["stage"] == f"student: {stage}"
    resumed_events: list[dict] = []
    resumed = E.evaluate(model, data, _cfg(), on_progress=resumed_events.append, partials=E.PartialStore(tmp_path))

    assert resumed == full  # the same numbers, to the last bit
    # every stage and part still says where it starts (a resumed one at its kept points), one tick per
    # measured batch follows: the k kept batches were not measured again
    assert len(full_events) - len(resumed_events) == k
    assert _stages(resumed_events) == _stages(full_events)
    percents = [e["percent"] for e in resumed_events]
    assert percents == sorted(percents) and percents[-1] == 100.0


def test_a_run_that_kept_everything_measures_no_attack_again(toy, tmp_path):
    data, model, full, full_events = toy
    assert E.evaluate(model, data, _cfg(), partials=E.PartialStore(tmp_path)) == full  # keeping changes no number
    n_batches = sum(map(_is_batch, full_events))
    assert n_batches > 0 and _measured(model, data, _cfg(), E.PartialStore(tmp_path)) == (
        full, len(full_events) - n_batches)


def test_stale_or_damaged_partials_are_measured_again(toy, tmp_path):
    data, model, full, full_events = toy
    E.evaluate(model, data, _cfg(), partials=E.PartialStore(tmp_path))  # every batch of `model` kept
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[1].bias[0] += 1e-3  # other weights: another key
    # every attack another (an attack of the same spec, settings, model and points would be reused)
    other_attacks = _cfg(attacks=(AttackSpec("pgd", eps=EPS, steps=4),), eps_curve=(0.0, 0.2), curve_attack_steps=2)
    for m, cfg in ((changed, _cfg()), (model, other_attacks), (model, _cfg(seed=1))):
        # measured in full: the same report and as many ticks as without any partials
        assert _measured(m, data, cfg, E.PartialStore(tmp_path)) == _measured(m, data, cfg)

    for path in tmp_path.glob("*.json"):  # the same keys, but masks that do not fit the points
        state = json.loads(path.read_text())
        path.write_text(json.dumps({**state, "robust": state["robust"] + "1"}))
    assert _measured(model, data, _cfg(), E.PartialStore(tmp_path)) == (full, len(full_events))


def test_kept_batches_are_handed_over_no_more_often_than_asked(toy, tmp_path):
    data, model, full, full_events = toy
    n_batches = sum(map(_is_batch, full_events))
    for every_s, during_run in ((None, 0), (3600.0, 0), (0.0, n_batches)):
        handed: list[int] = []
        store = E.PartialStore(tmp_path / str(every_s), on_keep=lambda h=handed: h.append(1), every_s=every_s)
        assert E.evaluate(model, data, _cfg(), partials=store) == full
        assert len(handed) == during_run, every_s
        store.flush()  # a stop hands over what is pending, once
        store.flush()
        assert len(handed) == during_run + (during_run == 0), every_s
