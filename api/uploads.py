"""Streamed multipart uploads and file sniffing (nothing uploaded is ever unpickled or extracted).

`receive_upload` parses the request body as it arrives (python-multipart's push parser) and
writes the file part straight to the artifact store with a size cap, hashing as it goes. Any
error removes what was written.
"""

from __future__ import annotations

import struct
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from anyio import to_thread
from fastapi import HTTPException, Request, status
from python_multipart.multipart import MultipartParser, parse_options_header

from kdiga_service.storage import ArtifactStore, StoredObject, StreamWriter, TooLargeError

MAX_FIELD_BYTES = 1024 * 1024
MAX_FIELDS_BYTES = 2 * MAX_FIELD_BYTES
HEAD_BYTES = 64

PICKLE_REFUSED = (
    "Pickle-based checkpoints (torch.save files) are refused because loading them can run arbitrary code; "
    "convert with safetensors.torch.save_file(model.state_dict(), 'teacher.safetensors') or export to ONNX, "
    "and upload that file."
)
TORCHSCRIPT_REFUSED = (
    "TorchScript files are disabled on this server; upload safetensors weights or an ONNX file."
)
UNKNOWN_MODEL_FORMAT = "Unsupported teacher file format; upload safetensors weights or an ONNX file."
NOT_MULTIPART = "Send the upload as multipart/form-data with a 'file' part and a 'metadata' part."


def http_error(code: int, detail: str) -> HTTPException:
    return HTTPException(status_code=code, detail=detail)


def too_large(max_bytes: int) -> HTTPException:
    return http_error(
        status.HTTP_413_CONTENT_TOO_LARGE, f"The file is larger than the upload limit of {max_bytes} bytes."
    )


@dataclass
class Upload:
    """A received multipart upload: its text fields and the stored file part."""

    fields: dict[str, str]
    stored: StoredObject | None = None
    filename: str | None = None
    head: bytes = b""


@dataclass
class _State:
    events: list[tuple[str, Any]] = field(default_factory=list)
    header_field: bytes = b""
    header_value: bytes = b""
    headers: dict[bytes, bytes] = field(default_factory=dict)


def _callbacks(state: _State) -> dict[str, Any]:
    def on_part_begin() -> None:
        state.headers = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state.header_value += data[start:end]

    def on_header_end() -> None:
        state.headers[state.header_field.lower()] = state.header_value
        state.header_field, state.header_value = b"", b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(state.headers.get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        filename = opts.get(b"filename")
        state.events.append(
            ("begin", (name, None if filename is None else filename.decode("utf-8", "replace")))
        )

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state.events.append(("data", bytes(data[start:end])))

    def on_part_end() -> None:
        state.events.append(("end", None))

    return {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }


class _Receiver:
    """Applies parser events: text fields to memory, the file part to a StreamWriter."""

    def __init__(
        self,
        store: ArtifactStore,
        key: str,
        max_bytes: int,
        file_field: str,
        check_fields: Callable[[dict[str, str]], None] | None,
    ):
        self.store, self.key, self.max_bytes, self.file_field = store, key, max_bytes, file_field
        self.check_fields = check_fields
        self.upload = Upload(fields={})
        self.writer: StreamWriter | None = None
        self.part: str | None = None
        self.buf = bytearray()
        self.text_bytes = 0

    async def apply(self, kind: str, value: Any) -> None:
        if kind == "begin":
            name, filename = value
            self.part, self.buf = name, bytearray()
            if "\x00" in name or "\x00" in (filename or ""):
                raise http_error(400, "A part's name or file name contains a NUL character, which is not allowed.")
            if name == self.file_field:
                if self.writer is not None or self.upload.stored is not None:
                    raise http_error(400, f"The upload has more than one '{self.file_field}' part.")
                self.upload.filename = filename
                if self.check_fields is not None:  # refuse bad metadata before receiving the file
                    self.check_fields(self.upload.fields)
                self.writer = await to_thread.run_sync(
                    lambda: self.store.writer(self.key, max_bytes=self.max_bytes)
                )
        elif kind == "data":
            if self.writer is not None and self.part == self.file_field:
                if len(self.upload.head) < HEAD_BYTES:
                    self.upload.head += value[: HEAD_BYTES - len(self.upload.head)]
                try:
                    await to_thread.run_sync(self.writer.write, value)
                except TooLargeError:
                    self.writer = None
                    raise too_large(self.max_bytes) from None
            else:
                self.buf += value
                self.text_bytes += len(value)
                if len(self.buf) > MAX_FIELD_BYTES:
                    raise http_error(
                        413, f"The form field '{self.part}' is larger than {MAX_FIELD_BYTES} bytes."
                    )
                if self.text_bytes > MAX_FIELDS_BYTES:  # many small fields add up too
                    raise http_error(413, f"The form fields add up to more than {MAX_FIELDS_BYTES} bytes.")
        elif kind == "end":
            if self.part == self.file_field and self.writer is not None:
                writer, self.writer = self.writer, None
                self.upload.stored = await to_thread.run_sync(writer.close)
            elif self.part:
                self.upload.fields[self.part] = self.buf.decode("utf-8", "replace")
            self.part = None

    async def abort(self) -> None:
        if self.writer is not None:
            await to_thread.run_sync(self.writer.abort)
            self.writer = None
        if self.upload.stored is not None:
            await to_thread.run_sync(self.store.delete, self.upload.stored.key)
            self.upload.stored = None


def is_multipart(request: Request) -> bool:
    ctype, _ = parse_options_header(request.headers.get("content-type", ""))
    return ctype == b"multipart/form-data"


async def receive_upload(
    request: Request,
    store: ArtifactStore,
    *,
    key: str,
    max_bytes: int,
    file_field: str = "file",
    check_fields: Callable[[dict[str, str]], None] | None = None,
) -> Upload:
    """Stream a multipart body: the `file_field` part goes to `key` in the store (at most `max_bytes`),
    other parts are returned as text. `check_fields(fields)` runs when the file part starts, with the
    fields sent before it, so bad metadata is refused before the file is received. Raises
    HTTPException (413/415/400/422) after removing any file."""
    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    boundary = opts.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise http_error(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, NOT_MULTIPART)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes + 2 * MAX_FIELD_BYTES:
        raise too_large(max_bytes)
    state = _State()
    parser = MultipartParser(boundary, _callbacks(state))  # type: ignore[arg-type]
    receiver = _Receiver(store, key, max_bytes, file_field, check_fields)
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            events, state.events = state.events, []
            for kind, value in events:
                await receiver.apply(kind, value)
        parser.finalize()
        for kind, value in state.events:
            await receiver.apply(kind, value)
        if receiver.upload.stored is None:
            raise http_error(status.HTTP_422_UNPROCESSABLE_CONTENT, f"The upload has no '{file_field}' part.")
    except HTTPException:
        await receiver.abort()
        raise
    except Exception as exc:  # malformed multipart, client disconnect, storage errors
        await receiver.abort()
        if type(exc).__name__ == "ClientDisconnect":
            raise
        raise http_error(status.HTTP_400_BAD_REQUEST, "The multipart body is malformed.") from exc
    return receiver.upload


# -- sniffing ------------------------------------------------------------------------------------
def _zip_names(store: ArtifactStore, key: str) -> list[str] | None:
    try:
        with store.open(key) as f, zipfile.ZipFile(f) as zf:
            return zf.namelist()
    except zipfile.BadZipFile:
        return None


def _tar_names(store: ArtifactStore, key: str) -> list[str] | None:
    """Member names of a tar (plain or gzip) object; None when it is not one."""
    try:
        with store.open(key) as f:
            head = f.read(512)
            if not (head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar"):
                return None
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:*") as tf:
                return tf.getnames()
    except (tarfile.TarError, EOFError, OSError):
        return None


def sniff_model_format(store: ArtifactStore, key: str, head: bytes, filename: str | None) -> str:
    """'safetensors' | 'onnx' | 'pickle' | 'torchscript' | 'unknown', from magic bytes only.

    A zip or tar holding one `.onnx` (with its external data, e.g. `model.onnx.data`) is 'onnx'.
    """
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        names = _zip_names(store, key) or []
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith(".pkl") for n in names):
            return "pickle"
        return "onnx" if any(n.lower().endswith(".onnx") for n in names) else "unknown"
    if any(n.lower().endswith(".onnx") for n in _tar_names(store, key) or []):
        return "onnx"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= 100 * 1024 * 1024 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x08" or (filename or "").lower().endswith(".onnx"):
        return "onnx"
    return "unknown"


def check_dataset_zip(store: ArtifactStore, key: str, *, max_unpacked_bytes: int) -> str | None:
    """None when a zip (npz or image folder) looks safe, else one sentence saying why it was refused."""
    try:
        with store.open(key) as f, zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile:
        return "The dataset is not a valid zip or npz file."
    total = 0
    for info in infos:
        name = info.filename
        if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/") or ":" in name:
            return f"The archive entry '{name}' points outside the archive."
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            return f"The archive entry '{name}' is a symbolic link, which is not allowed."
        total += info.file_size
        if (
            info.compress_size
            and info.file_size / info.compress_size > 1000
            and info.file_size > 10 * 1024**2
        ):
            return f"The archive entry '{name}' has a suspicious compression ratio (a decompression bomb)."
    if total > max_unpacked_bytes:
        return f"The archive unpacks to {total} bytes, more than the limit of {max_unpacked_bytes} bytes."
    return None


def check_model_archive(store: ArtifactStore, key: str, *, max_unpacked_bytes: int) -> str | None:
    """For a teacher sent as a zip or tar (an ONNX model with its external data): None when the
    archive looks safe, else one sentence (the worker checks again, member by member, when it loads)."""
    if names := _tar_names(store, key):
        try:
            with store.open(key) as f, tarfile.open(fileobj=f, mode="r:*") as tf:
                members = tf.getmembers()
        except (tarfile.TarError, EOFError, OSError):
            return "The tar archive could not be read."
        total = 0
        for info in members:
            if _escapes(info.name):
                return f"The archive entry '{info.name}' points outside the archive."
            if not (info.isreg() or info.isdir()):
                return f"The archive entry '{info.name}' is a link or a special file, which is not allowed."
            total += info.size
        if total > max_unpacked_bytes:
            return f"The archive unpacks to {total} bytes, more than the limit of {max_unpacked_bytes} bytes."
        return None if names else "The archive is empty."
    with store.open(key) as f:
        if not zipfile.is_zipfile(f):
            return "The teacher file is neither an ONNX model nor a readable zip or tar archive."
    return check_dataset_zip(store, key, max_unpacked_bytes=max_unpacked_bytes)


def _escapes(name: str) -> bool:
    return name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/") or ":" in name
