"""One poller per API process fans job changes out to every open event stream (`GET /v1/jobs/{id}/events`).

Before, each stream ran its own loop: a database query in a worker thread every
`KDIGA_SSE_POLL_INTERVAL_S`, plus a disconnect check, per stream; 120 idle streams raised /healthz
latency from 2 ms to p50 142 ms (BENCHMARKS.md, "SSE"). Now one task reads every watched job in
one query per interval (only while someone watches), serialises a job only when its row changed,
and wakes the streams of that job; an idle stream just awaits its event and costs nothing.

Why a poller and not a Redis subscription: progress is written to the job row by the worker
(`crud.update_progress`), and the row is the single source of truth; a pub/sub channel would need
every writer to publish too, and a missed message would leave a stream stale. One indexed
`IN (...)` query per interval per process is cheap on both backends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio import to_thread
from sqlalchemy import Engine, select

from api.schemas import JobPublic
from kdiga_service import crud
from kdiga_service.models import FINISHED_STATES, Artifact, Job

log = logging.getLogger("kdiga.api.events")
CHUNK = 500  # ids per IN (...) list
_JOB_COLUMNS = [getattr(Job, k) for k in crud.JOB_STATUS_KEYS] + [Job.owner_id]
_ARTIFACT_COLUMNS = [getattr(Artifact, k) for k in crud.ARTIFACT_KEYS]


@dataclass(eq=False)
class Watch:
    """One stream's view of one job: the latest (json, finished) or None once the job is gone."""

    owner_id: str
    job_id: str
    state: tuple[str, bool] | None = None
    gone: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, state: tuple[str, bool] | None) -> None:
        if state is None:
            self.gone = True
        else:
            self.state = state
        self.changed.set()


def read_jobs(engine: Engine, job_ids: list[str]) -> dict[str, tuple[Any, ...]]:
    """The status columns (plus owner, plus artifacts) of these jobs, keyed by id."""
    out: dict[str, tuple[Any, ...]] = {}
    with engine.connect() as conn:
        for start in range(0, len(job_ids), CHUNK):
            ids = job_ids[start:start + CHUNK]
            jobs = conn.execute(select(*_JOB_COLUMNS).where(Job.id.in_(ids))).all()
            arts = conn.execute(select(*_ARTIFACT_COLUMNS).where(Artifact.job_id.in_(ids))
                                .order_by(Artifact.created_at, Artifact.id)).all()
            by_job: dict[str, list[tuple[Any, ...]]] = {}
            for a in arts:
                by_job.setdefault(a.job_id, []).append(tuple(a))
            for j in jobs:
                out[j.id] = (tuple(j), tuple(by_job.get(j.id, ())))
    return out


def _to_state(raw: tuple[Any, ...]) -> tuple[str, bool]:
    job, artifacts = raw
    fields = dict(zip(crud.JOB_STATUS_KEYS, job[:-1], strict=True))
    fields["artifacts"] = [dict(zip(crud.ARTIFACT_KEYS, a, strict=True)) for a in artifacts]
    return JobPublic.model_validate(fields).model_dump_json(), fields["status"] in FINISHED_STATES


class JobWatcher:
    """Subscriptions by job id, and the one poll task that serves them all."""

    def __init__(self, engine: Engine, interval_s: float, *, inline: bool):
        self.engine, self.interval_s, self.inline = engine, interval_s, inline
        self._watches: dict[str, set[Watch]] = {}
        self._raw: dict[str, tuple[Any, ...]] = {}
        self._states: dict[str, tuple[str, bool]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.polls = 0  # how many queries ran (tests and the benchmark read it)

    def watch(self, owner_id: str, job_id: str) -> Watch:
        """Start watching a job for one stream; its first state arrives at the next poll (now)."""
        watch = Watch(owner_id, job_id)
        self._watches.setdefault(job_id, set()).add(watch)
        if job_id in self._states:
            watch.deliver(self._states[job_id])
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return watch

    def unwatch(self, watch: Watch) -> None:
        watches = self._watches.get(watch.job_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.job_id]
                self._raw.pop(watch.job_id, None)
                self._states.pop(watch.job_id, None)

    @property
    def watched(self) -> int:
        return sum(len(w) for w in self._watches.values())

    async def _run(self) -> None:
        while self._watches:
            self._wake.clear()
            try:
                await self._poll_once()
            except Exception:  # noqa: BLE001 - a failed read (database down) must not end every stream
                log.exception("event streams: reading the watched jobs failed; retrying")
            with anyio.move_on_after(self.interval_s):
                await self._wake.wait()

    async def _poll_once(self) -> None:
        ids = list(self._watches)
        read: Callable[[], dict[str, tuple[Any, ...]]] = lambda: read_jobs(self.engine, ids)  # noqa: E731
        rows = read() if self.inline else await to_thread.run_sync(read)
        self.polls += 1
        for job_id in ids:
            self._publish(job_id, rows.get(job_id))

    def _publish(self, job_id: str, raw: tuple[Any, ...] | None) -> None:
        watches = self._watches.get(job_id, set())
        if raw is None:
            for watch in list(watches):
                watch.deliver(None)
            return
        if self._raw.get(job_id) != raw:
            self._raw[job_id], self._states[job_id] = raw, _to_state(raw)
        owner_id, state = raw[0][-1], self._states[job_id]
        for watch in list(watches):
            if watch.state != state or watch.gone:
                watch.deliver(state if watch.owner_id == owner_id else None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
            self._task = None
