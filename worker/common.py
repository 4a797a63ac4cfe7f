"""Small helpers every worker module uses: sessions, scratch space, JSON-safe values, GPU memory."""

from __future__ import annotations

import gc
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from kdiga_service.db import get_sessionmaker
from kdiga_service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a task did: succeeded / failed / cancelled / skipped, or busy (look again in `retry_in` s)."""

    status: str
    detail: str = ""
    retry_in: float | None = None
    result: dict[str, Any] = field(default_factory=dict)


def session_for(s: Settings) -> Session:
    return get_sessionmaker(s)()


def scratch_dir(s: Settings) -> str | None:
    path = getattr(s, "work_dir", None)
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        return str(path)
    return None


def scalar(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        return value.item()
    return value


def jsonable(value: Any) -> Any:
    """A deep copy that JSON accepts (tuples become lists, NaN becomes null, paths become strings)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) or hasattr(value, "item"):
        return scalar(float(value) if isinstance(value, float) else value.item())
    return str(value)


OUT_OF_MEMORY = ("out of memory", "tried to allocate", "cannot allocate memory", "can't allocate memory")


def internal_failure(exc: BaseException, ref: str, *, subject: str = "The job",
                     failed: str = "failed with an internal error") -> str:
    """The sentence a row gets for an unexpected error (issue 16.7): its type, never its text.

    An exception's text can hold server paths, sizes and internals ("you tried to allocate
    4000000000000 bytes"); the caller logs it in full with `ref` (the job's or upload's id), and the
    sentence names that id so an operator can find it.
    """
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or any(word in text for word in OUT_OF_MEMORY):
        return (f"{subject} ran out of memory ({type(exc).__name__}); try a smaller batch size, model or "
                f"input, or ask the operator (id {ref}).")
    return f"{subject} {failed} ({type(exc).__name__}); the service log has the details under id {ref}."


def free_accelerator_memory() -> None:
    """Give cached GPU memory back after a job (only if torch and CUDA are already in use)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
