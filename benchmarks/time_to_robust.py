"""Robust accuracy against training time on digits, with augmentation (issue 13).

A cnn_medium teacher is trained with PGD-AT at L∞ ε = 0.1 (or loaded from `teacher_path`); then
cnn_small students are trained with each method for `epochs` epochs and `seeds` seeds, with
augmentation (random crop, 1 pixel of padding, no flips: digits change meaning when flipped).
After every epoch the student's PGD-20 accuracy is measured on a fixed class-stratified subset of
the test split (the evaluation is not counted in the training time); at the end, AutoAttack
(standard: APGD-CE, APGD-T, FAB-T, Square) on the first `aa_points` of that subset.

For each method: the mean ± std over seeds of the final PGD-20 and AutoAttack accuracy, and the
training wall time (and CPU time) at which the student first reaches 90% of the teacher's PGD-20
accuracy on the same subset ("never" when it does not within the epochs). The curve is written
as a PNG.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdiga_core.attacks import PGD, predict, run_autoattack
from kdiga_core.config import ObjectiveConfig, TrainConfig
from kdiga_core.data import load_dataset
from kdiga_core.evaluate import evaluation_points
from kdiga_core.models import create_model
from kdiga_core.objectives import TEACHER_METHODS
from kdiga_core.train import train

EPS = 0.1
TARGET = 0.9  # of the teacher's robust accuracy
LOWER = 0.8


# the lazy-IGA grid: (iga_every, iga_fraction, with the teacher bank)
Lazy = tuple[int, float, bool]
LAZY_GRID: tuple[Lazy, ...] = ((4, 0.5, False), (1, 0.25, False), (1, 0.25, True), (2, 1.0, True))


def lazy_name(every: int, fraction: float, bank: bool = False) -> str:
    return f"kdiga{'_bank' if bank else ''}_lazy_k{every}_f{fraction:g}"


def parse_lazy(text: str) -> tuple[Lazy, ...]:
    """``8:1:bank,4:0.5`` → the grid (k, f, bank)."""
    grid = []
    for item in filter(None, text.split(",")):
        k, f, *bank = item.split(":")
        grid.append((int(k), float(f), bank == ["bank"]))
    return tuple(grid)


def student_methods(lazy: tuple[Lazy, ...], bank_k: int) -> dict[str, dict[str, Any]]:
    """Name → ObjectiveConfig fields; γ = 5 with a 50% warm-up (REPRODUCTION.md's digits setting)."""
    kdiga = {"method": "kdiga", "gamma": 5.0, "gamma_warmup": 0.5}
    adv = {"attack_eps": EPS, "attack_step": 2.5 * EPS / 10, "attack_steps": 10}
    lazies = {lazy_name(k, f, bank): {**kdiga, "iga_every": k, "iga_fraction": f,
                                       **({"teacher_bank_k": bank_k} if bank else {})}
              for k, f, bank in lazy}
    return {
        "kdiga": kdiga, **lazies, "kdiga_bank": {**kdiga, "teacher_bank_k": bank_k},
        "rslad": {"method": "rslad", **adv}, "ard": {"method": "ard", **adv}, "pgd_at": {"method": "pgd_at", **adv},
    }


def train_cfg(epochs: int, seed: int) -> TrainConfig:
    # AdamW at 3e-3: what benchmarks/reproduce_digits.py found these small plain-ReLU CNNs need
    return TrainConfig(epochs=epochs, batch_size=64, optimizer="adamw", lr=3e-3, weight_decay=0.05,
                       schedule="cosine", augment=True, hflip=False, seed=seed, device="cpu")


def robust_teacher(data: Any, path: Path | None, epochs: int, log: Callable[[str], None]) -> nn.Module:
    torch.manual_seed(0)
    teacher = create_model("cnn_medium", data.num_classes, in_chans=1, img_size=8)
    if path is not None and path.exists():
        teacher.load_state_dict(load_file(str(path)))
        return teacher.eval()
    obj = ObjectiveConfig(method="pgd_at", attack_eps=EPS, attack_step=2.5 * EPS / 7, attack_steps=7)
    started = time.perf_counter()
    train(teacher, data, obj, TrainConfig(epochs=epochs, batch_size=64, optimizer="adamw", lr=3e-3,
                                          weight_decay=0.05, seed=0, device="cpu"))
    log(f"teacher trained in {time.perf_counter() - started:.0f} s")
    if path is not None:
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    return teacher.eval()


def pgd20(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    attack = PGD(EPS, "Linf", steps=20, step_size=2.5 * EPS / 20, generator=torch.Generator().manual_seed(0))
    return float((predict(model, attack(model, x, y)) == y).float().mean())


def curve(method: str, spec: dict[str, Any], data: Any, teacher: nn.Module, points: Any, *, epochs: int,
          seed: int) -> dict[str, Any]:
    """Train one student, measuring PGD-20 after each epoch outside the training clock."""
    torch.manual_seed(seed)
    student = create_model("cnn_small", data.num_classes, in_chans=1, img_size=8)
    rows: list[dict[str, float]] = []
    clock = {"wall": 0.0, "cpu": 0.0, "since": time.perf_counter(), "cpu_since": time.process_time()}

    def on_step(p: dict[str, Any]) -> None:
        if p["step"] != p["steps_per_epoch"]:
            return
        clock["wall"] += time.perf_counter() - clock["since"]
        clock["cpu"] += time.process_time() - clock["cpu_since"]
        was = student.training
        student.eval()
        rows.append({"epoch": p["epoch"], "wall_s": clock["wall"], "cpu_s": clock["cpu"],
                     "pgd20": pgd20(student, points.x, points.y)})
        student.train(was)
        clock["since"], clock["cpu_since"] = time.perf_counter(), time.process_time()

    train(student, data, ObjectiveConfig(**spec), train_cfg(epochs, seed),
          teacher=teacher if spec["method"] in TEACHER_METHODS else None, on_step=on_step)
    return {"method": method, "seed": seed, "curve": rows, "model": student.eval()}


def first_reach(rows: list[dict[str, float]], threshold: float) -> dict[str, float] | None:
    return next((r for r in rows if r["pgd20"] >= threshold), None)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(*, epochs: int, seeds: int, lazy: tuple[Lazy, ...] = LAZY_GRID, bank_k: int, subset: int, aa_points: int,
        aa_queries: int, teacher_path: Path | None, teacher_epochs: int, plot: Path | None,
        log: Callable[[str], None], partial: Callable[[dict[str, Any]], None] | None = None,
        first_seed: int = 0, methods: tuple[str, ...] = ()) -> dict[str, Any]:
    torch.set_num_threads(1)
    data = load_dataset("digits")
    points = evaluation_points(data, subset, seed=0)
    teacher = robust_teacher(data, teacher_path, teacher_epochs, log)
    aa_x, aa_y = points.x[:aa_points], points.y[:aa_points]
    teacher_pgd = pgd20(teacher, points.x, points.y)
    teacher_aa = run_autoattack(teacher, aa_x, aa_y, EPS, "Linf", seed=0, n_queries=aa_queries)["robust_accuracy"]
    threshold = TARGET * teacher_pgd
    log(f"teacher: PGD-20 {teacher_pgd:.3f}, AutoAttack {teacher_aa:.3f}; target PGD-20 {threshold:.3f}")
    out: dict[str, Any] = {"load_start": os.getloadavg(), "teacher_pgd20": teacher_pgd, "teacher_aa": teacher_aa,
                           "threshold": threshold, "epochs": epochs, "seeds": seeds, "subset": subset,
                           "aa_points": aa_points, "aa_queries": aa_queries, "lazy": lazy, "bank_k": bank_k,
                           "runs": []}
    for seed in range(first_seed, first_seed + seeds):
        for method, spec in student_methods(lazy, bank_k).items():
            if methods and method not in methods:
                continue
            run_ = curve(method, spec, data, teacher, points, epochs=epochs, seed=seed)
            model = run_.pop("model")
            run_["autoattack"] = run_autoattack(model, aa_x, aa_y, EPS, "Linf", seed=0,
                                                n_queries=aa_queries)["robust_accuracy"]
            run_["reached"] = first_reach(run_["curve"], threshold)
            last = run_["curve"][-1]
            log(f"seed {seed} {method}: {last['wall_s']:.1f} s, PGD-20 {last['pgd20']:.3f}, "
                f"AA {run_['autoattack']:.3f}, reached {run_['reached'] and run_['reached']['wall_s']}")
            out["runs"].append(run_)
            if partial is not None:  # an interrupted run keeps the students it finished
                partial(out)
    out["load_end"] = os.getloadavg()
    out["summary"] = summarize(out)
    if plot is not None:
        draw(out, plot)
    return out


def summarize(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in out["runs"]:
        by.setdefault(r["method"], []).append(r)
    summary = {}
    for method, runs in by.items():
        reached = [r["reached"] for r in runs if r["reached"] is not None]
        summary[method] = {
            "pgd20": mean_std([r["curve"][-1]["pgd20"] for r in runs]),
            "autoattack": mean_std([r["autoattack"] for r in runs]),
            "train_wall_s": mean_std([r["curve"][-1]["wall_s"] for r in runs]),
            "train_cpu_s": mean_std([r["curve"][-1]["cpu_s"] for r in runs]),
            "reached": f"{len(reached)}/{len(runs)}",
            "time_to_target_wall_s": mean_std([r["wall_s"] for r in reached]) if reached else None,
            "time_to_target_cpu_s": mean_std([r["cpu_s"] for r in reached]) if reached else None,
        }
        # a lower bar as well, so that methods that all miss 90% can still be told apart
        low = [first_reach(r["curve"], LOWER * out["teacher_pgd20"]) for r in runs]
        low = [x for x in low if x is not None]
        summary[method].update(reached_lower=f"{len(low)}/{len(runs)}",
                               time_to_lower_cpu_s=mean_std([x["cpu_s"] for x in low]) if low else None)
    return summary


def draw(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # wall time is what a user waits; CPU time is what other processes on a shared machine disturb less
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = dict(zip(out["summary"], plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, clock, label in ((axes[0], "wall_s", "training wall time (s)"), (axes[1], "cpu_s", "training CPU time (s)")):
        for r in out["runs"]:
            ax.plot([c[clock] for c in r["curve"]], [100 * c["pgd20"] for c in r["curve"]], color=colors[r["method"]],
                    alpha=0.8, label=r["method"] if r["seed"] == min(x["seed"] for x in out["runs"]) else None)
        ax.axhline(100 * out["threshold"], color="k", ls="--", lw=1, label="90% of the teacher's PGD-20")
        ax.set_xlabel(label + ", evaluation excluded")
    axes[0].set_ylabel("PGD-20 accuracy (%), ε = 0.1, stratified test subset")
    fig.suptitle(f"digits, cnn_medium → cnn_small, augmentation on, {out['seeds']} seeds")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pm(pair: tuple[float, float] | None, scale: float = 100.0, spec: str = ".1f") -> str:
    return "never" if pair is None else f"{format(scale * pair[0], spec)} ± {format(scale * pair[1], spec)}"


def _load(values: Any) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def markdown(out: dict[str, Any], plot: str | None = None) -> str:
    """The table (mean ± std over seeds) and the verdict on issue 13's targets."""
    s = out["summary"]
    rows = ["| method | PGD-20 % (last epoch) | AutoAttack % | train wall s | train CPU s | reached 90% | "
            "time to 90%: wall s | CPU s | reached 80% | time to 80%: CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in s.items():
        rows.append(f"| {m} | {_pm(r['pgd20'])} | {_pm(r['autoattack'])} | {_pm(r['train_wall_s'], 1, '.0f')} | "
                    f"{_pm(r['train_cpu_s'], 1, '.0f')} | {r['reached']} | {_pm(r['time_to_target_wall_s'], 1, '.0f')} | "
                    f"{_pm(r['time_to_target_cpu_s'], 1, '.1f')} | {r.get('reached_lower', '–')} | "
                    f"{_pm(r.get('time_to_lower_cpu_s'), 1, '.1f')} |")
    text = [f"Teacher (cnn_medium, PGD-AT): PGD-20 {100 * out['teacher_pgd20']:.1f}% on the {out['subset']}-point "
            f"stratified subset, AutoAttack {100 * out['teacher_aa']:.1f}% on its first {out['aa_points']} points "
            f"(Square {out['aa_queries']} queries); target: PGD-20 ≥ {100 * out['threshold']:.1f}% (90%). "
            f"{out['epochs']} epochs, {out['seeds']} seeds, load average {_load(out['load_start'])} at the start, "
            f"{_load(out['load_end'])} at the end (2 cores).", "", "\n".join(rows)]
    if plot:
        text += ["", f"![robust accuracy against training time]({plot})"]
    return "\n".join(text)


def main() -> None:
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed … (to split seeds over processes)")
    p.add_argument("--bank-k", type=int, default=4)
    p.add_argument("--lazy", type=parse_lazy, default=LAZY_GRID,
                   help="lazy-IGA grid: k:f[:bank],… (default 4:0.5,1:0.25,1:0.25:bank,2:1:bank)")
    p.add_argument("--methods", default="", help="only these methods (comma-separated names; default: all)")
    p.add_argument("--subset", type=int, default=450)
    p.add_argument("--aa-points", type=int, default=450)
    p.add_argument("--aa-queries", type=int, default=1000)
    p.add_argument("--teacher", type=Path, default=None, help="teacher weights to reuse (written when absent)")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    out = run(epochs=a.epochs, seeds=a.seeds, first_seed=a.first_seed, bank_k=a.bank_k, lazy=a.lazy,
              methods=tuple(filter(None, a.methods.split(","))), subset=a.subset, aa_points=a.aa_points,
              aa_queries=a.aa_queries, teacher_path=a.teacher, teacher_epochs=a.teacher_epochs, plot=a.plot,
              log=lambda m: print(m, file=sys.stderr, flush=True),  # noqa: T201
              partial=lambda o: a.out.with_suffix(".partial.json").write_text(json.dumps(o, indent=1)))
    a.out.write_text(json.dumps(out, indent=1))
    print(markdown(out, str(a.plot) if a.plot else None))  # noqa: T201


if __name__ == "__main__":
    main()
