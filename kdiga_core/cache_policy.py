"""Whether a job caches its teacher's outputs, and what that costs (issue 11, item 5).

A cache holds, for every training row, the teacher's logits and (for IGA) its input gradient, in
16-bit floats in host memory (fp16 logits, bf16 gradients): ``rows × (classes + C·H·W [with
gradients]) × 2`` bytes. It only helps when
the same inputs come back every epoch (augmentation ``none``) and only where they are in memory;
it is built when it fits the budget (``KDIGA_TEACHER_CACHE_BUDGET_BYTES``). On a dataset read in
place only when ``train.cache_teacher`` is true (an image folder on one device: one streamed pass).
The estimate and the decision go to the job's log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kdiga_core.config import ObjectiveConfig, TrainConfig
from kdiga_core.objectives import TEACHER_METHODS

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 2 * 1024**3
BYTES_PER_VALUE = 2  # fp16 / bf16


@dataclass(frozen=True)
class CachePlan:
    """The decision: ``use`` it or not, the estimated bytes, and one sentence saying why."""

    use: bool
    estimate_bytes: int
    reason: str


def estimate_bytes(rows: int, num_classes: int, input_numel: int, *, with_grads: bool) -> int:
    """Host bytes a 16-bit cache of ``rows`` takes."""
    return rows * (num_classes + (input_numel if with_grads else 0)) * BYTES_PER_VALUE


def plan(objective: Any, obj_cfg: ObjectiveConfig, cfg: TrainConfig, source: Any, *,
         budget_bytes: int | None) -> CachePlan:
    """Decide for one training run (``source``: `batches.batch_source`); logs the estimate and the reason."""
    if objective.teacher is None or obj_cfg.method not in TEACHER_METHODS:
        return CachePlan(False, 0, "no teacher outputs to cache")
    with_grads = bool(objective.needs_teacher_grads())
    need = estimate_bytes(source.n, source.num_classes, source.row_numel, with_grads=with_grads)
    budget = DEFAULT_BUDGET_BYTES if budget_bytes is None else int(budget_bytes)
    mib = f"{need / 2**20:.1f} MiB"
    if cfg.cache_teacher is False:
        decision = CachePlan(False, need, f"off (train.cache_teacher is false); it would take {mib}")
    elif cfg.preset != "none":
        decision = CachePlan(False, need, f"off: augmentation '{cfg.preset}' changes the inputs every epoch")
    elif source.streaming and not cfg.cache_teacher:
        decision = CachePlan(False, need, "off on a dataset read in place (train.cache_teacher: true asks for it); "
                                          "the teacher runs per batch")
    elif not source.cacheable:
        decision = CachePlan(False, need, "off: this dataset's loader does not give rows back (webdataset shards, "
                                          "several devices); the teacher runs per batch")
    elif need > budget:
        decision = CachePlan(False, need, f"off: it would take {mib}, more than the budget of "
                                          f"{budget / 2**20:.1f} MiB (KDIGA_TEACHER_CACHE_BUDGET_BYTES)")
    else:
        decision = CachePlan(True, need, f"on: {mib} of host memory (16-bit, {source.n} rows"
                                         f"{', logits + input gradients' if with_grads else ', logits'})")
    log.info("teacher cache %s", decision.reason)
    return decision
