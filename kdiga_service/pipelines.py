"""Pipelines: what to do next, given the steps' plan and their jobs' states (pure functions).

A pipeline's `spec["steps"]` is a list in dependency order (a step refers only to earlier ones),
each `{"name", "kind", "job_id", "depends_on": [names], "queue", "spec", "dataset_id",
"teacher_id", "labels", "job_name"}`, planned and validated by the API when the pipeline was
created. Ids a step refers to are known then already, because they are derived: a step's job id
from (pipeline, step), the teacher an adversarial_train job makes from its job id
(`produced_teacher_id`). crud calls `next_moves` in the transaction of every state change of a
pipeline's job, with the pipeline row locked, and creates the steps it returns: so a step is
created exactly once, when its inputs are ready, whichever process finishes the last input.

Semantics (as in Airflow): a step whose input failed or was cancelled is skipped; independent steps
go on; the pipeline ends when no step is active or can start: failed if a step failed, cancelled if
one was cancelled (or the pipeline was), succeeded otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kdiga_service.models import ACTIVE_STATES, CANCELLED, FAILED, QUEUED, STOPPED, SUCCEEDED, derived_id

WAITING, READY_TO_CREATE, SKIPPED = "waiting", "ready", "skipped"


def step_job_id(pipeline_id: str, step_name: str) -> str:
    """The id the job of a pipeline's step will have."""
    return derived_id("pipeline-step", pipeline_id, step_name)


def produced_teacher_id(job_id: str) -> str:
    """The id of the teacher an adversarial_train job registers when it succeeds (worker/outputs.py)."""
    return derived_id("teacher", job_id)


@dataclass
class Moves:
    """What a state change leads to: steps to create now, and the pipeline's end (if it ended)."""

    create: list[Mapping[str, Any]] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)
    final_status: str | None = None
    error: str | None = None


def step_states(steps: Sequence[Mapping[str, Any]], job_states: Mapping[str, str], *,
                cancel_requested: bool) -> dict[str, str]:
    """Each step's state: its job's status, or `waiting` / `ready` / `skipped` before it has a job."""
    states: dict[str, str] = {}
    for step in steps:
        name = step["name"]
        if name in job_states:
            states[name] = job_states[name]
            continue
        inputs = [states[d] for d in step.get("depends_on") or []]
        if cancel_requested or any(s in (FAILED, CANCELLED, SKIPPED) for s in inputs):
            states[name] = SKIPPED
        elif all(s == SUCCEEDED for s in inputs):
            states[name] = READY_TO_CREATE
        else:
            states[name] = WAITING
    return states


def next_moves(steps: Sequence[Mapping[str, Any]], job_states: Mapping[str, str],
               job_errors: Mapping[str, str | None], *, cancel_requested: bool) -> Moves:
    """The steps to create now and, when nothing is left to run, the pipeline's final status."""
    states = step_states(steps, job_states, cancel_requested=cancel_requested)
    create = [s for s in steps if states[s["name"]] == READY_TO_CREATE]
    moves = Moves(create=create, states={k: (QUEUED if v == READY_TO_CREATE else v) for k, v in states.items()})
    # a stopped step can be resumed: the pipeline waits for it (unless the pipeline is being cancelled)
    waits = (WAITING,) if cancel_requested else (WAITING, STOPPED)
    if create or any(v in ACTIVE_STATES or v in waits for v in states.values()):
        return moves
    failed = [n for n, v in states.items() if v == FAILED]
    if failed:
        why = (job_errors.get(failed[0]) or "no reason recorded").rstrip(".")
        moves.final_status, moves.error = FAILED, f"Step '{failed[0]}' failed: {why}."
    elif cancel_requested or any(v == CANCELLED for v in states.values()):
        moves.final_status = CANCELLED
    else:
        moves.final_status = SUCCEEDED
    return moves


def progress_percent(steps: Sequence[Mapping[str, Any]], percents: Mapping[str, float],
                     states: Mapping[str, str]) -> float:
    """The pipeline's percent: the mean over steps (a finished or skipped step counts as done)."""
    if not steps:
        return 100.0
    total = 0.0
    for step in steps:
        state = states.get(step["name"], WAITING)
        if state in (SUCCEEDED, FAILED, CANCELLED, SKIPPED):
            total += 100.0
        else:
            total += float(percents.get(step["name"]) or 0.0)
    return round(total / len(steps), 1)
