"""Datasets read in place (by reference): listing and validating image folders and WebDataset shards.

Nothing is copied. A reference is a URL that fsspec opens (``file://``, ``s3://``, ...):

- ``image_folder``: torchvision's layout, ``train/<class>/<image>`` and ``val/<class>/<image>``
  (or ``test/``, ``validation/``); deeper folders under a class are that class's too.
- ``webdataset``: tar shards whose samples are ``<key>.jpg|.jpeg|.png`` + ``<key>.cls`` (an
  integer label), under ``train/`` and ``val/`` (or ``test/``), or named ``train-*.tar`` and
  ``val-*.tar``; an optional ``classes.txt`` (one name per line) at the root names the classes.
  Shards are read with the `webdataset` package's tar iterator over an fsspec stream.

Validation (`validate_reference`) lists every file (or streams every shard) to count samples per
split and class, and decodes up to ``max_images`` of them spread evenly over the set: the image
sizes seen and the corrupt files are reported; above ``max_corrupt_fraction`` the set is invalid.
For shards it also records the samples each training shard yields to a reader
(``train_shard_sizes``): a job on several devices sizes every rank's epoch from them.
"""

from __future__ import annotations

import io
import math
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdiga_core.data import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS
from kdiga_core.errors import DataError

SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {"train": ("train",), "test": ("val", "validation", "test")}
WDS_IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png")
MAX_LISTED_CORRUPT = 200  # corrupt files named in the layout (all are counted)


def open_root(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, root path without a trailing slash) for ``uri``."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise DataError(f"The dataset uri's scheme cannot be read on this worker ({exc}).") from exc
    return fs, root.rstrip("/")


def _relative(path: str, root: str) -> list[str]:
    return [p for p in path[len(root):].split("/") if p]


# ----------------------------------------------------------------------------- image folders


@dataclass
class FolderListing:
    """An image folder's files: ``files[split]`` is a sorted list of (path, label)."""

    class_names: list[str]
    files: dict[str, list[tuple[str, int]]]


def list_image_folder(fs: Any, root: str, class_names: list[str] | None = None) -> FolderListing:
    """List ``train/<class>/*`` and the first of ``val|validation|test/<class>/*`` (no file is read)."""
    try:
        paths = sorted(fs.find(root))
    except (FileNotFoundError, PermissionError, OSError) as exc:
        raise DataError("The dataset folder could not be listed; check the uri and the worker's access.") from exc
    found: dict[str, list[tuple[str, str]]] = {}
    for path in paths:
        rel = _relative(path, root)
        if len(rel) < 3 or any(p.startswith(".") for p in rel):
            continue
        if posixpath.splitext(rel[-1])[1].lower() in IMAGE_EXTENSIONS:
            found.setdefault(rel[0].lower(), []).append((path, rel[1]))
    train = found.get("train", [])
    test = next((found[f] for f in SPLIT_FOLDERS["test"] if found.get(f)), [])
    if not train or not test:
        missing = "train/" if not train else "val/ (or test/)"
        raise DataError(f"The dataset folder has no images under {missing}<class>/; use the layout "
                        "train/<class>/<image> and val/<class>/<image>.")
    names = class_names or sorted({c for _, c in train})
    if len(names) < 2:
        raise DataError("The dataset needs at least 2 class folders under train/.")
    index = {c: i for i, c in enumerate(names)}
    unknown = sorted({c for _, c in train + test} - set(index))
    if unknown:
        raise DataError(f"Class '{unknown[0]}' has images but is not a class of the training split.")
    return FolderListing(names, {s: [(p, index[c]) for p, c in items] for s, items in
                                 (("train", train), ("test", test))})


# ----------------------------------------------------------------------------- webdataset shards


def list_shards(fs: Any, root: str) -> dict[str, list[str]]:
    """Tar shards per split: ``train/*.tar`` + ``val|test/*.tar``, or ``train-*.tar`` + ``val-*.tar``."""
    try:
        paths = sorted(p for p in fs.find(root) if p.endswith(".tar"))
    except (FileNotFoundError, PermissionError, OSError) as exc:
        raise DataError("The dataset shards could not be listed; check the uri and the worker's access.") from exc
    shards: dict[str, list[str]] = {"train": [], "test": []}
    for path in paths:
        rel = _relative(path, root)
        name = rel[0] if len(rel) > 1 else rel[-1].replace("_", "-").split("-")[0].split(".")[0]
        split = next((s for s, names in SPLIT_FOLDERS.items() if name.lower() in names), None)
        if split is not None:
            shards[split].append(path)
    if not shards["train"] or not shards["test"]:
        missing = "training" if not shards["train"] else "validation"
        raise DataError(f"The dataset has no {missing} shards; put .tar shards under train/ and val/ "
                        "(or name them train-*.tar and val-*.tar).")
    return shards


def wds_class_names(fs: Any, root: str) -> list[str] | None:
    """The names in ``classes.txt`` at the root, one a line, or None."""
    path = f"{root}/classes.txt"
    if not fs.exists(path):
        return None
    names = [line.strip() for line in fs.cat_file(path).decode("utf-8").splitlines() if line.strip()]
    return names or None


@dataclass
class ShardSample:
    """One sample of a shard: its key, image bytes (None when missing) and label (None when unreadable)."""

    key: str
    image: bytes | None
    label: int | None


def shard_samples(fs: Any, path: str) -> Iterator[ShardSample]:
    """The samples of one shard in order, read as a stream (webdataset's tar grouping by key)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def members(stream: Any) -> Iterator[dict[str, Any]]:
        for member in tar_file_iterator(stream):
            yield {**member, "__url__": path}

    try:
        with fs.open(path, "rb") as stream:
            for sample in group_by_keys(members(stream)):
                image = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), None)
                yield ShardSample(str(sample["__key__"]), image, _label(sample.get("cls")))
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise DataError(f"The shard '{posixpath.basename(path)}' is not a readable tar file.") from exc


def _label(raw: bytes | None) -> int | None:
    try:
        return int(raw.decode("utf-8").strip()) if raw is not None else None
    except (UnicodeDecodeError, ValueError):
        return None


# ----------------------------------------------------------------------------- decoding


def decode_rgb(raw: bytes) -> np.ndarray:
    """Decode image bytes to uint8 (H, W, 3); raises DataError for undecodable or oversized images."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:  # checked from the header, before decoding
                raise DataError(f"An image is {im.width}x{im.height} pixels, larger than allowed.")
            return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy (torch.from_numpy)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError("An image could not be decoded.") from exc


# ----------------------------------------------------------------------------- validation


@dataclass
class _Tally:
    """What validation counts while it streams."""

    counts: dict[str, Counter] = field(default_factory=lambda: {"train": Counter(), "test": Counter()})
    sizes: Counter = field(default_factory=Counter)
    decoded: int = 0
    corrupt: list[str] = field(default_factory=list)

    def check(self, name: str, raw: bytes | None) -> bool:
        """Decode one image; False (and the name recorded) when it is corrupt."""
        self.decoded += 1
        try:
            if raw is None:
                raise DataError("missing image")
            image = decode_rgb(raw)
        except DataError:
            self.corrupt.append(name)
            return False
        self.sizes[f"{image.shape[1]}x{image.shape[0]}"] += 1
        return True


def validate_reference(dataset: dict[str, Any]) -> dict[str, Any]:
    """List (or stream) a referenced dataset; return the row's summary with its ``layout``.

    ``dataset``: ``{"kind": "image_folder"|"webdataset", "uri", "storage_options",
    "max_corrupt_fraction", "validate_max_images"}``.

    Raises:
        DataError: bad layout, unreadable location, or too many corrupt images (one sentence).
    """
    fs, root = open_root(dataset["uri"], dataset.get("storage_options"))
    budget = int(dataset.get("validate_max_images") or 20_000)
    tally = _Tally()
    if dataset["kind"] == "image_folder":
        names, extra = _validate_folder(fs, root, tally, budget), {}
    elif dataset["kind"] == "webdataset":
        names, extra = _validate_shards(fs, root, tally, budget)
    else:
        raise DataError(f"Unknown dataset format '{dataset['kind']}'; use image_folder or webdataset.")
    return _summary(dataset, names, tally, extra)


def _validate_folder(fs: Any, root: str, tally: _Tally, budget: int) -> list[str]:
    listing = list_image_folder(fs, root)
    everything = [(s, p, y) for s in ("train", "test") for p, y in listing.files[s]]
    every = max(1, math.ceil(len(everything) / budget))  # decode every k-th file: spread over all classes
    for i, (split, path, label) in enumerate(everything):
        tally.counts[split][label] += 1
        if i % every == 0:
            tally.check("/".join(_relative(path, root)), _read(fs, path))
    return listing.class_names


def _read(fs: Any, path: str) -> bytes | None:
    try:
        return bytes(fs.cat_file(path))
    except OSError:
        return None


def _validate_shards(fs: Any, root: str, tally: _Tally, budget: int) -> tuple[list[str], dict[str, Any]]:
    shards = list_shards(fs, root)
    sizes = {p: int(fs.size(p) or 0) for s in shards.values() for p in s}
    step = max(1.0, sum(sizes.values()) / budget)  # decode about one image per `step` bytes of shards
    test_labels: dict[str, list[int]] = {}
    train_sizes: dict[str, int] = {}  # samples a training reader yields per shard (image + label present)
    seen_bytes, next_check = 0.0, 0.0
    for split, paths in shards.items():
        for path in paths:
            rel = "/".join(_relative(path, root))
            labels = test_labels.setdefault(rel, []) if split == "test" else None
            for sample in shard_samples(fs, path):
                seen_bytes += len(sample.image or b"") + 512
                ok = sample.label is not None and sample.image is not None
                if ok and seen_bytes >= next_check:
                    next_check += step
                    ok = tally.check(f"{rel}:{sample.key}", sample.image)
                elif not ok:
                    tally.decoded += 1
                    tally.corrupt.append(f"{rel}:{sample.key}")
                if split == "train" and sample.image is not None and sample.label is not None:
                    train_sizes[rel] = train_sizes.get(rel, 0) + 1
                if labels is not None:
                    labels.append(sample.label if ok and sample.label is not None else -1)  # -1: skipped
                if ok and sample.label is not None:
                    tally.counts[split][sample.label] += 1
    seen = sorted(set(tally.counts["train"]) | set(tally.counts["test"]))
    names = wds_class_names(fs, root) or [str(i) for i in range((seen[-1] + 1) if seen else 0)]
    if seen and (seen[0] < 0 or seen[-1] >= len(names)):
        raise DataError(f"Label {seen[-1] if seen[-1] >= len(names) else seen[0]} is out of range for "
                        f"{len(names)} classes (classes.txt).")
    if len(names) < 2:
        raise DataError("The dataset needs at least 2 classes.")
    sizes_of = {"/".join(_relative(p, root)): 0 for p in shards["train"]} | train_sizes  # empty shards too
    return names, {"shards": {s: len(p) for s, p in shards.items()}, "train_shard_sizes": sizes_of,
                   "test_labels": test_labels}


def _summary(dataset: dict[str, Any], names: list[str], tally: _Tally, extra: dict[str, Any]) -> dict[str, Any]:
    limit = float(dataset.get("max_corrupt_fraction", 0.01))
    fraction = len(tally.corrupt) / max(1, tally.decoded)
    if fraction > limit:
        raise DataError(f"{len(tally.corrupt)} of {tally.decoded} checked images ({100 * fraction:.1f}%) could not be "
                        f"read, more than the allowed {100 * limit:.1f}%; the first is '{tally.corrupt[0]}'.")
    sizes = dict(tally.sizes.most_common(20))
    only = next(iter(sizes)) if len(tally.sizes) == 1 else None
    square = only is not None and only.split("x")[0] == only.split("x")[1]
    counts = {s: {names[c]: int(n) for c, n in sorted(per.items())} for s, per in tally.counts.items()}
    layout = {"format": dataset["kind"], "class_names": names, "splits": counts, "image_sizes": sizes, "decoded": tally.decoded,
              "corrupt": {"count": len(tally.corrupt), "fraction": round(fraction, 6), "max_fraction": limit,
                          "files": tally.corrupt[:MAX_LISTED_CORRUPT]}, **extra}
    return {"num_classes": len(names), "class_names": names,
            "input_shape": [3, int(only.split("x")[0]), int(only.split("x")[0])] if square and only else None,
            "train_size": sum(tally.counts["train"].values()), "test_size": sum(tally.counts["test"].values()),
            "layout": layout}
