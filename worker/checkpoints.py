"""Training checkpoints in the artifact store: uploaded off the training loop, the latest fetched on resume.

Stored as `jobs/{id}/checkpoint/latest.json`, a manifest (file name → sha256, size), over
content-addressed `blobs/<sha256>`: an upload sends only the files the stored checkpoint lacks (an
evaluation checkpoint: its new `eval/partial/` files, not the unchanged weights). Checkpoints stored
before manifests (a folder per checkpoint, `latest.json` naming it) are still read, and replaced at
the next upload.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from kdiga_service.storage import ArtifactStore

log = logging.getLogger(__name__)

BLOBS = "blobs"  # content-addressed checkpoint files: jobs/{id}/checkpoint/blobs/<sha256>
_SHA256 = re.compile(r"[0-9a-f]{64}")


def checkpoint_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoint"


def checkpoint_files(directory: Path) -> list[str]:
    """Every finished file under a checkpoint directory, as relative POSIX paths.

    Sub-folders are part of the checkpoint: the γ sweep keeps its Optuna journal and the running
    trial's training checkpoint in ``sweep/`` (kdiga_core.sweep), so a resumed job skips finished trials.
    """
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and not p.name.endswith(".tmp"))


def upload_checkpoint(store: ArtifactStore, job_id: str, directory: Path, *,
                      hashes: HashCache | None = None) -> str:
    """Store a checkpoint directory: the files the stored one lacks, then the manifest (the commit).

    Files are content-addressed (``blobs/<sha256>``), so a file the previous checkpoint already holds
    (the weights, while evaluation adds ``eval/partial/`` files) is not sent again. `latest.json` lists
    every file with its digest and is written only after all of them are stored, and a blob is deleted
    only once no manifest names it: a reader sees the old checkpoint or the new one, never a mix.
    """
    files = checkpoint_files(directory)
    epoch, step = _checkpoint_place(directory)
    folder = f"e{epoch:05d}" if epoch is not None else f"t{int(time.time() * 1000)}"
    if step is not None:  # written inside an epoch (time-based): the global step tells them apart
        folder = f"{folder}-s{step:09d}"
    prefix = checkpoint_prefix(job_id)
    previous = _read_pointer(store, job_id)
    if previous and previous.get("folder") == folder:  # the same epoch again (the sweep's decisions): a new name
        folder = f"{folder}-t{int(time.time() * 1000)}"
    hashes = hashes if hashes is not None else HashCache()
    objects = {name: hashes.digest(directory / name, name) for name in files}
    hashes.keep(files)
    held = _blobs(previous)
    sent = sent_bytes = 0
    for name in files:
        digest = objects[name]["sha256"]
        if digest not in held:
            sent_bytes += store.upload_file(directory / name, f"{prefix}/{BLOBS}/{digest}").size_bytes
            held.add(digest)
            sent += 1
    store.write_bytes(f"{prefix}/latest.json", json.dumps(
        {"version": 2, "folder": folder, "files": files, "epoch": epoch, "objects": objects}).encode())
    _forget(store, prefix, previous, {o["sha256"] for o in objects.values()})
    log.info("checkpoint uploaded", extra={"job_id": job_id, "epoch": epoch, "folder": folder,
                                           "files": len(files), "sent_files": sent, "sent_bytes": sent_bytes})
    return folder


def download_checkpoint(store: ArtifactStore, job_id: str, dest: Path) -> bool:
    """Fetch the latest uploaded checkpoint into `dest`; False when there is none.

    Reads both layouts: a manifest of blobs (version 2) and the earlier folder of files per checkpoint.
    """
    pointer = _read_pointer(store, job_id)
    if not pointer:
        return False
    objects = pointer.get("objects") if pointer.get("version") == 2 else None
    for name in pointer.get("files", []):
        if not _safe_relative(name):
            log.warning("skipping an unsafe checkpoint file name", extra={"job_id": job_id, "file": name})
            continue
        store.download(_stored_key(job_id, pointer, objects, name), dest / name)
    return True


def _stored_key(job_id: str, pointer: dict[str, Any], objects: dict[str, Any] | None, name: str) -> str:
    prefix = checkpoint_prefix(job_id)
    if objects is None:  # a checkpoint stored before manifests: one folder of files
        return f"{prefix}/{pointer['folder']}/{name}"
    entry = objects.get(name) if isinstance(objects, dict) else None
    digest = str(entry.get("sha256")) if isinstance(entry, dict) else ""
    if not _SHA256.fullmatch(digest):
        raise ValueError(f"The checkpoint manifest names an invalid digest for {name!r}.")
    return f"{prefix}/{BLOBS}/{digest}"


def _blobs(pointer: dict[str, Any] | None) -> set[str]:
    """The blobs a stored manifest names (none for a folder-layout checkpoint: its files are re-sent once)."""
    if not pointer or pointer.get("version") != 2:
        return set()
    return {str(o["sha256"]) for o in pointer.get("objects", {}).values() if _SHA256.fullmatch(str(o["sha256"]))}


def _forget(store: ArtifactStore, prefix: str, previous: dict[str, Any] | None, kept: set[str]) -> None:
    """After the new manifest is written: delete what only the previous checkpoint used."""
    if not previous:
        return
    if previous.get("version") != 2:
        if _safe_relative(str(previous.get("folder", ""))):
            store.delete_prefix(f"{prefix}/{previous['folder']}")
        return
    for digest in _blobs(previous) - kept:
        store.delete(f"{prefix}/{BLOBS}/{digest}")


class HashCache:
    """sha256 of checkpoint files, remembered by (device, inode, size, mtime_ns) between uploads.

    A digest is remembered only when the file's mtime was at least `MARGIN_NS` old when it was hashed
    (as git does for "racily clean" files): a later file that reuses the inode is created after that
    hash, so its mtime differs, and a file changed in place gets a new mtime. Snapshots copy with
    fresh mtimes (never copy2), so every file's mtime is at least its inode's creation time.
    """

    MARGIN_NS = 2_000_000_000

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, int, int, int], str]] = {}
        self.hashed_bytes = 0  # what was read to hash (tests and the benchmark look at it)

    def digest(self, path: Path, name: str) -> dict[str, Any]:
        before = os.stat(path)
        stamp = (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns)
        known = self._known.get(name)
        if known is not None and known[0] == stamp:
            return {"sha256": known[1], "size": before.st_size}
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        self.hashed_bytes += before.st_size
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns) == stamp[2:] and after.st_mtime_ns <= time.time_ns() - self.MARGIN_NS:
            self._known[name] = (stamp, digest)
        return {"sha256": digest, "size": before.st_size}

    def keep(self, names: list[str]) -> None:
        """Forget files the checkpoint no longer has."""
        wanted = set(names)
        self._known = {n: v for n, v in self._known.items() if n in wanted}


def _read_pointer(store: ArtifactStore, job_id: str) -> dict[str, Any] | None:
    key = f"{checkpoint_prefix(job_id)}/latest.json"
    if not store.exists(key):
        return None
    try:
        latest: dict[str, Any] = json.loads(store.read_bytes(key, max_bytes=16 << 20))  # a manifest: ~150 bytes a file
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
        self.hashes = HashCache()  # the weights are hashed once, not at every evaluation checkpoint
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
            shutil.copyfile(directory / name, dest / name)  # a fresh mtime: see HashCache
        return dest

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting is not None or self._closed)
                if self._waiting is None:
                    return
                snapshot, self._waiting, self._busy = self._waiting, None, True
            try:
                self.stored = upload_checkpoint(self.store, self.job_id, snapshot, hashes=self.hashes)
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
