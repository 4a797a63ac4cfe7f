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

MODEL_KEYS = {"clean_accuracy", "attacks", "autoattack_breakdown", "sampling_error", "eps_curve", "smoothing", "stats"}
PROGRESS_KEYS = {"phase", "stage", "percent", "eta_s", "points_done", "points_total"}
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
    base = {
        "attacks": (AttackSpec("pgd", eps=0.15, steps=5), AttackSpec("autoattack", eps=0.15, steps=3)),
        "max_points": 24,
        "curve_attack_steps": 5,
        "linearity_steps": 5,
        "smoothing_points": 6,
        "smoothing_samples": 50,
        "square_queries": 30,
        "batch_size": 16,
    }
    return EvalConfig(**(base | kw))


def test_report_schema_with_teacher(setup):
    data, student, teacher = setup
    events = []
    report = E.evaluate(student, data, _cfg(), teacher=teacher, on_progress=events.append)
    assert set(report) == {"schema", "n_points", "points", "threat_model", "models", "alignment", "sanity"}
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
    assert set(report) == {"schema", "n_points", "points", "threat_model", "models", "sanity"}
    rep = report["models"]["student"]
    assert set(rep["attacks"]) == {"pgd-3", "fgsm@Linf-0.1"}
    assert rep["smoothing"] is None and rep["stats"]["latency_ms"] is None
    assert rep["eps_curve"][-1]["eps"] == 8.0
    json.dumps(report)




def test_masked_gradients_are_flagged(setup):
    data, student, _ = setup
    masked = Quantised(student)
    cfg = _cfg(
        attacks=(AttackSpec("pgd", eps=0.3, steps=5), AttackSpec("square", eps=0.3)),
        eps_curve=(0.0, 0.1, 0.3),
        smoothing_sigma=0.0,
        latency=False,
        square_queries=200,
    )
    report = E.evaluate(masked, data, cfg)
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
    points = E.evaluation_points(data, 12)
    x, y = points.x, points.y
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
    points = E.evaluation_points(data, 6)
    x, y = points.x, points.y
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
    points = E.evaluation_points(data, 8)
    x, y = points.x, points.y
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
    first = E.evaluate(student, data, _cfg(), teacher=teacher, teacher_cache=cache)
    assert first["teacher_evaluation"]["cached"] is False
    events = []
    second = E.evaluate(student, data, _cfg(), teacher=teacher, teacher_cache=cache, on_progress=events.append)
    assert second["teacher_evaluation"] == {"cached": True, "key": first["teacher_evaluation"]["key"]}
    assert second["models"]["teacher"] == first["models"]["teacher"]
    assert any("reused" in e["stage"] for e in events)
    percents = [e["percent"] for e in events]
    assert percents == sorted(percents) and percents[-1] == 100.0
    # Other points, other settings or other weights: measured again, under another key.
    other_points = E.evaluate(student, data, _cfg(max_points=20), teacher=teacher, teacher_cache=cache)
    other_budget = E.evaluate(student, data, _cfg(square_queries=31), teacher=teacher, teacher_cache=cache)
    changed = _train(48, data.x_train, data.y_train, 1)
    with torch.no_grad():
        changed[1].bias[0] += 1e-3
    other_weights = E.evaluate(student, data, _cfg(), teacher=changed, teacher_cache=cache)
    keys = {r["teacher_evaluation"]["key"] for r in (first, other_points, other_budget, other_weights)}
    assert len(keys) == 4
    assert not any(r["teacher_evaluation"]["cached"] for r in (other_points, other_budget, other_weights))
    assert len(list((tmp_path / "cache").glob("*.json"))) == 4


def test_unreadable_cache_entry_is_a_miss(setup, tmp_path):
    data, student, teacher = setup
    cache = E.DirectoryReportCache(tmp_path)
    cfg = _cfg()
    points = E.evaluation_points(data, 24)
    key = E.teacher_fingerprint(teacher, points.x, points.y, cfg)
    (tmp_path / f"{key}.json").write_text("{not json")
    report = E.evaluate(student, data, cfg, teacher=teacher, teacher_cache=cache)
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


# ----------------------------------------------------------------------------- points


def _sorted_split(counts: list[int], seed: int = 2) -> DataBundle:
    """A test split sorted by class (as many real splits are), with ``counts[c]`` points of class c."""
    y = torch.cat([torch.full((k,), c) for c, k in enumerate(counts)])
    x, _ = _toy_data(len(y), seed)
    return DataBundle("sorted", x, y, x, y, len(counts), [f"class-{c}" for c in range(len(counts))])


def test_points_are_a_stratified_sample_of_a_class_sorted_split():
    data = _sorted_split([30, 30, 30, 30])
    for n in (4, 10, 22, 57):
        points = E.evaluation_points(data, n, seed=3)
        counts = torch.bincount(points.y, minlength=4)
        assert len(points) == n and int(counts.min()) >= 1 and int(counts.max() - counts.min()) <= 1
        assert torch.equal(points.x, data.x_test[points.index]) and len(set(points.index.tolist())) == n
        # every prefix is stratified too (smoothing and any sub-sample can take one)
        head = torch.bincount(points.y[: n // 2], minlength=4)
        assert int(head.max() - head.min()) <= 1
    assert torch.equal(E.evaluation_points(data, 22, seed=3).index, E.evaluation_points(data, 22, seed=3).index)
    x, y = E.evaluation_points(data, 22, seed=3)  # unpacks as before
    assert torch.equal(y, E.evaluation_points(data, 22, seed=3).y) and len(x) == 22
    assert not torch.equal(E.evaluation_points(data, 22, seed=3).index, E.evaluation_points(data, 22, seed=4).index)


def test_a_small_class_gives_all_its_points_and_the_others_share_the_rest():
    data = _sorted_split([40, 3, 40, 40])
    counts = torch.bincount(E.evaluation_points(data, 60, seed=0).y, minlength=4).tolist()
    assert counts[1] == 3 and sum(counts) == 60
    others = [counts[0], counts[2], counts[3]]
    assert max(others) - min(others) <= 1


def test_points_are_the_same_in_another_process():
    import subprocess
    import sys

    code = ("import torch; from kdiga_core.evaluate import stratified_order; "
            "print(stratified_order(torch.arange(50) // 10, 7)[:23].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(E.stratified_order(torch.arange(50) // 10, 7)[:23].tolist())


def test_report_states_its_points_and_teacher_and_student_see_the_same_ones(setup, monkeypatch):
    _, student, teacher = setup
    data = _sorted_split([12, 12, 12, 12])
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    clean = E.report.clean_accuracy

    def spy(model, x, y, **kw):
        seen["student" if model is student else "teacher"].append(y.clone())
        return clean(model, x, y, **kw)

    monkeypatch.setattr(E.report, "clean_accuracy", spy)
    cfg = _cfg(max_points=18, alignment=False, smoothing_sigma=0.0, latency=False, seed=5)
    report = E.evaluate(student, data, cfg, teacher=teacher)
    assert torch.equal(seen["student"][0], seen["teacher"][0])
    per_class = report["points"]["per_class"]
    assert report["points"] == {"method": "stratified", "seed": 5, "n": 18, "per_class": per_class}
    assert set(per_class) == {"class-0", "class-1", "class-2", "class-3"}
    assert sum(per_class.values()) == 18 and max(per_class.values()) - min(per_class.values()) <= 1
    assert per_class == {f"class-{c}": int((seen["student"][0] == c).sum()) for c in range(4)}


def test_each_accuracy_has_its_sampling_error(setup):
    data, student, _ = setup
    report = E.evaluate(student, data, _cfg(smoothing_sigma=0.0, latency=False, alignment=False))
    rep, n = report["models"]["student"], report["n_points"]
    assert set(rep["sampling_error"]) == {"clean", *rep["attacks"]}
    for key, p in {"clean": rep["clean_accuracy"], **rep["attacks"]}.items():
        assert rep["sampling_error"][key] == pytest.approx(1.96 * (p * (1 - p) / n) ** 0.5, abs=1e-6)
    assert E.sampling_error(0.5, 100) == pytest.approx(0.098) and E.sampling_error(1.0, 10) == 0.0


def test_smoothing_certifies_a_stratified_sub_sample(setup, monkeypatch):
    _, student, _ = setup
    data = _sorted_split([10, 10, 10, 10])
    labels = []
    certify = E.report.certify_smoothing
    monkeypatch.setattr(E.report, "certify_smoothing", lambda m, x, y, *a, **kw: labels.append(y) or certify(
        m, x, y, *a, **kw))
    E.evaluate(student, data, _cfg(max_points=40, smoothing_points=6, alignment=False, latency=False))
    counts = torch.bincount(labels[0], minlength=4)
    assert len(labels[0]) == 6 and int(counts.min()) >= 1 and int(counts.max() - counts.min()) <= 1


# ----------------------------------------------------------------------------- progress


def test_progress_reports_every_stage_with_labels_that_match_the_work(setup, monkeypatch):
    data, student, teacher = setup
    events: list[dict] = []
    labels_at: dict[str, str] = {}

    def spying(module, name):
        real = getattr(module, name)

        def spy(*a, **kw):
            labels_at.setdefault(name, events[-1]["stage"])
            return real(*a, **kw)

        monkeypatch.setattr(module, name, spy)

    spying(E.report, "model_stats")
    spying(E.report, "certify_smoothing")
    spying(E.alignment, "local_linearity")
    E.evaluate(student, data, _cfg(), teacher=teacher, on_progress=events.append)
    assert all(set(e) == PROGRESS_KEYS and e["phase"] == "evaluate" for e in events)
    assert labels_at == {"model_stats": "student: size and latency",
                         "certify_smoothing": "student: randomized smoothing",
                         "local_linearity": "student: local linearity"}
    stages = [e["stage"] for e in events]
    for part in ("APGD-CE", "APGD-T", "FAB-T", "Square"):
        assert f"student: autoattack ({part})" in stages and f"teacher: autoattack ({part})" in stages
    assert "teacher: eps curve (eps 0.1)" in stages and "teacher: input gradients" in stages
    percents = [e["percent"] for e in events]
    assert percents == sorted(percents) and percents[-1] == 100.0 and events[-1]["eta_s"] == 0.0
    assert all(0 <= e["points_done"] <= e["points_total"] for e in events if e["points_total"])
    assert any(e["eta_s"] is not None and e["eta_s"] > 0 for e in events)


def test_tracker_weighs_stages_by_cost_and_never_goes_back(monkeypatch):
    from types import SimpleNamespace

    from kdiga_core.evaluate.plan import StageCost

    clock = [100.0]
    monkeypatch.setattr(E.progress, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    events: list[dict] = []
    speed = E.Speed(per_call=0.0, per_point=1.0)  # a second per pass of a point: cost = passes × points
    tracker = E.Tracker(events.append, {"a": StageCost(speed, 10, 1.0, 4), "b (APGD-CE)": StageCost(speed, 10, 3.0, 4),
                                        "b (Square)": StageCost(speed, 10, 6.0, 4)})
    tick = tracker.stage("a")
    assert events[-1]["eta_s"] is None  # nothing done yet: no estimate
    clock[0] = 102.0
    tick(5, 10)
    assert events[-1]["percent"] == 5.0 and events[-1]["eta_s"] == 38.0  # 5% in 2 s: 95% in 38 s
    tick = tracker.stage("b")
    tick(10, 10, part="apgd-ce")
    assert events[-1]["stage"] == "b (APGD-CE)" and events[-1]["percent"] == 40.0
    tick(0, 5, part="square")  # the survivors are half the planned points: Square costs half
    assert events[-1]["percent"] == pytest.approx(100 * 40 / 70, abs=0.01)
    tick(5, 5, part="square")
    assert events[-1]["percent"] == 100.0
    tracker.finish(10)
    assert [e["percent"] for e in events] == sorted(e["percent"] for e in events)


# ----------------------------------------------------------------------------- cache with batch norm


def test_teacher_cache_works_for_a_batchnorm_teacher(setup, tmp_path):
    from kdiga_core.config import ModelSpec
    from kdiga_core.models import build_model

    data, student, _ = setup
    torch.manual_seed(0)
    teacher = build_model(ModelSpec(arch="resnet_small", num_classes=4, in_chans=1, img_size=8)).eval()
    assert any(t.dim() == 0 for t in teacher.state_dict().values())  # num_batches_tracked
    cache = E.DirectoryReportCache(tmp_path)
    cfg = _cfg(smoothing_sigma=0.0, latency=False, alignment=False)
    first = E.evaluate(student, data, cfg, teacher=teacher, teacher_cache=cache)
    second = E.evaluate(student, data, cfg, teacher=teacher, teacher_cache=cache)
    assert first["teacher_evaluation"]["cached"] is False and second["teacher_evaluation"]["cached"] is True
    assert second["models"]["teacher"] == first["models"]["teacher"]
    points = E.evaluation_points(data, cfg.max_points)
    bf16 = E.teacher_fingerprint(teacher.to(torch.bfloat16), points.x, points.y, cfg)
    assert bf16 != first["teacher_evaluation"]["key"]
