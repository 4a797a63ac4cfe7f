"""Progress, cancellation and heartbeat for one running job, all through its row.

Progress goes to the row at most once per `progress_interval_s`; an update that arrived sooner is kept and
written by the background thread once the interval is over (so the last stage of a phase is never lost
behind a slow one: a CI log would show a stale stage for minutes). The same thread refreshes the heartbeat
so long phases without progress do not look dead; cancellation is cooperative (`should_cancel`, throttled
like progress).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from kdiga_service import crud
from kdiga_service.settings import Settings
from worker.common import scalar, session_for

log = logging.getLogger(__name__)


PROGRESS_KEYS = ("phase", "stage", "epoch", "epochs", "step", "steps_per_epoch", "global_step", "total_steps",
                 "percent", "eta_s", "points_done", "points_total", "job_percent", "job_eta_s")




class Reporter:
    """Throttled progress writes, throttled cancel checks and a heartbeat thread for one job."""

    def __init__(self, job_id: str, worker_id: str, settings: Settings):
        self.job_id, self.worker_id, self.settings = job_id, worker_id, settings
        self.interval = settings.progress_interval_s
        self.beat_every = max(0.2, min(10.0, settings.heartbeat_stale_s / 4))
        self.lost = False
        self._cancel = False
        self._last_write = self._last_check = -math.inf
        self._phase: str | None = None
        self._quarter = 0  # the last quarter of the work reported as a milestone (job.progress webhooks)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[str, Any] | None = None  # the newest update not written yet (throttled)
        self._write_lock = threading.Lock()
        self._settled = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat_loop, name=f"heartbeat-{self.job_id[:8]}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def on_step(self, progress: dict[str, Any]) -> None:
        """kdiga_core's `on_step`: called every step; writes at most once per interval (or on a new phase)."""
        phase = progress.get("phase")
        with self._write_lock:
            if self._settled:
                return
            if time.monotonic() - self._last_write < self.interval and phase == self._phase:
                self._pending = dict(progress)
                return
            self._write(progress)
        if phase != "train" and self.should_cancel():
            # Training checks `should_cancel` itself; the later phases (evaluation, export) only
            # report progress, so a cancel is honoured here, between two of their stages.
            from kdiga_core.errors import CancelledError

            raise CancelledError("The job was cancelled.")

    def settle(self) -> None:
        """The job's work is over: write what the throttle still holds, and hold nothing back after."""
        with self._write_lock:
            if self._pending is not None and not self.lost:
                self._write(self._pending)
            self._settled = True

    def _flush(self) -> None:
        """Write the update the throttle held back, once the interval is over (the heartbeat thread)."""
        with self._write_lock:
            if self._settled or self._pending is None:
                return
            if time.monotonic() - self._last_write >= self.interval:
                self._write(self._pending)

    def _write(self, progress: dict[str, Any]) -> None:
        """One progress write (the caller holds ``_write_lock``)."""
        phase = progress.get("phase")
        previous_phase = self._phase
        self._last_write, self._phase, self._pending = time.monotonic(), phase, None
        clean = {k: scalar(progress[k]) for k in PROGRESS_KEYS if k in progress}
        extra = {k: scalar(v) for k, v in progress.items()
                 if k not in PROGRESS_KEYS and isinstance(v, (int, float, str, bool))}
        metrics = {"live": extra} if extra else None
        milestone = self._milestone(clean, new_phase=phase != previous_phase)
        try:
            with session_for(self.settings) as session:
                ours = crud.update_progress(session, self.job_id, progress=clean, metrics=metrics,
                                            worker_id=self.worker_id, milestone=milestone)
        except Exception:  # noqa: BLE001 - progress is best effort; the job goes on
            log.warning("progress write failed", extra={"job_id": self.job_id}, exc_info=True)
            return
        if not ours:
            self._lose()

    def _milestone(self, progress: dict[str, Any], *, new_phase: bool) -> bool:
        """A new phase, or a new quarter of the whole job: worth a `job.progress` event."""
        percent = progress.get("job_percent", progress.get("percent"))
        quarter = int(float(percent or 0.0) // 25)
        crossed = quarter > self._quarter
        self._quarter = max(self._quarter, quarter)
        return new_phase or crossed

    def should_cancel(self, *, force: bool = False) -> bool:
        """kdiga_core's `should_cancel`: reads the row at most once per interval."""
        if self.lost or self._cancel:
            return True
        now = time.monotonic()
        if force or now - self._last_check >= self.interval:
            self._last_check = now
            try:
                with session_for(self.settings) as session:
                    self._cancel = crud.is_cancel_requested(session, self.job_id)
            except Exception:  # noqa: BLE001 - try again next time
                log.warning("cancel check failed", extra={"job_id": self.job_id}, exc_info=True)
        return self._cancel

    def beat(self) -> None:
        try:
            with session_for(self.settings) as session:
                ours = crud.heartbeat(session, self.job_id, worker_id=self.worker_id)
        except Exception:  # noqa: BLE001 - a missed beat is not fatal
            log.warning("heartbeat failed", extra={"job_id": self.job_id}, exc_info=True)
            return
        if not ours:
            self._lose()

    def _beat_loop(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(min(self.beat_every, max(0.1, self.interval))):
            self._flush()
            if time.monotonic() - last_beat >= self.beat_every:
                last_beat = time.monotonic()
                self.beat()

    def _lose(self) -> None:
        if not self.lost:
            log.warning("the job row is no longer ours; stopping", extra={"job_id": self.job_id})
        self.lost = True
