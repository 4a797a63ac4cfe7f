"""Plain progress lines for logs (CI), where a progress bar would print nothing or a mess of carriage returns.

`JobLines` has `JobBars`' interface (`add`, `update`, a context manager). It writes one line when a job's
status, phase, stage or epoch changes, and the last state again every ``every`` seconds while nothing
changes, so a CI log shows the job is alive during a long evaluation. Lines end with ``\\n`` only.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import threading
from typing import Any, TextIO

from kdiga_client.client import Job

DEFAULT_EVERY_S = 30.0
EVERY_ENV = "KDIGA_PROGRESS_EVERY_S"  # seconds between repeated lines when nothing changes
STALE_AFTER_S = 60.0  # progress older than this is shown with its age (a long attack batch reports nothing)


def every_from_env() -> float:
    """``KDIGA_PROGRESS_EVERY_S`` (seconds, > 0), else 30."""
    try:
        value = float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S))
    except ValueError:
        return DEFAULT_EVERY_S
    return value if value > 0 else DEFAULT_EVERY_S


def _duration(seconds: Any) -> str | None:
    if not isinstance(seconds, int | float) or seconds < 0:
        return None
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def describe(job: Job) -> tuple[tuple[Any, ...], str]:
    """(what counts as a change, the line's text after the label) for a job's current state."""
    p = job.progress
    raw = dict(p.raw) if p is not None else {}
    running = job.status == "running"
    phase = (p.phase if p is not None and running else None) or None
    stage = raw.get("stage") if running and phase != "train" else None  # sweep, evaluate, export
    epoch = f"epoch {p.epoch}/{p.epochs}" if running and p is not None and p.epoch and p.epochs else None
    parts = [job.status, phase, stage, epoch if phase == "train" else None]
    percent = 100.0 if job.status == "succeeded" else (p.percent if p is not None else None)
    if isinstance(percent, int | float):
        whole = raw.get("job_percent")
        parts.append(f"{percent:.0f}%" + (f" (job {whole:.0f}%)" if isinstance(whole, int | float) and running
                                           and phase else ""))
    if running and p is not None and (eta := _duration(p.eta_s)):
        whole_eta = _duration(raw.get("job_eta_s"))
        parts.append(f"ETA {eta}" + (f" (job {whole_eta})" if whole_eta else ""))
    age = _age(p.updated_at if p is not None else None)
    if running and age is not None and age >= STALE_AFTER_S:  # one long batch: say so, not a frozen number
        parts.append(f"last progress {_duration(age)} ago")
    key = (job.status, phase, stage, epoch)
    return key, " · ".join(str(x) for x in parts if x)


def _age(updated_at: str | None) -> float | None:
    """Seconds since the worker wrote this progress (None when unknown)."""
    if not updated_at:
        return None
    try:
        when = dt.datetime.fromisoformat(updated_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (dt.datetime.now(dt.UTC) - when).total_seconds())


class JobLines:
    """One line per change of a job's status, phase, stage or epoch, and every ``every`` seconds."""

    def __init__(self, out: TextIO | None = None, every: float | None = None):
        self.out = out or sys.stdout
        self.every = every if every is not None else every_from_env()
        self._labels: dict[str, str] = {}
        self._jobs: dict[str, tuple[tuple[Any, ...], Job]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="kdiga-progress-lines")

    def __enter__(self) -> JobLines:
        self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._ticker.join(timeout=5)

    def add(self, job: Job, label: str | None = None) -> None:
        with self._lock:
            self._labels[job.id] = label or job.name or job.id
        self.update(job)

    def update(self, job: Job) -> None:
        if job.id not in self._labels:
            return
        key, text = describe(job)
        with self._lock:
            changed = self._jobs.get(job.id, (None, job))[0] != key
            self._jobs[job.id] = (key, job)  # the newest numbers, printed by the next tick
            if changed:
                self._write(job.id, text)

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                for job_id, (key, job) in self._jobs.items():
                    if key[0] not in ("succeeded", "failed", "cancelled"):
                        self._write(job_id, describe(job)[1])  # described again: the progress's age moves

    def _write(self, job_id: str, text: str) -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        label = self._labels[job_id]
        who = label if label == job_id else f"{label} ({job_id})"
        self.out.write(f"{now} job {who}: {text}\n")
        self.out.flush()
