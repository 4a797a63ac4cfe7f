"""An ONNX model with external data, uploaded as one zip or tar archive: `model.onnx` + `model.onnx.data`.

torch's default `torch.onnx.export` writes the weights next to the graph (`model.onnx.data`). A bare
`.onnx` that points at files is refused (its paths could name anything on the server); inside an
archive, the only external file a tensor may name is a sibling of the `.onnx` in that archive.
Nothing is extracted to disk: the members are read into memory after the checks every archive gets
(no traversal, no links, sizes and compression ratio capped), and the weights are copied into the
graph, so the rest of the import sees an ordinary self-contained model.
"""

from __future__ import annotations

import posixpath
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kdiga_core.errors import ModelFormatError
from kdiga_core.onnx_import import INLINE_HINT, current_allocation_limit

__all__ = ["INLINE_HINT", "MAX_UNPACKED_BYTES", "archive_kind", "load_archive", "onnx_member"]

# Larger is refused before anything is read (protobuf itself cannot hold a model above 2 GB).
MAX_UNPACKED_BYTES = 2 * 1024**3
MAX_MEMBERS = 64
MAX_RATIO = 1000  # uncompressed / compressed, for members above a few MB (a decompression bomb)


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    compressed: int


def archive_kind(path: str | Path) -> str | None:
    """'zip' or 'tar' when the file is one of those archives, else None (from its bytes)."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x1f\x8b") or (len(head) >= 262 and head[257:262] == b"ustar"):
        return "tar" if tarfile.is_tarfile(path) else None
    return None


def onnx_member(path: str | Path) -> str | None:
    """The one `.onnx` member of a zip/tar archive; None when it holds none (or is no archive)."""
    kind = archive_kind(path)
    if kind is None:
        return None
    names = [m.name for m in _members(Path(path), kind)]
    onnx_names = [n for n in names if n.lower().endswith(".onnx")]
    if len(onnx_names) > 1:
        raise ModelFormatError(f"The archive holds {len(onnx_names)} .onnx files; upload one model per archive.")
    return onnx_names[0] if onnx_names else None


def load_archive(path: str | Path):  # -> onnx.ModelProto (onnx imported lazily)
    """The archive's ONNX model with its external weights copied inside, or `ModelFormatError`."""
    import onnx

    path = Path(path)
    kind = archive_kind(path)
    if kind is None:
        raise ModelFormatError("The file is not a zip or tar archive.")
    members = {m.name: m for m in _members(path, kind)}
    name = onnx_member(path)
    if name is None:
        raise ModelFormatError("The archive holds no .onnx file.")
    try:
        proto = onnx.load_model_from_string(_read(path, kind, members[name]))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelFormatError(f"The archive's {posixpath.basename(name)} is not a readable ONNX model.") from exc
    _inline_external_data(proto, path, kind, members, posixpath.dirname(name))
    return proto


def _members(path: Path, kind: str) -> list[_Member]:
    """Every member, after the checks any uploaded archive gets."""
    try:
        members = _zip_members(path) if kind == "zip" else _tar_members(path)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise ModelFormatError(f"The {kind} archive could not be read ({type(exc).__name__}).") from exc
    if len(members) > MAX_MEMBERS:
        raise ModelFormatError(f"The archive holds {len(members)} files; at most {MAX_MEMBERS} are allowed.")
    total = 0
    for m in members:
        _check_name(m.name)
        total += m.size
        if m.compressed and m.size > 8 * 1024**2 and m.size / m.compressed > MAX_RATIO:
            raise ModelFormatError(f"The archive entry '{m.name}' has a suspicious compression ratio "
                                   "(a decompression bomb).")
    if total > MAX_UNPACKED_BYTES:
        raise ModelFormatError(f"The archive unpacks to {total} bytes, more than the limit of "
                               f"{MAX_UNPACKED_BYTES} bytes.")
    return members


def _zip_members(path: Path) -> list[_Member]:
    with zipfile.ZipFile(path) as zf:
        out = []
        for info in zf.infolist():
            if info.is_dir():
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ModelFormatError(f"The archive entry '{info.filename}' is a symbolic link, which is not allowed.")
            out.append(_Member(info.filename, info.file_size, info.compress_size))
        return out


def _tar_members(path: Path) -> list[_Member]:
    with tarfile.open(path, mode="r:*") as tf:
        out = []
        for info in tf.getmembers():
            if info.isdir():
                continue
            if not info.isreg():
                raise ModelFormatError(f"The archive entry '{info.name}' is a link or a special file, "
                                       "which is not allowed.")
            out.append(_Member(info.name, info.size, 0))
        return out


def _check_name(name: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or ":" in name or "\0" in name:
        raise ModelFormatError(f"The archive entry '{name}' points outside the archive.")


def _read(path: Path, kind: str, member: _Member) -> bytes:
    """A member's bytes, never more than its checked size."""
    if kind == "zip":
        with zipfile.ZipFile(path) as zf, zf.open(member.name) as f:
            data = f.read(member.size + 1)
    else:
        with tarfile.open(path, mode="r:*") as tf:
            f = tf.extractfile(member.name)
            if f is None:
                raise ModelFormatError(f"The archive entry '{member.name}' is not a regular file.")
            data = f.read(member.size + 1)
    if len(data) != member.size:
        raise ModelFormatError(f"The archive entry '{member.name}' is not the size its header says.")
    return data


def _inline_external_data(proto, path: Path, kind: str, members: dict[str, _Member], folder: str) -> None:
    """Copy each externally stored tensor's bytes into it; the location must be a sibling member."""
    import onnx

    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    files: dict[str, bytes] = {}
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or "/" in location or "\\" in location or location in (".", ".."):
            raise ModelFormatError(f"The ONNX tensor '{tensor.name}' names external data '{location}'; only a "
                                   "file next to the .onnx inside the archive is allowed.")
        member = members.get(posixpath.join(folder, location) if folder else location)
        if member is None:
            raise ModelFormatError(f"The ONNX tensor '{tensor.name}' keeps its data in '{location}', which is "
                                   "not in the archive next to the .onnx file.")
        if member.name not in files:
            limit = current_allocation_limit()
            if limit is not None and member.size > limit:
                raise ModelFormatError(
                    f"The ONNX model's external data '{location}' holds {member.size / 2**20:,.0f} MiB, above this "
                    f"service's teacher memory limit of {limit / 2**20:,.0f} MiB (KDIGA_MAX_TEACHER_MEMORY_BYTES).")
            files[member.name] = _read(path, kind, member)
        data = files[member.name]
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") else len(data) - offset
        if offset < 0 or length < 0 or offset + length > len(data):
            raise ModelFormatError(f"The ONNX tensor '{tensor.name}' points past the end of '{location}'.")
        tensor.raw_data = data[offset:offset + length]
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
