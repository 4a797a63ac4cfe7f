"""One rank of a job on several devices: ``python -m worker.rank <launch.json>``, started by torchrun.

Every rank joins the process group (`kdiga_core.distributed.init_from_env`: NCCL with one GPU per
rank, or gloo with one CPU process per "device") and runs the same `kdiga_core.jobs.run_job` as a
one-device job, through the same `worker.runner` helpers. Rank 0 alone reports progress, reads
the row for a cancel (and broadcasts it), uploads checkpoints, stores the artifacts and finishes
the row, all under the owner id of the worker holding the job (so a rank of an attempt that was
taken over writes nothing). The other ranks report nothing.

Exit codes tell torchrun, and through it the worker, how the rank ended: 0 finished (or, for the
other ranks, cancelled); 1 the job failed (recorded on the row); 3 rank 0 recorded a cancel or a
stop at the time budget (not 0, so that torchrun stops at once any rank still waiting in a
collective, e.g. a cancel during the evaluation); 75 the attempt died under it (a peer or host lost, a collective timed out): nothing
is recorded and the worker retries.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdiga_service import crud
from kdiga_service.settings import Settings, get_settings
from kdiga_service.storage import get_storage
from worker.common import session_for
from worker.progress import Reporter

if TYPE_CHECKING:  # kdiga_core (torch) is imported in the rank only once it runs
    from kdiga_core.distributed import RankContext
    from kdiga_service.models import Job

log = logging.getLogger(__name__)

EXIT_DONE, EXIT_FAILED, EXIT_CANCELLED, EXIT_ATTEMPT_DIED = 0, 1, 3, 75
# What torch.distributed's gloo and NCCL errors say when a peer or the network went away.
COMMUNICATION_ERRORS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "broken pipe",
                        "socket", "store", "process group")


class QuietReporter:
    """What ranks other than 0 report: nothing (rank 0 holds the row's progress and cancel)."""

    lost = False

    def on_step(self, progress: dict[str, Any]) -> None:  # noqa: ARG002 - the Reporter interface
        return None

    def should_cancel(self, *, force: bool = False) -> bool:  # noqa: ARG002 - the Reporter interface
        return False

    def beat(self) -> None:
        return None


def die_with_parent() -> None:
    """SIGKILL this rank when torchrun dies (a SIGKILLed worker must not leave ranks behind)."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # torchrun died before the call
        os._exit(EXIT_ATTEMPT_DIED)


def main(argv: Sequence[str] | None = None) -> int:
    """Run this rank of the job described by the launch file; the exit code (module docstring)."""
    die_with_parent()
    from worker.logs import configure_logging

    configure_logging()
    launch = json.loads(Path((argv or sys.argv[1:])[0]).read_text(encoding="utf-8"))
    s = get_settings()
    from kdiga_core import distributed

    device = str(((_job(launch["job_id"], s).spec or {}).get("train") or {}).get("device", "auto"))
    try:
        ctx = distributed.init_from_env(device, timeout_s=s.collective_timeout_s)
    except Exception as exc:  # noqa: BLE001 - a KdigaError (too few GPUs) fails the job, the rest retries
        return _ended(launch, s, exc, rank=int(os.environ.get("RANK", "0")))
    try:
        return _run(launch, s, ctx)
    finally:
        distributed.teardown()


def _job(job_id: str, s: Settings) -> Job:
    with session_for(s) as session:
        job = crud.get_job(session, job_id)
        if job is None:
            raise SystemExit(EXIT_DONE)  # deleted meanwhile: nothing to do
        session.expunge(job)
        return job


def _run(launch: dict[str, Any], s: Settings, ctx: RankContext) -> int:
    from kdiga_core.errors import CancelledError, StoppedError
    from worker.runner import _call_core, _finish_cancelled, _stop, _succeed

    job, owner = _job(launch["job_id"], s), launch["owner"]
    reporter: Any = Reporter(job.id, owner, s) if ctx.is_main else QuietReporter()
    store = get_storage(s)
    try:
        result = _call_core(job, Path(launch["workdir"]), launch["inputs"], reporter, store, launch["resume"], s)
    except CancelledError:
        if not ctx.is_main:
            return EXIT_DONE
        if not reporter.lost:
            _finish_cancelled(job, s, owner)
        return EXIT_CANCELLED
    except StoppedError as exc:  # the budget: every rank stopped at the same epoch end (or rank 0 in evaluation)
        if ctx.is_main and not reporter.lost:
            _stop(job, s, owner, str(exc))
        return EXIT_CANCELLED if ctx.is_main else EXIT_DONE
    except Exception as exc:  # noqa: BLE001 - sorted out by _ended
        return _ended(launch, s, exc, rank=ctx.rank)
    if not ctx.is_main or reporter.lost:
        return EXIT_DONE
    if reporter.should_cancel(force=True):  # cancelled during the last phase: honour it
        _finish_cancelled(job, s, owner)
        return EXIT_CANCELLED
    _succeed(job, result, s, store, owner)
    return EXIT_DONE


def _ended(launch: dict[str, Any], s: Settings, exc: BaseException, *, rank: int) -> int:
    """Record a failure the job owns (bad input, an internal error); leave a dead attempt to the worker."""
    from kdiga_core.errors import KdigaError
    from worker.common import internal_failure
    from worker.runner import AFTER_TRAINING, FailedAfterTraining, _fail

    job_id, owner = launch["job_id"], launch["owner"]
    if isinstance(exc, FailedAfterTraining):
        _fail(_job(job_id, s), s, owner, exc.sentence + AFTER_TRAINING.format(id=job_id), resumable=True)
        return EXIT_FAILED
    if isinstance(exc, KdigaError):
        _fail(_job(job_id, s), s, owner, str(exc))
        return EXIT_FAILED
    if is_communication_error(exc):
        log.warning("the attempt died under this rank", extra={"job_id": job_id, "rank": rank,
                                                               "error": f"{type(exc).__name__}: {exc}"})
        return EXIT_ATTEMPT_DIED
    log.exception("rank failed with an internal error", extra={"job_id": job_id, "rank": rank})
    _fail(_job(job_id, s), s, owner, internal_failure(exc, job_id, failed=f"failed with an internal error on rank {rank}"))
    return EXIT_FAILED


def is_communication_error(exc: BaseException) -> bool:
    """A torch.distributed failure caused by a peer or the network, not by the job itself."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(word in text for word in COMMUNICATION_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
