"""Publish tasks by name (kdiga_service.queue); the api never imports worker code (style.md habit 6).

The Celery app here only publishes: it has the broker URL and transport options, no tasks.
"""

from __future__ import annotations

import threading

from celery import Celery

from kdiga_service.settings import Settings, get_settings

_lock = threading.Lock()
_apps: dict[str, Celery] = {}


class QueueUnavailable(Exception):
    """The broker refused or did not answer a publish."""


def broker_transport_options(settings: Settings) -> dict[str, object]:
    """Transport options shared with the worker (the visibility timeout must match)."""
    return {"visibility_timeout": settings.visibility_timeout_s}


def publish_transport_options(settings: Settings) -> dict[str, object]:
    """The worker's transport options plus socket timeouts, so a frozen broker cannot hang a request.

    Without `socket_timeout`, redis-py waits forever for an answer from a Redis that accepts
    connections but does not answer (stopped with SIGSTOP, swapping, a dead peer behind a NAT): every
    POST and /readyz hung. Each attempt is bounded by half of `KDIGA_PUBLISH_TIMEOUT_S`, and there
    are two (one retry on a fresh connection), so a publish gives up within about that timeout.
    The worker keeps its own options: its blocking reads must not time out.
    """
    half = settings.publish_timeout_s / 2
    return {**broker_transport_options(settings), "socket_timeout": half, "socket_connect_timeout": half}


def make_celery(settings: Settings) -> Celery:
    """A publish-only Celery app for `settings.broker_url`."""
    app = Celery("kdiga-api", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=publish_transport_options(settings),
        broker_connection_timeout=settings.publish_timeout_s / 2,
        broker_connection_retry_on_startup=False,
        broker_connection_max_retries=1,
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.1,
            "interval_max": 0.1,
        },
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def get_celery(settings: Settings | None = None) -> Celery:
    """The cached publish-only Celery app for the given (or process-wide) settings."""
    settings = settings or get_settings()
    with _lock:
        app = _apps.get(settings.broker_url)
        if app is None:
            app = _apps[settings.broker_url] = make_celery(settings)
        return app


def enqueue(settings: Settings, task_name: str, object_id: str, *, queue: str) -> str:
    """Publish `task_name(object_id)` on `queue`; returns the Celery task id.

    Raises QueueUnavailable when the broker cannot be reached.
    """
    try:
        result = get_celery(settings).send_task(task_name, args=[object_id], queue=queue)
    except Exception as exc:  # kombu raises several connection error types
        raise QueueUnavailable(str(exc)) from exc
    return str(result.id)


def ping_broker(settings: Settings) -> bool:
    """True when the broker answers (a connection, and PING on Redis) within the publish timeout."""
    app = get_celery(settings)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                   timeout=settings.publish_timeout_s)
            client = getattr(conn.default_channel, "client", None)
            if client is not None and hasattr(client, "ping"):
                client.ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return False


def close_all() -> None:
    """Close broker connection pools (app shutdown, tests)."""
    with _lock:
        for app in _apps.values():
            app.close()
        _apps.clear()
