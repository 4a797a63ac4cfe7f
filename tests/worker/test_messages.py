"""Errors stored on rows carry neither server paths nor raw exception text (issue 16.7); the log keeps
both with the id. Real failures: a missing built-in, a teacher file gone from the store, an allocation
torch refuses."""

from __future__ import annotations

import logging

import kdiga_svc_helpers as h
import pytest
import torch

from kdiga_service.db import get_sessionmaker
from kdiga_service.models import READY, Dataset, Teacher
from kdiga_service.storage import get_storage
from worker import runner, validation
from worker.common import internal_failure


def _assert_clean(error: str, *secrets: str) -> None:
    assert error and error.endswith("."), error
    for secret in secrets:
        assert secret not in error, error


def test_a_missing_builtin_names_no_server_path(settings, seeded, tmp_path):
    settings.data_dir = tmp_path / "secret-data-folder"
    with get_sessionmaker(settings)() as session:
        dataset = Dataset(owner_id=seeded["owner_id"], name="cifar", kind="builtin", builtin="cifar10",
                          status=READY, num_classes=10, input_shape=[3, 32, 32])
        session.add(dataset)
        session.commit()
        dataset_id = dataset.id
    job_id = h.create_job_row(settings, seeded["owner_id"], h.tiny_job_request(dataset_id, seeded["teacher_id"]))
    outcome = runner.run_job(job_id, settings=settings)
    row = h.job_row(settings, job_id)
    assert outcome.status == row.status == "failed"
    _assert_clean(row.error, str(tmp_path), "secret-data-folder")
    assert "<server path>" in row.error


def test_an_internal_error_stores_its_type_and_the_job_id_not_its_text(settings, seeded, caplog):
    with get_sessionmaker(settings)() as session:
        key = session.get(Teacher, seeded["teacher_id"]).storage_key
    store = get_storage(settings)
    store.delete(key)  # the teacher's file vanished from the store: not the user's doing
    job_id = h.create_job_row(settings, seeded["owner_id"],
                              h.tiny_job_request(seeded["dataset_id"], seeded["teacher_id"]))
    caplog.set_level(logging.ERROR)
    runner.run_job(job_id, settings=settings)
    row = h.job_row(settings, job_id)
    assert row.status == "failed"
    _assert_clean(row.error, str(settings.home), key)
    assert "internal error (StorageError)" in row.error and job_id in row.error
    assert any(getattr(r, "job_id", None) == job_id and r.exc_info for r in caplog.records)  # the log has it all


def test_a_teacher_that_cannot_be_read_is_invalid_without_paths(settings, seeded):
    with get_sessionmaker(settings)() as session:
        teacher = session.get(Teacher, seeded["teacher_id"])
        teacher.status, key = "validating", teacher.storage_key
        session.commit()
    get_storage(settings).delete(key)
    outcome = validation.validate_teacher(seeded["teacher_id"], settings=settings)
    with get_sessionmaker(settings)() as session:
        error = session.get(Teacher, seeded["teacher_id"]).error
    assert outcome.status == "failed"
    _assert_clean(error, str(settings.home), key)
    assert "could not be loaded (StorageError)" in error and seeded["teacher_id"] in error


def test_an_allocation_torch_refuses_reads_as_out_of_memory():
    with pytest.raises(RuntimeError) as caught:
        torch.empty(4_000_000_000_000, dtype=torch.uint8)
    sentence = internal_failure(caught.value, "job-1")
    assert "ran out of memory" in sentence and "job-1" in sentence
    assert "4000000000000" not in sentence and "allocate" not in sentence


def test_a_generic_error_keeps_its_text_out():
    sentence = internal_failure(FileNotFoundError(2, "No such file", "/srv/kdiga/tenant-a/x.bin"), "abc")
    assert sentence == ("The job failed with an internal error (FileNotFoundError); the service log has the "
                        "details under id abc.")
