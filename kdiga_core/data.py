"""Datasets for kdiga_core: built-ins, uploaded ``.npz`` files and image-folder zips.

Everything ends up in a `DataBundle`: NCHW square images, int64 labels. Pixels stay uint8
(0..255) when the source is 8-bit (CIFAR, image zips, uint8 npz): 4x less memory than float32;
`pixels` turns a batch into float32 in [0, 1] on whatever device it is on. Float sources
(digits, float npz) stay float32 in [0, 1]. Models normalise inside (method.md §1), so no
mean/std lives here. Datasets too large for memory are read in place instead (`data_stream`).

Uploaded files are untrusted: ``.npz`` files are read with ``allow_pickle=False`` and
zips are read member by member from memory after path, symlink, size and
compression-ratio checks; nothing uploaded is ever unpickled or extracted to disk.
"""

from __future__ import annotations

import io
import posixpath
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdiga_core.errors import DataError, UnknownNameError

BUILTIN_DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "digits")
DATASET_KINDS: tuple[str, ...] = ("cifar10", "cifar100", "digits", "image_folder_zip", "npz")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SPLIT_NAMES: dict[str, str] = {"train": "train", "test": "test", "val": "test", "validation": "test"}

# Keyword options each uploaded kind accepts through load_dataset.
LOADER_OPTIONS: dict[str, tuple[str, ...]] = {
    "npz": ("max_bytes",),
    "image_folder_zip": ("img_size", "max_files", "max_bytes"),
}

# Safety caps for untrusted archives; callers may tighten them.
MAX_ZIP_FILES = 200_000
MAX_UNCOMPRESSED_BYTES = 4 * 1024**3
MAX_COMPRESSION_RATIO = 200.0  # deflate tops out near 1032:1; image data stays far below 200:1
RATIO_CHECK_MIN_BYTES = 64 * 1024  # tiny members can be highly compressible without being a threat
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass
class DataBundle:
    """An in-memory dataset with a train and a test split.

    Attributes:
        name: Human-readable name (e.g. ``"digits"``).
        x_train: uint8 pixels (0..255) or float32 in [0, 1], shape (N, C, H, H); `pixels` makes floats.
        y_train: int64 labels in [0, num_classes), shape (N,).
        x_test: the same for the test split, shape (M, C, H, H).
        y_test: int64 labels, shape (M,).
        num_classes: Number of classes.
        class_names: One name per class.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.class_names is None:
            self.class_names = tuple(str(i) for i in range(self.num_classes))
        self.class_names = tuple(str(c) for c in self.class_names)

    @property
    def in_chans(self) -> int:
        """Number of input channels."""
        return int(self.x_train.shape[1])

    @property
    def img_size(self) -> int:
        """Side of the (square) images in pixels."""
        height, width = int(self.x_train.shape[2]), int(self.x_train.shape[3])
        if height != width:
            raise DataError(f"Images must be square, but dataset '{self.name}' has {height}x{width} images.")
        return height

    def summary(self) -> dict[str, Any]:
        """Plain-JSON description (what the API shows for a dataset)."""
        return {
            "num_classes": int(self.num_classes),
            "class_names": list(self.class_names or ()),
            "input_shape": [self.in_chans, self.img_size, self.img_size],
            "train_size": int(self.x_train.shape[0]),
            "test_size": int(self.x_test.shape[0]),
        }


# ----------------------------------------------------------------------------- built-ins


def list_builtin_datasets() -> list[str]:
    """Names accepted by `load_builtin`."""
    return list(BUILTIN_DATASETS)


def load_builtin(name: str, root: str | Path | None = None) -> DataBundle:
    """Load a built-in dataset.

    Args:
        name: ``"digits"`` (ships with scikit-learn), ``"cifar10"`` or ``"cifar100"``.
        root: For CIFAR, the directory holding torchvision's extracted
            ``cifar-10-batches-py`` / ``cifar-100-python`` folder. Never downloaded.

    Raises:
        UnknownNameError: ``name`` is not a built-in.
        DataError: CIFAR files are missing.
    """
    if name == "digits":
        return load_digits()
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root)
    raise UnknownNameError("dataset", name, list(BUILTIN_DATASETS))


def load_digits() -> DataBundle:
    """scikit-learn's 8x8 digits: 1x8x8 pixels, stratified 75/25 split with a fixed seed."""
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    digits = _sk_digits()
    # The raw values are 0..16 intensities.
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return _bundle("digits", x_tr, y_tr, x_te, y_te, 10, [str(i) for i in range(10)])


def load_cifar(name: str, root: str | Path | None) -> DataBundle:
    """CIFAR-10/100 from torchvision's on-disk format under ``root`` (never downloaded)."""
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if root is None or not (Path(root) / folder).is_dir():
        where = f"under '{root}'" if root is not None else "(no data directory was given)"
        raise DataError(f"{name} was not found {where}; put torchvision's extracted '{folder}' folder there.")
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        # torchvision unpickles CIFAR's python batches. That is acceptable only here: the
        # directory is the operator's own local copy (checked against CIFAR's published
        # md5 sums by torchvision), never an upload. Uploads go through load_npz / zips.
        train, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except RuntimeError as exc:
        raise DataError(
            f"{name} under '{root}' is incomplete or corrupted; replace the '{folder}' folder."
        ) from exc
    x_tr, x_te = (_to_float_nchw(d.data, "NHWC") for d in (train, test))
    return _bundle(
        name,
        x_tr,
        np.asarray(train.targets),
        x_te,
        np.asarray(test.targets),
        len(train.classes),
        list(train.classes),
    )


# ----------------------------------------------------------------------------- npz


def load_npz(path: str | Path, *, max_bytes: int = MAX_UNCOMPRESSED_BYTES) -> DataBundle:
    """Load an uploaded ``.npz`` dataset (never unpickled).

    Required arrays: ``x_train``, ``y_train``, ``x_test``, ``y_test``. Pixels are uint8
    (0..255) or float in [0, 1], laid out NCHW or NHWC (channels: 1 to 4; a 3-D array is
    taken as grayscale NHW); images must be square. When both layouts would fit
    (e.g. 3x3x3 images), NCHW wins. Labels are integers in [0, num_classes).
    Optional: ``num_classes`` (scalar) and ``class_names`` (1-D strings); without them,
    num_classes is the largest label + 1.

    Raises:
        DataError: one sentence naming what is wrong.
    """
    _check_zip_sizes(path, max_bytes=max_bytes, max_files=64, what=".npz archive")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # numpy's refusal of object arrays
            raise DataError(
                "The npz file holds pickled objects, which are refused; save plain numeric arrays."
            ) from exc
        raise DataError("The npz file is malformed: its arrays could not be read.") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError("The file is not a readable .npz archive.") from exc
    return _bundle_from_arrays(Path(path).stem, arrays)


def _bundle_from_arrays(name: str, arrays: dict[str, np.ndarray]) -> DataBundle:
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"The npz file is missing array(s): {', '.join(missing)}.")
    x_tr, x_te = (_to_float_nchw(arrays[k], None, k) for k in ("x_train", "x_test"))
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"x_train images are {x_tr.shape[1:]} but x_test images are {x_te.shape[1:]}.")
    y_tr, y_te = (_check_labels(arrays[k], k) for k in ("y_train", "y_test"))
    for xk, x, y in (("x_train", x_tr, y_tr), ("x_test", x_te, y_te)):
        if len(x) != len(y):
            raise DataError(f"{xk} has {len(x)} images but its labels have {len(y)} entries.")
    class_names = _class_names(arrays)
    num_classes = _num_classes(arrays, class_names, y_tr, y_te)
    return _bundle(name, x_tr, y_tr, x_te, y_te, num_classes, class_names)


def _to_float_nchw(x: np.ndarray, layout: str | None, key: str = "x") -> np.ndarray:
    """Validate pixel values and return NCHW: uint8 kept as it is (4x smaller), floats as float32 in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None, :, :]
    if x.ndim != 4 or x.shape[0] == 0:
        raise DataError(f"{key} must be a non-empty (N, C, H, W) or (N, H, W, C) array.")
    layout = layout or _guess_layout(x.shape, key)
    if layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{key} must be uint8 (0..255) or float in [0, 1], not {x.dtype}.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{key} contains NaN or infinite values.")
    if x.min() < 0.0 or x.max() > 1.0:
        raise DataError(f"{key} has float values outside [0, 1]; scale pixels to [0, 1] or store uint8.")
    return x


def _guess_layout(shape: tuple[int, ...], key: str) -> str:
    if shape[1] <= 4 and shape[2] == shape[3]:
        return "NCHW"
    if shape[3] <= 4 and shape[1] == shape[2]:
        return "NHWC"
    raise DataError(
        f"{key} has shape {tuple(shape)}; expected square images as (N, C, H, W) or (N, H, W, C) "
        "with 1 to 4 channels."
    )


def _check_labels(y: np.ndarray, key: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{key} must be a 1-D array of integer class labels.")
    if len(y) and y.min() < 0:
        raise DataError(f"Label {int(y.min())} in {key} is negative.")
    return y.astype(np.int64)


def _class_names(arrays: dict[str, np.ndarray]) -> list[str] | None:
    names = arrays.get("class_names")
    if names is None:
        return None
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError("class_names must be a 1-D array of strings.")
    return [str(n) for n in names.tolist()]


def _num_classes(
    arrays: dict[str, np.ndarray], class_names: list[str] | None, y_tr: np.ndarray, y_te: np.ndarray
) -> int:
    given = arrays.get("num_classes")
    if given is not None:
        if given.size != 1 or not np.issubdtype(given.dtype, np.integer):
            raise DataError("num_classes must be a single integer.")
        num_classes = int(given.reshape(()))
        if class_names is not None and len(class_names) != num_classes:
            raise DataError(f"class_names has {len(class_names)} entries but num_classes is {num_classes}.")
    elif class_names is not None:
        num_classes = len(class_names)
    else:
        num_classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    if num_classes < 2:
        raise DataError("A dataset needs at least 2 classes.")
    for key, y in (("y_train", y_tr), ("y_test", y_te)):
        if len(y) and y.max() >= num_classes:
            raise DataError(f"Label {int(y.max())} in {key} is out of range for {num_classes} classes.")
    return num_classes


def _bundle(
    name: str,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    num_classes: int,
    class_names: list[str] | None,
) -> DataBundle:
    bundle = DataBundle(
        name=name,
        x_train=torch.from_numpy(_stored(x_tr)),
        y_train=torch.from_numpy(np.asarray(y_tr, dtype=np.int64)),
        x_test=torch.from_numpy(_stored(x_te)),
        y_test=torch.from_numpy(np.asarray(y_te, dtype=np.int64)),
        num_classes=int(num_classes),
        class_names=tuple(class_names) if class_names is not None else None,
    )
    bundle.img_size  # noqa: B018 -- raises DataError on non-square images
    return bundle


def _stored(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.uint8 if x.dtype == np.uint8 else np.float32)


def pixels(x: Tensor) -> Tensor:
    """A batch as float32 in [0, 1]: uint8 is divided by 255 (on the batch's device), floats pass through."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


# ----------------------------------------------------------------------------- zips


def _check_zip_sizes(
    path: str | Path, *, max_bytes: int, max_files: int, what: str = "zip archive"
) -> list[zipfile.ZipInfo]:
    """Refuse archives that are unsafe to read: traversal, symlinks, bombs, too many files."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"The file is not a readable {what}.") from exc
    if len(infos) > max_files:
        raise DataError(f"The archive holds {len(infos)} entries, more than the limit of {max_files}.")
    for info in infos:
        _check_member(info)
    total = sum(info.file_size for info in infos)
    if total > max_bytes:
        raise DataError(f"The archive expands to {total} bytes, more than the limit of {max_bytes}.")
    return infos


def _check_member(info: zipfile.ZipInfo) -> None:
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"The archive entry '{name}' has an absolute path, which is refused.")
    if ".." in parts:
        raise DataError(f"The archive entry '{name}' points outside the archive ('..'), which is refused.")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataError(f"The archive entry '{name}' is a symbolic link, which is refused.")
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > RATIO_CHECK_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
        raise DataError(f"The archive entry '{name}' expands {ratio:.0f}-fold, which looks like a zip bomb.")


def load_image_folder_zip(
    path: str | Path,
    img_size: int | None = None,
    *,
    max_files: int = MAX_ZIP_FILES,
    max_bytes: int = MAX_UNCOMPRESSED_BYTES,
) -> DataBundle:
    """Load a zip of images laid out as ``[root/]<split>/<class>/<image>``.

    Splits are ``train`` and ``test`` (or ``val``/``validation``). Without split folders
    (``[root/]<class>/<image>``) a deterministic, per-class 80/20 split is made. Images are
    read straight from the archive (nothing is extracted to disk), converted to RGB, or to
    grayscale when every image is grayscale, and resized to ``img_size`` if given; otherwise
    all images must share one square size.

    Raises:
        DataError: unsafe archive (traversal, symlink, too many files, too large, bomb),
            bad layout or undecodable image, in one sentence.
    """
    infos = _check_zip_sizes(path, max_bytes=max_bytes, max_files=max_files)
    splits = _layout(_image_members(infos))
    class_names = sorted({cls for cls, _ in splits["train"]})
    unknown = sorted({cls for cls, _ in splits["test"]} - set(class_names))
    if unknown:
        raise DataError(f"Class '{unknown[0]}' appears in the test split but not in the train split.")
    if len(class_names) < 2:
        raise DataError("The archive needs at least 2 class folders.")
    index = {c: i for i, c in enumerate(class_names)}
    with zipfile.ZipFile(path) as zf:
        images = {s: [_read_image(zf, m, img_size) for _, m in items] for s, items in splits.items()}
    x_tr, x_te = _stack_images(images["train"], images["test"])
    y_tr = np.array([index[c] for c, _ in splits["train"]], dtype=np.int64)
    y_te = np.array([index[c] for c, _ in splits["test"]], dtype=np.int64)
    return _bundle(Path(path).stem, x_tr, y_tr, x_te, y_te, len(class_names), class_names)


def _image_members(infos: list[zipfile.ZipInfo]) -> list[tuple[list[str], str]]:
    """(path parts, member name) of image files, skipping folders, hidden and macOS metadata files."""
    members = []
    for info in infos:
        parts = [p for p in info.filename.replace("\\", "/").split("/") if p]
        if info.is_dir() or not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
            continue
        if posixpath.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS:
            members.append((parts, info.filename))
    if not members:
        raise DataError("The archive holds no images (.png, .jpg, .jpeg, .bmp, .gif, .webp).")
    return sorted(members, key=lambda m: m[1])


def _layout(members: list[tuple[list[str], str]]) -> dict[str, list[tuple[str, str]]]:
    """Map the archive's paths to {'train': [(class, member)], 'test': [...]}."""
    # Strip a common root folder (one that is not itself a split name).
    while (
        all(len(p) >= 3 for p, _ in members)
        and len({p[0] for p, _ in members}) == 1
        and members[0][0][0].lower() not in SPLIT_NAMES
    ):
        members = [(p[1:], m) for p, m in members]
    if all(p[0].lower() in SPLIT_NAMES for p, _ in members):
        return _split_layout(members)
    bad = next((m for p, m in members if len(p) != 2), None)
    if bad is not None:
        raise DataError(
            f"Images must be laid out as <split>/<class>/<image> or <class>/<image>; found '{bad}'."
        )
    return _auto_split([(p[0], m) for p, m in members])


def _split_layout(members: list[tuple[list[str], str]]) -> dict[str, list[tuple[str, str]]]:
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for parts, member in members:
        if len(parts) != 3:
            raise DataError(f"Images must be laid out as <split>/<class>/<image>; found '{member}'.")
        splits[SPLIT_NAMES[parts[0].lower()]].append((parts[1], member))
    for split in ("train", "test"):
        if not splits[split]:
            raise DataError(f"The archive has no {split} images; add a '{split}/' folder.")
    return splits


def _auto_split(items: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Deterministic stratified 80/20 split: the same archive always gives the same split."""
    rng = np.random.default_rng(0)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for cls in sorted({c for c, _ in items}):
        members = sorted(m for c, m in items if c == cls)
        order = rng.permutation(len(members))
        n_test = int(round(0.2 * len(members))) if len(members) >= 2 else 0
        for rank, i in enumerate(order):
            splits["test" if rank < n_test else "train"].append((cls, members[i]))
    if not splits["test"]:
        raise DataError("The archive has too few images to make a test split; add a 'test/' folder.")
    return splits


def _read_image(zf: zipfile.ZipFile, member: str, img_size: int | None) -> np.ndarray:
    """Decode one member from memory to uint8 (H, W) or (H, W, 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(zf.read(member))) as im:
            # Image.open only reads the header: check the size before decoding (pixel bombs).
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise DataError(f"Image '{member}' is {im.width}x{im.height} pixels, larger than allowed.")
            out = im.convert("L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
            if img_size is not None:
                out = out.resize((img_size, img_size), Image.Resampling.BILINEAR)
            return np.asarray(out, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"Image '{member}' could not be decoded.") from exc


def _stack_images(train: list[np.ndarray], test: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack to uint8 NCHW; grayscale images become RGB when any image is in colour."""
    all_images = train + test
    shape = all_images[0].shape[:2]
    odd = next((i for i, im in enumerate(all_images) if im.shape[:2] != shape), None)
    if odd is not None:
        raise DataError(
            f"Images have different sizes ({all_images[odd].shape[1]}x{all_images[odd].shape[0]} "
            f"and {shape[1]}x{shape[0]}); pass img_size to resize them."
        )
    if shape[0] != shape[1]:
        raise DataError(f"Images are {shape[1]}x{shape[0]} but must be square; pass img_size to resize them.")
    rgb = any(im.ndim == 3 for im in all_images)

    def stack(images: list[np.ndarray]) -> np.ndarray:
        arr = np.stack([np.repeat(im[:, :, None], 3, 2) if rgb and im.ndim == 2 else im for im in images])
        return _to_float_nchw(arr if rgb else arr[:, :, :, None], "NHWC")

    return stack(train), stack(test)


# ----------------------------------------------------------------------------- dispatch


def load_dataset(kind: str, path: str | Path | None = None, **kw: Any) -> DataBundle:
    """Load a dataset by kind.

    Args:
        kind: ``digits`` | ``cifar10`` | ``cifar100`` | ``npz`` | ``image_folder_zip``.
        path: File for npz/zip; data root directory for CIFAR; unused for digits.
        **kw: Loader options: ``img_size``, ``max_files``, ``max_bytes`` for zips;
            ``max_bytes`` for npz; none for built-ins.

    Raises:
        UnknownNameError: unknown kind. DataError: missing path or an unknown option.
    """
    if kind not in DATASET_KINDS:
        raise UnknownNameError("dataset kind", kind, list(DATASET_KINDS))
    unknown = sorted(set(kw) - set(LOADER_OPTIONS.get(kind, ())))
    if unknown:
        raise DataError(f"Unknown option(s) for a '{kind}' dataset: {', '.join(unknown)}.")
    if kind in BUILTIN_DATASETS:
        return load_builtin(kind, path)
    if path is None:
        raise DataError(f"A file path is required to load a '{kind}' dataset.")
    return load_npz(path, **kw) if kind == "npz" else load_image_folder_zip(path, **kw)


# ----------------------------------------------------------------------------- batching


def batches(
    x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x, y) mini-batches of in-memory tensors; the last one may be smaller.

    Indexing whole batches at once avoids a DataLoader's per-sample Python work, which
    dominates for the small images this service trains on.
    """
    n = int(x.shape[0])
    if not shuffle:
        for start in range(0, n, batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    order = torch.randperm(n, generator=generator).to(x.device)
    for idx in order.split(batch_size):
        yield x[idx], y[idx]


def augment_batch(
    x: Tensor, generator: torch.Generator | None = None, pad: int = 4, hflip: bool = True
) -> Tensor:
    """Random crop with zero padding plus random horizontal flip, for a whole batch at once.

    One gather does both: each sample's row and column indices into the padded batch are
    offset by its crop position, and its column indices are reversed when it is flipped.

    Args:
        x: (N, C, H, W) batch.
        generator: CPU generator for reproducible augmentation.
        pad: Zero padding on each side; crops move by up to ``pad`` pixels.
        hflip: Flip each image left-right with probability 1/2.
    """
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(x.device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(x.device) if hflip else None
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if flips is not None:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    cols = offsets[1][:, None] + cols
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices separated by a slice put the broadcast (N, H, W) first, channels last.
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
