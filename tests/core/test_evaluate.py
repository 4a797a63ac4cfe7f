"""Tests for kdiga_core.evaluate: the report schema, each measurement, and the sanity flags."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from kdiga_core import evaluate as E
from kdiga_core.config import AttackSpec, EvalConfig
from kdiga_core.data import DataBundle

torch.set_num_threads(1)

MODEL_KEYS = {"clean_accuracy", "attacks", "autoattack_breakdown", "eps_curve", "smoothing", "stats"}
ALIGNMENT_KEYS = {
    "l1",
    "l2",
    "cosine",
    "linearity_student",
    "linearity_teacher",
    "bound",
    "measured_loss",
    "teacher_measured_loss",
}


def _toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes, each a bright column band on a noisy 8x8 image (separable)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.4
    for c in range(4):
        x[y == c, :, :, 2 * c : 2 * c + 2] += 0.5
    return x.clamp(0, 1), y


def _train(hidden: int, x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


class Quantised(nn.Module):
    """Rounds its input before a trained net: zero input gradients, i.e. masked gradients."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 2) / 2)


@pytest.fixture(scope="module")
def setup():
    x, y = _toy_data(200, 0)
    x_test, y_test = _toy_data(40, 1)
    data = DataBundle("toy", x, y, x_test, y_test, 4)
    return data, _train(16, x, y, 0), _train(48, x, y, 1)


def _cfg(**kw) -> EvalConfig:
    base = dict(
        attacks=(AttackSpec("pgd", eps=0.15, steps=5), AttackSpec("autoattack", eps=0.15, steps=3)),
        max_points=24,
        curve_attack_steps=5,
        linearity_steps=5,
        smoothing_points=6,
        smoothing_samples=50,
        batch_size=16,
    )
    return EvalConfig(**(base | kw))


def test_report_schema_with_teacher(setup):
    data, student, teacher = setup
    events = []
    report = E.evaluate(student, data, _cfg(), teacher=teacher, on_progress=events.append, square_queries=30)
    assert set(report) == {"schema", "n_points", "threat_model", "models", "alignment", "sanity"}
    assert report["schema"] == "kdiga.report/1" and report["n_points"] == 24
    assert report["threat_model"] == {"norm": "Linf", "eps": 0.15}
    assert set(report["models"]) == {"student", "teacher"}
    for rep in report["models"].values():
        assert set(rep) == MODEL_KEYS
        assert set(rep["attacks"]) == {"pgd-5", "autoattack"}
        assert [s["attack"] for s in rep["autoattack_breakdown"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
        assert all(0 <= v <= 1 for v in [rep["clean_accuracy"], *rep["attacks"].values()])
        assert rep["eps_curve"][0]["eps"] == 0 and rep["eps_curve"][-1]["eps"] >= 0.5
        assert set(rep["stats"]) == {"params", "macs", "latency_ms", "latency_batch"}
    assert set(report["alignment"]) == ALIGNMENT_KEYS
    assert {(f["check"], f["model"]) for f in report["sanity"]} >= {("black_box_not_better", "teacher")}
    assert all(set(f) == {"check", "model", "ok", "message"} for f in report["sanity"])
    assert json.loads(json.dumps(report)) == report  # plain Python types only
    assert events[0]["phase"] == "evaluate" and events[-1]["percent"] == 100.0
    percents = [e["percent"] for e in events]
    assert percents == sorted(percents)


def test_report_without_teacher_and_without_smoothing(setup):
    data, student, _ = setup
    cfg = _cfg(
        attacks=(AttackSpec("pgd", norm="L2", eps=0.5, steps=3), AttackSpec("fgsm", eps=0.1)),
        smoothing_sigma=0.0,
        latency=False,
    )
    report = E.evaluate(student, data, cfg)
    assert set(report) == {"schema", "n_points", "threat_model", "models", "sanity"}
    rep = report["models"]["student"]
    assert set(rep["attacks"]) == {"pgd-3", "fgsm@Linf-0.1"}
    assert rep["smoothing"] is None and rep["stats"]["latency_ms"] is None
    assert rep["eps_curve"][-1]["eps"] == 8.0
    json.dumps(report)


def test_teacher_and_student_see_the_same_points(setup):
    data, student, _ = setup
    x, y = E.evaluation_points(data, 10)
    assert torch.equal(x, data.x_test[:10]) and torch.equal(y, data.y_test[:10])
    assert E.clean_accuracy(student, x, y) == E.clean_accuracy(student, *E.evaluation_points(data, 10))


def test_masked_gradients_are_flagged(setup):
    data, student, _ = setup
    masked = Quantised(student)
    cfg = _cfg(
        attacks=(AttackSpec("pgd", eps=0.3, steps=5), AttackSpec("square", eps=0.3)),
        eps_curve=(0.0, 0.1, 0.3),
        smoothing_sigma=0.0,
        latency=False,
    )
    report = E.evaluate(masked, data, cfg, square_queries=200)
    attacks = report["models"]["student"]["attacks"]
    assert attacks["square"] < attacks["pgd-5"] - 0.1  # the black-box attack wins
    flags = {f["check"]: f for f in report["sanity"]}
    assert not flags["black_box_not_better"]["ok"]
    assert "masked gradients" in flags["black_box_not_better"]["message"]
    assert not flags["reaches_zero_at_large_eps"]["ok"]


def test_sanity_flags_on_handmade_reports():
    good = {
        "clean_accuracy": 0.9,
        "attacks": {"pgd-20": 0.5},
        "autoattack_breakdown": [],
        "eps_curve": [
            {"eps": 0.0, "accuracy": 0.9},
            {"eps": 0.1, "accuracy": 0.5},
            {"eps": 0.5, "accuracy": 0.0},
        ],
    }
    bad = {
        "clean_accuracy": 0.5,
        "attacks": {"pgd-20": 0.6},
        "autoattack_breakdown": [
            {"attack": "fab-t", "robust_accuracy": 0.6},
            {"attack": "square", "robust_accuracy": 0.3},
        ],
        "eps_curve": [
            {"eps": 0.0, "accuracy": 0.5},
            {"eps": 0.1, "accuracy": 0.6},
            {"eps": 0.5, "accuracy": 0.3},
        ],
    }
    flags = E.sanity_flags({"student": good, "teacher": bad})
    assert all(f["ok"] for f in flags if f["model"] == "student")
    assert not any(f["ok"] for f in flags if f["model"] == "teacher")
    assert all(f["message"].endswith(".") for f in flags)


def test_eps_curve_falls_and_default_grid():
    assert E.default_eps_grid(0.1, "Linf") == (0.0, 0.066667, 0.133333, 0.2, 0.266667, 0.333333, 0.4, 0.5)
    assert E.default_eps_grid(3.0, "L2")[-1] == 12.0  # no extra point when 4 eps is already past 8


def test_gradient_alignment_and_linearity(setup):
    data, student, teacher = setup
    x, y = E.evaluation_points(data, 12)
    same = E.gradient_alignment(student, student, x, y)
    assert same["l1"] == 0 and same["l2"] == 0 and same["cosine"] == pytest.approx(1.0)
    other = E.gradient_alignment(student, teacher, x, y)
    assert other["l1"] > 0 and -1 <= other["cosine"] < 1
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    nn.init.zeros_(flat[1].weight)  # constant logits: the loss is exactly linear (constant) in x
    assert E.local_linearity(flat, x, y, 0.1, steps=3).abs().max() == 0
    gamma = E.local_linearity(student, x, y, 0.3, steps=5)
    assert gamma.shape == (12,) and (gamma >= 0).all() and gamma.mean() > 0
    bound = E.linearity_bound(student, teacher, x, y, 0.05, steps=5)
    assert bound["measured_loss"] > 0
    # gamma is also ascended from the PGD point, so the bound holds per sample by construction.
    assert bound["bound"] >= bound["measured_loss"] - 1e-6


def test_smoothing_certifies_an_easy_model(setup):
    data, student, _ = setup
    x, y = E.evaluation_points(data, 6)
    res = E.certify_smoothing(student, x, y, 0.25, n0=20, n=100, num_classes=4)
    assert res["certified_accuracy"] > 0.5 and res["mean_radius"] > 0
    assert res["curve"][0] == {"radius": 0.0, "certified_accuracy": res["certified_accuracy"]}
    accs = [c["certified_accuracy"] for c in res["curve"]]
    assert accs == sorted(accs, reverse=True) and res["n_points"] == 6
    # n = 100 samples cap p_A's lower bound at 0.001 ** (1/100), hence the radius.
    assert res["mean_radius"] <= 0.25 * 1.51


def test_model_stats_counts_params_and_macs():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    stats = E.model_stats(model, (1, 8, 8), repeats=5, warmup=1)
    assert stats["params"] == 64 * 3 + 3 and stats["macs"] == 64 * 3
    assert stats["latency_ms"] > 0 and stats["latency_batch"] == 1


def test_robust_accuracy_keeps_training_mode(setup):
    data, student, _ = setup
    x, y = E.evaluation_points(data, 8)
    student.train()
    try:
        res = E.robust_accuracy(student, x, y, AttackSpec("pgd", eps=0.1, steps=2))
        assert student.training and 0 <= res["accuracy"] <= 1 and res["breakdown"] is None
    finally:
        student.eval()
    assert E.attack_key(AttackSpec("pgd", steps=7)) == "pgd-7"


def test_teacher_evaluation_is_reused_only_for_the_same_teacher_points_and_settings(setup, tmp_path):
    data, student, teacher = setup
    cache = E.DirectoryReportCache(tmp_path / "cache")
    first = E.evaluate(student, data, _cfg(), teacher=teacher, square_queries=30, teacher_cache=cache)
    assert first["teacher_evaluation"]["cached"] is False
    events = []
    second = E.evaluate(student, data, _cfg(), teacher=teacher, square_queries=30, teacher_cache=cache,
                        on_progress=events.append)
    assert second["teacher_evaluation"] == {"cached": True, "key": first["teacher_evaluation"]["key"]}
    assert second["models"]["teacher"] == first["models"]["teacher"]
    assert any("reused" in e["stage"] for e in events)
    percents = [e["percent"] for e in events]
    assert percents == sorted(percents) and percents[-1] == 100.0
    # Other points, other settings or other weights: measured again, under another key.
    other_points = E.evaluate(student, data, _cfg(max_points=20), teacher=teacher, square_queries=30,
                              teacher_cache=cache)
    other_budget = E.evaluate(student, data, _cfg(square_queries=31), teacher=teacher, teacher_cache=cache)
    changed = _train(48, data.x_train, data.y_train, 1)
    with torch.no_grad():
        changed[1].bias[0] += 1e-3
    other_weights = E.evaluate(student, data, _cfg(), teacher=changed, square_queries=30, teacher_cache=cache)
    keys = {r["teacher_evaluation"]["key"] for r in (first, other_points, other_budget, other_weights)}
    assert len(keys) == 4
    assert not any(r["teacher_evaluation"]["cached"] for r in (other_points, other_budget, other_weights))
    assert len(list((tmp_path / "cache").glob("*.json"))) == 4


def test_unreadable_cache_entry_is_a_miss(setup, tmp_path):
    data, student, teacher = setup
    cache = E.DirectoryReportCache(tmp_path)
    cfg = _cfg()
    key = E.teacher_fingerprint(teacher, *E.evaluation_points(data, 24), cfg, cfg.square_queries)
    (tmp_path / f"{key}.json").write_text("{not json")
    report = E.evaluate(student, data, _cfg(), teacher=teacher, square_queries=30, teacher_cache=cache)
    assert report["teacher_evaluation"]["cached"] is False
    assert json.loads((tmp_path / f"{key}.json").read_text()) == report["models"]["teacher"]


def test_pgd_attacks_only_the_correctly_classified_points(setup):
    data, student, _ = setup
    x, y = data.x_test[:24], data.y_test[:24].clone()
    y[:10] = (y[:10] + 1) % 4  # ten points the model now gets wrong
    correct = int((student(x).argmax(1) == y).sum())
    sizes = []
    hook = student.register_forward_hook(lambda _m, inp, _out: sizes.append(len(inp[0])))
    try:
        res = E.robust_accuracy(student, x, y, AttackSpec("pgd", eps=0.15, steps=3), batch_size=64)
    finally:
        hook.remove()
    # one clean pass over all 24 points, then PGD on the correct ones only (fewer as they break),
    # then a prediction on the correct ones
    assert sizes[0] == 24 and sizes[1] == correct and sizes[-1] == correct
    assert sizes[1:-1] == sorted(sizes[1:-1], reverse=True) and len(sizes) <= 1 + 3 + 1
    assert res["accuracy"] <= correct / 24
