"""The `kdiga` command line: run the service, manage keys, upload models and data, run jobs.

    kdiga serve                                   # API + one worker + embedded Redis under ~/.kdiga
    kdiga admin keys create --name me             # prints a key (shown once)
    kdiga login --url http://127.0.0.1:8000 --api-key kdg_...
    kdiga datasets upload --builtin digits
    kdiga jobs submit --kind adversarial_train --dataset DS --student-arch cnn_medium --method pgd_at --wait
    kdiga jobs submit --teacher T --dataset DS --student-arch cnn_small --method kdiga --wait
    kdiga jobs download JOB --dest out/

Every command takes `--json` for scripts. The URL and key come from `--url`/`--api-key`, then
KDIGA_URL/KDIGA_API_KEY, then the config file `kdiga login` writes. Errors are one line on stderr
and exit code 1. This module never imports server code or torch: `serve`, `worker` and `admin`
are mounted from the server's `kdiga.commands` entry point when the server is installed
(kdiga_launcher.cli).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column, Table

from kdiga_client import config as cfg
from kdiga_client.client import Client, Dataset, Job, Teacher
from kdiga_client.errors import AuthError, JobCancelledError, JobFailedError, KdigaError
from kdiga_client.progress_lines import JobLines

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(name="kdiga", help="KDIGA model-compression service: distil robust teachers into small "
                  "students that stay robust.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
teachers_app = typer.Typer(help="Upload and inspect teacher models.", no_args_is_help=True)
datasets_app = typer.Typer(help="Upload or register datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Submit, watch and collect distillation/training/evaluation jobs.",
                       no_args_is_help=True)
app.add_typer(teachers_app, name="teachers")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")

UrlOpt = Annotated[str | None, typer.Option("--url", help="Server URL (else KDIGA_URL, the config file, "
                                            "else http://127.0.0.1:8000).", show_default=False)]
KeyOpt = Annotated[str | None, typer.Option("--api-key", help="API key (else KDIGA_API_KEY or the config file).",
                                            show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until it finishes (progress bars).")]


# --------------------------------------------------------------------------- plumbing


class _Fail(Exception):
    """A CLI-level error with a one-line message (bad flags, unreadable files)."""


def _fail_line(message: str, *, json_out: bool, status: int | None = None) -> None:
    message = " ".join(str(message).split())  # exactly one line
    if json_out:
        typer.echo(json.dumps({"error": message, "status": status}), err=True)
    else:
        err_console.print(f"[bold red]Error:[/] {message}", markup=True, highlight=False, soft_wrap=True)


def _auth_hint(exc: AuthError) -> str:
    if exc.status == 403:
        return exc.detail
    return f"{exc.detail} (check --api-key, KDIGA_API_KEY or `kdiga login`)"


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SDK and input errors into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        json_out = bool(kwargs.get("json_out"))
        try:
            return fn(*args, **kwargs)
        except AuthError as exc:
            _fail_line(_auth_hint(exc), json_out=json_out, status=exc.status)
        except KdigaError as exc:
            _fail_line(str(exc), json_out=json_out, status=exc.status)
        except (_Fail, ValueError, OSError) as exc:
            _fail_line(str(exc), json_out=json_out)
        raise typer.Exit(1)

    return wrapper


def _client(url: str | None, api_key: str | None, *, need_key: bool = True) -> Client:
    settings = cfg.resolve(url, api_key)
    if need_key and not settings.api_key:
        raise AuthError("No API key: pass --api-key, set KDIGA_API_KEY or run `kdiga login`.", 401)
    return Client(settings.url, settings.api_key)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _csv_floats(text: str | None, name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise _Fail(f"{name} must be comma-separated numbers, e.g. 0.5,0.5,0.5.") from exc


def _json_object(text: str | None, name: str) -> dict[str, Any] | None:
    """A flag holding a JSON object (timm kwargs), or None when not given."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise _Fail(f'{name} must be a JSON object, e.g. \'{{"patch_size": 4}}\'.')
    return value


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [v.strip() for v in text.split(",") if v.strip()]


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, int | float) else "—"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


_STATUS_STYLE = {"ready": "green", "succeeded": "green", "running": "cyan", "queued": "yellow",
                 "validating": "yellow", "cancelling": "magenta", "invalid": "red", "failed": "red",
                 "cancelled": "magenta", "stopped": "yellow"}


def _id_column(header: str = "id") -> Column:
    """Ids are copied into the next command: never truncate them."""
    return Column(header, no_wrap=True, min_width=36)


def _kv(pairs: list[tuple[str, Any]]) -> Table:
    """One resource as a two-column grid (readable at any terminal width)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in pairs:
        if value not in (None, "", [], {}):
            grid.add_row(key, value if isinstance(value, str) else json.dumps(value, default=str))
    return grid


def _status(status: str) -> str:
    return f"[{_STATUS_STYLE.get(status, 'white')}]{status}[/]"


# --------------------------------------------------------------------------- progress bars


class JobBars:
    """Rich progress bars for a set of jobs, fed by `update(job)` from any thread."""

    def __init__(self, out: Console | None = None):
        self.progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=30),
            TaskProgressColumn(), TextColumn("{task.fields[phase]}"), TextColumn("{task.fields[epoch]}"),
            TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn(),
            console=out or console, transient=False, refresh_per_second=4)
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> JobBars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def add(self, job: Job, label: str | None = None) -> None:
        with self._lock:
            self._tasks[job.id] = self.progress.add_task(label or job.name or job.id, total=100,
                                                         phase=job.status, epoch="", eta="—")
        self.update(job)

    def update(self, job: Job) -> None:
        task = self._tasks.get(job.id)
        if task is None:
            return
        p = job.progress
        percent = p.percent if p and isinstance(p.percent, int | float) else 0.0
        if job.status == "succeeded":
            percent = 100.0
        phase = (p.phase if p and p.phase and job.status == "running" else job.status) or ""
        epoch = f"epoch {p.epoch}/{p.epochs}" if p and p.epoch and p.epochs else ""
        if p and p.phase in ("sweep", "evaluate", "export") and job.status == "running":
            epoch = str(p.raw.get("stage") or "")  # e.g. "student: autoattack"
        eta = "—" if job.is_finished else _duration(p.eta_s if p else None)
        self.progress.update(task, completed=percent, phase=_status(phase) if phase == job.status else phase,
                             epoch=epoch, eta=eta)


def watch_jobs(client: Client, jobs: list[Job], *, labels: list[str] | None = None,
               out: Console | None = None, poll: float = 1.0,
               timeout: float | None = None) -> list[Job | KdigaError]:
    """Wait for several jobs at once with one progress bar each; returns each final Job or its error.

    When stdout is not a terminal (a CI log, a pipe) plain lines replace the bars (`JobLines`): one per
    change of status, phase, stage or epoch, and the last state again every ``KDIGA_PROGRESS_EVERY_S``.
    """
    results: list[Job | KdigaError] = list(jobs)
    view = JobBars(out) if (out or console).is_terminal else JobLines()
    with view as bars:
        for i, job in enumerate(jobs):
            bars.add(job, labels[i] if labels else None)

        def wait(i: int) -> None:
            try:
                results[i] = client.wait_job(jobs[i].id, on_progress=bars.update, poll=poll, timeout=timeout)
            except (JobFailedError, JobCancelledError) as exc:
                bars.update(cast(Job, exc.job))  # errors.py names it by a Protocol (no import cycle)
                results[i] = exc
            except KdigaError as exc:
                results[i] = exc
            except Exception as exc:  # noqa: BLE001 - e.g. the client closed under us on Ctrl-C
                results[i] = KdigaError(f"Stopped watching job {jobs[i].id}: {exc}")

        threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    return results


def _wait_one(client: Client, job: Job, json_out: bool, timeout: float | None = None) -> Job:
    """Wait for one job (bars unless --json); raise its error when it did not succeed."""
    if json_out:
        return client.wait_job(job.id, timeout=timeout)
    (result,) = watch_jobs(client, [job], timeout=timeout)
    if isinstance(result, KdigaError):
        raise result
    return result


# --------------------------------------------------------------------------- account


@app.command()
@handle_errors
def login(url: Annotated[str, typer.Option("--url", help="Server URL.")],
          api_key: Annotated[str, typer.Option("--api-key", help="Your API key.")],
          verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check the key first.")] = True,
          json_out: JsonOpt = False) -> None:
    """Save the server URL and API key to the config file (mode 0600)."""
    if verify:
        with Client(url, api_key) as client:
            client.list_teachers(limit=1)
    path = cfg.write_config(url, api_key)
    if json_out:
        _print_json({"config": str(path), "url": url})
    else:
        console.print(f"Saved the URL and key to [bold]{path}[/] (readable by you only).")


@app.command()
@handle_errors
def catalog(url: UrlOpt = None, api_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """List what the server offers: architectures, attacks, methods, datasets, job kinds."""
    with _client(url, api_key) as client:
        data = client.catalog()
    if json_out:
        return _print_json(data)
    for key, values in data.items():
        console.print(f"[bold]{key}[/]: {', '.join(map(str, values))}")


# --------------------------------------------------------------------------- teachers


def _teacher_table(teachers: list[Teacher]) -> Table:
    table = Table(_id_column(), "name", "status", "format", "arch", "classes", "size", "created")
    for t in teachers:
        spec = t.spec or {}
        table.add_row(t.id, t.name, _status(t.status), t.format or "", str(spec.get("arch", "")),
                      str(spec.get("num_classes", "")), _size(t.size_bytes), (t.created_at or "")[:19])
    return table


def _show_teacher(t: Teacher) -> None:
    spec = t.spec or {}
    console.print(_kv([("id", t.id), ("name", t.name), ("status", _status(t.status)), ("format", t.format),
                       ("arch", spec.get("arch")), ("classes", spec.get("num_classes")),
                       ("input", f"{spec.get('in_chans')}×{spec.get('img_size')}×{spec.get('img_size')}"
                        if spec.get("img_size") else None),
                       ("normalisation", _normalisation(t.normalization)),
                       ("size", _size(t.size_bytes)), ("sha256", t.sha256), ("from job", t.source_job_id),
                       ("created", t.created_at), ("error", f"[red]{t.error}[/]" if t.error else None)]))


def _normalisation(norm: dict[str, Any] | None) -> str | None:
    """'mean 0.5 std 0.5 (default)' from the server's `normalization`, or None (older servers)."""
    if not norm:
        return None
    if norm.get("mean") is None:
        return f"none added ({norm.get('source')})"
    return f"mean {norm['mean']} std {norm['std']} ({norm.get('source')})"


@teachers_app.command("upload")
@handle_errors
def teachers_upload(
        path: Annotated[Path, typer.Argument(help="A .safetensors or .onnx file.", exists=True, dir_okay=False)],
        name: Annotated[str | None, typer.Option(help="Display name (default: the file name).")] = None,
        arch: Annotated[str | None, typer.Option(help="Architecture (required for safetensors).")] = None,
        num_classes: Annotated[int | None, typer.Option(help="Number of classes (required for safetensors).")] = None,
        in_chans: Annotated[int | None, typer.Option(help="Input channels.")] = None,
        img_size: Annotated[int | None, typer.Option(help="Input height = width in pixels.")] = None,
        mean: Annotated[str | None, typer.Option(help="Per-channel mean, e.g. 0.49,0.48,0.45.")] = None,
        std: Annotated[str | None, typer.Option(help="Per-channel std.")] = None,
        class_names: Annotated[str | None, typer.Option(help="Comma-separated class names.")] = None,
        arch_kwargs: Annotated[str | None, typer.Option(help='timm kwargs of a non-default shape, JSON: '
                                                        '\'{"patch_size": 4}\'.')] = None,
        wait: WaitOpt = True, url: UrlOpt = None, api_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Upload a teacher model; with --wait (default) wait until the worker validated it."""
    with _client(url, api_key) as client:
        teacher = client.upload_teacher(path, name or path.stem, arch=arch, num_classes=num_classes,
                                        in_chans=in_chans, img_size=img_size, mean=_csv_floats(mean, "--mean"),
                                        std=_csv_floats(std, "--std"), class_names=_csv(class_names),
                                        arch_kwargs=_json_object(arch_kwargs, "--arch-kwargs"))
        if wait:
            with console.status("Validating the teacher...") if not json_out else _nullcontext():
                teacher = client.wait_teacher(teacher.id)
    _finish_upload(teacher, "Teacher", json_out)


def _finish_upload(obj: Teacher | Dataset, what: str, json_out: bool) -> None:
    if json_out:
        _print_json(obj.to_dict())
    elif isinstance(obj, Teacher):
        _show_teacher(obj)
    else:
        _show_dataset(obj)
    if obj.status == "invalid":
        if not json_out:
            err_console.print(f"[bold red]Error:[/] {what} {obj.id} is invalid: {obj.error}", soft_wrap=True)
        raise typer.Exit(1)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _print_page(page: Any, table: Callable[[Any], Any], json_out: bool) -> None:
    """One page of a list command: `{data, count}` as JSON, or a table and "n of count"."""
    if json_out:
        _print_json({"data": [item.to_dict() for item in page], "count": page.count})
        return
    console.print(table(page.data))
    console.print(f"{len(page)} of {page.count}", style="dim")


@teachers_app.command("list")
@handle_errors
def teachers_list(limit: int = 50, offset: int = 0, url: UrlOpt = None, api_key: KeyOpt = None,
                  json_out: JsonOpt = False) -> None:
    """List your teachers."""
    with _client(url, api_key) as client:
        page = client.list_teachers(limit=limit, offset=offset)
    _print_page(page, _teacher_table, json_out)


@teachers_app.command("show")
@handle_errors
def teachers_show(teacher_id: str, url: UrlOpt = None, api_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Show one teacher (spec, status, validation error)."""
    with _client(url, api_key) as client:
        teacher = client.get_teacher(teacher_id)
    if json_out:
        return _print_json(teacher.to_dict())
    _show_teacher(teacher)
    if teacher.spec:
        console.print_json(json.dumps(teacher.spec))


@teachers_app.command("delete")
@handle_errors
def teachers_delete(teacher_id: str, url: UrlOpt = None, api_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Delete a teacher (refused while a job uses it)."""
    with _client(url, api_key) as client:
        client.delete_teacher(teacher_id)
    if json_out:
        return _print_json({"id": teacher_id, "deleted": True})
    console.print(f"Deleted teacher {teacher_id}.")


# --------------------------------------------------------------------------- datasets


def _dataset_table(datasets: list[Dataset]) -> Table:
    table = Table(_id_column(), "name", "kind", "status", "classes", "input", "train", "test", "created")
    for d in datasets:
        shape = "×".join(map(str, d.input_shape)) if d.input_shape else ""
        table.add_row(d.id, d.name, d.builtin or d.kind or "", _status(d.status), str(d.num_classes or ""),
                      shape, str(d.train_size or ""), str(d.test_size or ""), (d.created_at or "")[:19])
    return table


def _show_dataset(d: Dataset) -> None:
    console.print(_kv([("id", d.id), ("name", d.name), ("kind", d.builtin or d.kind), ("status", _status(d.status)),
                       ("classes", d.num_classes), ("input", "×".join(map(str, d.input_shape or [])) or None),
                       ("train / test", f"{d.train_size} / {d.test_size}" if d.train_size else None),
                       ("created", d.created_at), ("error", f"[red]{d.error}[/]" if d.error else None)]))


@datasets_app.command("upload")
@handle_errors
def datasets_upload(
        path: Annotated[Path | None, typer.Argument(help="An .npz or image-folder .zip file.", dir_okay=False)] = None,
        builtin: Annotated[str | None, typer.Option(help="Register a built-in dataset instead, e.g. digits.")] = None,
        uri: Annotated[str | None, typer.Option(help="Register a folder or bucket read in place instead "
                                                     "(file:///data/set, s3://bucket/prefix).")] = None,
        name: Annotated[str | None, typer.Option(help="Display name.")] = None,
        kind: Annotated[str | None, typer.Option(help="npz | image_folder_zip (default: from the suffix); with "
                                                      "--uri: image_folder | webdataset.")] = None,
        wait: WaitOpt = True, url: UrlOpt = None, api_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Upload a dataset file, register a built-in one with --builtin, or one read in place with --uri."""
    if sum(x is not None for x in (path, builtin, uri)) != 1:
        raise _Fail("Give either a dataset file, --builtin NAME or --uri URL.")
    with _client(url, api_key) as client:
        if uri is not None:
            dataset = client.register_reference_dataset(name or uri.rstrip("/").rsplit("/", 1)[-1], uri,
                                                        kind or "image_folder")
        elif builtin is not None:
            dataset = client.register_builtin_dataset(name or builtin, builtin)
        else:
            assert path is not None
            if not path.is_file():
                raise _Fail(f"No such file: {path}.")
            kind = kind or ("image_folder_zip" if path.suffix.lower() == ".zip" else "npz")
            dataset = client.upload_dataset(path, name or path.stem, kind)
        if wait:
            with console.status("Validating the dataset...") if not json_out else _nullcontext():
                dataset = client.wait_dataset(dataset.id)
    _finish_upload(dataset, "Dataset", json_out)


@datasets_app.command("list")
@handle_errors
def datasets_list(limit: int = 50, offset: int = 0, url: UrlOpt = None, api_key: KeyOpt = None,
                  json_out: JsonOpt = False) -> None:
    """List your datasets."""
    with _client(url, api_key) as client:
        page = client.list_datasets(limit=limit, offset=offset)
    _print_page(page, _dataset_table, json_out)


@datasets_app.command("show")
@handle_errors
def datasets_show(dataset_id: str, url: UrlOpt = None, api_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Show one dataset."""
    with _client(url, api_key) as client:
        dataset = client.get_dataset(dataset_id)
    if json_out:
        return _print_json(dataset.to_dict())
    _show_dataset(dataset)


# --------------------------------------------------------------------------- jobs


def build_job_spec(base: dict[str, Any] | None = None, *, kind: str | None = None, name: str | None = None,
                   dataset: str | None = None, teacher: str | None = None, student_arch: str | None = None,
                   student_weights: str | None = None, model_teacher: str | None = None,
                   model_job: str | None = None, student_kwargs: dict[str, Any] | None = None, objective: dict[str, Any] | None = None,
                   train: dict[str, Any] | None = None, eval_attacks: list[str] | None = None,
                   eval_eps: float | None = None, eval_norm: str | None = None,
                   evaluation: dict[str, Any] | None = None,
                   resources: dict[str, Any] | None = None,
                   threat_model: dict[str, Any] | None = None,
                   limits: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge a --spec file with the flags (flags win); `None` flags leave the spec alone."""
    spec: dict[str, Any] = json.loads(json.dumps(base or {}))  # deep copy
    for key, value in (("kind", kind), ("name", name), ("dataset_id", dataset), ("teacher_id", teacher)):
        if value is not None:
            spec[key] = value
    spec.setdefault("kind", "distill")
    if student_arch is not None or student_weights is not None or student_kwargs is not None:
        student = spec.setdefault("student", {})
        if student_kwargs is not None:
            student["kwargs"] = student_kwargs
        if student_arch is not None:
            student["arch"] = student_arch
        if student_weights is not None:
            student["weights_id"] = student_weights
    if model_teacher is not None or model_job is not None:
        spec["model"] = {"teacher_id": model_teacher} if model_teacher else {"job_id": model_job}
    for section, values in (("objective", objective), ("train", train), ("evaluation", evaluation),
                            ("resources", resources), ("threat_model", threat_model), ("limits", limits)):
        values = {k: v for k, v in (values or {}).items() if v is not None}
        if values:
            spec.setdefault(section, {}).update(values)
    if eval_attacks is not None or eval_eps is not None or eval_norm is not None:
        ev = spec.setdefault("evaluation", {})
        # the service's defaults: PGD, and AutoAttack only where the plan expects it to be cheap
        current = {a.get("name", "pgd"): a for a in ev.get("attacks") or []} or {
            "pgd": {"name": "pgd"}, "autoattack": {"name": "autoattack", "max_seconds": 60.0}}
        names = eval_attacks or list(current)
        attacks = []
        for attack_name in names:
            attack = dict(current.get(attack_name, {"name": attack_name}))
            if eval_eps is not None:
                attack["eps"] = eval_eps
            if eval_norm is not None:
                attack["norm"] = eval_norm
            attacks.append(attack)
        ev["attacks"] = attacks
    if not spec.get("dataset_id"):
        raise _Fail("A job needs a dataset: pass --dataset ID (or dataset_id in --spec).")
    return spec


def _read_spec(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _Fail(f"Cannot read the job spec {path}: {exc}.") from exc
    if not isinstance(data, dict):
        raise _Fail(f"The job spec {path} must be a JSON object.")
    return data


def _job_table(jobs: list[Job]) -> Table:
    table = Table(_id_column(), "kind", "name", "status", "progress", "method", "created")
    for j in jobs:
        p = j.progress
        prog = f"{p.percent:.0f}%" if p and isinstance(p.percent, int | float) else ""
        if p and p.epoch and p.epochs and j.status == "running":
            prog += f" (epoch {p.epoch}/{p.epochs})"
        method = str((j.spec.get("objective") or {}).get("method", ""))
        table.add_row(j.id, j.kind, j.name or "", _status(j.status), prog, method, (j.created_at or "")[:19])
    return table


def _show_job(job: Job) -> None:
    p = job.progress
    progress = None
    if p and isinstance(p.percent, int | float):
        progress = f"{p.percent:.0f}%" + (f" {p.phase}" if p.phase else "")
        if p.epoch and p.epochs:
            progress += f", epoch {p.epoch}/{p.epochs}"
        if p.eta_s and not job.is_finished:
            progress += f", ETA {_duration(p.eta_s)}"
    objective = job.spec.get("objective") or {}
    console.print(_kv([("id", job.id), ("kind", job.kind), ("name", job.name), ("status", _status(job.status)),
                       ("progress", progress), ("method", objective.get("method")),
                       ("student", (job.spec.get("student") or {}).get("arch")), ("teacher", job.spec.get("teacher_id")),
                       ("dataset", job.spec.get("dataset_id")), ("attempts", job.attempts),
                       ("created", job.created_at), ("started", job.started_at), ("finished", job.finished_at),
                       ("error", f"[red]{job.error}[/]" if job.error else None)]))
    metrics = (job.result or {}).get("metrics") or job.metrics
    if metrics:
        console.print("[bold]metrics[/]  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in metrics.items()), soft_wrap=True)
    made = (job.result or {}).get("teacher_id")
    if made:
        console.print(f"[bold]teacher made by this job[/]  {made}")
    if job.artifacts:
        table = Table(_id_column("artifact id"), "name", "kind", "size")
        for a in job.artifacts:
            table.add_row(a.id, a.name, a.kind, _size(a.size_bytes))
        console.print(table)


def _end_of_job(job: Job, json_out: bool) -> None:
    if json_out:
        _print_json(job.to_dict())
    else:
        _show_job(job)


@jobs_app.command("submit")
@handle_errors
def jobs_submit(
        kind: Annotated[str | None, typer.Option(help="distill | adversarial_train | evaluate (default: distill).")] = None,
        dataset: Annotated[str | None, typer.Option(help="Dataset id.")] = None,
        teacher: Annotated[str | None, typer.Option(help="Teacher id (distill).")] = None,
        student_arch: Annotated[str | None, typer.Option(help="Student (or trained model) architecture.")] = None,
        student_weights: Annotated[str | None, typer.Option(help="A ready teacher id whose weights start the student.")] = None,
        student_kwargs: Annotated[str | None, typer.Option(help='timm kwargs of the student, JSON: '
                                                           '\'{"patch_size": 4, "depth": 6}\'.')] = None,
        model_teacher: Annotated[str | None, typer.Option(help="evaluate: the teacher id to measure.")] = None,
        model_job: Annotated[str | None, typer.Option(help="evaluate: the job id whose student to measure.")] = None,
        method: Annotated[str | None, typer.Option(help="kdiga | kd | ce | ard | rslad | pgd_at | trades.")] = None,
        gamma: Annotated[float | None, typer.Option(help="IGA weight γ (default: chosen per job by a sweep).")] = None,
        alpha: Annotated[float | None, typer.Option(help="KD weight α.")] = None,
        tau: Annotated[float | None, typer.Option(help="KD temperature τ.")] = None,
        norm: Annotated[str | None, typer.Option(help="Threat model norm, Linf | L2: training attacks, IGA noise "
                                                 "and report (default: Linf).")] = None,
        eps: Annotated[float | None, typer.Option(help="Threat model ε in pixel units (default: sized to the "
                                                  "images, 0.1 on 8×8 digits).")] = None,
        step: Annotated[float | None, typer.Option(help="Threat model training attack step (default: 2.5·ε/7).")] = None,
        attack_eps: Annotated[float | None, typer.Option(help="Inner attack ε (adversarial methods).")] = None,
        attack_steps: Annotated[int | None, typer.Option(help="Inner attack steps.")] = None,
        epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Batch size (per device).")] = None,
        grad_accum_steps: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
        nodes: Annotated[int | None, typer.Option(help="Worker hosts the job runs on.")] = None,
        devices_per_node: Annotated[int | None, typer.Option(help="Devices (GPUs) used on each host.")] = None,
        lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
        optimizer: Annotated[str | None, typer.Option(help="sgd | adamw.")] = None,
        device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N.")] = None,
        seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
        eval_attacks: Annotated[str | None, typer.Option(help="Attacks for the report, e.g. pgd,autoattack.")] = None,
        eval_eps: Annotated[float | None, typer.Option(help="Attack radius ε for the report.")] = None,
        eval_norm: Annotated[str | None, typer.Option(help="Linf | L2.")] = None,
        max_points: Annotated[int | None, typer.Option(help="Test points the report uses.")] = None,
        name: Annotated[str | None, typer.Option(help="A name for the job.")] = None,
        time_budget: Annotated[float | None, typer.Option(
            help="Seconds one run may take; then it stops (status stopped) and `kdiga jobs resume` continues it.")] = None,
        spec: Annotated[Path | None, typer.Option(help="JSON file with the whole job body; flags override it.",
                                                  exists=True, dir_okay=False)] = None,
        idempotency_key: Annotated[str | None, typer.Option(help="Retry-safe submit: same key, same job.")] = None,
        wait: Annotated[bool, typer.Option("--wait", help="Watch the job until it ends.")] = False,
        url: UrlOpt = None, api_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Submit a job (flags for the common hyperparameters, --spec FILE.json for everything)."""
    body = build_job_spec(
        _read_spec(spec), kind=kind, name=name, dataset=dataset, teacher=teacher, student_arch=student_arch,
        student_weights=student_weights, model_teacher=model_teacher, model_job=model_job,
        student_kwargs=_json_object(student_kwargs, "--student-kwargs"),
        objective={"method": method, "gamma": gamma, "alpha": alpha, "tau": tau, "attack_eps": attack_eps,
                   "attack_steps": attack_steps},
        train={"epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "device": device,
               "seed": seed, "grad_accum_steps": grad_accum_steps},
        eval_attacks=_csv(eval_attacks), eval_eps=eval_eps, eval_norm=eval_norm,
        evaluation={"max_points": max_points}, resources={"nodes": nodes, "devices_per_node": devices_per_node},
        threat_model={"norm": norm, "eps": eps, "step": step}, limits={"time_budget_s": time_budget})
    with _client(url, api_key) as client:
        job = client.submit_job(body, idempotency_key=idempotency_key)
        if not json_out:
            console.print(f"Submitted job [bold]{job.id}[/] ({job.kind}).")
        if wait:
            job = _wait_one(client, job, json_out)
    _end_of_job(job, json_out)


@jobs_app.command("list")
@handle_errors
def jobs_list(status: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
              limit: int = 50, offset: int = 0, url: UrlOpt = None, api_key: KeyOpt = None,
              json_out: JsonOpt = False) -> None:
    """List your jobs, newest first."""
    with _client(url, api_key) as client:
        page = client.list_jobs(limit=limit, offset=offset, status=status)
    _print_page(page, _job_table, json_out)


@jobs_app.command("show")
@handle_errors
def jobs_show(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Show a job: status, progress, result, metrics, artifacts."""
    with _client(url, api_key) as client:
        job = client.get_job(job_id)
    _end_of_job(job, json_out)


@jobs_app.command("follow", help="Follow jobs until they end (the same as `watch`).")
@jobs_app.command("watch")
@handle_errors
def jobs_watch(job_ids: Annotated[list[str], typer.Argument(help="One or more job ids.")],
               timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
               url: UrlOpt = None, api_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Follow jobs with progress bars until they end (exit 1 when one fails)."""
    with _client(url, api_key) as client:
        jobs = [client.get_job(j) for j in job_ids]
        if json_out:
            results: list[Job | KdigaError] = []
            for job in jobs:
                try:
                    results.append(client.wait_job(job.id, timeout=timeout))
                except (JobFailedError, JobCancelledError) as exc:
                    results.append(exc)
        else:
            results = watch_jobs(client, jobs, timeout=timeout)
    finals = [r.job if isinstance(r, JobFailedError | JobCancelledError) else r for r in results]
    if json_out:
        _print_json([f.to_dict() if isinstance(f, Job) else {"error": str(f)} for f in finals])
    errors = [r for r in results if isinstance(r, KdigaError)]
    if errors and not json_out:
        for e in errors:
            _fail_line(str(e), json_out=False)
    if errors:
        raise typer.Exit(1)


@jobs_app.command("cancel")
@handle_errors
def jobs_cancel(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Ask a job to stop (a queued job never starts; a running one stops at its next step)."""
    with _client(url, api_key) as client:
        job = client.cancel_job(job_id)
    if json_out:
        return _print_json(job.to_dict())
    console.print(f"Job {job.id} is {_status(job.status)}.")


@jobs_app.command("resume")
@handle_errors
def jobs_resume(job_id: str,
                time_budget: Annotated[float | None, typer.Option(
                    help="Seconds the resumed run may take (default: the job's limits.time_budget_s).")] = None,
                url: UrlOpt = None, api_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Resume a stopped job from its last checkpoint (or retry the evaluation of one that failed after training)."""
    with _client(url, api_key) as client:
        job = client.resume_job(job_id, time_budget_s=time_budget)
    if json_out:
        return _print_json(job.to_dict())
    console.print(f"Job {job.id} is {_status(job.status)}.")


def report_summary(report: dict[str, Any]) -> Table:
    """A rich table of a report's headline numbers (teacher vs student)."""
    models = report.get("models") or {}
    roles = [r for r in ("teacher", "student") if r in models] + [r for r in models if r not in ("teacher", "student")]
    attacks: list[str] = []
    for r in roles:
        attacks += [a for a in (models[r].get("attacks") or {}) if a not in attacks]
    threat = report.get("threat_model") or {}
    table = Table("", *roles, title=f"Robustness report ({threat.get('norm', '?')}, ε={threat.get('eps', '?')}, "
                  f"{report.get('n_points', '?')} points)")
    table.add_row("clean", *[_pct(models[r].get("clean_accuracy")) for r in roles])
    for a in attacks:
        table.add_row(a, *[_pct((models[r].get("attacks") or {}).get(a)) for r in roles])
    stats = {r: models[r].get("stats") or {} for r in roles}
    table.add_row("params", *[f"{stats[r].get('params', 0):,}" if stats[r].get("params") else "—" for r in roles])
    table.add_row("latency (ms)", *[f"{stats[r]['latency_ms']:.3f}" if isinstance(stats[r].get("latency_ms"), int | float)
                                    else "—" for r in roles])
    return table


@jobs_app.command("report")
@handle_errors
def jobs_report(job_id: str,
                format: Annotated[str, typer.Option("--format", help="json | html.")] = "json",
                output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the report to this file.")] = None,
                html: Annotated[Path | None, typer.Option("--html", help="Write the HTML page to this file.")] = None,
                url: UrlOpt = None, api_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Fetch a job's robustness report: a summary table, the JSON (--json) or a file (--output, --html)."""
    if html is not None:
        format, output = "html", html
    if format not in ("json", "html"):
        raise _Fail("--format must be json or html.")
    with _client(url, api_key) as client:
        report = client.get_report(job_id, format=format)
    if output is not None:
        text = report if isinstance(report, str) else json.dumps(report, indent=2)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        if json_out:
            return _print_json({"path": str(output), "format": format})
        return console.print(f"Wrote {output}")
    if isinstance(report, str):
        return typer.echo(report)
    if json_out:
        return _print_json(report)
    console.print(report_summary(report))
    for check in report.get("sanity") or []:
        mark = "[green]✓[/]" if check.get("ok") else "[red]✗[/]"
        console.print(f"{mark} {check.get('check')} ({check.get('model')}): {check.get('message', '')}",
                      soft_wrap=True)


@jobs_app.command("download")
@handle_errors
def jobs_download(job_id: str,
                  dest: Annotated[Path, typer.Argument(help="Directory to write the artifacts to.")] = Path("."),
                  checkpoints: Annotated[bool, typer.Option("--checkpoints", help="Also checkpoints.")] = False,
                  url: UrlOpt = None, api_key: KeyOpt = None, json_out: JsonOpt = False) -> None:
    """Download a job's artifacts (student weights, ONNX, model card, reports) into DEST."""
    with _client(url, api_key) as client:
        paths = client.download_job(job_id, dest, include_checkpoints=checkpoints)
    if json_out:
        return _print_json({name: str(p) for name, p in paths.items()})
    if not paths:
        console.print(f"Job {job_id} has no artifacts yet.")
    for p in paths.values():
        console.print(f"  {p}  ({_size(p.stat().st_size)})")


# --------------------------------------------------------------------------- entry point


SERVER_COMMANDS = "kdiga.commands"  # entry-point group: the server distribution adds serve/worker/admin


def mount_server_commands() -> None:
    """Add the server-side commands (`serve`, `worker`, `admin`) when the server packages are installed.

    They are found through an entry point, not an import: the client never imports server code,
    and a client-only install simply has no such entry point.
    """
    from importlib.metadata import entry_points

    if getattr(app, "_server_commands_mounted", False):
        return
    for entry in entry_points(group=SERVER_COMMANDS):
        entry.load()(app)
    app._server_commands_mounted = True  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    """The `kdiga` console script."""
    mount_server_commands()
    try:
        app(args=argv, prog_name="kdiga")
    except KeyboardInterrupt:
        err_console.print("Interrupted.")
        sys.exit(130)


if __name__ == "__main__":
    main()
