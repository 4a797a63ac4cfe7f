"""The Celery application of the worker (design.md §5, §7, §9).

Importing this module must stay cheap and must never import torch or touch CUDA
(pytorch#40403: a CUDA context created before the prefork pool forks is unusable
in the children). kdiga_core is imported lazily, inside the tasks.

Reliability settings, and why:
- `task_acks_late` + `task_reject_on_worker_lost`: a job whose worker dies is
  delivered again instead of lost; `worker.runner` caps the attempts on the job row
  so a job that always kills its worker (out of memory) fails with a reason.
- `worker_prefetch_multiplier=1`: a busy worker does not hold jobs another could run.
- Redis redelivers a message unacknowledged for longer than `visibility_timeout`, so
  it is kept above the hard time limit (celery#5935); the restore sweep runs every
  `unacked_restore_interval` seconds (throttle 1) instead of kombu's ~100 s default.
- `worker_max_tasks_per_child`: recycles the pool process now and then, which frees
  any GPU memory the allocator kept (besides the explicit `empty_cache` after a job).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import setup_logging

from kdiga_service.queue import task_routes
from kdiga_service.settings import Settings, get_settings

log = logging.getLogger(__name__)

DEFAULT_MAX_TASKS_PER_CHILD = 20


def restore_interval_s(visibility_timeout_s: float) -> int:
    """How often a worker sweeps for unacknowledged messages older than the visibility timeout."""
    return int(min(60, max(1, visibility_timeout_s // 4)))


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration derived from the service settings."""
    hard = settings.effective_hard_time_limit_s
    if settings.visibility_timeout_s <= hard:
        log.warning("visibility_timeout_s (%s) is not above the hard time limit (%s): a long job may be "
                    "delivered twice (the job row's claim keeps it from running twice)",
                    settings.visibility_timeout_s, hard)
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": restore_interval_s(settings.visibility_timeout_s),
        "unacked_restore_throttle": 1,
    }
    max_tasks = getattr(settings, "worker_max_tasks_per_child", DEFAULT_MAX_TASKS_PER_CHILD)
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": max_tasks or None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_soft_time_limit": settings.job_soft_time_limit_s,
        "task_time_limit": hard,
        "task_default_queue": settings.queue_eval,
        "task_routes": task_routes(settings),
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_send_task_events": True,  # flower
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app for `settings` (the process-wide settings by default)."""
    app = Celery("kdiga", include=["worker.tasks"])
    app.conf.update(celery_config(settings or get_settings()))
    return app


app = make_celery()
celery = app  # `celery -A worker.celery_app` finds either name


@setup_logging.connect
def _configure_logging(**_kwargs: Any) -> None:
    """JSON logs with the job id instead of Celery's default format (any receiver disables Celery's)."""
    from worker.logs import configure_logging

    configure_logging()
