"""Which test points a report measures: a seeded, class-stratified sample (method.md §5).

Never "the first N": test splits are often sorted by class, and the first N points of a sorted
split hold one or two classes. The sample depends only on the labels of the test split, the seed
and the count, so every model of a dataset (teacher and student, this job and the next) is
measured on the same points, in every process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdiga_core.data import DataBundle, pixels


@dataclass(frozen=True)
class EvalPoints:
    """The sampled test points, in an order whose every prefix is itself stratified.

    Attributes:
        x: Pixels in [0, 1], (N, C, H, W). y: int64 labels (N,).
        index: Their rows in the test split. seed: The seed they were drawn with.
    """

    x: Tensor
    y: Tensor
    index: Tensor
    seed: int

    def __len__(self) -> int:
        return len(self.y)

    def __iter__(self) -> Iterator[Tensor]:
        """``x, y = points``: what `evaluation_points` returned before it said how it drew them."""
        return iter((self.x, self.y))

    def summary(self, num_classes: int, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """The report's ``points`` block: how they were drawn, and how many of each class."""
        counts = torch.bincount(self.y.cpu(), minlength=num_classes).tolist()
        names = list(class_names) if class_names else [str(c) for c in range(len(counts))]
        return {"method": "stratified", "seed": int(self.seed), "n": len(self),
                "per_class": {str(names[c]) if c < len(names) else str(c): int(k) for c, k in enumerate(counts)}}


def stratified_order(y: Tensor, seed: int) -> Tensor:
    """Every index of ``y``, ordered so that each prefix is a stratified sample.

    Round robin over the classes: each class's points in a seeded random order, the classes in a
    seeded random order within a round. Any prefix therefore has counts per class within one of
    each other, except for classes that have run out of points, whose share the others take.
    Deterministic across processes: a CPU generator seeded with ``seed`` draws everything.
    """
    gen = torch.Generator().manual_seed(int(seed))
    shuffled = torch.randperm(len(y), generator=gen)
    classes, inverse = torch.unique(y.cpu()[shuffled], return_inverse=True)
    slot = torch.randperm(len(classes), generator=gen)[inverse]
    return shuffled[torch.argsort(_rank_within_class(inverse) * len(classes) + slot)]


def _rank_within_class(labels: Tensor) -> Tensor:
    """For each entry, how many earlier entries share its class (0 for the first of each class)."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - starts[labels[order]]
    return rank


def evaluation_points(data: DataBundle, max_points: int, seed: int = 0) -> EvalPoints:
    """A seeded, class-stratified sample of at most ``max_points`` test points (`stratified_order`)."""
    index = stratified_order(data.y_test, seed)[:max_points]
    # pixels(): uint8 storage becomes floats; a dataset read in place decodes only these rows
    return EvalPoints(pixels(data.x_test[index]), data.y_test[index], index, int(seed))
