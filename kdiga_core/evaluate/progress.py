"""Progress of one evaluation: one percent and ETA over stages weighted by their expected cost.

`evaluate` plans its stages up front (label → expected cost and points, see `plan`), then each
measurement reports the points it has finished through a `Ticker`. Percent is the planned cost
done over the planned total, so it moves roughly linearly in time whatever the stage; the ETA
is elapsed time over the fraction done. A stage is re-weighed when it starts on fewer points than
planned (AutoAttack's later attacks run on survivors only); only stages with nothing done yet
shrink, so percent never goes back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

Progress = Callable[[dict[str, Any]], None]

PART_NAMES = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square"}


class Ticker(Protocol):
    """What a measurement calls after each batch: points done and total of the current stage.

    ``part`` names a sub-stage (an attack of AutoAttack, a radius of the ε-curve); a new part
    starts a new stage labelled ``"<stage> (<part>)"``.
    """

    def __call__(self, done: int, total: int, part: str | None = None) -> None: ...


StageFn = Callable[[str], Ticker]  # a stage label -> the ticker of that stage


class Cost(Protocol):
    """A stage's expected cost (`plan.StageCost`)."""

    points: int

    def seconds(self, points: int | None = None) -> float: ...


def stage_label(label: str, part: str | None) -> str:
    """``"student: autoattack (APGD-T)"`` for part ``apgd-t`` of stage ``"student: autoattack"``."""
    return label if part is None else f"{label} ({PART_NAMES.get(part, part)})"


def silent_stage(_label: str) -> Ticker:
    """A `StageFn` for measurements run outside a report: their ticks go nowhere."""
    return lambda done, total, part=None: None  # noqa: ARG005 - the progress signature


class Tracker:
    """Turns stages and ticks into ``on_progress`` dicts (docs/contracts.md, the on_step section).

    Args:
        on_progress: Receives ``{"phase": "evaluate", "stage", "percent", "eta_s", "points_done",
            "points_total"}``; may be called often (callers throttle). None: nothing is reported.
        plan: Stage label → its expected cost (`plan.StageCost`, anything with ``points`` and
            ``seconds(points=None)``); stages with parts are planned per part (`stage_label`).
    """

    def __init__(self, on_progress: Progress | None, plan: Mapping[str, Cost]):
        self.on_progress, self.plan = on_progress, dict(plan)
        self.total = sum(cost.seconds() for cost in self.plan.values()) or 1.0
        self.done = 0.0  # cost of the finished stages
        self.cost: Cost | None = None  # of the current stage
        self.label, self.weight, self.points, self.fraction = "", 0.0, 0, 0.0
        self.percent, self.started = 0.0, time.perf_counter()

    def stage(self, label: str) -> Ticker:
        """Start the stage ``label``; return the ticker its measurement reports to."""
        self._enter(label)
        self._emit(0, self.points)

        def tick(done: int, total: int, part: str | None = None) -> None:
            if part is not None and self.label != stage_label(label, part):
                self._enter(stage_label(label, part))
            if self.fraction == 0.0:
                self._resize(total)
            self.fraction = min(1.0, done / total) if total else 1.0
            self._emit(done, total)

        return tick

    def skip(self, labels: Iterable[str], label: str) -> None:
        """Drop the planned stages ``labels`` (they will not run) and say why, as stage ``label``."""
        for key in labels:
            cost = self.plan.pop(key, None)
            self.total -= cost.seconds() if cost is not None else 0.0
        self.stage(label)

    def finish(self, points: int) -> None:
        """The evaluation is over: 100%, no time left."""
        self.done, self.weight, self.fraction, self.label = self.total, 0.0, 0.0, "done"
        self._emit(points, points)

    def _enter(self, label: str) -> None:
        self.done += self.weight  # the stage before is over
        self.cost = self.plan.pop(label, None)
        self.weight = self.cost.seconds() if self.cost is not None else 0.0
        self.points = self.cost.points if self.cost is not None else 0
        self.label, self.fraction = label, 0.0

    def _resize(self, points: int) -> None:
        """Fewer points than planned, before any is done: the stage is priced again, lower."""
        if self.cost is not None and 0 <= points < self.points:
            smaller = min(self.cost.seconds(points), self.weight)
            self.total -= self.weight - smaller
            self.weight, self.points = smaller, points

    def _emit(self, done: int, total: int) -> None:
        fraction = min(1.0, (self.done + self.fraction * self.weight) / max(self.total, 1e-12))
        self.percent = max(self.percent, round(100.0 * fraction, 2))
        if self.on_progress is not None:
            self.on_progress({"phase": "evaluate", "stage": self.label, "percent": self.percent,
                              "eta_s": self._eta(fraction), "points_done": int(done), "points_total": int(total)})

    def _eta(self, fraction: float) -> float | None:
        if fraction <= 0.0:
            return None
        return round((time.perf_counter() - self.started) * (1.0 - fraction) / fraction, 1)
