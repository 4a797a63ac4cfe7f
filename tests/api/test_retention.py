"""The retention sweep deletes checkpoints of ended jobs once their period ran out, on a local store and
on S3 (a moto server), on both database backends; active and recent jobs keep theirs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from api_helpers import new_key
from test_storage import s3_endpoint, s3_settings  # noqa: F401 - the module-scoped moto fixture

from api.sweeper import Retention
from kdiga_service.models import Job, utcnow
from kdiga_service.storage import ArtifactStore, checkpoint_prefix


def _job(client, owner_id, status, ended_days_ago, result=None):
    finished = utcnow() - timedelta(days=ended_days_ago) if ended_days_ago is not None else None
    with client.app.state.sessionmaker() as session:
        job = Job(owner_id=owner_id, kind="distill", queue="q", spec={}, status=status, finished_at=finished,
                  result=result)
        session.add(job)
        session.commit()
        return job.id


def _checkpoint(store, job_id):
    key = f"{checkpoint_prefix(job_id)}/e00001/student.safetensors"
    store.write_bytes(key, b"tenant weights")
    store.write_bytes(f"{checkpoint_prefix(job_id)}/latest.json", b"{}")
    return key


def _exercise(client, settings, store):
    _, owner = new_key(client, "retention")
    jobs = {
        "failed_old": _job(client, owner, "failed", 8, result={"resumable": "evaluation"}),
        "cancelled_old": _job(client, owner, "cancelled", 30),
        "succeeded_old": _job(client, owner, "succeeded", 9),  # its worker died before deleting them
        "failed_recent": _job(client, owner, "failed", 1),
        "running": _job(client, owner, "running", None),
    }
    keys = {name: _checkpoint(store, job_id) for name, job_id in jobs.items()}
    artifact = f"jobs/{jobs['failed_old']}/student.safetensors"  # not a checkpoint: kept
    store.write_bytes(artifact, b"kept")

    retention = Retention()
    settings = settings.model_copy(update={"checkpoint_retention_days": 7})
    purged = retention.sweep(client.app.state.sessionmaker, settings, store)
    assert {jobs["failed_old"], jobs["cancelled_old"], jobs["succeeded_old"]} <= set(purged)
    assert jobs["failed_recent"] not in purged and jobs["running"] not in purged
    for name in ("failed_old", "cancelled_old", "succeeded_old"):
        assert not store.exists(keys[name]) and not store.exists(f"{checkpoint_prefix(jobs[name])}/latest.json")
    assert store.exists(keys["failed_recent"]) and store.exists(keys["running"]) and store.exists(artifact)
    with client.app.state.sessionmaker() as session:  # its checkpoint is gone: resume must not retrain silently
        assert "resumable" not in (session.get(Job, jobs["failed_old"]).result or {})

    keep_none = settings.model_copy(update={"checkpoint_retention_days": 0})  # keep-none: at the next sweep
    assert jobs["failed_recent"] in retention.sweep(client.app.state.sessionmaker, keep_none, store)
    assert not store.exists(keys["failed_recent"]) and store.exists(keys["running"])


def test_retention_on_a_local_store(client, settings):
    _exercise(client, settings, client.app.state.storage)


@pytest.mark.slow
def test_retention_on_s3(client, settings, tmp_path, s3_endpoint):  # noqa: F811
    _exercise(client, settings, ArtifactStore.from_settings(s3_settings(tmp_path, s3_endpoint)))


def test_the_worker_writes_checkpoints_where_the_sweep_looks():
    from worker.checkpoints import checkpoint_prefix as written

    assert written("abc") == checkpoint_prefix("abc")
