"""The streaming input pipeline for datasets read in place (image folders, WebDataset shards).

A job on a referenced dataset never holds the set in memory: a `torch.utils.data.DataLoader` with
worker processes reads, decodes and resizes/crops each image (`torchvision.transforms.v2`) as it is
needed, with pinned memory on CUDA and a bounded prefetch, so a job's peak host memory does not
grow with the dataset's size. Batches leave the loader as uint8 and become [0, 1] floats on the
device (`data.pixels`).

Augmentation presets (``TrainConfig.augmentation``), all ending at ``img_size`` x ``img_size``:

- ``none``: resize the short side to img_size, center crop (training = evaluation);
- ``cifar``: that, then a random crop with img_size//8 zero padding and a horizontal flip;
- ``imagenet``: RandomResizedCrop(img_size) + horizontal flip for training; resize to
  img_size/0.875 and center crop for evaluation.

On several devices (DDP ranks) an image folder is shared out by a `DistributedSampler`; WebDataset
shards are shared out whole, as webdataset's ``split_by_node``/``split_by_worker`` do: each epoch
the shards are shuffled by (seed, epoch), the same on every rank, rank r reads every world-th of
them from r and its loader workers share those out again, so every sample is read by one rank per
epoch. Shards may hold different numbers of samples, and a rank that ran out early would leave the
others waiting in a collective: every rank stops after the batches the poorest rank has in its
poorest epoch (`ReferenceData.rank_batches`, from the per-shard sizes validation recorded; the
rest of that epoch is left out, none when the shards are equal and their number divides by the
ranks). A set with fewer training shards than ranks is refused.

`ReferenceData` stands where a `DataBundle` stands for the rest of the library: ``y_test`` holds
the test split's labels (from the listing, or from the validated layout for shards), and
``x_test[index]`` decodes only the rows asked for, so the stratified evaluation points are drawn
from the labels alone.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Sampler, get_worker_info

from kdiga_core import distributed
from kdiga_core.data_ref import decode_rgb, list_image_folder, list_shards, open_root, shard_samples
from kdiga_core.errors import DataError

PRESETS: tuple[str, ...] = ("none", "cifar", "imagenet")
REFERENCE_KINDS: tuple[str, ...] = ("image_folder", "webdataset")
SHUFFLE_BUFFER = 2_000  # samples a shard reader shuffles among (bounded: memory stays flat)
MAX_LOADER_WORKERS = 8


def train_transform(preset: str, img_size: int, *, hflip: bool = True) -> Any:
    """The training transform of a preset: uint8 (3, H, W) of any size in, uint8 (3, S, S) out."""
    from torchvision.transforms import v2

    flip = [v2.RandomHorizontalFlip()] if hflip else []
    if preset == "imagenet":
        return v2.Compose([v2.RandomResizedCrop(img_size, antialias=True), *flip])
    if preset == "cifar":
        return v2.Compose([*_fit(img_size), v2.RandomCrop(img_size, padding=max(1, img_size // 8)), *flip])
    return eval_transform(preset, img_size)


def eval_transform(preset: str, img_size: int) -> Any:
    """The evaluation transform: resize (imagenet: to img_size/0.875) and center crop to img_size."""
    from torchvision.transforms import v2

    if preset == "imagenet":
        return v2.Compose([v2.Resize(round(img_size / 0.875), antialias=True), v2.CenterCrop(img_size)])
    return v2.Compose(_fit(img_size))


def _fit(img_size: int) -> list[Any]:
    from torchvision.transforms import v2

    return [v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)]


def _to_chw(raw: bytes) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(decode_rgb(raw))).permute(2, 0, 1)


def collate(samples: list[tuple[Tensor, int, int] | None]) -> tuple[Tensor, Tensor, Tensor] | None:
    """Stack (uint8 image, label, row) samples, skipping the ones that could not be decoded."""
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    return (torch.stack([s[0] for s in kept]), torch.tensor([s[1] for s in kept], dtype=torch.long),
            torch.tensor([s[2] for s in kept], dtype=torch.long))


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block with torch's global generator seeded by ``seed`` (None: as it is), then put its
    state back: the transforms.v2 presets draw from it, and seeding each image by (seed, epoch, row)
    makes its augmentation the same in any loader worker, also after a resume inside the epoch."""
    if seed is None:
        yield
        return
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed % (1 << 63))
    try:
        yield
    finally:
        gen.set_state(state)


class SkipSampler(Sampler[int]):
    """A sampler without its first ``skip`` indices: a run resumed inside an epoch draws the epoch's
    order again (the same generator draws) but never reads or decodes the batches it already trained on."""

    def __init__(self, inner: Sampler[int], skip: int):
        self.inner, self.skip = inner, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)  # type: ignore[arg-type]


class _ProcessFs:
    """The filesystem, opened again in each process: an async one (s3fs) is not fork-safe, and
    fsspec gives a forked loader worker a fresh instance."""

    def __init__(self, uri: str, storage_options: dict[str, Any]):
        self.uri, self.storage_options = uri, storage_options
        self._fs: Any = None
        self._pid = -1

    @property
    def fs(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._pid = open_root(self.uri, self.storage_options)[0], os.getpid()
        return self._fs


class FolderImages(_ProcessFs, Dataset):
    """Map-style dataset over listed files: each item is read and decoded in the loader's workers."""

    def __init__(self, source: tuple[str, dict[str, Any]], items: list[tuple[str, int]], transform: Any,
                 seed: int | None = None):
        super().__init__(*source)
        self.seed = seed  # of this epoch's random transforms (None: the process's generator, as it is)
        # two flat arrays, not a list of tuples: a few bytes per file, and forked loader workers share
        # them (no per-object reference counts to write, so no copy-on-write copies)
        self.paths = np.array([p.encode("utf-8") for p, _ in items], dtype=np.bytes_)
        self.labels = np.array([y for _, y in items], dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int] | None:
        path, label = self.paths[i].decode("utf-8"), int(self.labels[i])
        try:
            image = _to_chw(bytes(self.fs.cat_file(path)))
            with seeded(None if self.seed is None else self.seed * 1_000_003 + i):
                return self.transform(image), label, i
        except (DataError, OSError):  # a file corrupted (or removed) since validation is skipped
            return None


def epoch_shards(shards: list[str], *, seed: int, epoch: int, shuffle: bool = True) -> list[str]:
    """The epoch's shard order, a pure function of (seed, epoch): the same on every rank and in every worker."""
    order = list(shards)
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def split_shards(order: list[str], *, rank: int, world: int, worker: int, workers: int) -> list[str]:
    """One reader's shards: every world-th from its rank, then every workers-th of those from its
    worker (webdataset's ``split_by_node`` then ``split_by_worker``, with the rank given, not read
    from the environment), so the readers of an epoch share the shards out without overlap."""
    return order[rank::world][worker::max(1, workers)]


def shard_batches(sizes: list[int], *, batch_size: int, workers: int) -> int:
    """Batches a DataLoader makes of one rank's shards (``sizes``: their samples, in the epoch's order)
    split over ``workers`` (0: read in the loader's process): each worker batches its own samples,
    so each worker's last batch may be short."""
    k = max(1, workers)
    return sum(math.ceil(sum(sizes[w::k]) / batch_size) for w in range(k))


class ShardStream(_ProcessFs, IterableDataset):
    """Iterable over tar shards: each loader worker (of each rank) reads its own shards, shuffling in
    a bounded buffer."""

    def __init__(self, source: tuple[str, dict[str, Any]], shards: list[str], transform: Any, *, seed: int,
                 epoch: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        super().__init__(*source)
        self.shards, self.transform = shards, transform
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.rank, self.world = rank, world
        self._count = 0  # items this worker has yielded, from a base of (seed, epoch, worker): their transform seeds

    def __iter__(self) -> Iterator[tuple[Tensor, int, int] | None]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = (self.seed * 1_000_003 + self.epoch) * 64 + wid + (self.rank << 48)  # rank 0: as on one device
        rng = random.Random(stream)
        order = epoch_shards(self.shards, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        buffer: list[Any] = []
        self._count = stream * 1_000_003  # each item's transform seed
        for path in split_shards(order, rank=self.rank, world=self.world, worker=wid, workers=workers):
            for sample in shard_samples(self.fs, path):
                if sample.image is None or sample.label is None:  # what `train_shard_sizes` leaves out
                    continue
                buffer.append(sample)
                if len(buffer) >= (SHUFFLE_BUFFER if self.shuffle else 1):
                    yield self._item(buffer.pop(rng.randrange(len(buffer)) if self.shuffle else 0))
        rng.shuffle(buffer)
        yield from (self._item(s) for s in buffer)

    def _item(self, sample: Any) -> tuple[Tensor, int, int] | None:
        self._count += 1
        try:
            image = _to_chw(sample.image)
            with seeded(self._count):
                return self.transform(image), int(sample.label), -1
        except DataError:
            return None


def start_loader(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)``, also inside a daemonic process (a Celery prefork pool process).

    Python refuses children to daemonic processes because they could outlive it; a DataLoader's
    workers cannot: each watches its parent and exits when it is gone. So the flag is lifted
    while the workers start, and put back.
    """
    import multiprocessing

    me = multiprocessing.current_process()
    daemon = me._config.get("daemon")  # type: ignore[attr-defined]
    if not daemon or not loader.num_workers:
        return iter(loader)
    me._config["daemon"] = False  # type: ignore[attr-defined]
    try:
        return iter(loader)
    finally:
        me._config["daemon"] = daemon  # type: ignore[attr-defined]


def loader_workers(requested: int | None) -> int:
    """Loader processes: as asked, else one per core this process may use but one, at most 8."""
    if requested is not None:
        return int(requested)
    return max(0, min(MAX_LOADER_WORKERS, len(os.sched_getaffinity(0)) - 1))


class _LazyImages:
    """``x_test``: indexing decodes (with the evaluation transform) only the rows asked for."""

    def __init__(self, owner: ReferenceData):
        self.owner = owner

    def __getitem__(self, index: Tensor | list[int]) -> Tensor:
        rows = [int(i) for i in (index.tolist() if isinstance(index, Tensor) else index)]
        return self.owner.test_images(rows)

    def __len__(self) -> int:
        return len(self.owner.y_test)


@dataclass
class ReferenceData:
    """A dataset read in place, at ``img_size`` with an augmentation preset (see the module doc).

    Has what the library reads of a `DataBundle`: name, num_classes, class_names, in_chans,
    img_size, x_test (lazy), y_test, summary(); training reads `train_loader`.
    """

    name: str
    kind: str
    uri: str
    img_size: int
    num_classes: int
    class_names: tuple[str, ...]
    layout: dict[str, Any]
    storage_options: dict[str, Any] = field(default_factory=dict)
    preset: str = "none"
    in_chans: int = 3
    streaming: bool = True

    def __post_init__(self) -> None:
        self.fs, self.root = open_root(self.uri, self.storage_options)
        self._source = (self.uri, self.storage_options)  # loader workers open their own filesystem
        corrupt = set((self.layout.get("corrupt") or {}).get("files") or [])
        if self.kind == "image_folder":
            listing = list_image_folder(self.fs, self.root, list(self.class_names))
            self.files = {s: [(p, y) for p, y in items if self._rel(p) not in corrupt]
                          for s, items in listing.files.items()}
            self.y_test = torch.tensor([y for _, y in self.files["test"]], dtype=torch.long)
        else:
            self.shards = list_shards(self.fs, self.root)
            labels = self.layout.get("test_labels") or {}
            self._test_rows = [(rel, pos, y) for rel in sorted(labels) for pos, y in enumerate(labels[rel]) if y >= 0]
            self.y_test = torch.tensor([y for _, _, y in self._test_rows], dtype=torch.long)
        self.x_test = _LazyImages(self)
        self._decoded: dict[tuple[int, ...], Tensor] = {}

    def _rel(self, path: str) -> str:
        return path[len(self.root):].lstrip("/")

    @property
    def train_size(self) -> int:
        if self.kind == "image_folder":
            return len(self.files["train"])
        return int(sum((self.layout.get("splits") or {}).get("train", {}).values()))

    def summary(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "class_names": list(self.class_names),
                "input_shape": [self.in_chans, self.img_size, self.img_size], "train_size": self.train_size,
                "test_size": len(self.y_test), "streamed": True}

    def test_images(self, rows: list[int]) -> Tensor:
        """Float [0, 1] pixels of these test rows, decoded with the evaluation transform."""
        key = tuple(rows)
        if key not in self._decoded:
            transform = eval_transform(self.preset, self.img_size)
            if self.kind == "image_folder":
                images = [self._folder_image(self.files["test"][r][0], transform) for r in rows]
            else:
                images = self._shard_images(rows, transform)
            self._decoded = {key: torch.stack(images).float().div_(255.0)}  # keep the last set only
        return self._decoded[key]

    def _folder_image(self, path: str, transform: Any) -> Tensor:
        try:
            return transform(_to_chw(bytes(self.fs.cat_file(path))))
        except (DataError, OSError) as exc:
            raise DataError(f"The test image '{self._rel(path)}' could not be read.") from exc

    def _shard_images(self, rows: list[int], transform: Any) -> list[Tensor]:
        """One pass over the test shards that hold the rows, decoding only those samples."""
        wanted: dict[tuple[str, int], list[int]] = {}
        for i, r in enumerate(rows):
            rel, pos, _ = self._test_rows[r]
            wanted.setdefault((rel, pos), []).append(i)
        out: list[Tensor | None] = [None] * len(rows)
        for rel in sorted({rel for rel, _ in wanted}):
            for pos, sample in enumerate(shard_samples(self.fs, f"{self.root}/{rel}")):
                for i in wanted.get((rel, pos), []):
                    out[i] = transform(_to_chw(sample.image or b""))
        if any(o is None for o in out):
            raise DataError("The test shards changed since the dataset was validated; validate it again.")
        return [o for o in out if o is not None]

    def train_loader(self, *, epoch: int, seed: int, batch_size: int, workers: int, pin: bool, hflip: bool = True,
                     ctx: distributed.RankContext | None = None, skip_batches: int = 0) -> DataLoader:
        """This epoch's training batches of (uint8 images, labels, rows) in a fresh order of (seed, epoch).

        Several ranks: an image folder's `DistributedSampler` gives each rank its part of the files;
        shards are shared out whole (`split_shards`), each rank reading its own, and the caller stops
        every rank after `rank_batches` (the fewest any rank has).

        ``skip_batches``: the epoch's first batches left out (an image folder: their indices are skipped
        in the sampler, never read; shards have no index to skip: refused, the caller reads past them).
        """
        transform = train_transform(self.preset, self.img_size, hflip=hflip)
        ctx = ctx or distributed.context()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # the order; workers' seeds too
        if self.kind == "webdataset" and ctx.distributed:
            workers = self.rank_workers(workers, ctx)
        kw: dict[str, Any] = {"batch_size": batch_size, "num_workers": workers, "pin_memory": pin,
                              "collate_fn": collate, "generator": gen}
        if workers:
            kw.update(prefetch_factor=2, persistent_workers=False)
        if self.kind == "image_folder":
            dataset = FolderImages(self._source, self.files["train"], transform, seed=seed * 1_000_003 + epoch)
            shard = distributed.sampler(dataset, seed=seed, ctx=ctx)
            if shard is not None:
                shard.set_epoch(epoch)
            order: Sampler[int] = shard or RandomSampler(dataset, generator=gen)
            return DataLoader(dataset, sampler=SkipSampler(order, skip_batches * batch_size) if skip_batches else order,
                              **kw)
        if skip_batches:
            raise DataError("WebDataset shards cannot skip batches; read past them.")
        return DataLoader(ShardStream(self._source, self.shards["train"], transform, seed=seed, epoch=epoch,
                                      rank=ctx.rank, world=ctx.world_size), **kw)

    def rank_workers(self, workers: int, ctx: distributed.RankContext) -> int:
        """Shards, several ranks: loader workers for this rank, at most one per shard it reads (the
        same shards every epoch: only their order changes), so none starts with nothing to read."""
        total = len(self.shards["train"])
        if total < ctx.world_size:
            raise DataError(f"The dataset has {total} training shard{'s' if total != 1 else ''}, fewer than the "
                            f"job's {ctx.world_size} devices; each device reads whole shards, so use at most "
                            f"{total} or split the set into more shards.")
        return min(workers, len(range(ctx.rank, total, ctx.world_size)))

    def rank_batches(self, *, epoch: int, seed: int, batch_size: int, workers: int,
                     ctx: distributed.RankContext) -> int:
        """Shards: the loader batches this rank's `train_loader` gives in ``epoch``, from the samples per
        shard that validation recorded (``layout.train_shard_sizes``); no shard is read."""
        workers = self.rank_workers(workers, ctx)
        sizes = self.layout.get("train_shard_sizes")
        if sizes is None:
            raise DataError("This WebDataset reference was validated before its shard sizes were recorded; "
                            "register it again to train on several devices.")
        order = epoch_shards(self.shards["train"], seed=seed, epoch=epoch)
        mine = split_shards(order, rank=ctx.rank, world=ctx.world_size, worker=0, workers=1)
        try:
            counts = [int(sizes[self._rel(path)]) for path in mine]
        except KeyError as exc:
            raise DataError("The training shards changed since the dataset was validated; "
                            "register it again.") from exc
        return shard_batches(counts, batch_size=batch_size, workers=workers)


def open_reference(dataset: dict[str, Any], *, img_size: int, preset: str) -> ReferenceData:
    """`ReferenceData` for a validated reference (``dataset`` as `worker.inputs.reference_input` gives it)."""
    layout = dict(dataset.get("layout") or {})
    splits = layout.get("splits") or {}
    names = list((splits.get("train") or {}).keys())
    names = dataset.get("class_names") or layout.get("class_names") or names
    if preset not in PRESETS:
        raise DataError(f"Unknown augmentation preset '{preset}'; use one of: {', '.join(PRESETS)}.")
    return ReferenceData(name=str(dataset.get("name") or dataset["uri"].rsplit("/", 1)[-1]), kind=dataset["kind"],
                         uri=dataset["uri"], img_size=int(img_size), num_classes=len(names),
                         class_names=tuple(names), layout=layout,
                         storage_options=dict(dataset.get("storage_options") or {}), preset=preset)
