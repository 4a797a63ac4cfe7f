"""Jobs on several devices (``resources: {nodes, devices_per_node}``), the worker's side.

The worker that claims the row (the leader, `run_on_devices`) keeps the claim and heartbeat for
the whole job, gathers the other hosts when there are several (`worker.gang`), stages the inputs
and the last checkpoint in a scratch folder, and starts torchrun here (`worker.torchrun`); each
member host (`join_job`) does the same after taking its place in the gang. The ranks
(`worker.rank`) do the work: rank 0 writes progress, checkpoints, artifacts and the job's end to
the row; every rank stops on a cancel that rank 0 broadcasts.

When torchrun exits, the leader reads the row. A finished row (succeeded, failed, cancelled)
was settled by a rank. Anything else means the attempt died (a rank killed, a host lost, a
collective that timed out): the leader puts the job back in the queue, under the same attempt
cap as a worker that dies (KDIGA_TASK_MAX_RETRIES), and the next attempt resumes from the last
checkpoint. The job's `attempts` counts attempts of the whole gang, so a job never runs twice at
once and never more often than the cap.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from kdiga_service import crud
from kdiga_service.models import FINISHED_STATES, Job
from kdiga_service.settings import Settings
from kdiga_service.storage import get_storage
from worker import gang
from worker.checkpoints import checkpoint_prefix, download_checkpoint
from worker.common import Outcome, scratch_dir, session_for
from worker.inputs import prepare_inputs
from worker.torchrun import Launch, Rendezvous, advertised_host, free_port, rank_env

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0  # a died attempt is sent again after this (the claim counts it against the cap)
LAUNCH_FILE = "launch.json"


@dataclass(frozen=True)
class Resources:
    """The devices a job asked for: hosts × devices on each."""

    nodes: int = 1
    devices_per_node: int = 1

    @classmethod
    def of(cls, job: Job) -> Resources:
        spec = dict((job.spec or {}).get("resources") or {})
        return cls(int(spec.get("nodes", 1)), int(spec.get("devices_per_node", 1)))

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node


def on_several_devices(job: Job) -> bool:
    """True for a job that runs as torchrun ranks (more than one device in all)."""
    return Resources.of(job).world_size > 1


# ----------------------------------------------------------------------------- the leader


def run_on_devices(job: Job, s: Settings, me: str) -> Outcome:
    """Run a claimed job on its devices (see the module docstring); the task's outcome."""
    from kdiga_core.errors import KdigaError

    resources = Resources.of(job)
    workdir = Path(tempfile.mkdtemp(prefix=f"kdiga-job-{job.id[:8]}-", dir=scratch_dir(s)))
    try:
        with GangHeartbeat(job.id, me, s) as heartbeat:
            rdzv = _open_rendezvous(job, s, me, resources)
            if rdzv is None:
                return Outcome("skipped", "the job is no longer ours")
            if resources.nodes > 1 and (given_up := gang.gather(job, s, me, rdzv.id, resources.nodes)):
                return given_up
            code, launch = launch_here(job, s, rdzv, workdir, owner=me, keep_going=lambda: not heartbeat.lost)
        return _settle(job, s, me, code, launch)
    except SoftTimeLimitExceeded:
        if get_storage(s).exists(f"{checkpoint_prefix(job.id)}/latest.json"):  # resumable from its checkpoint
            return _stop(job, s, me, f"The job reached the service's time limit of {s.job_soft_time_limit_s} "
                                     "seconds; resuming it continues from its last checkpoint.")
        return _fail(job, s, me, f"The job exceeded its time limit of {s.job_soft_time_limit_s} seconds.")
    except KdigaError as exc:  # staging the inputs
        return _fail(job, s, me, str(exc))
    except Exception as exc:  # noqa: BLE001 - recorded on the row (never left running), traceback in the log
        log.exception("job on several devices failed with an internal error", extra={"job_id": job.id})
        return _fail(job, s, me, f"The job failed with an internal error ({type(exc).__name__}: {exc}).")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _open_rendezvous(job: Job, s: Settings, me: str, resources: Resources) -> Rendezvous | None:
    """A fresh rendezvous for this attempt, recorded on the row; None when the row is not ours."""
    if resources.nodes > 1:
        host = advertised_host(s)
        endpoint = f"{host}:{s.rendezvous_port or free_port()}"
    else:  # one host: the store never leaves it
        host, endpoint = "127.0.0.1", f"127.0.0.1:{free_port('127.0.0.1')}"
    rdzv = Rendezvous(id=str(uuid.uuid4()), endpoint=endpoint, is_host=True, local_addr=host,
                      nodes=resources.nodes, devices_per_node=resources.devices_per_node,
                      join_timeout_s=s.gang_timeout_s)
    with session_for(s) as session:
        ok = crud.open_gang(session, job.id, worker_id=me, rendezvous_id=rdzv.id, endpoint=endpoint,
                            size=resources.nodes)
    return rdzv if ok else None


class GangHeartbeat:
    """The leader's heartbeat, for the whole gang: a thread refreshing the row while the ranks run.

    `lost` turns True when another worker holds the row (the ranks must stop); a row that a rank
    has finished is not lost, the beating just ends.
    """

    def __init__(self, job_id: str, worker_id: str, s: Settings):
        self.job_id, self.worker_id, self.settings = job_id, worker_id, s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"gang-heartbeat-{job_id[:8]}", daemon=True)
        self._every = max(0.2, min(10.0, s.heartbeat_stale_s / 4))

    def __enter__(self) -> GangHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            try:
                with session_for(self.settings) as session:
                    if crud.heartbeat(session, self.job_id, worker_id=self.worker_id):
                        continue
                    row = crud.get_job(session, self.job_id)
                    self.lost = row is None or row.status not in FINISHED_STATES
            except Exception:  # noqa: BLE001 - a missed beat is not fatal
                log.warning("heartbeat failed", extra={"job_id": self.job_id}, exc_info=True)
                continue
            if self.lost:
                log.warning("another worker holds the job now; stopping its ranks", extra={"job_id": self.job_id})
            return


def _settle(job: Job, s: Settings, me: str, code: int, launch: Launch) -> Outcome:
    """After torchrun: what the ranks recorded, or a died attempt (retried, or failed at the cap)."""
    with session_for(s) as session:
        row = crud.get_job(session, job.id)
        if row is not None:
            session.expunge(row)
    if row is None:
        return Outcome("skipped", "the job was deleted")
    if row.status in FINISHED_STATES:
        return Outcome(row.status, row.error or "")
    if row.worker_id != me:
        return Outcome("skipped", "another worker took the job over")
    if row.cancel_requested:
        return _finish_cancelled(job, s, me)
    why = failure_of(launch.tail(60), code)
    log.warning("the job's ranks failed", extra={"job_id": job.id, "attempt": row.attempts, "why": why,
                                                 "torchrun_log": launch.tail()})
    if row.attempts >= s.task_max_retries + 1:
        return _fail(job, s, me, f"The job's ranks failed on each of its {row.attempts} attempts; the last time "
                                 f"{why}.")
    progress = {**(row.progress or {}), "phase": "queued", "retry": f"attempt {row.attempts} ended: {why}"}
    with session_for(s) as session:
        crud.release_job(session, job.id, worker_id=me, progress=progress)
    return Outcome("busy", why, retry_in=RETRY_AFTER_S)


_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*?(?:\((SIG\w+)\))?\s*\n",
                         re.S)


def failure_of(torchrun_log: str, code: int) -> str:
    """One clause saying which rank failed how, from torchrun's summary ("rank 1 was killed by SIGKILL")."""
    match = _ROOT_CAUSE.search(torchrun_log)
    if match is None:
        return f"torchrun exited with code {code}"
    rank, exitcode, signame = match.groups()
    return f"rank {rank} was killed by {signame}" if signame else f"rank {rank} exited with code {exitcode}"


def _fail(job: Job, s: Settings, me: str, error: str) -> Outcome:
    with session_for(s) as session:
        crud.fail_job(session, job.id, error=error, worker_id=me)
    log.error("job failed", extra={"job_id": job.id, "error": error})
    return Outcome("failed", error)


def _stop(job: Job, s: Settings, me: str, reason: str) -> Outcome:
    with session_for(s) as session:
        crud.stop_job(session, job.id, reason=reason, worker_id=me)
    log.info("job stopped", extra={"job_id": job.id, "reason": reason})
    return Outcome("stopped", reason)


def _finish_cancelled(job: Job, s: Settings, me: str) -> Outcome:
    with session_for(s) as session:
        crud.mark_cancelled(session, job.id, worker_id=me)
    log.info("job cancelled", extra={"job_id": job.id})
    return Outcome("cancelled")


# ----------------------------------------------------------------------------- every host


def launch_here(job: Job, s: Settings, rdzv: Rendezvous, workdir: Path, *, owner: str,
                keep_going: Callable[[], bool]) -> tuple[int, Launch]:
    """Stage the job's inputs and checkpoint in `workdir`, run this host's torchrun to its end."""
    store = get_storage(s)
    with ExitStack() as stack:
        inputs = prepare_inputs(job, s, store, stack, workdir)
        resume = download_checkpoint(store, job.id, workdir / "checkpoint")
        launch_file = workdir / LAUNCH_FILE
        launch_file.write_text(json.dumps({"job_id": job.id, "owner": owner, "workdir": str(workdir),
                                           "inputs": _jsonable_inputs(inputs), "resume": resume}))
        launch = Launch(rdzv, launch_file, rank_env(s, job.id, rdzv.devices_per_node), workdir / "torchrun.log")
        return launch.wait(keep_going), launch


def _jsonable_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in inputs.items()}


# ----------------------------------------------------------------------------- a member host


def join_job(job_id: str, rendezvous_id: str, *, settings: Settings | None = None) -> Outcome:
    """Another host of a multi-host job: take a place in the gang, then run this host's ranks."""
    from kdiga_service.settings import get_settings

    s = settings or get_settings()
    row = gang.join(job_id, rendezvous_id, s)
    if row is None:
        return Outcome("skipped", "no place in the job's gang, or it was given up")
    resources = Resources.of(row)
    rdzv = Rendezvous(id=rendezvous_id, endpoint=row.rendezvous_endpoint or "", is_host=False,
                      local_addr=advertised_host(s), nodes=resources.nodes,
                      devices_per_node=resources.devices_per_node, join_timeout_s=s.gang_timeout_s)
    workdir = Path(tempfile.mkdtemp(prefix=f"kdiga-join-{job_id[:8]}-", dir=scratch_dir(s)))
    try:
        code, launch = launch_here(row, s, rdzv, workdir, owner=row.worker_id or "",
                                   keep_going=gang.still_current(job_id, rendezvous_id, s))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if code != 0:
        log.warning("this host's ranks ended early", extra={"job_id": job_id, "why": failure_of(launch.tail(60), code),
                                                            "torchrun_log": launch.tail()})
    return Outcome("joined", f"torchrun exited with code {code}")
