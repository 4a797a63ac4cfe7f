"""The benchmark harness: `python -m benchmarks.run [--quick] [--cases step,attack,api,flops] [--out BENCHMARKS.md]`.

Cases: step, flops, attack, api (the default set, with layout and threads), demo, sse, ddp (1 vs 2
gloo ranks; `python -m benchmarks.ddp_bench` is the same measurement on a GPU machine), data (the
streaming input pipeline at 10k and 100k images; `python -m benchmarks.data_bench`), and the
issue-13 cases epoch (one augmented epoch per method) and time_to_robust (digits, 3 seeds; not in
the default set: it takes about half an hour on 2 cores).
Other options: --threads N (torch intra-op threads), --step-budget-s S (start no new step row
after S seconds), --models/--inputs/--repeats/--teacher (narrow the step case).

Runs the chosen cases, prints one markdown section per case, and appends each to `--out` as
soon as it is done, under a header naming the date, the command, the machine and the load
from other processes. Targets come from design.md §8 (issue 6); each table says which are met.

Add a case by writing `def case_x(args, log) -> str` (returning markdown) and listing it in
`CASES`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import machine

TARGET_SPEEDUP = 2.0  # KDIGA default vs reference exact
TARGET_COSINE = 0.99
TARGET_CACHED_RATIO = 1.5  # KDIGA cached / KD cached
TARGET_ATTACK_SPEEDUP = 1.0
TARGET_ATTACK_POINTS = 0.5  # robust-accuracy difference, percentage points
TARGET_API_RPS = 2000.0
TARGET_API_P99_MS = 25.0
TARGET_DEMO_S = 180.0  # "demo under 3 minutes after installation on 2 CPU cores"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # noqa: T201 - progress of a command-line tool


def _fmt(value: float | None, spec: str = ".2f", missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**missed**")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- step (and flops)

_STEP_CACHE: dict[str, list] = {}


def _step_rows(args, log, *, with_flops: bool):
    from benchmarks import step_bench

    key = "rows"
    if key not in _STEP_CACHE:
        zoo = tuple(args.models.split(",")) if args.models else None
        inputs = tuple(args.inputs.split(",")) if args.inputs else None
        _STEP_CACHE[key] = step_bench.run(quick=args.quick, zoo=zoo, inputs=inputs, repeats=args.repeats,
                                          with_flops=with_flops, teacher=args.teacher, budget_s=args.step_budget_s,
                                          log=log)
    return _STEP_CACHE[key]


def _ms(row, mode: str) -> str:
    if mode in row.failures:
        return "fails"
    return _fmt(row.times.get(mode) and row.times[mode] * 1e3, ".0f")


def case_step(args, log) -> str:
    """Step time of every mode, then ratios and gradient cosines against the reference."""
    from benchmarks import step_bench

    all_rows = _step_rows(args, log, with_flops="flops" in args.cases)
    rows = [r for r in all_rows if not r.skipped]
    skipped = [f"{r.student} {r.inputs}" for r in all_rows if r.skipped]
    repeats = rows[0].repeats if rows else 0
    times = table(
        ["student", "input", "params (M)", "CE", "KD", "KD cached", "ref exact", "ours auto", "ours FD",
         "ours default (auto, cached)", "ours FD cached", "auto resolves to"],
        [[r.student, r.inputs, f"{r.params_m:.2f}", *(_ms(r, m) for m in step_bench.MODES), r.auto_resolved]
         for r in rows])
    ratio_rows, default_ok, cached_ok = [], [], []
    for r in rows:
        ref_runs = "ref" in r.times
        speed = r.ratio("ref", "auto_cached")
        cos = r.cosine.get("auto")
        ok1 = None
        if ref_runs and speed is not None:
            ok1 = speed >= TARGET_SPEEDUP and cos is not None and cos >= TARGET_COSINE
            default_ok.append(ok1)
        cached = r.ratio("auto_cached", "kd_cached")
        ok2 = None if cached is None else cached <= TARGET_CACHED_RATIO
        if ok2 is not None:
            cached_ok.append(ok2)
        vs_ref = [r.ratio("ref", "auto_cached"), r.ratio("ref", "auto"), r.ratio("ref", "fd"),
                  r.cosine.get("auto"), r.cosine.get("fd")]
        vs_ref_cells = [_fmt(v, ".4f" if i >= 3 else ".2f") if ref_runs else "ref fails" for i, v in enumerate(vs_ref)]
        ratio_rows.append([r.student, r.inputs, *vs_ref_cells, _fmt(cached), _fmt(r.ratio("fd_cached", "kd_cached")),
                           _mark(ok1), _mark(ok2)])
    ratios = table(
        ["student", "input", "ref / ours default", "ref / ours auto (same teacher work)", "ref / ours FD",
         "grad cos (default vs ref)", "grad cos (FD vs ref)", "KDIGA cached / KD cached",
         "FD cached / KD cached", f"target ≥{TARGET_SPEEDUP:g}× & cos ≥{TARGET_COSINE}",
         f"target ≤{TARGET_CACHED_RATIO}×"],
        ratio_rows)
    cpu_ratios = table(
        ["student", "input", "ref / ours default", "ref / ours auto", "ref / ours FD", "KDIGA cached / KD cached"],
        [[r.student, r.inputs,
          *(_fmt(r.ratio("ref", m, cpu=True)) if "ref" in r.times else "ref fails"
            for m in ("auto_cached", "auto", "fd")),
          _fmt(r.ratio("auto_cached", "kd_cached", cpu=True))] for r in rows])
    failures = [f"- {r.student} {r.inputs}, {m}: `{msg}`" for r in rows for m, msg in r.failures.items()]
    summary = (f"Targets: KDIGA default ≥ {TARGET_SPEEDUP:g}× the reference with cosine ≥ {TARGET_COSINE} — "
               f"{sum(default_ok)}/{len(default_ok)} rows met; KDIGA cached ≤ {TARGET_CACHED_RATIO}× KD cached — "
               f"{sum(cached_ok)}/{len(cached_ok)} rows met.")
    return "\n\n".join([
        f"### Training step time (ms, median of {repeats} after 1 warm-up; batch {step_bench.BATCH}, "
        f"teacher {args.teacher}, {step_bench.NUM_CLASSES} classes, SGD update included)",
        times, "### Ratios and gradient agreement", ratios, summary,
        "Cross-check on process CPU time (user + system, all threads) instead of wall time: less sensitive to "
        "other processes taking the cores, but it also counts intra-op threads spinning while they wait.",
        cpu_ratios,
        *(["Failures (no double backward):", "\n".join(failures)] if failures else []),
        *([f"Not run (time budget of {args.step_budget_s:g} s spent): {', '.join(skipped)}."] if skipped else []),
    ])


def case_flops(args, log) -> str:
    """Achieved FLOP/s of a step against the machine's measured fp32 matmul rate."""
    from benchmarks import step_bench

    peak = machine.matmul_flops(2048, repeats=3 if args.quick else 7)
    rows = [r for r in _step_rows(args, log, with_flops=True) if r.flops and not r.skipped]
    out = []
    for r in rows:
        for mode in step_bench.MODES:
            if mode in r.flops and mode in r.times:
                achieved = r.flops[mode] / r.times[mode]
                out.append([r.student, r.inputs, mode, f"{r.flops[mode] / 1e9:.2f}",
                            f"{achieved / 1e9:.1f}", f"{100 * achieved / peak:.0f}%"])
    return "\n\n".join([
        f"### Achieved FLOP/s of a training step (fp32 2048×2048 matmul on this machine: {peak / 1e9:.1f} GFLOP/s)",
        "FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (convolutions, matmuls, attention; "
        "element-wise work is not counted) over the step's median time.",
        table(["student", "input", "mode", "GFLOP / step", "achieved GFLOP/s", "% of matmul rate"], out),
    ])


# ----------------------------------------------------------------------------- attacks


def case_attack(args, log) -> str:
    """Our PGD-20 and AutoAttack against torchattacks on the same model and points."""
    from benchmarks import attack_bench

    rows, meta = attack_bench.run(quick=args.quick, log=log)
    out = []
    for r in rows:
        ok = r.speedup >= TARGET_ATTACK_SPEEDUP and r.diff_points <= TARGET_ATTACK_POINTS
        out.append([r.attack, str(r.n_points), str(r.repeats), f"{r.n_points / r.ours_s:.1f}",
                    f"{r.n_points / r.theirs_s:.1f}", f"{r.speedup:.2f}", f"{100 * r.ours_robust:.1f}",
                    f"{100 * r.theirs_robust:.1f}",
                    f"{r.diff_points:.1f} ({round(r.diff_points * r.n_points / 100)} pts)",
                    f"{r.cpu_speedup:.2f}", _mark(ok)])
    return "\n\n".join([
        f"### Attack evaluation throughput ({meta['model']}, clean accuracy {100 * meta['clean_accuracy']:.1f}%, "
        f"L∞ ε = {meta['eps']:g})",
        "PGD: robust accuracy as a report computes it (`evaluate.robust_accuracy`: clean predictions, "
        "then PGD on the correctly classified points only) against torchattacks' PGD on every point plus "
        "predictions; median of the repeats, the two sides alternating. AutoAttack: one pass per side "
        "over the points in chunks, the side that goes first alternating from chunk to chunk.",
        table(["attack", "points", "repeats", "ours img/s", "torchattacks img/s", "ours / torchattacks",
               "ours robust %", "torchattacks robust %", "difference (pp, points)",
               "ours / torchattacks on CPU time", f"target ≥{TARGET_ATTACK_SPEEDUP:g}× & ≤{TARGET_ATTACK_POINTS} pp"], out),
    ])


# ----------------------------------------------------------------------------- API


def case_api(args, log) -> str:
    """Job-status reads and job creations per second on the embedded default."""
    from benchmarks import api_bench

    rows, meta = api_bench.run(quick=args.quick, ablation=not args.quick, log=log)
    out = []
    for r in rows:
        ok = None
        if r.endpoint.startswith("GET") and r.connections == 64:
            ok = r.rps >= TARGET_API_RPS and r.p99_ms < TARGET_API_P99_MS and r.errors == 0
        out.append([r.endpoint, str(r.connections), f"{r.rps:.0f}", f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}",
                    str(r.requests), str(r.errors), f"{r.api_cpu_ms_per_request:.2f}",
                    f"{r.api_cpu_s / r.seconds:.2f}" if r.seconds else "–",
                    f"{r.loadgen_cpu_s / r.seconds:.2f}" if r.seconds else "–", _mark(ok)])
    sections = []
    if meta.get("ablation"):
        one, multi = meta["ablation"]
        sections = [
            "Ablation (status reads, 64 connections, median of 2 alternated runs): one API process "
            f"(`uvicorn --workers 1` on the same database and broker) against the embedded service's "
            f"{meta['api_processes']}.",
            table(["server", "req/s", "p50 ms", "p99 ms", "errors"],
                  [[r.endpoint.split(", ")[1], f"{r.rps:.0f}", f"{r.p50_ms:.1f}", f"{r.p99_ms:.1f}", str(r.errors)]
                   for r in (one, multi)])
            + f"\n\nRatio {meta['api_processes']} processes / 1 process: {multi.rps / one.rps:.2f}×.",
        ]
    return "\n\n".join([
        f"### API on the embedded default ({meta['api_processes']} uvicorn process(es), SQLite, embedded Redis; "
        f"load by {meta['tool']}, "
        f"{meta['duration_s']:g} s per run, loopback)",
        table(["endpoint", "connections", "req/s", "p50 ms", "p99 ms", "requests", "errors",
               "API CPU ms / request", "API cores busy", "load generator cores busy",
               f"target ≥{TARGET_API_RPS:.0f} req/s & p99 <{TARGET_API_P99_MS:g} ms @64"], out),
        *sections,
    ])


def case_sse(args, log) -> str:
    """/healthz latency and the API's CPU while 120 server-sent-event streams sit idle (issue 16)."""
    from benchmarks import sse_bench

    repo, rows = Path(__file__).resolve().parents[1], []
    for backend in ("sqlite", "postgres"):
        try:
            r = sse_bench.measure(repo, 20 if args.quick else 120, backend)
        except Exception as exc:  # noqa: BLE001 - PostgreSQL may be absent; say so in the table
            log(f"  sse on {backend}: {exc}")
            continue
        idle, busy = r["idle"], r["with_streams"]
        rows.append([backend, str(r["streams"]), f"{idle['p50_ms']:.1f}", f"{idle['max_ms']:.1f}",
                     f"{busy['p50_ms']:.1f}", f"{busy['p99_ms']:.1f}", f"{busy['max_ms']:.1f}",
                     f"{r['api_cpu_while_streams_idle']:.3f}"])
        log(f"  sse {backend}: {rows[-1]}")
    return "\n\n".join([
        "### /healthz with idle event streams (one API process, `python -m benchmarks.sse_bench`; "
        f"{sse_bench.PROBES} sequential probes, CPU over {sse_bench.IDLE_WINDOW_S:g} s)",
        table(["database", "streams", "no streams: p50 ms", "max ms", "with streams: p50 ms", "p99 ms", "max ms",
               "API cores busy while the streams are idle"], rows),
    ])


# ----------------------------------------------------------------------------- memory layout (ablation)


def case_layout(args, log) -> str:
    """channels_last vs NCHW on CPU for a conv student (train uses channels_last on CUDA only)."""
    from benchmarks import step_bench

    name = "cnn_small" if args.quick else "resnet18"
    repeats = args.repeats or (1 if args.quick else 3)
    rows = step_bench.channels_last_ablation(name, "32x32x3", repeats=repeats, teacher_name=args.teacher)
    out = [[name, mode, f"{a * 1e3:.0f}", f"{b * 1e3:.0f}", f"{a / b:.2f}"] for mode, a, b in rows]
    return "\n\n".join([
        f"### Memory layout on CPU (32x32x3, batch {step_bench.BATCH}, median of {repeats}, interleaved)",
        table(["student", "mode", "NCHW ms", "channels_last ms", "NCHW / channels_last"], out),
    ])


def case_precision(args, log) -> str:
    """fp32 vs bf16 autocast on CPU (train autocasts on CUDA only), and the bf16 gradient's agreement."""
    from benchmarks import step_bench

    name = "cnn_small" if args.quick else "resnet18"
    repeats = args.repeats or (1 if args.quick else 3)
    res = step_bench.precision_ablation(name, "32x32x3", repeats=repeats, teacher_name=args.teacher)
    out = [[name, mode, f"{a * 1e3:.0f}", f"{b * 1e3:.0f}", f"{a / b:.2f}"] for mode, a, b in res["rows"]]
    bf16_auto = {m: b for m, _, b in res["rows"]}.get("auto_cached")
    ratio = f"{res['ref_s'] / bf16_auto:.2f}" if bf16_auto else "–"
    return "\n\n".join([
        f"### Precision on CPU (32x32x3, batch {step_bench.BATCH}, median of {repeats}, interleaved)",
        table(["student", "mode", "fp32 ms", "bf16 autocast ms", "fp32 / bf16"], out),
        f"Reference exact (fp32) {res['ref_s'] * 1e3:.0f} ms; ref fp32 / ours default in bf16: {ratio}; "
        f"parameter-gradient cosine of bf16 ours against fp32 ref: {res['cosine']:.4f}.",
    ])


def case_compile(args, log) -> str:
    """torch.compile (inductor) on CPU for a first-order and a KDIGA step: speed, compile time, agreement."""
    from benchmarks import step_bench

    name = "cnn_small" if args.quick else "resnet18"
    repeats = args.repeats or (1 if args.quick else 3)
    rows = step_bench.compile_ablation(name, "32x32x3", repeats=repeats, teacher_name=args.teacher)
    out = []
    for r in rows:
        ok = r["compiled_s"] is not None
        out.append([name, r["mode"], f"{r['eager_s'] * 1e3:.0f}",
                    f"{r['compiled_s'] * 1e3:.0f}" if ok else "fails",
                    f"{r['eager_s'] / r['compiled_s']:.2f}" if ok else "–",
                    f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "–",
                    f"{r['cosine']:.4f}" if r["cosine"] is not None else "–", r["error"] or ""])
    return "\n\n".join([
        f"### torch.compile on CPU (student forward compiled, inductor; 32x32x3, batch {step_bench.BATCH}, "
        f"median of {repeats}, interleaved after the compile)",
        table(["student", "mode", "eager ms", "compiled ms", "eager / compiled", "first compiled step s",
               "grad cosine compiled vs eager", "error"], out),
    ])


# ----------------------------------------------------------------------------- demo


def case_demo(args, log) -> str:
    """The README's demo in a fresh process: wall time phase by phase, and the numbers it produced."""
    from benchmarks import demo_bench

    record = demo_bench.run(quick=args.quick, log=log)
    phases = record["phases"]
    total = sum(s for _, s in phases)
    met = total < TARGET_DEMO_S and not args.quick
    return "\n\n".join([
        f"### Demo wall time, phase by phase (`python -m kdiga_launcher.demo{' --quick' if args.quick else ''}`, "
        "after installation)",
        table(["phase", "seconds"], [[p, f"{s:.1f}"] for p, s in phases]
              + [["total of the phases", f"{total:.1f}"], ["whole process (incl. imports, shutdown)",
                                                           f"{record['process_s']:.1f}"]]),
        f"Target: under {TARGET_DEMO_S:.0f} s after installation on 2 CPU cores — "
        + ("met." if met else ("not judged (--quick)." if args.quick else "**missed**.")),
        "Results of that run (the demo's own table):",
        table(record["results_header"], record["results"]),
    ])


def case_threads(args, log) -> str:
    """1 vs 2 intra-op threads for KD and KDIGA steps (train uses one thread per core on CPU)."""
    from benchmarks import step_bench

    cases = [("cnn_small", "8x8x1")] if args.quick else [("cnn_small", "8x8x1"), ("resnet18", "32x32x3")]
    repeats = args.repeats or (1 if args.quick else 3)
    out = []
    for name, inputs in cases:
        for mode, times in step_bench.threads_ablation(name, inputs, repeats=repeats, teacher_name=args.teacher):
            out.append([name, inputs, mode, f"{times[1] * 1e3:.0f}", f"{times[2] * 1e3:.0f}",
                        f"{times[1] / times[2]:.2f}"])
    return "\n\n".join([
        f"### Intra-op threads (batch {step_bench.BATCH}, median of {repeats}, thread counts interleaved "
        "in one process)",
        table(["student", "input", "mode", "1 thread ms", "2 threads ms", "speed-up of 2 threads"], out),
    ])


def case_ddp(args, log) -> str:
    """One job on 1 rank vs 2 gloo ranks on this CPU machine (a "device" is a process with one core)."""
    from benchmarks import ddp_bench

    cfg = ddp_bench.settings(argparse.Namespace(device="cpu", quick=args.quick, student=None, teacher=None,
                                                batch_size=None, steps=None, warmup_steps=None))
    result = ddp_bench.scaling(cfg, [1, 2], timeout_s=1200, log=log)
    rows = [[str(r["world_size"]), r["backend"], str(cfg["threads_per_rank"]), str(cfg["batch_size"]),
             str(r["steps_timed"]), _fmt(r["step_ms_median"], ".0f"), _fmt(r["images_per_s"], ".1f"),
             _fmt(r["images_per_cpu_s"], ".1f")]
            for r in result["runs"]]
    return "\n".join([
        "### ddp: scaling of one KDIGA job over ranks (CPU, gloo)", "",
        f"{cfg['student']} student, {cfg['teacher']} teacher, {cfg['img_size']}x{cfg['img_size']}x{cfg['in_chans']} "
        f"synthetic images with augmentation (the teacher runs every step), iga_mode {cfg['iga_mode']}, "
        f"{cfg['batch_size']} images per rank and step, {cfg['warmup_steps']} warm-up steps. On this 2-core "
        "machine each rank gets one core, so 2 ranks use the whole machine and 1 rank half of it; "
        "`python -m benchmarks.ddp_bench --out FILE.json` measures 1 GPU against every GPU the same way.", "",
        table(["ranks", "backend", "threads per rank", "batch per rank", "timed steps", "step (ms, median)",
               "images/s", "images per CPU-second (all ranks)"], rows), "",
        f"Scaling efficiency (images/s of 2 ranks / 2 × images/s of 1): "
        f"**{_fmt(result['scaling_efficiency'], '.2f')}**; by CPU time (images per CPU-second, 2 ranks / 1): "
        f"**{_fmt(result['cpu_time_efficiency'], '.2f')}**. With other processes running, 2 processes get "
        "a larger share of the cores than 1, which inflates the first ratio; the second does not depend on it.",
    ])


def case_data(args, log) -> str:
    """The streaming input pipeline (datasets by reference) at 10k and 100k images (--quick: 1k and 5k)."""
    from benchmarks import data_bench

    sizes = [1000, 5000] if args.quick else [10_000, 100_000]
    result = data_bench.run(sizes, workers=1, batch=128, log=log)
    return "\n".join([
        "### data: streaming a CIFAR-shaped image folder by reference", "",
        "32x32x3 PNGs in train/<class>/ (10 classes), validated, then one epoch through the job's loader "
        "(DataLoader worker process, decode, preset cifar, batch 128) in a fresh process. Peak RSS of that "
        "process should not grow with the set (importing torch and torchvision alone peaks near 0.9 GB here).", "",
        data_bench.markdown(result),
    ])


def case_epoch(args, log) -> str:
    """One augmented epoch per method, as ratios to CE (issue 13; benchmarks/epoch_bench.py)."""
    from benchmarks import epoch_bench

    out = epoch_bench.run(quick=args.quick, log=log)
    return "### epoch: one augmented epoch per method (CPU)\n\n" + epoch_bench.markdown(out)


def case_time_to_robust(args, log) -> str:
    """Robust accuracy against training time on digits (issue 13; benchmarks/time_to_robust.py)."""
    from benchmarks import time_to_robust

    plot = Path("benchmarks/results/time_to_robust_digits.png")
    small = {"epochs": 2, "seeds": 1, "subset": 50, "aa_points": 10, "aa_queries": 100, "teacher_epochs": 1} if args.quick else {}
    settings = {"epochs": 12, "seeds": 3, "subset": 450, "aa_points": 450, "aa_queries": 1000, "teacher_epochs": 8,
                **small}
    out = time_to_robust.run(**settings, bank_k=4, teacher_path=None, plot=None if args.quick else plot, log=log)
    return ("### time_to_robust: digits, augmentation on\n\n"
            + time_to_robust.markdown(out, None if args.quick else str(plot)))


CASES: dict[str, Callable[..., str]] = {
    "step": case_step, "flops": case_flops, "attack": case_attack, "api": case_api, "layout": case_layout,
    "threads": case_threads, "demo": case_demo, "precision": case_precision,
    "compile": case_compile, "sse": case_sse, "ddp": case_ddp, "data": case_data, "epoch": case_epoch,
    "time_to_robust": case_time_to_robust,
}
DEFAULT_CASES = "step,flops,attack,api,layout,precision,compile,threads,demo,ddp"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer models, points and repeats (smoke run)")
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file the results are appended to "
                                                                 "('-' to print only)")
    parser.add_argument("--models", default="", help="step case: comma-separated students (default: the zoo)")
    parser.add_argument("--inputs", default="", help="step case: 32x32x3 and/or 8x8x1 (default: both)")
    parser.add_argument("--repeats", type=int, default=None, help="step case: timed repeats per mode")
    parser.add_argument("--teacher", default="resnet18", help="step case: the teacher architecture")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own, one per core)")
    parser.add_argument("--step-budget-s", type=float, default=None,
                        help="step case: start no new row after this many seconds (the rest is marked not run)")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; valid cases are: {', '.join(CASES)}")
    return args


def header(args: argparse.Namespace, argv: list[str], info: machine.MachineInfo, busy: str) -> str:
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in argv)
    return "\n".join([
        f"## Run of {info.date_utc} UTC{' (quick)' if args.quick else ''}",
        "", f"Command: `{command.strip()}`", "", info.markdown(),
        f"- other processes at the start: {busy}",
    ])


class Report:
    """Prints each section and appends it to the output file as soon as it is ready,
    so that an interrupted run keeps the cases it finished."""

    def __init__(self, out: str):
        self.path = None if out == "-" else Path(out)
        self.first = True

    def add(self, text: str) -> None:
        print(text + "\n", flush=True)  # noqa: T201 - the command's output is the report
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            if self.first and fh.tell():
                fh.write("\n")
            fh.write(text + "\n\n")
        self.first = False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine.describe("cpu")
    busy = machine.other_processes_busy()
    _log(f"kdiga benchmarks: {', '.join(args.cases)}{' (quick)' if args.quick else ''}; {busy}")
    report = Report(args.out)
    report.add(header(args, argv, info, busy))
    start = time.perf_counter()
    for name in args.cases:
        _log(f"case {name} ...")
        case_start = time.perf_counter()
        report.add(CASES[name](args, _log))
        _log(f"case {name}: {time.perf_counter() - case_start:.0f} s")
    report.add(f"Run finished in {time.perf_counter() - start:.0f} s; other processes at the end: "
               f"{machine.other_processes_busy()}.")
    if report.path is not None:
        _log(f"appended to {report.path}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    sys.exit(main())
