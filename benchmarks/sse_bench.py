"""/healthz latency while N server-sent-event streams are open (issue 16: 120 streams raised it from
2 ms to p50 142 ms, max 1.2 s).

    python -m benchmarks.sse_bench [--streams 120] [--repo PATH ...]

For each source tree given (default: this one) and backend (SQLite under a temporary KDIGA_HOME, or
a fresh PostgreSQL database), starts one API process (`uvicorn --workers 1`, the real Redis at
KDIGA_TEST_REDIS_URL), makes a queued job
(a row written with plain SQL, so that trees with different code share the procedure), measures
/healthz with no stream open, opens N streams on the job from a separate process (they stay open:
the job never changes), measures /healthz again, and prints one row per tree. Loopback only;
every run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx

REDIS_URL = os.environ.get("KDIGA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_URL = os.environ.get("KDIGA_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PROBES = 300
IDLE_WINDOW_S = 10.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_api(repo: Path, home: Path, key: str, database_url: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(repo), "KDIGA_HOME": str(home), "KDIGA_BROKER_URL": REDIS_URL,
           "KDIGA_DATABASE_URL": database_url,
           "KDIGA_BOOTSTRAP_ADMIN_KEY": key, "KDIGA_QUEUE_TRAIN": f"sse-bench-{uuid.uuid4().hex[:6]}",
           "KDIGA_REQUEUE_AFTER_S": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the API of {repo} did not become ready")


def insert_queued_job(database_url: str) -> str:
    """A queued job owned by the bootstrap key, written with plain SQL (no ORM: any tree's schema)."""
    from sqlalchemy import create_engine, text

    job_id = str(uuid.uuid4())
    engine = create_engine(database_url)
    with engine.begin() as conn:
        owner = conn.execute(text("SELECT id FROM api_keys LIMIT 1")).scalar_one()
        conn.execute(text(
            "INSERT INTO jobs (id, owner_id, kind, status, queue, spec, progress, metrics, result, attempts, "
            "cancel_requested, created_at) VALUES (:id, :owner, 'distill', 'queued', 'none', '{}', :progress, '{}', "
            "'{}', 0, false, :now)"),
            {"id": job_id, "owner": owner, "progress": json.dumps({"phase": "queued", "percent": 0.0}),
             "now": datetime.now(UTC)})
    engine.dispose()
    return job_id


@contextlib.contextmanager
def database(kind: str, home: Path) -> Iterator[str]:
    """A SQLite file under `home`, or a fresh PostgreSQL database (dropped afterwards)."""
    if kind == "sqlite":
        yield f"sqlite:///{home / 'kdiga.db'}"
        return
    import psycopg

    name = f"kdiga_sse_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_share(pid: int, seconds: float) -> float:
    """The API process's CPU use (fraction of one core) over `seconds` with nothing but idle streams."""
    before, start = _cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    return (_cpu_s(pid) - before) / (time.monotonic() - start)


def probe(url: str, n: int = PROBES) -> dict[str, float]:
    """Sequential /healthz requests on one connection: p50, p99 and max latency in ms."""
    times = []
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/healthz")
        for _ in range(n):
            start = time.perf_counter()
            client.get("/healthz").raise_for_status()
            times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    return {"p50_ms": statistics.median(times), "p99_ms": times[int(0.99 * (len(times) - 1))], "max_ms": times[-1]}


async def _hold_streams(url: str, key: str, job_id: str, n: int, seconds: float) -> None:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=httpx.Timeout(seconds + 30)) as client:
        async def one() -> None:
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                response.raise_for_status()
                print("open", flush=True)  # noqa: T201 - the parent counts these lines
                with contextlib_suppress():
                    async for _ in response.aiter_bytes():
                        pass

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.sleep(seconds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class contextlib_suppress:  # noqa: N801 - a tiny local stand-in for contextlib.suppress(Exception)
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def open_streams(url: str, key: str, job_id: str, n: int, seconds: float) -> subprocess.Popen:
    """A child process that holds `n` streams open for `seconds`; returns once all are open."""
    env = {**os.environ, "KDIGA_BENCH_KEY": key}
    args = json.dumps({"url": url, "job_id": job_id, "n": n, "seconds": seconds})
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.sse_bench", "--hold", args], env=env,
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    opened, deadline = 0, time.monotonic() + 120
    while opened < n and time.monotonic() < deadline:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            break
        opened += line.strip() == "open"
    if opened < n:
        proc.kill()
        raise RuntimeError(f"only {opened} of {n} streams opened")
    return proc


def measure(repo: Path, streams: int, backend: str) -> dict[str, object]:
    key = "kdg_" + secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="kdg-sse-") as tmp, database(backend, Path(tmp)) as url_db:
        proc, url = start_api(repo, Path(tmp), key, url_db)
        try:
            job_id = insert_queued_job(url_db)
            idle = probe(url)
            holder = open_streams(url, key, job_id, streams, seconds=120)
            time.sleep(2.0)  # let every stream reach its steady state
            try:
                idle_cpu = cpu_share(proc.pid, IDLE_WINDOW_S)
                loaded = probe(url)
            finally:
                holder.kill()
                holder.wait(timeout=30)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"repo": str(repo), "backend": backend, "streams": streams, "idle": idle, "with_streams": loaded,
            "api_cpu_while_streams_idle": idle_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description="/healthz latency with N open SSE streams")
    parser.add_argument("--streams", type=int, default=120)
    parser.add_argument("--repo", type=Path, action="append")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), action="append")
    parser.add_argument("--hold", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold:
        opts = json.loads(args.hold)
        asyncio.run(_hold_streams(opts["url"], os.environ["KDIGA_BENCH_KEY"], opts["job_id"], opts["n"],
                                  opts["seconds"]))
        return
    for backend in args.backend or ["sqlite"]:
        for repo in args.repo or [Path(__file__).resolve().parents[1]]:
            row = measure(repo.resolve(), args.streams, backend)
            print(json.dumps(row))  # noqa: T201 - a CLI


if __name__ == "__main__":
    main()
