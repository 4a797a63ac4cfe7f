"""Generated datasets for the reference tests: an image folder of mixed-size PNGs and WebDataset shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "stripes")


def _image(label: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A class-shaped picture (so a model can learn it) of ``size`` = (w, h), with noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    if label == 0:
        mask = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 3) ** 2
    elif label == 1:
        mask = (abs(xx - w / 2) < w / 4) & (abs(yy - h / 2) < h / 4)
    else:
        mask = (xx // max(1, w // 8)) % 2 == 0
    img = np.zeros((h, w, 3), np.float32) + rng.uniform(0, 0.3, (h, w, 3))
    img[mask] += np.array([0.7, 0.3 + 0.2 * label, 0.2])
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def png_bytes(label: int, size: tuple[int, int], rng: np.random.Generator) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(_image(label, size, rng)).save(out, format="PNG")
    return out.getvalue()


SIZES = ((40, 40), (48, 36), (33, 50), (64, 64))


def write_image_folder(root: Path, *, per_class: tuple[int, int] = (24, 8), seed: int = 0,
                       corrupt: int = 0) -> Path:
    """``train/<class>/*.png`` and ``val/<class>/*.png`` of mixed sizes; ``corrupt`` bad files in train."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class, strict=True):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i:04d}.png").write_bytes(png_bytes(label, SIZES[i % len(SIZES)], rng))
    for i in range(corrupt):
        (root / "train" / CLASSES[0] / f"bad{i}.png").write_bytes(b"not a png at all")
    return root


def shard_bytes(samples: list[tuple[str, bytes, int]]) -> bytes:
    """A tar shard of ``<key>.png`` + ``<key>.cls`` members."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for key, image, label in samples:
            for suffix, data in (("png", image), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def webdataset_shards(*, per_class: tuple[int, int] = (24, 8), shards: int = 2, seed: int = 0) -> dict[str, bytes]:
    """{relative path: shard bytes} for train/ and val/, plus classes.txt."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {"classes.txt": "\n".join(CLASSES).encode()}
    for split, n in zip(("train", "val"), per_class, strict=True):
        samples = [(f"{split}{label}_{i:04d}", png_bytes(label, SIZES[i % len(SIZES)], rng), label)
                   for i in range(n) for label in range(len(CLASSES))]
        for k in range(shards):
            files[f"{split}/{split}-{k:06d}.tar"] = shard_bytes(samples[k::shards])
    return files


def write_shards(root: Path, sizes: list[int], *, test: int = 6, seed: int = 0, size: tuple[int, int] = (16, 16)) -> Path:
    """``train/train-<k>.tar`` holding ``sizes[k]`` samples each (any sizes: uneven shards), one
    ``val/`` shard of ``test`` samples, and classes.txt; every image distinct (its noise is drawn)."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "val").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES))
    for k, n in enumerate(sizes):
        samples = [(f"s{k}_{i:04d}", png_bytes(i % 3, size, rng), i % 3) for i in range(n)]
        (root / "train" / f"train-{k:06d}.tar").write_bytes(shard_bytes(samples))
    samples = [(f"v{i:04d}", png_bytes(i % 3, size, rng), i % 3) for i in range(test)]
    (root / "val" / "val-000000.tar").write_bytes(shard_bytes(samples))
    return root
