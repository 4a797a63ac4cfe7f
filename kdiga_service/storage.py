"""The artifact store: uploads and job outputs over any fsspec URL.

`file://HOME/artifacts` by default; `s3://bucket/prefix` (S3, MinIO), `gs://...`, or a shared
volume in a scale-out deployment. Keys are chosen by the server (`new_key`) and validated on every
call so no caller can reach outside the store. Writes are streamed with a size cap and hashed
while streaming; a failed or oversized write leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import fsspec
from anyio import to_thread

from kdiga_service.settings import Settings, get_settings

CHUNK = 1024 * 1024
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,200}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,200}){0,15}$")


class StorageError(Exception):
    """The store refused an operation (bad key, missing object)."""


class TooLargeError(StorageError):
    """A streamed write went over its size cap; nothing was kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        super().__init__(f"The upload is larger than the limit of {max_bytes} bytes.")


@dataclass(frozen=True)
class StoredObject:
    """What a finished write produced."""

    key: str
    size_bytes: int
    sha256: str


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative key ('a/b.ext', no '..', no absolute path), else raise."""
    if not isinstance(key, str) or not _KEY_RE.match(key) or any(p in ("..", ".") for p in key.split("/")):
        raise StorageError(f"Invalid storage key {key!r}.")
    return key


def new_key(prefix: str, suffix: str = "") -> str:
    """A fresh server-chosen key, e.g. `new_key('teachers', '.safetensors')`."""
    return validate_key(f"{prefix}/{uuid.uuid4().hex}{suffix}")


class StreamWriter:
    """Write one object chunk by chunk, counting and hashing; `close()` commits, `abort()` drops it."""

    def __init__(self, store: ArtifactStore, key: str, max_bytes: int | None):
        self.store, self.key, self.max_bytes = store, validate_key(key), max_bytes
        self.size, self._sha = 0, hashlib.sha256()
        self._target = store._path(key)
        self._tmp = f"{self._target}.part-{uuid.uuid4().hex}" if store.is_local else self._target
        if store.is_local:
            store.fs.makedirs(store.fs._parent(self._tmp), exist_ok=True)
        self._file: IO[bytes] | None = store.fs.open(self._tmp, "wb")

    def write(self, chunk: bytes) -> None:
        assert self._file is not None, "writer is closed"
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            self.abort()
            raise TooLargeError(self.max_bytes)
        self._sha.update(chunk)
        self._file.write(chunk)

    def close(self) -> StoredObject:
        assert self._file is not None, "writer is closed"
        try:
            self._file.close()
            self._file = None
            if self._tmp != self._target:
                self.store.fs.mv(self._tmp, self._target)
        except BaseException:
            self.abort()
            raise
        return StoredObject(self.key, self.size, self._sha.hexdigest())

    def abort(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - the partial object is deleted below anyway
                pass
            self._file = None
        for path in {self._tmp, self._target}:
            try:
                if self.store.fs.exists(path):
                    self.store.fs.rm(path)
            except FileNotFoundError:
                pass


class ArtifactStore:
    """Keys → objects under one fsspec root."""

    def __init__(self, url: str, **storage_options: Any):
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.is_local = "file" in _protocols(self.fs)
        if self.is_local:
            self.fs.makedirs(self.root, exist_ok=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> ArtifactStore:
        options = dict(settings.storage_options)
        if settings.storage_url.startswith(("s3://", "s3a://")):
            client_kwargs = dict(options.pop("client_kwargs", {}))
            if settings.s3_endpoint_url:
                options.setdefault("endpoint_url", settings.s3_endpoint_url)
            if settings.s3_region:
                client_kwargs.setdefault("region_name", settings.s3_region)
            if settings.s3_access_key_id:
                options.setdefault("key", settings.s3_access_key_id)
            if settings.s3_secret_access_key:
                options.setdefault("secret", settings.s3_secret_access_key.get_secret_value())
            if client_kwargs:
                options["client_kwargs"] = client_kwargs
        return cls(settings.storage_url, **options)

    def _path(self, key: str) -> str:
        return f"{self.root}/{validate_key(key)}"

    # -- writing ---------------------------------------------------------------------------------
    def writer(self, key: str, *, max_bytes: int | None = None) -> StreamWriter:
        """Open a streamed write; call `.write(chunk)` then `.close()` (or `.abort()`)."""
        return StreamWriter(self, key, max_bytes)

    def write_stream(
        self, key: str, chunks: Iterable[bytes] | BinaryIO, *, max_bytes: int | None = None
    ) -> StoredObject:
        """Write an iterable of byte chunks or a readable file object; raises TooLargeError over the cap."""
        source = _iter_file(chunks) if hasattr(chunks, "read") else chunks
        writer = self.writer(key, max_bytes=max_bytes)
        try:
            for chunk in source:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.close()

    async def awrite_stream(
        self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None
    ) -> StoredObject:
        """Async variant of `write_stream` (blocking file calls run in a worker thread)."""
        writer = await to_thread.run_sync(lambda: self.writer(key, max_bytes=max_bytes))
        try:
            async for chunk in chunks:
                await to_thread.run_sync(writer.write, chunk)
        except BaseException:
            await to_thread.run_sync(writer.abort)
            raise
        return await to_thread.run_sync(writer.close)

    def write_bytes(self, key: str, data: bytes) -> StoredObject:
        return self.write_stream(key, [data])

    def upload_file(self, path: str | Path, key: str) -> StoredObject:
        """Copy a local file into the store (workers: artifacts, checkpoints)."""
        with open(path, "rb") as f:
            return self.write_stream(key, f)

    # -- reading ---------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def size(self, key: str) -> int:
        return int(self.fs.size(self._path(key)))

    def open(self, key: str) -> IO[bytes]:
        """Open an object for reading (a seekable binary file object)."""
        try:
            handle: IO[bytes] = self.fs.open(self._path(key), "rb")
            return handle
        except FileNotFoundError as exc:
            raise StorageError(f"No object with key {key!r}.") from exc

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Stream an object's bytes (for StreamingResponse)."""
        with self.open(key) as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def read_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        with self.open(key) as f:
            data = f.read(-1 if max_bytes is None else max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise TooLargeError(max_bytes)
        return data

    def download(self, key: str, dest: str | Path) -> Path:
        """Copy an object to a local file path."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.open(key) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
        return dest

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        """A file on local disk with the object's bytes: the real file for a local store,
        else a temporary copy removed when the block exits."""
        if self.is_local:
            if not self.exists(key):
                raise StorageError(f"No object with key {key!r}.")
            yield Path(self._path(key))
            return
        with tempfile.TemporaryDirectory(prefix="kdiga-") as tmp:
            yield self.download(key, Path(tmp) / key.rsplit("/", 1)[-1])

    # -- other -----------------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        """Delete an object; a missing object is not an error."""
        path = self._path(key)
        try:
            if self.fs.exists(path):
                self.fs.rm(path)
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under `prefix/` (e.g. a job's checkpoints)."""
        path = self._path(prefix)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    @property
    def supports_presign(self) -> bool:
        return not self.is_local and bool({"s3", "s3a", "gs", "gcs"} & _protocols(self.fs))

    def presigned_url(self, key: str, *, expires_s: int = 3600, filename: str | None = None) -> str | None:  # noqa: ARG002 - the store interface
        """A time-limited download URL when the backend supports one, else None."""
        if not self.supports_presign:
            return None
        try:
            return str(self.fs.sign(self._path(key), expiration=expires_s))
        except NotImplementedError:
            return None


def checkpoint_prefix(job_id: str) -> str:
    """Where a job's training checkpoints live in the store (written by worker.checkpoints, deleted by
    the API's retention sweep, api/sweeper.py)."""
    return f"jobs/{job_id}/checkpoint"


def _protocols(fs: Any) -> set[str]:
    proto = fs.protocol
    return set(proto) if isinstance(proto, (tuple, list)) else {proto}


def _iter_file(f: Any) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


_stores: dict[tuple[str, ...], ArtifactStore] = {}


def get_storage(settings: Settings | None = None) -> ArtifactStore:
    """The artifact store for the given (or process-wide) settings, cached per URL and options."""
    settings = settings or get_settings()
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else ""
    cache_key = (
        settings.storage_url,
        json.dumps(settings.storage_options, sort_keys=True),
        str(settings.s3_endpoint_url),
        str(settings.s3_access_key_id),
        secret,
        str(settings.s3_region),
    )
    store = _stores.get(cache_key)
    if store is None:
        store = _stores[cache_key] = ArtifactStore.from_settings(settings)
    return store
