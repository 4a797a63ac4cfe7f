"""Jobs on several devices, the worker's side, with real torchrun ranks (gloo on CPU).

Gang claims in crud; a cancel reaching every rank and an incomplete gang given up, through the
runner; then real worker processes on PostgreSQL + Redis: two hosts × one device through two
workers on loopback, and a SIGKILLed rank whose job resumes from its checkpoint and succeeds once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import kdiga_svc_helpers as h
import pytest

from api.publish import close_all, enqueue
from kdiga_service import crud
from kdiga_service.db import get_sessionmaker
from kdiga_service.models import Job
from kdiga_service.queue import RUN_JOB
from kdiga_service.storage import get_storage
from worker import ddp, runner, torchrun
from worker.checkpoints import checkpoint_prefix

needs_services = pytest.mark.skipif(not (h.postgres_available() and h.redis_available()),
                                    reason="needs the PostgreSQL and Redis servers")

TORCHRUN_SUMMARY = """
Failures:
[1]:
  time      : 2026-11-27_15:34:30
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 8895)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 8895
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-27_15:34:30
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 8896)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 8896
"""


def ddp_request(seeded, *, nodes=1, devices=2, epochs=2, batch_size=64):
    request = h.tiny_job_request(seeded["dataset_id"], seeded["teacher_id"], epochs=epochs, batch_size=batch_size)
    request["resources"] = {"nodes": nodes, "devices_per_node": devices}
    return request


def rank_pid(job_id: str, rank: int) -> int | None:
    """The process of one rank of a job (torchrun puts RANK, the launcher the job id, in its environment)."""
    wanted = {f"{torchrun.RANK_JOB_ENV}={job_id}".encode(), f"RANK={rank}".encode()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= environ:
            return int(pid)
    return None


def model_card(settings, job_id: str) -> dict:
    store = get_storage(settings)
    card = next(a for a in h.artifacts_of(settings, job_id) if a.name == "model_card.json")
    return json.loads(store.read_bytes(card.storage_key))


# ----------------------------------------------------------------------------- no processes


def test_torchrun_summary_names_the_rank_that_failed():
    assert ddp.failure_of(TORCHRUN_SUMMARY, 1) == "rank 1 was killed by SIGKILL"
    exited = TORCHRUN_SUMMARY.replace("-9 (pid: 8896)  (SIGKILL)", "75 (pid: 8896)")
    assert ddp.failure_of(exited, 1) == "rank 1 exited with code 75"
    assert ddp.failure_of("no summary", 3) == "torchrun exited with code 3"


def test_ranks_read_the_settings_of_the_task(settings, monkeypatch):
    from kdiga_service.settings import Settings

    for name, value in torchrun.settings_env(settings).items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings


def test_gang_places_are_counted_by_a_conditional_update(settings, seeded):
    job_id = h.create_job_row(settings, seeded["owner_id"], ddp_request(seeded, nodes=3, devices=1))
    with get_sessionmaker(settings)() as session:
        assert crud.claim_job(session, job_id, "leader", max_attempts=2).attempts == 1
        assert not crud.open_gang(session, job_id, worker_id="intruder", rendezvous_id="r1", endpoint="h:1", size=3)
        assert crud.open_gang(session, job_id, worker_id="leader", rendezvous_id="r1", endpoint="h:1", size=3)
        assert not crud.join_gang(session, job_id, rendezvous_id="r0")  # an older attempt's rendezvous
        assert [crud.join_gang(session, job_id, rendezvous_id="r1") for _ in range(3)] == [True, True, False]
        assert crud.release_job(session, job_id, worker_id="leader", progress={"phase": "queued"})
        job = crud.get_job(session, job_id)
        assert (job.status, job.attempts, job.rendezvous_id, job.gang_claims) == ("queued", 1, None, 0)
        assert not crud.join_gang(session, job_id, rendezvous_id="r1")
        assert crud.claim_job(session, job_id, "leader-2", max_attempts=2).attempts == 2
        crud.release_job(session, job_id, worker_id="leader-2", progress={})
        assert crud.claim_job(session, job_id, "leader-3", max_attempts=2) is None
        assert crud.get_job(session, job_id).status == "failed"  # the cap covers attempts of the gang


# ----------------------------------------------------------------------------- through the runner


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_cancel_stops_every_rank(settings, seeded):
    job_id = h.create_job_row(settings, seeded["owner_id"], ddp_request(seeded, epochs=200, batch_size=8))
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(done=runner.run_job(job_id, settings=settings)))
    thread.start()
    h.wait_for(lambda: (h.job_row(settings, job_id).progress or {}).get("phase") == "train", 180,
               what="training on two ranks")
    with get_sessionmaker(settings)() as session:
        crud.request_cancel(session, job=session.get(Job, job_id))
        session.commit()
    thread.join(timeout=120)
    assert outcome["done"].status == "cancelled"
    row = h.job_row(settings, job_id)
    assert row.status == "cancelled" and row.attempts == 1
    assert rank_pid(job_id, 0) is None and rank_pid(job_id, 1) is None  # every rank has ended


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_spent_budget_stops_every_rank_at_an_epoch_end_and_resume_finishes(settings, seeded):
    request = {**ddp_request(seeded, epochs=2), "limits": {"time_budget_s": 1e-3}}
    job_id = h.create_job_row(settings, seeded["owner_id"], request)
    assert runner.run_job(job_id, settings=settings).status == "stopped"
    row = h.job_row(settings, job_id)
    # 1347 digits on 2 ranks, batches of 64: 11 steps an epoch; on several devices the stop waits for its end
    assert "training stopped after step 11 of 22" in row.error, row.error
    assert rank_pid(job_id, 0) is None and rank_pid(job_id, 1) is None
    with get_sessionmaker(settings)() as session:
        job = session.get(Job, job_id)
        crud.resume_job(session, job=job, spec={**job.spec, "limits": {}})
        session.commit()
    assert runner.run_job(job_id, settings=settings).status == "succeeded", h.job_row(settings, job_id).error
    card = next(a for a in h.artifacts_of(settings, job_id) if a.name == "model_card.json")
    training = json.loads(get_storage(settings).read_bytes(card.storage_key))["training"]
    assert (training["resumed_from_step"], training["steps"]) == (11, 22)


@pytest.mark.redis
@pytest.mark.skipif(not h.redis_available(), reason="needs the Redis server")
def test_an_incomplete_gang_is_given_up_and_releases_its_worker(tmp_path, seeded_redis):
    s, seeded = seeded_redis
    job_id = h.create_job_row(s, seeded["owner_id"], ddp_request(seeded, nodes=2, devices=1))
    outcome = runner.run_job(job_id, settings=s)  # nobody takes the join task
    assert outcome.status == "failed"
    row = h.job_row(s, job_id)
    assert row.status == "failed" and row.error == (
        f"The job needs 2 workers of queue '{s.queue_train}' at once but only 1 claimed it within 2 s "
        "(KDIGA_GANG_TIMEOUT_S); it was given up and its workers released.")


@pytest.fixture()
def seeded_redis(tmp_path, teacher_file):
    with h.redis_database() as broker_url:
        queues = h.unique_queues()
        s = h.make_settings(tmp_path / "home", broker_url=broker_url, gang_timeout_s=2.0,
                            queue_train=queues["KDIGA_QUEUE_TRAIN"], queue_eval=queues["KDIGA_QUEUE_EVAL"],
                            queue_validate=queues["KDIGA_QUEUE_VALIDATE"])
        h.migrate(s)
        owner = h.create_owner(s)[0]
        yield s, {"owner_id": owner, **h.seed_rows(s, owner, teacher_file)}
        from kdiga_service.db import dispose_engines

        dispose_engines()


# ----------------------------------------------------------------------------- real workers


@pytest.fixture(scope="module")
def workers(tmp_path_factory, teacher_file):
    """PostgreSQL + Redis, and two worker processes on the same queues (two "hosts" on loopback)."""
    if not (h.postgres_available() and h.redis_available()):
        pytest.skip("needs the PostgreSQL and Redis servers")
    home = tmp_path_factory.mktemp("ddp")
    with h.postgres_database() as db_url, h.redis_database() as broker_url:
        queues = h.unique_queues()
        s = h.make_settings(home, database_url=db_url, broker_url=broker_url, progress_interval_s=0.3,
                            task_max_retries=2, queue_train=queues["KDIGA_QUEUE_TRAIN"],
                            queue_eval=queues["KDIGA_QUEUE_EVAL"], queue_validate=queues["KDIGA_QUEUE_VALIDATE"],
                            gang_timeout_s=120)
        h.migrate(s)
        owner = h.create_owner(s)[0]
        rows = h.seed_rows(s, owner, teacher_file)
        env = h.settings_env(s, KDIGA_RENDEZVOUS_HOST="127.0.0.1", KDIGA_GANG_TIMEOUT_S="120")
        logs = [home / "worker-a.log", home / "worker-b.log"]
        procs = [h.start_worker(env, log) for log in logs]
        try:
            for log in logs:
                h.wait_worker_ready(log)
            yield {"settings": s, "seeded": {"owner_id": owner, **rows}, "logs": logs}
        finally:
            for proc in procs:
                h.stop_process(proc)
            close_all()


def _run(workers, request) -> tuple[str, Job]:
    s = workers["settings"]
    job_id = h.create_job_row(s, workers["seeded"]["owner_id"], request)
    enqueue(s, RUN_JOB, job_id, queue=h.job_row(s, job_id).queue)  # the API's queue: gpu-x2 for 2 devices
    return job_id, _finished(s, job_id)


def _finished(s, job_id: str) -> Job:
    return h.wait_for(lambda: (row := h.job_row(s, job_id)).status in ("succeeded", "failed", "cancelled") and row,
                      300, what=f"job {job_id} to end")


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(600)
@needs_services
def test_two_hosts_with_one_device_each_through_two_workers(workers):
    s = workers["settings"]
    job_id, row = _run(workers, ddp_request(workers["seeded"], nodes=2, devices=1))
    assert row.status == "succeeded", row.error
    assert row.attempts == 1 and row.gang_claims == 2
    compute = model_card(s, job_id)["training"]["compute"]
    assert (compute["world_size"], compute["nodes"], compute["devices_per_node"]) == (2, 2, 1)
    logs = b"".join(log.read_bytes() for log in workers["logs"])
    assert logs.count(b'"msg": "joined the gang"') >= 1 and b"kdiga.join_job" in logs


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(600)
@needs_services
def test_a_sigkilled_rank_resumes_from_the_checkpoint_and_succeeds_once(workers):
    s = workers["settings"]
    store = get_storage(s)
    job_id = h.create_job_row(s, workers["seeded"]["owner_id"],
                              ddp_request(workers["seeded"], epochs=4, batch_size=8))
    enqueue(s, RUN_JOB, job_id, queue=h.job_row(s, job_id).queue)  # the API's queue: gpu-x2 for 2 devices
    pointer = f"{checkpoint_prefix(job_id)}/latest.json"
    h.wait_for(lambda: store.exists(pointer), 240, interval=0.1, what="the first checkpoint")
    victim = h.wait_for(lambda: rank_pid(job_id, 1), 30, what="rank 1")
    assert h.job_row(s, job_id).progress.get("epoch", 0) < 4, "training ended before the kill"
    os.kill(victim, signal.SIGKILL)

    row = _finished(s, job_id)
    assert row.status == "succeeded", row.error
    assert row.attempts == 2  # the killed attempt, then the resumed one, never two at once
    training = model_card(s, job_id)["training"]
    per_epoch = training["steps"] // 4
    assert 0 < training["resumed_from_step"] < training["steps"] and training["resumed_from_step"] % per_epoch == 0
    names = [a.name for a in h.artifacts_of(s, job_id)]
    assert sorted(names) == sorted(set(names)) and len(names) == 5  # stored once
    assert not store.exists(pointer)  # the checkpoint went with the success
    logs = b"".join(log.read_bytes() for log in workers["logs"])
    assert b"rank 1 was killed by SIGKILL" in logs



def test_jobs_on_several_devices_per_host_have_their_own_queue(settings, monkeypatch):
    from kdiga_service.queue import job_queue
    from worker import launcher

    assert job_queue(settings, "distill") == job_queue(settings, "distill", 1) == settings.queue_train
    assert job_queue(settings, "adversarial_train", 4) == f"{settings.queue_train}-x4"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert launcher.visible_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launcher.visible_gpus() == 0
