"""Does ``objective.gamma: "auto"`` pick a good γ, and say when robustness will not transfer? (digits)

Every student here is trained by the service's own job function (`kdiga_core.jobs.run_job`), with
the objective's defaults (γ not given, so "auto"; α, τ, warm-up, IGA mode as the library ships them)
and one TrainConfig for every pair: the digits recipe of REPRODUCTION.md and the demo (AdamW 3e-3,
weight decay 0.05, cosine, batch 64, 40 epochs), since the library's own TrainConfig defaults are
not yet scaled to the data (issue 17). Each report measures clean, PGD-20 and AutoAttack (standard)
accuracy on the first 300 test points (the digits test split is a shuffled, stratified draw).

Steps (each writes JSON files under --out; `all` prints the commands, run them in parallel):
  teachers   PGD-AT teachers (cnn_medium and cnn_small at each ε) and a natural cnn_medium.
  job        one distill job: --teacher, --student, --eps, --seed, and --gamma (a number, "kd" or "auto").
  plan       the job commands of the study: 4 robust pairs × 2 ε with γ auto, the natural teacher,
             and on the main pair (cnn_medium → cnn_small, ε 0.1) the full γ grid trained to the
             end and γ auto, 3 seeds each.
  summarize  the tables of REPRODUCTION.md ("γ chosen per job").
  cost       CPU seconds of a γ-auto job's training against one fixed-γ run (main pair, --seed).

Usage:
    python benchmarks/gamma_auto_digits.py teachers --out runs/gamma
    python benchmarks/gamma_auto_digits.py plan --out runs/gamma | xargs -P 2 -I{} sh -c {}
    python benchmarks/gamma_auto_digits.py summarize --out runs/gamma
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

EPSILONS = (0.1, 0.2)
TEACHERS = ("cnn_medium", "cnn_small")
PAIRS = (("cnn_medium", "cnn_small"), ("cnn_medium", "cnn_tiny"), ("cnn_medium", "mlp"), ("cnn_small", "cnn_tiny"))
MAIN = ("cnn_medium", "cnn_small", 0.1)
SEEDS = (0, 1, 2)
STUDENT_TRAIN = {"epochs": 40, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05,
                 "schedule": "cosine", "device": "cpu"}
TEACHER_TRAIN = {**STUDENT_TRAIN, "epochs": 15}


def evaluation(eps: float, autoattack: bool = True) -> dict[str, Any]:
    """PGD-20 and AutoAttack (standard: 100 iterations, Square 5000 queries) on the first 300 test points.

    Without ``autoattack`` (the other pairs: their question is whether a collapse is reported, which
    clean accuracy answers) PGD-20 only.
    """
    attacks = [{"name": "pgd", "eps": eps, "steps": 20}] + ([{"name": "autoattack", "eps": eps}] if autoattack else [])
    return {"attacks": attacks,
            "max_points": 300, "eps_curve": [0.0, eps], "curve_attack_steps": 10, "alignment": False,
            "smoothing_sigma": 0.0, "latency": False}


def teacher_name(arch: str, eps: float | None) -> str:
    return f"{arch}-natural" if eps is None else f"{arch}-pgdat-{eps:g}"


# ----------------------------------------------------------------------------- steps


def train_teachers(out: Path) -> None:
    """PGD-AT teachers at each ε (PGD-7, step 2.5ε/7, as REPRODUCTION.md) and one natural teacher."""
    from kdiga_core import jobs

    wanted = [(arch, eps) for arch in TEACHERS for eps in EPSILONS] + [("cnn_medium", None)]
    for arch, eps in wanted:
        folder = out / "teachers" / teacher_name(arch, eps)
        if (folder / "model.safetensors").exists():
            continue
        objective = ({"method": "ce"} if eps is None else
                     {"method": "pgd_at", "attack_eps": eps, "attack_step": 2.5 * eps / 7, "attack_steps": 7})
        spec = {"student": {"arch": arch}, "objective": objective, "train": {**TEACHER_TRAIN, "seed": 0},
                "evaluation": evaluation(eps or 0.1) | {"attacks": [{"name": "pgd", "eps": eps or 0.1}]}}
        _seed(0)
        result = jobs.run_job("adversarial_train", spec, folder / "work", jobs.JobInputs({"kind": "digits"}))
        folder.mkdir(parents=True, exist_ok=True)
        files = {a["name"]: a["path"] for a in result["artifacts"]}
        for name in ("model.safetensors", "model_card.json"):
            (folder / name).write_bytes(Path(files[name]).read_bytes())
        print(f"teacher {folder.name}: {json.dumps(jobs.headline_metrics(result['report']))}", flush=True)


def run_one(out: Path, teacher: str, student: str, eps: float, seed: int, gamma: str) -> None:
    """One distill job through kdiga_core.jobs.run_job; its numbers and timings go to a JSON file.

    AutoAttack runs on the main pair only (the grid comparison); the other pairs are measured with PGD-20.
    """
    from kdiga_core import jobs

    path = out / "jobs" / f"{teacher}__{student}__eps{eps:g}__{gamma}__s{seed}.json"
    if path.exists():
        return
    objective: dict[str, Any] = {"method": "kd"} if gamma == "kd" else {"method": "kdiga"}
    if gamma not in ("kd", "auto"):
        objective["gamma"] = float(gamma)
    main = (teacher, student, eps) == (teacher_name(MAIN[0], MAIN[2]), MAIN[1], MAIN[2])
    spec = {"student": {"arch": student}, "objective": objective, "train": {**STUDENT_TRAIN, "seed": seed},
            "evaluation": evaluation(eps, autoattack=main)}
    folder = out / "teachers" / teacher
    card = json.loads((folder / "model_card.json").read_text())
    work = out / "work" / path.stem
    _seed(seed)
    started = time.perf_counter()
    inputs = jobs.JobInputs({"kind": "digits"}, teacher=jobs.ModelInput(folder / "model.safetensors", card["spec"]),
                            teacher_cache_dir=out / "teacher-cache")
    result = jobs.run_job("distill", spec, work, inputs, jobs.JobHooks(on_step=_stage_logger(path.stem)))
    record = {"teacher": teacher, "student": student, "eps": eps, "seed": seed, "gamma": gamma,
              "wall_s": time.perf_counter() - started, "metrics": result["metrics"],
              "training": json.loads((work / "out" / "model_card.json").read_text()).get("training"),
              "gamma_sweep": result["report"].get("gamma_sweep")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"{path.stem}: clean {record['metrics'].get('student_clean_accuracy')} "
          f"AA {record['metrics'].get('student_autoattack_accuracy')}", flush=True)


def _stage_logger(label: str):
    """Log each new evaluation stage (they are the long part of a job here), with the time."""
    import logging

    last: dict[str, Any] = {}

    def on_step(progress: dict[str, Any]) -> None:
        if progress.get("phase") == "evaluate" and progress.get("stage") != last.get("stage"):
            last["stage"] = progress.get("stage")
            logging.getLogger("benchmark").warning("%s: %s", label, last["stage"])

    return on_step


def plan(out: Path, part: str = "all") -> list[str]:
    """The job commands of the study: ``main`` (grid and auto on the main pair, 3 seeds), ``pairs``, or ``all``."""
    from kdiga_core.config import SweepConfig

    me = f"{sys.executable} {Path(__file__).resolve()} job --out {out}"
    main = f"{me} --teacher {teacher_name(MAIN[0], MAIN[2])} --student {MAIN[1]} --eps {MAIN[2]}"
    # robust students first: their AutoAttack is the long part; collapsed ones evaluate in seconds
    grid = ["kd"] + [f"{g:g}" for g in sorted(SweepConfig().grid())]
    cmds = [f"{main} --seed {s} --gamma auto" for s in SEEDS] if part in ("main", "all") else []
    cmds += [f"{main} --seed {s} --gamma {g}" for g in grid for s in SEEDS] if part in ("main", "all") else []
    if part in ("pairs", "all"):
        cmds += [f"{me} --teacher {teacher_name(t, eps)} --student {st} --eps {eps} --seed 0 --gamma auto"
                 for t, st in PAIRS for eps in EPSILONS if (t, st, eps) != MAIN]
        cmds += [f"{me} --teacher {teacher_name('cnn_medium', None)} --student cnn_small --eps 0.1 --seed 0 "
                 "--gamma auto"]
    return cmds


def measure_cost(out: Path, seed: int) -> dict[str, Any]:
    """CPU seconds of a γ-auto job's training (sweep + final run) against one fixed-γ run, main pair.

    Process CPU time, not wall time: on a shared machine wall time measures the other tenants. One
    thread. The fixed-γ run is timed twice and the faster counts (the first warms up the allocator).
    """
    import time

    import torch

    from kdiga_core import jobs, models
    from kdiga_core.config import AttackSpec, ModelSpec, ObjectiveConfig, TrainConfig
    from kdiga_core.data import load_digits
    from kdiga_core.sweep import choose_gamma
    from kdiga_core.train import train

    folder = out / "teachers" / teacher_name(MAIN[0], MAIN[2])
    card = json.loads((folder / "model_card.json").read_text())
    teacher = jobs.ModelInput(folder / "model.safetensors", card["spec"]).load().eval()
    data, cfg = load_digits(), TrainConfig(**{**STUDENT_TRAIN, "seed": seed})
    spec = ModelSpec(arch=MAIN[1], num_classes=10, in_chans=1, img_size=8)

    def student() -> torch.nn.Module:
        _seed(seed)
        return models.build_model(spec)

    def cpu(fn) -> tuple[float, Any]:
        started = time.process_time()
        value = fn()
        return time.process_time() - started, value

    shutil.rmtree(out / "cost" / f"sweep-s{seed}", ignore_errors=True)  # a fresh sweep, not a resumed one
    one_run = min(cpu(lambda: train(student(), data, ObjectiveConfig(method="kdiga", gamma=3.0), cfg,
                                    teacher=teacher))[0] for _ in range(2))
    model = student()
    sweep_s, sweep = cpu(lambda: choose_gamma(model, teacher, data, ObjectiveConfig(method="kdiga"), cfg,
                                              out / "cost" / f"sweep-s{seed}", attack=AttackSpec("pgd", eps=MAIN[2])))
    final_s, _ = cpu(lambda: train(model, data, sweep.final_objective(ObjectiveConfig(method="kdiga")), cfg,
                                   teacher=teacher))
    record = {"seed": seed, "one_run_cpu_s": one_run, "sweep_cpu_s": sweep_s, "final_cpu_s": final_s,
              "chosen": sweep.gamma, "job_runs_cpu": (sweep_s + final_s) / one_run,
              "job_runs_steps": sweep.report["cost"]["job_runs"]}
    print(json.dumps(record), flush=True)
    return record


# ----------------------------------------------------------------------------- summary


def _load(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "jobs").glob("*.json"))]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def summarize(out: Path) -> str:
    """Markdown: the grid on the main pair (mean ± std over seeds), γ auto on it, and every pair's verdict."""
    rows = _load(out)
    lines = [_grid_table(rows), "", _auto_table(rows)]
    text = "\n".join(lines)
    print(text)
    return text


def _is_main(r: dict[str, Any]) -> bool:
    return (r["teacher"], r["student"], r["eps"]) == (teacher_name(MAIN[0], MAIN[2]), MAIN[1], MAIN[2])


def _grid_table(rows: list[dict[str, Any]]) -> str:
    main = [r for r in rows if _is_main(r)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in main:
        groups.setdefault(r["gamma"], []).append(r)
    key = lambda g: (g != "kd", g == "auto", float(g) if g not in ("kd", "auto") else 0.0)  # noqa: E731
    lines = ["| γ | seeds | clean % | PGD-20 % | AutoAttack % | final train s | sweep s | job steps (runs) |",
             "|" + "---|" * 8]
    for g in sorted(groups, key=key):
        rs = groups[g]
        m = [r["metrics"] for r in rs]
        chosen, sweep_s, runs = "", "-", "1"
        if g == "auto":
            chosen = " (chose " + ", ".join(f"{r['gamma_sweep']['chosen']['gamma']:g}" for r in rs) + ")"
            sweep_s = f"{statistics.mean(r['gamma_sweep']['cost']['sweep_seconds'] for r in rs):.1f}"
            runs = ", ".join(f"{r['gamma_sweep']['cost']['job_runs']:.2f}" for r in rs)
        lines.append(f"| {g}{chosen} | {len(rs)} | {_mean_std([x['student_clean_accuracy'] for x in m])} | "
                     f"{_mean_std([x['student_pgd-20_accuracy'] for x in m])} | "
                     f"{_mean_std([x['student_autoattack_accuracy'] for x in m])} | "
                     f"{statistics.mean(r['training']['seconds'] for r in rs):.1f} | {sweep_s} | {runs} |")
    return "\n".join(lines)


def _auto_table(rows: list[dict[str, Any]]) -> str:
    autos = [r for r in rows if r["gamma"] == "auto"]
    lines = ["| teacher | student | ε | seed | chosen γ | clean % | AA % | PGD-20 % | KD ref. clean % (test) | "
             "teacher PGD-20 % | job cost (runs) | transfers | verdict |", "|" + "---|" * 13]
    for r in sorted(autos, key=lambda r: (r["teacher"], r["student"], r["eps"], r["seed"])):
        sw, m = r["gamma_sweep"], r["metrics"]
        final = sw.get("final_check") or {}
        verdict = _verdict(sw)
        lines.append(f"| {r['teacher']} | {r['student']} | {r['eps']:g} | {r['seed']} | {sw['chosen']['gamma']:g} | "
                     f"{_pct(m['student_clean_accuracy'])} | {_pct(m.get('student_autoattack_accuracy'))} | "
                     f"{_pct(m.get('student_pgd-20_accuracy'))} | "
                     f"{_pct(final.get('kd_reference_clean_accuracy'))} | {_pct(m.get('teacher_pgd-20_accuracy'))} | "
                     f"{sw['cost']['job_runs']:.2f} | {'yes' if verdict['transfers'] else 'no'} | "
                     f"{verdict['summary'].replace('|', '/')} |")
    return "\n".join(lines)


def _verdict(sweep: dict[str, Any]) -> dict[str, Any]:
    """The verdict as this version of `kdiga_core.transfer.verdict` states it, from the recorded trial numbers.

    Recorded runs keep their numbers; re-deriving the verdict lets a refined wording or criterion be
    checked against them without training again.
    """
    from kdiga_core.config import SweepConfig
    from kdiga_core.transfer import verdict

    kd = next(t for t in sweep["trials"] if t["gamma"] == 0)
    capacity = sweep["transfer"]["verdict"]["capacity"]
    out = verdict(sweep["transfer"]["teacher"], kd, sweep["chosen"], sweep["trials"], SweepConfig(),
                  student_params=capacity["student_params"], teacher_params=capacity["teacher_params"])
    final = sweep.get("final_check") or {}
    if final.get("collapsed"):
        out["transfers"], out["summary"] = False, "the final student lost clean accuracy: " + final["sentence"]
    return out


# ----------------------------------------------------------------------------- main


def _seed(seed: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("teachers", "job", "plan", "summarize", "cost"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher")
    p.add_argument("--student")
    p.add_argument("--eps", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gamma", default="auto", help='a number, "kd" or "auto"')
    p.add_argument("--part", default="all", choices=("all", "main", "pairs"), help="plan: which jobs")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kdiga_core.sweep").setLevel(logging.INFO)
    if args.step == "teachers":
        train_teachers(args.out)
    elif args.step == "job":
        run_one(args.out, args.teacher, args.student, args.eps, args.seed, args.gamma)
    elif args.step == "cost":
        measure_cost(args.out, args.seed)
    elif args.step == "plan":
        print("\n".join(plan(args.out, args.part)))
    else:
        text = summarize(args.out)
        (args.out / "summary.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
