"""What a report and a model card describe: the job, each model (arch, parameters, sha256), the dataset,
the date and the service version, so that a report found later can be traced to what made it.

The caller (the worker) knows the rows: ids and names, the dataset's stored hash. This module adds what
only the files and models can say: each model's architecture, parameter count and the sha256 of the
weights actually measured. Plain dicts, so ``json.dumps`` works.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

from torch import nn

import kdiga_core
from kdiga_core.models import count_parameters

SCHEMA = "kdiga.about/1"
_KNOWN_MODEL_KEYS = ("id", "name", "source", "source_job_id")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_entry(model: nn.Module, *, sha256: str | None, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{arch, params, sha256}`` of a model, with the ids and names the caller knows (``known``)."""
    spec = getattr(model, "spec", None)
    entry: dict[str, Any] = {"arch": getattr(spec, "arch", type(model).__name__),
                             "params": count_parameters(model), "sha256": sha256}
    entry |= {k: v for k, v in (known or {}).items() if k in _KNOWN_MODEL_KEYS and v is not None}
    return entry


def about(kind: str, known: dict[str, Any] | None, models: dict[str, dict[str, Any]],
          dataset: dict[str, Any]) -> dict[str, Any]:
    """The report's ``about`` block (docs/contracts.md).

    Args:
        kind: The job kind. known: What the caller knows (`JobInputs.about`): ``job`` ({id, name}),
            ``dataset`` ({id, name, sha256, size_bytes}), ``service_version``.
        models: Each role's `model_entry`. dataset: What the loaded data says (name, classes, sizes).
    """
    known = known or {}
    job = {"kind": kind} | {k: v for k, v in (known.get("job") or {}).items() if k in ("id", "name")}
    data = dict(dataset) | {k: v for k, v in (known.get("dataset") or {}).items()
                            if k in ("id", "name", "sha256", "size_bytes", "source") and v is not None}
    return {"schema": SCHEMA, "job": job, "models": models, "dataset": data,
            "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "service_version": str(known.get("service_version") or kdiga_core.__version__)}
