"""A pipeline's next moves when one of its steps is `stopped` (its time budget spent, resumable)."""

from __future__ import annotations

from kdiga_service.pipelines import WAITING, next_moves

STEPS = [{"name": "teacher"}, {"name": "student", "depends_on": ["teacher"]}]


def test_a_stopped_step_keeps_the_pipeline_waiting_for_its_resume():
    moves = next_moves(STEPS, {"teacher": "stopped"}, {"teacher": "The job reached its time budget."},
                       cancel_requested=False)
    assert moves.final_status is None and moves.create == []
    assert moves.states == {"teacher": "stopped", "student": WAITING}


def test_once_resumed_and_succeeded_the_next_step_is_created():
    moves = next_moves(STEPS, {"teacher": "succeeded"}, {}, cancel_requested=False)
    assert [s["name"] for s in moves.create] == ["student"] and moves.final_status is None


def test_a_cancelled_pipeline_does_not_wait_for_a_stopped_step():
    moves = next_moves(STEPS, {"teacher": "stopped"}, {}, cancel_requested=True)
    assert moves.final_status == "cancelled"
