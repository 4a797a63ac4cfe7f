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


def upload_checkpoint(store: ArtifactStore, job_id: str, directory: Path) -> str:
    """Upload every file of a checkpoint directory, then point `latest` at it (the commit)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
    epoch = _checkpoint_epoch(directory)
    folder = f"e{epoch:05d}" if epoch is not None else f"t{int(time.time() * 1000)}"
    prefix = checkpoint_prefix(job_id)
    for path in files:
        store.upload_file(path, f"{prefix}/{folder}/{path.name}")
    previous = _read_pointer(store, job_id)
    store.write_bytes(f"{prefix}/latest.json", json.dumps(
        {"folder": folder, "files": [p.name for p in files], "epoch": epoch}).encode())
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
        store.download(f"{prefix}/{name}", dest / name)
    return True


def _read_pointer(store: ArtifactStore, job_id: str) -> dict[str, Any] | None:
    key = f"{checkpoint_prefix(job_id)}/latest.json"
    if not store.exists(key):
        return None
    try:
        return json.loads(store.read_bytes(key, max_bytes=1 << 20))
    except ValueError:
        return None


def _checkpoint_epoch(directory: Path) -> int | None:
    try:
        meta = json.loads((directory / "last.json").read_text(encoding="utf-8"))
        return int(meta["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
