"""`kdiga serve`'s supervision (restart with capped exponential backoff) and the thread share, on real
child processes; the whole service under SIGKILL is tests/e2e/test_validation_worker.py."""

from __future__ import annotations

import os
import signal

import pytest

from kdiga_launcher.supervisor import Embedded, Keeper, worker_threads
from worker.launcher import default_queues, share_cores


@pytest.fixture
def service(tmp_path):
    svc = Embedded(url="", admin_key="", home=tmp_path, env=dict(os.environ))
    svc.commands["sleeper"] = ["sleep", "300"]
    svc.start("sleeper")
    yield svc
    svc.stop(grace_s=1)


def _kill(svc: Embedded, name: str = "sleeper") -> int:
    proc = svc.processes[name]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return proc.pid


def test_a_dead_process_is_restarted_after_a_doubling_capped_delay(service):
    keeper = Keeper(service, base_s=1.0, cap_s=4.0, stable_s=100.0)
    keeper.check(now=0.0)
    first = _kill(service)
    delays = []
    now = 1.0
    for _ in range(4):  # four quick deaths: 1, 2, 4, then capped at 4 s
        keeper.check(now=now)
        delays.append(keeper.due["sleeper"] - now)
        keeper.check(now=now + delays[-1] - 0.01)
        assert service.processes["sleeper"].poll() is not None  # not before its time
        now += delays[-1]
        keeper.check(now=now)
        assert service.processes["sleeper"].poll() is None and service.processes["sleeper"].pid != first
        _kill(service)
    assert delays == [1.0, 2.0, 4.0, 4.0]


def test_a_process_that_ran_long_enough_starts_over_at_the_base_delay(service):
    keeper = Keeper(service, base_s=1.0, cap_s=60.0, stable_s=10.0)
    keeper.failures["sleeper"] = 5  # it died quickly before ...
    keeper.check(now=0.0)
    _kill(service)  # ... but this time it had run 50 s
    keeper.check(now=50.0)
    assert keeper.due["sleeper"] == 51.0 and keeper.failures["sleeper"] == 1


def test_worker_threads_are_a_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert worker_threads(1, cpus=16) == 8  # one job worker + the validator
    assert worker_threads(3, cpus=16) == 4
    assert worker_threads(1, cpus=1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an operator's explicit choice wins
    assert worker_threads(1, cpus=16) == 3


def test_a_standalone_worker_shares_the_cores_among_its_pool(monkeypatch):
    from kdiga_service.settings import reset_settings

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("KDIGA_WORKER_THREADS", raising=False)
    assert share_cores(4, cpus=16) == 4 and os.environ["KDIGA_WORKER_THREADS"] == "4"
    assert share_cores(2, cpus=16) == 4  # already set (by an operator or the launcher): kept
    monkeypatch.delenv("KDIGA_WORKER_THREADS")
    reset_settings()


def test_validation_has_its_own_queue_and_role(monkeypatch):
    from kdiga_service.settings import reset_settings

    monkeypatch.setenv("KDIGA_QUEUE_VALIDATE", "uploads")
    reset_settings()
    try:
        assert default_queues("validation") == ["uploads"]
        assert "uploads" not in default_queues("jobs")
        assert set(default_queues("all")) == {*default_queues("jobs"), "uploads"}
    finally:
        monkeypatch.undo()
        reset_settings()
