"""The README's first command: robust teacher -> KD and KDIGA students -> report, over the REST API only.

    python -m kdiga_launcher.demo                   # starts the embedded service in a temporary home
    python -m kdiga_launcher.demo --url URL --api-key KEY   # uses a running service instead

Steps: register the built-in 8x8 digits; an `adversarial_train` job makes a robust teacher
(cnn_medium, PGD-AT, eps 0.1 Linf); two `distill` jobs (cnn_small, methods `kd` and `kdiga`) run
from it; the table compares teacher, KD student and KDIGA student on the same test points (clean,
PGD-20, AutoAttack, parameters, latency). Students and reports land in ./demo-output/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kdiga_client.cli import watch_jobs
from kdiga_client.client import Client, Job
from kdiga_client.errors import KdigaError

console = Console(highlight=False)

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "digits"
DATASET = "digits"


def load_recipe(name: str) -> dict[str, Any]:
    """A job recipe of examples/digits (the same files the README and REPRODUCTION.md point to)."""
    recipe: dict[str, Any] = json.loads((RECIPES / f"{name}.json").read_text(encoding="utf-8"))
    return recipe


# The recipes' settings come from REPRODUCTION.md / benchmarks/reproduce_digits.py, shortened to fit a
# demo: AdamW (these small batch-norm-free CNNs barely move with SGD in a few hundred steps), PGD-7
# with step 2.5ε/7 for the teacher, and the KDIGA settings of the reproduction (γ = 5 warmed up over
# half the steps, input gradients at x + U(-ε, ε)). The teacher job's own report is kept small: each
# distill report measures the teacher again, on the same points as its student. AutoAttack's Square
# uses 5000 queries as standard; on a small CPU that dominates the whole demo, so the students'
# recipes ask for 1000 (the table's title says so).
TEACHER = load_recipe("robust_teacher")
STUDENTS = {"kd": load_recipe("student_kd"), "kdiga": load_recipe("student_kdiga")}
TEACHER_ARCH, STUDENT_ARCH = TEACHER["student"]["arch"], STUDENTS["kdiga"]["student"]["arch"]
EPS = STUDENTS["kdiga"]["evaluation"]["attacks"][0]["eps"]
DEMO_SQUARE_QUERIES = STUDENTS["kdiga"]["evaluation"]["square_queries"]


class Timer:
    """Wall time per phase, printed at the end."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        console.rule(f"[bold]{name}")
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.phases.append((name, elapsed))
            console.print(f"[dim]{name}: {elapsed:.1f} s[/]")

    def table(self) -> Table:
        table = Table("phase", "wall time", title="Phase wall times")
        for name, seconds in self.phases:
            table.add_row(name, f"{seconds:.1f} s")
        table.add_row("[bold]total", f"[bold]{sum(s for _, s in self.phases):.1f} s")
        return table


def _row(model: dict[str, Any]) -> list[str]:
    attacks = model.get("attacks") or {}
    stats = model.get("stats") or {}
    pgd = next((v for k, v in attacks.items() if k.startswith("pgd")), None)
    aa = attacks.get("autoattack")

    def pct(v: Any) -> str:
        return f"{100 * v:.1f}%" if isinstance(v, int | float) else "—"

    latency = stats.get("latency_ms")
    return [pct(model.get("clean_accuracy")), pct(pgd), pct(aa),
            f"{stats['params']:,}" if isinstance(stats.get("params"), int) else "—",
            f"{latency:.3f}" if isinstance(latency, int | float) else "—"]


def results_table(reports: dict[str, dict[str, Any]]) -> Table:
    """Teacher / KD student / KDIGA student side by side (the teacher from the KDIGA report: same points)."""
    table = Table("model", "arch", "clean", "PGD-20", "AutoAttack", "params", "latency ms",
                  title=(f"Accuracy on {DATASET} under L∞ attacks, ε = {EPS:g} (same test points; AutoAttack with "
                         f"20 APGD/FAB iterations and {DEMO_SQUARE_QUERIES} Square queries)"))
    teacher_src = reports.get("kdiga") or reports.get("kd") or {}
    teacher = (teacher_src.get("models") or {}).get("teacher")
    if teacher:
        table.add_row("teacher", TEACHER_ARCH, *_row(teacher))
    for method, label in (("kd", "KD student"), ("kdiga", "KDIGA student")):
        student = ((reports.get(method) or {}).get("models") or {}).get("student")
        if student:
            style = "bold green" if method == "kdiga" else ""
            table.add_row(label, STUDENT_ARCH, *_row(student), style=style)
    return table


def _check(results: list[Job | KdigaError]) -> list[Job]:
    bad = [r for r in results if isinstance(r, KdigaError)]
    if bad:
        raise bad[0]
    return results  # type: ignore[return-value]


def _with_overrides(recipe: dict[str, Any], *, epochs: int | None = None, points: int | None = None,
                    autoattack: bool = True) -> dict[str, Any]:
    """A copy of a recipe with the demo's command-line overrides applied."""
    job: dict[str, Any] = json.loads(json.dumps(recipe))
    if epochs:
        job["train"]["epochs"] = epochs
    if points:
        job["evaluation"]["max_points"] = points
    if not autoattack:
        job["evaluation"]["attacks"] = [a for a in job["evaluation"]["attacks"] if a["name"] != "autoattack"]
    return job


def _submit(client: Client, recipe: dict[str, Any], dataset_id: str, teacher_id: str | None = None) -> Job:
    ids = {"dataset_id": dataset_id} | ({"teacher_id": teacher_id} if teacher_id else {})
    return client.submit_job({**recipe, **ids})


def run_demo(client: Client, out_dir: Path, timer: Timer, *, teacher_epochs: int | None = None,
             student_epochs: int | None = None, points: int | None = None,
             autoattack: bool = True) -> dict[str, Any]:
    """The three phases over REST; returns the reports and downloaded paths."""
    teacher_recipe = _with_overrides(TEACHER, epochs=teacher_epochs)
    students = {m: _with_overrides(r, epochs=student_epochs, points=points, autoattack=autoattack)
                for m, r in STUDENTS.items()}
    with timer.phase("1. dataset"):
        dataset = client.wait_dataset(client.register_builtin_dataset(DATASET, DATASET).id, timeout=300)
        if dataset.status != "ready":
            raise KdigaError(f"The {DATASET} dataset is {dataset.status}: {dataset.error}")
        console.print(f"{DATASET}: {dataset.train_size} train / {dataset.test_size} test images, "
                      f"input {dataset.input_shape}")
    with timer.phase("2. robust teacher (adversarial_train, PGD-AT)"):
        job = _submit(client, teacher_recipe, dataset.id)
        (teacher_job,) = _check(watch_jobs(client, [job], labels=["teacher pgd_at"], out=console))
        teacher_id = (teacher_job.result or {}).get("teacher_id")
        if not teacher_id:
            raise KdigaError(f"Job {teacher_job.id} finished without a teacher_id in its result.")
        console.print(f"teacher: {teacher_id}")
    with timer.phase("3. students (distill: KD and KDIGA)"):
        jobs = [_submit(client, recipe, dataset.id, teacher_id) for recipe in students.values()]
        finished = _check(watch_jobs(client, jobs, labels=[f"student {m}" for m in students], out=console))
    with timer.phase("4. reports and downloads"):
        reports, paths = {}, {}
        for method, job in zip(students, finished, strict=True):
            reports[method] = client.get_report(job.id)
            paths[method] = client.download_job(job.id, out_dir / method)
        (out_dir / "teacher_job.json").write_text(json.dumps(teacher_job.to_dict(), indent=2, default=str))
    return {"reports": reports, "paths": paths, "teacher_id": teacher_id}


def _print_outcome(result: dict[str, Any], out_dir: Path) -> None:
    console.print(results_table(result["reports"]))
    for method, paths in result["paths"].items():
        weights = [p for n, p in paths.items() if n.endswith(".safetensors")]
        html = [p for n, p in paths.items() if n.endswith(".html")]
        console.print(f"{method:>6} student: {weights[0] if weights else '(no weights)'}")
        if html:
            console.print(f"{method:>6} report:  {html[0]}")
    console.print(f"Everything is in {out_dir.resolve()}")


@contextmanager
def _service(args: argparse.Namespace, timer: Timer) -> Iterator[tuple[str, str]]:
    """The URL and key to use: the given ones, or a freshly started embedded service."""
    if args.url:
        if not args.api_key:
            raise SystemExit("--url needs --api-key (or KDIGA_API_KEY).")
        yield args.url, args.api_key
        return
    from kdiga_launcher.supervisor import start_embedded  # only when we start the service ourselves

    # A short home: the embedded Redis listens on a unix socket inside it (paths are limited to ~100 bytes).
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="kdiga-demo-", dir="/tmp"))
    with timer.phase("0. start the service"), console.status("Starting the embedded service "
                                                             "(API + worker + embedded Redis + SQLite)..."):
        service = start_embedded(home, port=0)
    console.print(f"service: {service.url}  (home {home})")
    try:
        yield service.url, service.admin_key
    finally:
        with console.status("Stopping the service..."):
            service.stop()
        if not args.home and not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(prog="python -m kdiga_launcher.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="Use a running service instead of starting one.")
    parser.add_argument("--api-key", default=os.environ.get("KDIGA_API_KEY"), help="Key for --url.")
    parser.add_argument("--out", default="demo-output", help="Where students and reports go.")
    parser.add_argument("--home", default=None, help="KDIGA_HOME for the embedded service (default: a temp dir).")
    parser.add_argument("--keep-home", action="store_true", help="Keep the temporary KDIGA_HOME.")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help=f"Teacher training epochs (default {TEACHER['train']['epochs']}).")
    parser.add_argument("--student-epochs", type=int, default=None,
                        help=f"Student training epochs (default {STUDENTS['kdiga']['train']['epochs']}).")
    parser.add_argument("--points", type=int, default=None,
                        help=f"Test points in the students' reports (default {STUDENTS['kdiga']['evaluation']['max_points']}).")
    parser.add_argument("--no-autoattack", action="store_true",
                        help="Skip AutoAttack in the students' reports (PGD-20 only; much faster on a CPU).")
    parser.add_argument("--quick", action="store_true", help="A smoke test: one epoch each, 30 points.")
    parser.add_argument("--timings", default=None, metavar="FILE",
                        help="Also write the phase wall times and the results table as JSON (benchmarks/).")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    start = time.perf_counter()
    try:
        with _service(args, timer) as (url, key), Client(url, key, timeout=60) as client:
            result = run_demo(client, out_dir, timer,
                              teacher_epochs=1 if args.quick else args.teacher_epochs,
                              student_epochs=1 if args.quick else args.student_epochs,
                              points=30 if args.quick else args.points, autoattack=not args.no_autoattack)
    except KdigaError as exc:
        console.print(f"[bold red]Error:[/] {exc}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console.print("Interrupted.")
        return 130
    _print_outcome(result, out_dir)
    console.print(timer.table())
    total = time.perf_counter() - start
    console.print(f"[dim]total wall time including start-up and shutdown: {total:.1f} s[/]")
    if args.timings:
        Path(args.timings).write_text(json.dumps(timings_record(result["reports"], timer, total), indent=2))
    return 0


def timings_record(reports: dict[str, dict[str, Any]], timer: Timer, total_s: float) -> dict[str, Any]:
    """What `--timings` writes: phase wall times and the results table's rows (teacher, KD, KDIGA)."""
    teacher = ((reports.get("kdiga") or reports.get("kd") or {}).get("models") or {}).get("teacher")
    rows = [["teacher", TEACHER_ARCH, *_row(teacher)]] if teacher else []
    for method, label in (("kd", "KD student"), ("kdiga", "KDIGA student")):
        student = ((reports.get(method) or {}).get("models") or {}).get("student")
        if student:
            rows.append([label, STUDENT_ARCH, *_row(student)])
    return {"phases": [[name, seconds] for name, seconds in timer.phases], "total_s": total_s,
            "results_header": ["model", "arch", "clean", "PGD-20", "AutoAttack", "params", "latency ms"],
            "results": rows}


if __name__ == "__main__":
    raise SystemExit(main())
