"""Scratch folders of dead attempts (issue 16.4): a killed attempt never reaches its `finally`, so its
folder (staged inputs, the tenant's checkpoint weights) would stay in the scratch folder forever.

Each attempt's folder is made by `make_scratch`, which writes the owner (`host:pid:thread`, as on
the job row) into it. `sweep_scratch` removes the folders whose owner is known dead on this host;
a folder without an owner file (made before this existed) goes once it is older than the hard time
limit, which no attempt outlives. Workers sweep when they start and before each task (throttled),
since only they can see their host's scratch folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from kdiga_service.settings import Settings
from worker.common import scratch_dir
from worker.ownership import owner_is_dead, worker_identity

log = logging.getLogger(__name__)

OWNER_FILE = ".kdiga-owner"
PREFIXES = ("kdiga-job-", "kdiga-join-")
EVERY_S = 60.0
_last_sweep = 0.0


def make_scratch(s: Settings, prefix: str) -> Path:
    """A fresh scratch folder for this attempt, marked with its owner so a sweep can tell it is dead."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_dir(s)))
    (path / OWNER_FILE).write_text(worker_identity(), encoding="utf-8")
    return path


def sweep_scratch(s: Settings, *, now: float | None = None) -> list[Path]:
    """Remove the scratch folders of dead attempts on this host; returns those removed."""
    root = Path(scratch_dir(s) or tempfile.gettempdir())
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = [p for p in root.iterdir() if p.name.startswith(PREFIXES) and p.is_dir()]
    except OSError:
        return removed
    for path in entries:
        if _dead(path, s, now):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.warning("removed scratch folders of dead attempts", extra={"count": len(removed), "root": str(root)})
    return removed


def sweep_now_and_then(s: Settings) -> None:
    """`sweep_scratch` at most every EVERY_S seconds per process (it runs before each task)."""
    global _last_sweep
    if time.monotonic() - _last_sweep >= EVERY_S:
        _last_sweep = time.monotonic()
        try:
            sweep_scratch(s)
        except Exception:  # noqa: BLE001 - housekeeping must never fail a task
            log.warning("scratch sweep failed", exc_info=True)


def _dead(path: Path, s: Settings, now: float) -> bool:
    try:
        owner = (path / OWNER_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        try:
            return now - path.stat().st_mtime > s.effective_hard_time_limit_s
        except OSError:
            return False
    except OSError:
        return False
    host, _, rest = owner.partition(":")
    if host != socket.gethostname() or rest.partition(":")[0] == str(os.getpid()):
        return False  # another host's, or this process's own (its attempt may be running)
    return owner_is_dead(owner)
