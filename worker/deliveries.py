"""The retry cap of validation tasks (issue 16.4): count each delivery on the row, end it past the cap.

A validation task is acknowledged late and rejected when its worker dies (worker.celery_app), so an
upload that kills the worker (a teacher that allocates more memory than the host has) would be
delivered forever. Each delivery of a row still `validating` adds one to its `attempts` before any
work starts; the delivery after the `validation_max_deliveries`-th marks it `invalid` with one
sentence instead of running it again, and the queue moves on.

Test hook (documented in docs/contracts.md, off unless set): `KDIGA_TEST_HOLD_VALIDATION=<name>`
makes the validation of an upload with exactly that name wait until its worker is killed, so the
chaos test (tests/e2e/test_validation_worker.py) can kill a worker mid-validation deterministically.
The service never sets it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from sqlalchemy import select, update

from kdiga_service import crud
from kdiga_service.models import VALIDATING, Dataset, Teacher
from kdiga_service.settings import Settings, get_settings
from worker.common import session_for

log = logging.getLogger(__name__)

HOLD_ENV = "KDIGA_TEST_HOLD_VALIDATION"


def cap_sentence(cap: int) -> str:
    return (f"The validation crashed the worker {cap} time{'s' if cap != 1 else ''} (the process was killed, "
            "for example out of memory), so it is not tried again; check the upload's size and format.")


def over_cap(model: Any, row_id: str, *, settings: Settings | None = None) -> bool:
    """Count this delivery; True when the row was over the cap and is now `invalid` (skip the work)."""
    s = settings or get_settings()
    with session_for(s) as session:
        counted = session.execute(
            update(model).where(model.id == row_id, model.status == VALIDATING).values(attempts=model.attempts + 1)
        )
        session.commit()
        if not crud.updated_one_row(counted):  # gone or no longer waiting: the validation itself skips it
            return False
        attempts, name = session.execute(select(model.attempts, model.name).where(model.id == row_id)).one()
        cap = s.validation_max_deliveries
        if attempts <= cap:
            _hold_for_test(name)
            return False
        sentence = cap_sentence(cap)
        if model is Teacher:
            crud.set_teacher_validated(session, row_id, error=sentence)
        elif model is Dataset:
            crud.set_dataset_validated(session, row_id, error=sentence)
    log.error("validation given up: it crashed its worker too often",
              extra={"id": row_id, "kind": model.__tablename__, "deliveries": attempts, "cap": cap})
    return True


def _hold_for_test(name: str) -> None:
    """The chaos test's hook: wait (until killed) when the upload's name is the one the test chose."""
    held = os.environ.get(HOLD_ENV)
    if held and name == held:
        log.warning("holding a validation for a test (%s)", HOLD_ENV, extra={"upload_name": name})
        while True:
            time.sleep(1)
