"""Task and queue names: the one place the API (which publishes) and the worker (which consumes) agree on.

Tasks are sent by name so the API never imports worker code (style.md habit 6); the row id is the
only argument. No Celery here: the API's publisher (`api.publish`) and the worker's app
(`worker.celery_app`) both read these names.
"""

from __future__ import annotations

from kdiga_service.settings import Settings

RUN_JOB = "kdiga.run_job"
JOIN_JOB = "kdiga.join_job"  # another host of a multi-host job: take a place in its gang (worker.gang)
VALIDATE_TEACHER = "kdiga.validate_teacher"
VALIDATE_DATASET = "kdiga.validate_dataset"
VALIDATION_TASKS = (VALIDATE_TEACHER, VALIDATE_DATASET)


def job_queue(settings: Settings, kind: str, devices_per_node: int = 1) -> str:
    """The queue a job of `kind` is published on (stored on the row, so a re-send uses the same).

    A training job on several devices per host goes to the queue of workers that see that many
    (`multi_device_queue`): a worker's device class is the queues it serves.
    """
    if kind == "evaluate":
        return settings.queue_eval
    return settings.queue_train if devices_per_node <= 1 else multi_device_queue(settings, devices_per_node)


def multi_device_queue(settings: Settings, devices_per_node: int) -> str:
    """``<train queue>-x<devices>``: jobs that use `devices_per_node` devices on each of their hosts."""
    return f"{settings.queue_train}-x{devices_per_node}"


def validation_queue(settings: Settings) -> str:
    """The queue teacher and dataset validations are published on: their own, served by a worker process
    of its own, so that an upload is validated in seconds even while every job worker trains."""
    return settings.queue_validate


def task_routes(settings: Settings) -> dict[str, dict[str, str]]:
    """Celery's default `task_routes` (every publish also names its queue explicitly)."""
    routes = {RUN_JOB: {"queue": settings.queue_train}, JOIN_JOB: {"queue": settings.queue_train}}
    routes.update({name: {"queue": validation_queue(settings)} for name in VALIDATION_TASKS})
    return routes
