"""The validation delivery cap on the row (the SIGKILL chaos test is tests/e2e/test_validation_worker.py)."""

from __future__ import annotations

from kdiga_service.db import get_sessionmaker
from kdiga_service.models import Dataset, Teacher
from worker import validation
from worker.deliveries import cap_sentence, over_cap


def _validating(settings, model, row_id):
    with get_sessionmaker(settings)() as session:
        row = session.get(model, row_id)
        row.status, row.attempts = "validating", 0
        session.commit()


def _row(settings, model, row_id):
    with get_sessionmaker(settings)() as session:
        row = session.get(model, row_id)
        session.expunge(row)
        return row


def test_a_dataset_delivered_past_the_cap_ends_invalid_with_the_sentence(settings, seeded):
    settings.validation_max_deliveries = 2
    _validating(settings, Dataset, seeded["dataset_id"])
    assert [over_cap(Dataset, seeded["dataset_id"], settings=settings) for _ in range(3)] == [False, False, True]
    row = _row(settings, Dataset, seeded["dataset_id"])
    assert row.status == "invalid" and row.error == cap_sentence(2) and row.attempts == 3
    assert "2 times" in row.error
    assert over_cap(Dataset, seeded["dataset_id"], settings=settings) is False  # no longer waiting: not counted
    assert _row(settings, Dataset, seeded["dataset_id"]).attempts == 3


def test_a_delivery_within_the_cap_validates_as_usual(settings, seeded):
    _validating(settings, Teacher, seeded["teacher_id"])
    assert over_cap(Teacher, seeded["teacher_id"], settings=settings) is False
    assert validation.validate_teacher(seeded["teacher_id"], settings=settings).status == "succeeded"
    row = _row(settings, Teacher, seeded["teacher_id"])
    assert row.status == "ready" and row.attempts == 1
