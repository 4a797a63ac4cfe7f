"""Training checkpoints in the artifact store: uploaded off the training loop, the latest fetched on resume."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
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
    epoch, step = _checkpoint_place(directory)
    folder = f"e{epoch:05d}" if epoch is not None else f"t{int(time.time() * 1000)}"
    if step is not None:  # written inside an epoch (time-based): the global step tells them apart
        folder = f"{folder}-s{step:09d}"
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


def _checkpoint_place(directory: Path) -> tuple[int | None, int | None]:
    """(epochs done, global step when written inside an epoch else None) of a checkpoint folder."""
    try:
        meta = json.loads((directory / "last.json").read_text(encoding="utf-8"))
        return int(meta["epoch"]), (int(meta["global_step"]) if meta.get("partial") else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


class CheckpointUploader:
    """Uploads a job's checkpoints in a background thread, so training never waits for the store.

    `submit` (called by the training loop) takes a snapshot of the checkpoint folder with hard
    links: `save_checkpoint` replaces its files by rename, so a link keeps the version it was given
    while the next one is written. The queue is bounded at one waiting snapshot: a newer one
    replaces it (only the latest matters), so a slow store costs checkpoints, never memory or
    training time. `flush` waits until the last snapshot is stored; `close` flushes and ends the
    thread. An upload that fails is logged and the next one tries again; `stored` is the folder
    name of the last checkpoint that reached the store (None: none yet, in this run).
    """

    def __init__(self, store: ArtifactStore, job_id: str, scratch: Path):
        self.store, self.job_id, self.scratch = store, job_id, Path(scratch)
        self.stored: str | None = None
        self._cond = threading.Condition()
        self._waiting: Path | None = None
        self._busy = self._closed = False
        self._count = 0
        self._thread = threading.Thread(target=self._loop, name=f"checkpoint-upload-{job_id[:8]}", daemon=True)
        self._thread.start()

    def submit(self, directory: Path) -> None:
        snapshot = self._snapshot(Path(directory))
        with self._cond:
            stale, self._waiting = self._waiting, snapshot
            self._cond.notify_all()
        if stale is not None:  # superseded before its upload began
            shutil.rmtree(stale, ignore_errors=True)

    def flush(self) -> str | None:
        """Wait for every submitted checkpoint to be stored (or to fail); the last stored folder."""
        with self._cond:
            self._cond.wait_for(lambda: self._waiting is None and not self._busy)
        return self.stored

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> CheckpointUploader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _snapshot(self, directory: Path) -> Path:
        self._count += 1
        dest = self.scratch / f"{self._count:06d}"
        for name in checkpoint_files(directory):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            try:  # our files are replaced by rename, so a link is a stable copy; others may grow
                if Path(name).name.startswith("last."):
                    os.link(directory / name, dest / name)
                    continue
            except OSError:
                pass
            shutil.copy2(directory / name, dest / name)
        return dest

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting is not None or self._closed)
                if self._waiting is None:
                    return
                snapshot, self._waiting, self._busy = self._waiting, None, True
            try:
                self.stored = upload_checkpoint(self.store, self.job_id, snapshot)
            except Exception:  # noqa: BLE001 - the next checkpoint tries again; the job goes on
                log.exception("checkpoint upload failed", extra={"job_id": self.job_id})
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def _safe_relative(name: str) -> bool:
    """A pointer's file names are relative paths inside the checkpoint: never absolute, never '..'."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts
