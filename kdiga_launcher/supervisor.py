"""The embedded default's supervisor: everything on one machine, nothing to install (design.md §2).

`kdiga serve` calls `serve()`. It starts, under `KDIGA_HOME`:

- the embedded Redis (`kdiga_launcher.embedded_redis`) unless KDIGA_BROKER_URL names another broker;
- the database migrations (SQLite under `KDIGA_HOME` by default);
- the API under uvicorn, ONE Celery worker process for jobs (training and evaluation) and ONE for
  teacher and dataset validation, so an upload never waits behind a training job (issue 17.2).

Each worker's intra-op threads follow its share of the cores (`KDIGA_WORKER_THREADS`, default
cores // worker processes started here): two processes each using every core make jobs 10-30x
slower on a busy machine. `serve()` supervises the processes: one that dies is restarted with
exponential backoff; the service stops only when asked (Ctrl-C, SIGTERM).

When `KDIGA_DATABASE_URL` / `KDIGA_BROKER_URL` are set those are used instead and
nothing embedded is started for them. Tests and the demo use `start_embedded()`,
which returns a handle with `.url`, `.admin_key` and `.stop()`.

This module never imports torch or kdiga_core (the worker does, in its own process).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kdiga_launcher.embedded_redis import EmbeddedRedis, restore_orphaned_messages
from kdiga_service.cpus import available_cpus

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY_FILE = "admin_key"


# --------------------------------------------------------------------------- the whole service


@dataclass
class Embedded:
    """A running embedded service: `.url`, `.admin_key`, `.stop()`."""

    url: str
    admin_key: str
    home: Path
    env: dict[str, str]
    redis: EmbeddedRedis | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path | None = None  # None: the processes log to this terminal
    lock_fd: int | None = None  # held while running: one launcher per KDIGA_HOME
    _stopped: bool = False

    @property
    def database_url(self) -> str:
        return self.env["KDIGA_DATABASE_URL"]

    @property
    def broker_url(self) -> str:
        return self.env["KDIGA_BROKER_URL"]

    commands: dict[str, list[str]] = field(default_factory=dict)  # how to start each process again

    def start_worker(self, name: str = "worker", *, queues: str | None = None, role: str = "jobs") -> subprocess.Popen[bytes]:
        """Start (or restart) a worker process under `name` with this service's settings.

        `role`: "jobs" (training and evaluation), "validation" (uploads) or "all"; `queues` overrides it.
        """
        self.commands[name] = _worker_command(queues, role)
        return self.start(name)

    def start(self, name: str) -> subprocess.Popen[bytes]:
        """Start process `name` again with the command it was first started with."""
        old = self.processes.get(name)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"The process {name!r} is still running.")
        self.processes[name] = _spawn(name, self.commands[name], self.env, self.log_path(name))
        return self.processes[name]

    def log_path(self, name: str) -> Path | None:
        """Where process `name` writes its log (None when it logs to the terminal)."""
        return self.log_dir / f"{name}.log" if self.log_dir else None

    def stop(self, *, grace_s: float = 10.0) -> None:
        """Stop workers (warm, then cold shutdown), then the API, then the embedded Redis."""
        if self._stopped:
            return
        self._stopped = True
        workers = {n: p for n, p in self.processes.items() if n != "api"}
        _stop_processes(workers, grace_s)
        _stop_processes({n: p for n, p in self.processes.items() if n == "api"}, grace_s)
        if self.redis is not None:
            self.redis.stop()
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the lock
            self.lock_fd = None
        log.info("embedded service stopped", extra={"home": str(self.home)})

    def __enter__(self) -> Embedded:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def start_embedded(
    home: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    workers: int = 1,
    env: dict[str, str] | None = None,
    console: bool = False,
    startup_timeout_s: float = 90.0,
) -> Embedded:
    """Start the embedded service and return once the API answers `/healthz`.

    Args:
        home: KDIGA_HOME (default: the setting, ~/.kdiga).
        host, port: where the API listens; port 0 picks a free port.
        workers: job worker processes to start (one by default); with any, a validation worker
            too. 0 starts none (nothing consumes the queues).
        env: extra environment for the API and worker processes (e.g. KDIGA_* overrides).
        console: let the processes log to this terminal instead of KDIGA_HOME/logs/*.log.
    """
    from kdiga_service.settings import Settings

    base_env = {**os.environ, **(env or {})}
    home = Path(home or base_env.get("KDIGA_HOME") or Settings().home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    base_env["KDIGA_HOME"] = str(home)
    extra: dict[str, Any] = {"api_workers": base_env["KDIGA_API_WORKERS"]} if base_env.get("KDIGA_API_WORKERS") else {}
    settings = Settings(
        home=home,
        database_url=base_env.get("KDIGA_DATABASE_URL", ""),
        broker_url=base_env.get("KDIGA_BROKER_URL", ""),
        **extra,
    )
    port = port or _free_port(host)
    child_env = {
        **base_env,
        "KDIGA_DATABASE_URL": settings.database_url,
        "KDIGA_BROKER_URL": settings.broker_url,
        "KDIGA_API_HOST": host,
        "KDIGA_API_PORT": str(port),
        "KDIGA_RUN_MIGRATIONS": "false",
        "PYTHONPATH": _pythonpath(base_env),
        "KDIGA_WORKER_THREADS": base_env.get("KDIGA_WORKER_THREADS") or str(worker_threads(workers)),
    }
    service = Embedded(url=f"http://{_url_host(host)}:{port}", admin_key="", home=home, env=child_env,
                       lock_fd=_lock_home(home))
    if not console:
        service.log_dir = home / "logs"
        service.log_dir.mkdir(exist_ok=True)
    try:
        service.redis = _start_broker(settings)
        if service.redis is not None:
            restore_orphaned_messages(settings.broker_url)
        _migrate(settings)
        service.admin_key = ensure_admin_key(settings)
        api_workers = settings.api_workers
        if api_workers > 1:
            child_env["PROMETHEUS_MULTIPROC_DIR"] = str(_fresh_metrics_dir(home))
        service.commands["api"] = _api_command(host, port, api_workers)
        service.start("api")
        for i in range(workers):
            service.start_worker("worker" if i == 0 else f"worker{i + 1}")
        if workers:
            service.start_worker("validator", role="validation")
        _wait_healthy(service, startup_timeout_s)
    except BaseException:
        service.stop(grace_s=2)
        raise
    log.info("embedded service started", extra={"url": service.url, "home": str(home)})
    return service


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    home: str | Path | None = None,
    *,
    workers: int = 1,
    console: bool = True,
) -> int:
    """`kdiga serve`: start everything, print where it listens, run until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        service = start_embedded(home, host, port, workers=workers, console=console)
    except BaseException:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise
    _announce(service)
    keeper = Keeper(service)
    try:
        while not stop.wait(0.5):
            keeper.check()
        return_code = 0
    finally:
        print("Stopping kdiga...", file=sys.stderr, flush=True)  # noqa: T201 - the CLI's own output
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return return_code


def worker_threads(workers: int, cpus: int | None = None) -> int:
    """Each worker process's intra-op threads: its share of the cores (the validator counts as one)."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:  # the operator already chose
        return int(omp)
    processes = workers + 1 if workers else 1
    return max(1, (cpus or available_cpus()) // processes)


@dataclass
class Keeper:
    """Restarts the service's processes when they die, with exponential backoff (issue 16.6).

    A process that ran for `stable_s` before dying starts again after `base_s`; each quick death
    doubles the wait up to `cap_s`, so a process that cannot start does not spin. A dead worker's
    leftover pool processes are killed, and (with the embedded broker, whose consumers are all ours)
    the tasks it had not acknowledged are put back at once: its job resumes from its last checkpoint
    on the restarted worker instead of waiting for the visibility timeout (hours).
    """

    service: Embedded
    base_s: float = 1.0
    cap_s: float = 60.0
    stable_s: float = 60.0
    failures: dict[str, int] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)  # name -> monotonic time of the restart
    started: dict[str, float] = field(default_factory=dict)
    cleaned: set[int] = field(default_factory=set)  # dead pids whose process group was killed

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for name, proc in list(self.service.processes.items()):
            self.started.setdefault(name, now)
            if proc.poll() is None:
                continue
            if name not in self.due:
                self._schedule(name, proc, now)
            elif now >= self.due[name]:
                del self.due[name]
                self.started[name] = now
                try:
                    self.service.start(name)
                except OSError:  # counted as a quick death: the next try waits longer
                    log.exception("could not restart a service process", extra={"process_name": name})
                    continue
                log.warning("service process restarted", extra={"process_name": name,
                                                                 "pid": self.service.processes[name].pid})

    def _schedule(self, name: str, proc: subprocess.Popen[bytes], now: float) -> None:
        ran = now - self.started.get(name, now)
        self.failures[name] = 1 if ran >= self.stable_s else self.failures.get(name, 0) + 1
        delay = min(self.cap_s, self.base_s * 2 ** (self.failures[name] - 1))
        self.due[name] = now + delay
        if proc.pid not in self.cleaned:  # once: a later pid reuse must not be signalled
            self.cleaned.add(proc.pid)
            _signal_group(proc.pid, signal.SIGKILL)  # its orphaned children (a worker's pool process)
        if name != "api" and self.service.redis is not None:
            try:
                restore_orphaned_messages(self.service.broker_url)
            except Exception:  # noqa: BLE001 - the broker may be restarting: the visibility timeout still applies
                log.exception("could not put a dead worker's tasks back in their queues")
        log.error("service process died; restarting it", extra={
            "process_name": name, "exit_code": proc.returncode, "restart_in_s": delay,
            "quick_deaths": self.failures[name]})


def _announce(service: Embedded) -> None:
    lines = [
        f"kdiga is running at {service.url}  (API docs: {service.url}/docs)",
        f"  home:      {service.home}",
        f"  admin key: {service.admin_key}  (also in {service.home / ADMIN_KEY_FILE})",
        "  Press Ctrl-C to stop.",
    ]
    print("\n".join(lines), flush=True)  # noqa: T201 - `kdiga serve` is a CLI entry point


# --------------------------------------------------------------------------- pieces


def _lock_home(home: Path) -> int:
    """Hold `KDIGA_HOME/serve.lock` so a second launcher on the same home fails with a clear message.

    The lock dies with the process, so a crashed launcher never blocks the next start.
    """
    import fcntl

    path = home / "serve.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(f"Another kdiga service is already running with KDIGA_HOME={home} "
                           f"(launcher pid {holder}); stop it first.") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def ensure_admin_key(settings: Any) -> str:
    """The admin key stored in KDIGA_HOME/admin_key (0600), created on first start."""
    from kdiga_service.admin import ensure_key, generate_key
    from kdiga_service.db import get_sessionmaker

    path = Path(settings.home) / ADMIN_KEY_FILE
    secret = path.read_text(encoding="utf-8").strip() if path.exists() else ""
    with get_sessionmaker(settings)() as session:
        row = ensure_key(session, secret=secret, name="embedded-admin") if secret else None
        if row is None or row.revoked_at is not None:
            secret = generate_key()
            ensure_key(session, secret=secret, name="embedded-admin")
            _write_secret(path, secret)
    return secret


def _write_secret(path: Path, secret: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")
    os.replace(tmp, path)


def _start_broker(settings: Any) -> EmbeddedRedis | None:
    sock = settings.embedded_broker_socket
    if sock is None:
        return None  # an external broker (KDIGA_BROKER_URL)
    return EmbeddedRedis(Path(settings.home) / "redis", socket_path=sock).start()


def _migrate(settings: Any) -> None:
    from kdiga_service.migrate import upgrade_head

    upgrade_head(settings)


def _fresh_metrics_dir(home: Path) -> Path:
    """An empty folder for prometheus_client's multiprocess files (stale ones would add up)."""
    path = home / "run" / "prometheus"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    return path


def _api_command(host: str, port: int, workers: int = 1) -> list[str]:
    # Several processes because one is bound by the GIL at ~2,400 status reads/s (BENCHMARKS.md).
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "api.main:create_app",
        "--factory",
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "5",
        *(["--workers", str(workers)] if workers > 1 else []),
    ]


def _worker_command(queues: str | None, role: str = "jobs") -> list[str]:
    cmd = [sys.executable, "-m", "worker", "--concurrency", "1", "--pool", "prefork", "--role", role]
    return cmd + (["--queues", queues] if queues else [])


def _spawn(name: str, cmd: list[str], env: dict[str, str], log_file: Path | None) -> subprocess.Popen[bytes]:
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    finally:
        if out:
            out.close()
    log.info("process started", extra={"process_name": name, "pid": proc.pid})
    return proc


def _die_with_parent() -> None:
    """Linux: SIGTERM the child when the launcher dies, so a crashed `kdiga serve` leaves no orphans."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort (non-Linux)
        pass


def _stop_processes(processes: dict[str, subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM (warm shutdown), then SIGQUIT (Celery's cold shutdown), then SIGKILL the group."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        alive = {n: p for n, p in processes.items() if p.poll() is None}
        if not alive:
            return
        for proc in alive.values():
            _signal_group(proc.pid, sig)
        deadline = time.monotonic() + wait
        for proc in alive.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    # reap leftovers of the group (a prefork child whose parent was killed)
    for proc in processes.values():
        _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_healthy(service: Embedded, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    api = service.processes["api"]
    while time.monotonic() < deadline:
        if api.poll() is not None:
            raise RuntimeError(
                f"The API process exited with code {api.returncode}; "
                f"see {service.log_path('api') or 'its output'}."
            )
        try:
            if httpx.get(f"{service.url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"The API did not answer {service.url}/healthz within {timeout:.0f} s.")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _pythonpath(env: dict[str, str]) -> str:
    parts = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


@contextmanager
def embedded(home: str | Path | None = None, **kwargs: Any) -> Iterator[Embedded]:
    """`with embedded(tmp_path, port=0) as svc: ...` starts and always stops the service."""
    service = start_embedded(home, **kwargs)
    try:
        yield service
    finally:
        service.stop()
