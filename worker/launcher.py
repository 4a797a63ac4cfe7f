"""Start a worker process: `kdiga worker`, `python -m worker`, the docker entrypoint and tests.

One worker process per GPU (set CUDA_VISIBLE_DEVICES per process), concurrency 1: a job gets
the whole device. The embedded default runs one worker listening to every queue.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import socket
from collections.abc import Sequence

from kdiga_service.queue import multi_device_queue
from kdiga_service.settings import get_settings

log = logging.getLogger(__name__)


def default_queues() -> list[str]:
    """What a lone worker serves: training ('gpu'), evaluation and validation ('cpu'), and the queues
    of jobs on several devices per host that it can run ('gpu-x2', ...): up to its GPUs, or up to
    KDIGA_MAX_DEVICES_PER_NODE on a CPU-only host, where a "device" is a process."""
    s = get_settings()
    most = visible_gpus() or s.max_devices_per_node
    return [s.queue_train, s.queue_eval, *(multi_device_queue(s, m) for m in range(2, most + 1))]


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
    from worker.celery_app import app

    argv = worker_argv(queues, concurrency=concurrency, pool=pool, hostname=hostname, loglevel=loglevel,
                       max_tasks_per_child=max_tasks_per_child)
    log.info("starting worker", extra={"argv": argv, "broker": _redacted(app.conf.broker_url)})
    app.worker_main(argv)


def _redacted(url: str | None) -> str:
    if not url or "@" not in url:
        return url or ""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m worker [--queues gpu,cpu] [--concurrency 1] [--pool prefork|solo]`."""
    parser = argparse.ArgumentParser(prog="python -m worker", description="Run a kdiga worker process.")
    parser.add_argument("--queues", "-Q", default=None,
                        help="Comma-separated queues (default: the train and eval queues).")
    parser.add_argument("--concurrency", "-c", type=int, default=1)
    parser.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    parser.add_argument("--hostname", "-n", default=None)
    parser.add_argument("--loglevel", "-l", default=os.environ.get("KDIGA_LOG_LEVEL", "INFO"))
    parser.add_argument("--max-tasks-per-child", type=int, default=None)
    args = parser.parse_args(argv)
    queues = [q for q in (args.queues or "").split(",") if q] or None
    start_worker(queues, args.concurrency, pool=args.pool, hostname=args.hostname, loglevel=args.loglevel,
                 max_tasks_per_child=args.max_tasks_per_child)
