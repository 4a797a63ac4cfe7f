"""Training checkpoints in the artifact store: uploaded after each epoch, the latest fetched on resume."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from kdiga_service.storage import ArtifactStore

log = logging.getLogger(__name__)


def checkpoint_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoint"


def checkpoint_files(directory: Path) -> list[str]:
    """Every finished file under a checkpoint directory, as relative POSIX paths.

    Sub-folders are part of the checkpoint: the γ sweep keeps its Optuna journal and the running
    trial's training checkpoint in ``sweep/`` (kdiga_core.sweep), so a resumed job skips finished trials.
    """
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and not p.name.endswith(".tmp"))


def upload_checkpoint(store: ArtifactStore, job_id: str, directory: Path) -> str:
    """Upload every file of a checkpoint directory, then point `latest` at it (the commit)."""
    files = checkpoint_files(directory)
    epoch = _checkpoint_epoch(directory)
    folder = f"e{epoch:05d}" if epoch is not None else f"t{int(time.time() * 1000)}"
    prefix = checkpoint_prefix(job_id)
    previous = _read_pointer(store, job_id)
    if previous and previous.get("folder") == folder:  # the same epoch again (the sweep's decisions): a new folder
        folder = f"{folder}-t{int(time.time() * 1000)}"
    for name in files:
        store.upload_file(directory / name, f"{prefix}/{folder}/{name}")
    store.write_bytes(f"{prefix}/latest.json", json.dumps(
        {"folder": folder, "files": files, "epoch": epoch}).encode())
    if previous and previous.get("folder") != folder:
        store.delete_prefix(f"{prefix}/{previous['folder']}")
    log.info("checkpoint uploaded", extra={"job_id": job_id, "epoch": epoch, "folder": folder})
    return folder


def download_checkpoint(store: ArtifactStore, job_id: str, dest: Path) -> bool:
    """Fetch the latest uploaded checkpoint into `dest`; False when there is none."""
    pointer = _read_pointer(store, job_id)
    if not pointer:
        return False
    prefix = f"{checkpoint_prefix(job_id)}/{pointer['folder']}"
    for name in pointer.get("files", []):
        if not _safe_relative(name):
            log.warning("skipping an unsafe checkpoint file name", extra={"job_id": job_id, "file": name})
            continue
        store.download(f"{prefix}/{name}", dest / name)
    return True


def _read_pointer(store: ArtifactStore, job_id: str) -> dict[str, Any] | None:
    key = f"{checkpoint_prefix(job_id)}/latest.json"
    if not store.exists(key):
        return None
    try:
        latest: dict[str, Any] = json.loads(store.read_bytes(key, max_bytes=1 << 20))
        return latest
    except ValueError:
        return None


def _checkpoint_epoch(directory: Path) -> int | None:
    try:
        meta = json.loads((directory / "last.json").read_text(encoding="utf-8"))
        return int(meta["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _safe_relative(name: str) -> bool:
    """A pointer's file names are relative paths inside the checkpoint: never absolute, never '..'."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts
