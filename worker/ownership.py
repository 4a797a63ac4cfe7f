"""Who holds a job row: `host:pid:thread` of the task, and whether that owner is known to be dead."""

from __future__ import annotations

import logging
import os
import socket
import threading

log = logging.getLogger(__name__)


def worker_identity() -> str:
    """`host:pid:thread` of this task; stored on the row so a redelivery can tell a dead owner."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def owner_is_dead(worker_id: str | None) -> bool:
    """True when `worker_id` names a process (or a thread of ours) on this host that no longer runs."""
    host, _, rest = (worker_id or "").partition(":")
    pid, _, thread = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():  # an earlier attempt in this very process (thread pool, or a retry)
        alive = {t.ident for t in threading.enumerate()} - {threading.get_ident()}
        return not (thread.isdigit() and int(thread) in alive)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ", 1)[1][:1] == "Z"
    except (OSError, IndexError):
        return False
