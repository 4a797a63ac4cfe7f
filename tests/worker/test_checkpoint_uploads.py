"""Incremental checkpoint uploads: a manifest over content-addressed blobs, so an evaluation checkpoint
sends its new `eval/partial/` files, not the unchanged training weights, and a download is always whole."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import kdiga_svc_helpers as h
import pytest

from worker import checkpoints


def _replace(path, data: bytes):
    """Write as save_checkpoint and the partial store do: a temporary file renamed over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _training_checkpoint(folder, epoch=2):
    _replace(folder / "last.safetensors", os.urandom(256 * 1024))  # weights + optimizer state
    _replace(folder / "last.json", json.dumps({"epoch": epoch, "global_step": 8 * epoch}).encode())
    _replace(folder / "sweep" / "optuna.journal", b"journal")


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _upload(store, folder, scratch):
    store.written.clear()
    with checkpoints.CheckpointUploader(store, "job-e", scratch) as uploads:
        uploads.submit(folder)
        assert uploads.flush() is not None
    return list(store.written)


def test_evaluation_checkpoints_send_only_their_new_files(tmp_path):
    store = h.counting_store(h.make_settings(tmp_path / "home"))
    folder = tmp_path / "checkpoint"
    _training_checkpoint(folder)
    first = _upload(store, folder, tmp_path / "up")
    assert sum(size for _, size in first) > 256 * 1024  # the first upload sends everything

    batch = b'{"batches": 1}'
    _replace(folder / "eval" / "partial" / "student-pgd.json", batch)
    second = _upload(store, folder, tmp_path / "up")
    assert second[0] == (f"jobs/job-e/checkpoint/blobs/{_sha(batch)}", len(batch))  # the new file, once
    assert [key for key, _ in second[1:]] == ["jobs/job-e/checkpoint/latest.json"]  # then the manifest

    _replace(folder / "eval" / "partial" / "student-pgd.json", b'{"batches": 2}')  # the next batch
    _replace(folder / "eval" / "partial" / "teacher.json", b'{"done": true}')
    third = _upload(store, folder, tmp_path / "up")
    blobs = [key for key, _ in third if "/blobs/" in key]
    assert sorted(blobs) == sorted(f"jobs/job-e/checkpoint/blobs/{_sha(d)}" for d in (b'{"batches": 2}',
                                                                                      b'{"done": true}'))
    assert not store.exists(second[0][0])  # the superseded partial's blob is gone once nothing names it

    dest = tmp_path / "down"
    assert checkpoints.download_checkpoint(store, "job-e", dest)
    assert _files(dest) == _files(folder)  # the whole folder: weights, sweep journal, every partial
    stored = {p.name for p in _keys(Path(store.root))}
    manifest = json.loads(store.read_bytes("jobs/job-e/checkpoint/latest.json"))
    assert stored == {"latest.json"} | {o["sha256"] for o in manifest["objects"].values()}  # nothing left over


def test_a_changed_weights_file_of_the_same_size_is_sent(tmp_path):
    """The hash cache never mistakes a rewritten file for the stored one (same name and size, new content)."""
    store = h.counting_store(h.make_settings(tmp_path / "home"))
    folder = tmp_path / "checkpoint"
    _training_checkpoint(folder, epoch=1)
    with checkpoints.CheckpointUploader(store, "job-e", tmp_path / "up") as uploads:
        uploads.submit(folder)
        uploads.flush()
        _training_checkpoint(folder, epoch=2)  # within the same clock tick on a fast machine
        store.written.clear()
        uploads.submit(folder)
        uploads.flush()
    assert any(size == 256 * 1024 for _, size in store.written)
    dest = tmp_path / "down"
    assert checkpoints.download_checkpoint(store, "job-e", dest)
    assert _files(dest) == _files(folder)


def test_hash_cache_rereads_only_changed_files(tmp_path):
    cache, path = checkpoints.HashCache(), tmp_path / "last.safetensors"
    _replace(path, b"a" * 1000)
    old = time.time_ns() - 10 * checkpoints.HashCache.MARGIN_NS
    os.utime(path, ns=(old, old))  # written long before it is hashed: its digest can be remembered
    first = cache.digest(path, "last.safetensors")
    assert cache.digest(path, "last.safetensors") == first and cache.hashed_bytes == 1000
    _replace(path, b"b" * 1000)  # a new file (new inode, fresh mtime), same size
    assert cache.digest(path, "last.safetensors")["sha256"] != first["sha256"]
    assert cache.hashed_bytes == 2000
    fresh = cache.digest(path, "last.safetensors")  # written just now: hashed again, not trusted yet
    assert fresh["sha256"] == _sha(b"b" * 1000) and cache.hashed_bytes == 3000


def test_a_checkpoint_stored_as_a_folder_is_read_and_then_replaced(tmp_path):
    """Checkpoints stored before manifests (one folder per checkpoint) still resume; the next upload
    stores the whole checkpoint as blobs and removes the old folder."""
    store = h.counting_store(h.make_settings(tmp_path / "home"))
    prefix = checkpoints.checkpoint_prefix("job-e")
    store.write_bytes(f"{prefix}/e00001/last.json", b'{"epoch": 1}')
    store.write_bytes(f"{prefix}/e00001/last.safetensors", b"old-weights")
    store.write_bytes(f"{prefix}/latest.json",
                      json.dumps({"folder": "e00001", "files": ["last.json", "last.safetensors"], "epoch": 1}).encode())
    dest = tmp_path / "down"
    assert checkpoints.download_checkpoint(store, "job-e", dest)
    assert _files(dest) == {"last.json": b'{"epoch": 1}', "last.safetensors": b"old-weights"}

    _replace(dest / "eval" / "partial" / "a.json", b"{}")
    written = _upload(store, dest, tmp_path / "up")
    assert len([k for k, _ in written if "/blobs/" in k]) == 3  # the stored folder had no blobs to reuse
    assert not store.exists(f"{prefix}/e00001/last.safetensors")
    back = tmp_path / "back"
    assert checkpoints.download_checkpoint(store, "job-e", back)
    assert _files(back) == _files(dest)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _keys(root):
    return [p for p in root.rglob("*") if p.is_file()]


def test_a_manifest_without_a_digest_for_a_file_is_refused(tmp_path):
    store = h.counting_store(h.make_settings(tmp_path / "home"))
    store.write_bytes("jobs/job-m/checkpoint/latest.json", json.dumps(
        {"version": 2, "folder": "e00001", "files": ["last.json"], "objects": {}}).encode())
    with pytest.raises(ValueError, match="invalid digest for 'last.json'"):
        checkpoints.download_checkpoint(store, "job-m", tmp_path / "down")
