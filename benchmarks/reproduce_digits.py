"""Reproduce the KDIGA claim on scikit-learn's digits, on a CPU, in minutes.

Claim (Shao et al., arXiv 2110.12072; docs/method.md §7): standard KD does not transfer a robust
teacher's adversarial robustness to a student of another architecture; KDIGA does.

The jobs are the recipe files of examples/digits/ (the ones the demo submits to the service):
`robust_teacher.json` for the teacher, `student_<method>.json` for each student. Their
architecture, objective and `train` settings are used as they are, except what this script is
for: a longer schedule (15 teacher and 100 student epochs; --teacher-epochs, --student-epochs),
CPU, the run's --seed, and --eps / --kdiga when given. Evaluation is this script's own (below),
not the recipes' `evaluation` section.

Phases (each timed):
 1. teacher: cnn_medium trained with PGD-AT at ε (L∞);
 2. students: cnn_small (~4x fewer parameters) trained with CE, KD and KDIGA, same epochs and
    optimizer;
 3. evaluation: clean and PGD-20 accuracy on the whole test split, AutoAttack (standard:
    APGD-CE, APGD-T, FAB-T, Square) on the first --aa-points test points;
 4. optional γ sweep for KDIGA (--sweep), with and without warm-up.

Usage:
    python benchmarks/reproduce_digits.py [--quick] [--seed 0] [--out results.json] [--sweep 1,3,10,30,100]
"""

from __future__ import annotations

import argparse
import os
import sys

THREADS_FLAG = "--threads"


def _early_threads(argv: list[str]) -> int:
    """Read --threads before torch is imported: OpenMP reads OMP_NUM_THREADS once, at start."""
    if THREADS_FLAG in argv:
        return int(argv[argv.index(THREADS_FLAG) + 1])
    return 1


os.environ.setdefault("OMP_NUM_THREADS", str(_early_threads(sys.argv)))

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from kdiga_core.attacks import PGD, predict, run_autoattack  # noqa: E402
from kdiga_core.config import ObjectiveConfig, TrainConfig  # noqa: E402
from kdiga_core.data import load_dataset  # noqa: E402
from kdiga_core.models import count_parameters, create_model  # noqa: E402
from kdiga_core.objectives import TEACHER_METHODS  # noqa: E402
from kdiga_core.train import train  # noqa: E402
from kdiga_launcher.demo import load_recipe  # noqa: E402  (examples/digits/<name>.json, the demo's reader)

TEACHER_RECIPE = load_recipe("robust_teacher")
STUDENT_RECIPE = "student_{method}"  # student_ce, student_kd, student_kdiga
TEACHER_ARCH, STUDENT_ARCH = TEACHER_RECIPE["student"]["arch"], load_recipe("student_kdiga")["student"]["arch"]
# The reproduction's schedule (REPRODUCTION.md); the recipes' shorter one is the demo's.
EPOCHS = {"teacher": 15, "student": 100}
QUICK_EPOCHS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer epochs and AutoAttack points (demo/tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write all numbers and settings as JSON here")
    p.add_argument(THREADS_FLAG, type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    p.add_argument("--eps", type=float, default=None,
                   help="L∞ radius in [0, 1] pixel units (default: the teacher recipe's attack_eps)")
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--student-epochs", type=int, default=None)
    p.add_argument("--student-lr", type=float, default=None)
    p.add_argument("--aa-points", type=int, default=None, help="test points for AutoAttack (first N)")
    p.add_argument("--aa-queries", type=int, default=5000, help="Square's query budget (standard: 5000)")
    p.add_argument("--teacher-weights", type=Path, default=None,
                   help="reuse a teacher saved by an earlier run (safetensors) instead of training one")
    p.add_argument("--skip-aa", action="store_true", help="no AutoAttack (for quick γ probes)")
    p.add_argument("--methods", default="ce,kd,kdiga", help="student methods to train")
    p.add_argument("--sweep", default="", help="comma-separated γ values for a KDIGA sweep (PGD-20 only)")
    p.add_argument("--sweep-warmups", default="0,0.3", help="gamma_warmup values for the sweep")
    p.add_argument("--kdiga", type=json.loads, default={},
                   help="JSON ObjectiveConfig overrides of student_kdiga.json's objective, for KDIGA students and the sweep")
    p.add_argument("--sweep-modes", default="auto", help="iga_mode values for the sweep")
    return p.parse_args(argv)


def train_config(recipe: dict[str, Any], epochs: int, args: argparse.Namespace) -> TrainConfig:
    """The recipe's `train` settings with the reproduction's schedule, seed and device."""
    return TrainConfig.from_dict({**recipe["train"], "epochs": epochs, "seed": args.seed, "device": "cpu"})


def objective(recipe: dict[str, Any], eps: float, **overrides: Any) -> ObjectiveConfig:
    """The recipe's objective at radius `eps`: the inner attack (step scaled with ε) and the IGA noise."""
    obj = dict(recipe["objective"])
    scale = eps / obj["attack_eps"] if obj.get("attack_eps") else None
    if scale is not None:
        obj.update(attack_eps=eps, attack_step=obj["attack_step"] * scale)
    if obj.get("iga_noise_eps"):
        obj["iga_noise_eps"] = eps
    return ObjectiveConfig.from_dict({**obj, **overrides})


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting of the run in one place (also written to the JSON)."""
    quick = args.quick
    eps = args.eps if args.eps is not None else TEACHER_RECIPE["objective"]["attack_eps"]
    # robust_teacher.json: AdamW (these small plain-ReLU CNNs barely move in 100 SGD steps at lr 0.05),
    # PGD-7 with step 2.5ε/7 instead of PGD-10 (the same ball coverage for 30% less teacher time)
    teacher_train = train_config(TEACHER_RECIPE, args.teacher_epochs or (QUICK_EPOCHS if quick else EPOCHS["teacher"]),
                                 args)
    student_train = train_config(load_recipe(STUDENT_RECIPE.format(method="kd")),
                                 args.student_epochs or (QUICK_EPOCHS if quick else EPOCHS["student"]), args)
    if args.student_lr:
        student_train = replace(student_train, lr=args.student_lr)
    return {"eps": eps, "teacher_train": teacher_train, "teacher_obj": objective(TEACHER_RECIPE, eps),
            "student_train": student_train, "recipes": "examples/digits",
            "aa_points": args.aa_points or (20 if quick else 100), "aa_queries": args.aa_queries,
            "pgd": {"steps": 20, "step_size": 2.5 * eps / 20, "random_start": True}}


def student_objective(method: str, args: argparse.Namespace, cfg: dict[str, Any], **kw: Any) -> ObjectiveConfig:
    """examples/digits/student_<method>.json's objective (+ --kdiga for KDIGA), then `kw`."""
    extra = args.kdiga if method == "kdiga" else {}
    name = STUDENT_RECIPE.format(method=method)
    try:
        recipe = load_recipe(name)
    except FileNotFoundError:
        raise SystemExit(f"No recipe examples/digits/{name}.json for method '{method}'; add one or drop it "
                         "from --methods.") from None
    return objective(recipe, cfg["eps"], **{**extra, **kw})


# ----------------------------------------------------------------------------- evaluation


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y).float().mean())


def evaluate(model: torch.nn.Module, data: Any, cfg: dict[str, Any], *, seed: int, autoattack: bool) -> dict[str, Any]:
    """Clean + PGD-20 on the full test split, AutoAttack on the first cfg['aa_points'] points."""
    started = time.perf_counter()
    x, y = data.x_test, data.y_test
    gen = torch.Generator().manual_seed(seed)
    pgd = PGD(cfg["eps"], "Linf", steps=20, step_size=cfg["pgd"]["step_size"], generator=gen)
    out: dict[str, Any] = {"n_points": len(x), "clean": accuracy(model, x, y), "pgd20": accuracy(model, pgd(model, x, y), y)}
    if autoattack:
        n = cfg["aa_points"]
        aa_started = time.perf_counter()
        aa = run_autoattack(model, x[:n], y[:n], cfg["eps"], "Linf", seed=seed, n_queries=cfg["aa_queries"])
        out.update(aa_points=n, aa_clean=aa["clean_accuracy"], autoattack=aa["robust_accuracy"],
                   aa_breakdown=aa["breakdown"], aa_seconds=time.perf_counter() - aa_started)
    out["eval_seconds"] = time.perf_counter() - started
    return out


# ----------------------------------------------------------------------------- phases


def make_model(arch: str, data: Any, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # same initial weights for every student of a run
    return create_model(arch, data.num_classes, in_chans=data.in_chans, img_size=data.img_size)


def train_teacher(data: Any, cfg: dict[str, Any], args: argparse.Namespace) -> tuple[torch.nn.Module, float]:
    teacher = make_model(TEACHER_ARCH, data, args.seed)
    if args.teacher_weights is not None:
        teacher.load_state_dict(load_file(str(args.teacher_weights)))
        print(f"[teacher] loaded {args.teacher_weights}", flush=True)
        return teacher.eval(), 0.0
    started = time.perf_counter()
    result = train(teacher, data, cfg["teacher_obj"], cfg["teacher_train"], on_step=epoch_printer("teacher pgd_at"))
    return result.model, time.perf_counter() - started


def train_student(data: Any, teacher: torch.nn.Module, obj: ObjectiveConfig, cfg: dict[str, Any], seed: int,
                  label: str) -> tuple[torch.nn.Module, float, list[dict[str, float]]]:
    student = make_model(STUDENT_ARCH, data, seed)
    started = time.perf_counter()
    result = train(student, data, obj, cfg["student_train"], teacher=teacher if obj.method in TEACHER_METHODS else None,
                   on_step=epoch_printer(label))
    return result.model, time.perf_counter() - started, result.history


def epoch_printer(label: str):
    def on_step(p: dict[str, Any]) -> None:
        if p["step"] == p["steps_per_epoch"]:
            parts = " ".join(f"{k}={p[k]:.4g}" for k in ("loss", "ce", "kd", "iga", "gamma") if k in p)
            print(f"  [{label}] epoch {p['epoch']}/{p['epochs']} {parts} eta {p['eta_s']:.0f}s", flush=True)

    return on_step


# ----------------------------------------------------------------------------- output


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def print_table(rows: list[dict[str, Any]], teacher_aa: float | None, teacher_pgd: float) -> str:
    head = ("| model | arch | params | method | clean % | PGD-20 % | AutoAttack % | AA kept vs teacher | "
            "PGD kept vs teacher | train s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        ev = r["eval"]
        aa = ev.get("autoattack")
        kept_aa = "-" if aa is None or not teacher_aa else f"{100 * aa / teacher_aa:.0f}%"
        kept_pgd = f"{100 * ev['pgd20'] / teacher_pgd:.0f}%" if teacher_pgd else "-"
        lines.append(f"| {r['name']} | {r['arch']} | {r['params']:,} | {r['method']} | {pct(ev['clean'])} | "
                     f"{pct(ev['pgd20'])} | {pct(aa)} | {kept_aa} | {kept_pgd} | {r['train_seconds']:.0f} |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores_available": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "load_average_start": os.getloadavg()}


def jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


# ----------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = settings(args)
    info = machine()
    print(f"machine: {info}", flush=True)
    print(f"settings: {json.dumps(jsonable(cfg))}", flush=True)
    wall = time.perf_counter()
    phases: dict[str, float] = {}

    started = time.perf_counter()
    data = load_dataset("digits")
    phases["data"] = time.perf_counter() - started

    teacher, phases["teacher_train"] = train_teacher(data, cfg, args)
    rows: list[dict[str, Any]] = []
    t_eval = evaluate(teacher, data, cfg, seed=args.seed, autoattack=not args.skip_aa)
    phases["teacher_eval"] = t_eval["eval_seconds"]
    rows.append({"name": "teacher", "arch": TEACHER_ARCH, "params": count_parameters(teacher), "method": "pgd_at",
                 "train_seconds": phases["teacher_train"], "eval": t_eval})
    print(f"[teacher] clean {pct(t_eval['clean'])} PGD-20 {pct(t_eval['pgd20'])} AA {pct(t_eval.get('autoattack'))} "
          f"train {phases['teacher_train']:.0f}s eval {t_eval['eval_seconds']:.0f}s", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        weights = args.out.with_suffix(".teacher.safetensors")
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))

    for method in [m for m in args.methods.split(",") if m]:
        # pgd_at here is the student architecture's own adversarial training: its robustness ceiling
        obj = cfg["teacher_obj"] if method == "pgd_at" else student_objective(method, args, cfg)
        student, seconds, history = train_student(data, teacher, obj, cfg, args.seed, f"student {method}")
        ev = evaluate(student, data, cfg, seed=args.seed, autoattack=not args.skip_aa)
        phases[f"student_{method}_train"], phases[f"student_{method}_eval"] = seconds, ev["eval_seconds"]
        rows.append({"name": "student", "arch": STUDENT_ARCH, "params": count_parameters(student), "method": method,
                     "objective": obj.to_dict(), "train_seconds": seconds, "eval": ev, "history": history})
        print(f"[student {method}] clean {pct(ev['clean'])} PGD-20 {pct(ev['pgd20'])} AA {pct(ev.get('autoattack'))} "
              f"train {seconds:.0f}s eval {ev['eval_seconds']:.0f}s", flush=True)

    sweep = run_sweep(data, teacher, cfg, args)
    phases["total"] = time.perf_counter() - wall
    info["load_average_end"] = os.getloadavg()

    print(f"\nDigits, L∞ ε = {cfg['eps']}: clean and PGD-20 on all {len(data.x_test)} test points, "
          f"AutoAttack (standard) on the first {cfg['aa_points']}.", flush=True)
    table = print_table(rows, t_eval.get("autoattack"), t_eval["pgd20"])
    if sweep:
        print_sweep(sweep, t_eval["pgd20"])
    print("phase seconds: " + ", ".join(f"{k}={v:.0f}" for k, v in phases.items()), flush=True)
    if args.out is not None:
        result = {"settings": jsonable(cfg), "machine": info, "rows": rows, "sweep": sweep, "phases": phases,
                  "table": table, "args": {k: str(v) for k, v in vars(args).items()}}
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}", flush=True)


def run_sweep(data: Any, teacher: torch.nn.Module, cfg: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """KDIGA students for every (γ, warm-up, mode); clean + PGD-20 on the full test split."""
    gammas = [float(g) for g in args.sweep.split(",") if g]
    out = []
    for mode in args.sweep_modes.split(","):
        for warmup in [float(w) for w in args.sweep_warmups.split(",")]:
            for gamma in gammas:
                obj = student_objective("kdiga", args, cfg, gamma=gamma, gamma_warmup=warmup, iga_mode=mode)
                label = f"sweep γ={gamma:g} warmup={warmup:g} {mode}"
                student, seconds, history = train_student(data, teacher, obj, cfg, args.seed, label)
                ev = evaluate(student, data, cfg, seed=args.seed, autoattack=False)
                out.append({"gamma": gamma, "gamma_warmup": warmup, "iga_mode": mode, "objective": obj.to_dict(),
                            "train_seconds": seconds,
                            "eval": ev, "final_iga": history[-1].get("iga")})
                print(f"[{label}] clean {pct(ev['clean'])} PGD-20 {pct(ev['pgd20'])} train {seconds:.0f}s", flush=True)
    return out


def print_sweep(sweep: list[dict[str, Any]], teacher_pgd: float) -> None:
    print("\n| γ | warm-up | iga_mode | clean % | PGD-20 % | PGD kept vs teacher | final IGA | train s |")
    print("|" + "---|" * 8)
    for s in sweep:
        ev = s["eval"]
        kept = f"{100 * ev['pgd20'] / teacher_pgd:.0f}%" if teacher_pgd else "-"
        iga = "-" if s["final_iga"] is None else f"{s['final_iga']:.3g}"
        print(f"| {s['gamma']:g} | {s['gamma_warmup']:g} | {s['iga_mode']} | {pct(ev['clean'])} | {pct(ev['pgd20'])} | "
              f"{kept} | {iga} | {s['train_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
