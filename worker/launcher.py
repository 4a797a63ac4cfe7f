"""Start a worker process: `kdiga worker`, `python -m worker`, the docker entrypoint and tests.

One worker process per GPU (set CUDA_VISIBLE_DEVICES per process), concurrency 1: a job gets
the whole device. The embedded default runs one job worker (training and evaluation) and one validation worker.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import socket
from collections.abc import Sequence

from kdiga_service.cpus import available_cpus
from kdiga_service.queue import multi_device_queue, validation_queue
from kdiga_service.settings import get_settings

log = logging.getLogger(__name__)


ROLES = ("all", "jobs", "validation")


def default_queues(role: str = "all") -> list[str]:
    """The queues a worker of `role` serves.

    `jobs`: training ('gpu'), evaluation ('cpu') and the queues of jobs on several devices per host
    that it can run ('gpu-x2', ...): up to its GPUs, or up to KDIGA_MAX_DEVICES_PER_NODE on a CPU-only
    host, where a "device" is a process. `validation`: teacher and dataset validation ('validate').
    `all` (a lone worker): both. The embedded launcher runs one `validation` process beside its `jobs`
    workers, so an upload never waits behind a training job.
    """
    s = get_settings()
    most = visible_gpus() or s.max_devices_per_node
    jobs = [s.queue_train, s.queue_eval, *(multi_device_queue(s, m) for m in range(2, most + 1))]
    validation = [validation_queue(s)]
    return {"jobs": jobs, "validation": validation}.get(role, jobs + validation)


def visible_gpus() -> int:
    """GPUs this process may use, without importing torch (no CUDA before the pool forks)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(glob.glob("/dev/nvidia[0-9]*"))


def worker_argv(queues: Sequence[str] | None = None, *, concurrency: int = 1, pool: str = "prefork",
                hostname: str | None = None, loglevel: str = "INFO",
                max_tasks_per_child: int | None = None) -> list[str]:
    """The `celery worker` arguments for these options."""
    argv = [
        "worker",
        f"--queues={','.join(queues or default_queues())}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--hostname={hostname or default_hostname()}",
        f"--loglevel={loglevel}",
        "--without-mingle",
        "--without-gossip",
    ]
    if max_tasks_per_child:
        argv.append(f"--max-tasks-per-child={max_tasks_per_child}")
    return argv


def default_hostname() -> str:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    suffix = f"-gpu{gpu.replace(',', '_')}" if gpu else ""
    return f"kdiga{suffix}-{os.getpid()}@{socket.gethostname()}"


def start_worker(queues: Sequence[str] | None = None, concurrency: int = 1, *, pool: str = "prefork",
                 hostname: str | None = None, loglevel: str = "INFO",
                 max_tasks_per_child: int | None = None) -> None:
    """Run a Celery worker in this process until it is stopped (SIGTERM: warm shutdown)."""
    from worker.logs import configure_logging

    configure_logging(loglevel)
    share_cores(concurrency)
    from worker.celery_app import app

    argv = worker_argv(queues, concurrency=concurrency, pool=pool, hostname=hostname, loglevel=loglevel,
                       max_tasks_per_child=max_tasks_per_child)
    log.info("starting worker", extra={"argv": argv, "broker": _redacted(app.conf.broker_url)})
    app.worker_main(argv)


def share_cores(concurrency: int, cpus: int | None = None) -> int:
    """Default `KDIGA_WORKER_THREADS` to this worker's share of the cores: cores // pool processes.

    Set in the environment before the Celery app reads the settings, so the pool processes (which
    apply it, worker.tasks) inherit it. An operator's (or the embedded launcher's) value wins, and
    so does an explicit OMP_NUM_THREADS.
    """
    from kdiga_service.settings import reset_settings

    if not os.environ.get("KDIGA_WORKER_THREADS"):
        share = max(1, (cpus or available_cpus()) // max(1, concurrency))
        omp = os.environ.get("OMP_NUM_THREADS", "")
        os.environ["KDIGA_WORKER_THREADS"] = omp if omp.isdigit() and int(omp) > 0 else str(share)
        reset_settings()
    return int(os.environ["KDIGA_WORKER_THREADS"])


def _redacted(url: str | None) -> str:
    if not url or "@" not in url:
        return url or ""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m worker [--queues gpu,cpu] [--concurrency 1] [--pool prefork|solo]`."""
    parser = argparse.ArgumentParser(prog="python -m worker", description="Run a kdiga worker process.")
    parser.add_argument("--queues", "-Q", default=None,
                        help="Comma-separated queues (default: those of --role).")
    parser.add_argument("--role", default="all", choices=ROLES,
                        help="jobs: training and evaluation; validation: uploads; all: both (default).")
    parser.add_argument("--concurrency", "-c", type=int, default=1)
    parser.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    parser.add_argument("--hostname", "-n", default=None)
    parser.add_argument("--loglevel", "-l", default=os.environ.get("KDIGA_LOG_LEVEL", "INFO"))
    parser.add_argument("--max-tasks-per-child", type=int, default=None)
    args = parser.parse_args(argv)
    queues = [q for q in (args.queues or "").split(",") if q] or default_queues(args.role)
    start_worker(queues, args.concurrency, pool=args.pool, hostname=args.hostname, loglevel=args.loglevel,
                 max_tasks_per_child=args.max_tasks_per_child)
