"""The kdiga worker: a Celery app whose tasks run kdiga_core jobs (design.md §5).

`start_worker(queues, concurrency=1, ...)` runs one worker process (the `kdiga worker` command).
Nothing here imports torch at import time.
"""

from __future__ import annotations

from typing import Any


def start_worker(*args: Any, **kwargs: Any) -> None:
    """See `worker.launcher.start_worker`."""
    from worker.launcher import start_worker as _start

    _start(*args, **kwargs)
