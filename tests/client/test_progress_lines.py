"""`kdiga jobs submit --wait` and `kdiga jobs follow` in a CI log: stdout is a pipe, not a terminal, so the
CLI prints plain progress lines (one per change of phase, stage or epoch, and the last state again every
KDIGA_PROGRESS_EVERY_S), never carriage returns or terminal escapes. Run as a real `kdiga` process against
the embedded service (session fixture in conftest.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdiga_client import Client

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ job .+: (queued|running|succeeded|failed|cancelled)( · .+)?$")
# Enough work that training and evaluation each last a few progress writes on a busy machine.
# Each phase and evaluation stage must outlast the worker's 1 s progress throttle on a fast machine too
# (3 epochs and PGD-50 finished between two writes on an idle one, so no evaluate line was printed).
SPEC = {"student": {"arch": "cnn_tiny"}, "objective": {"method": "ce"},
        "train": {"epochs": 20, "batch_size": 64, "lr": 0.01, "optimizer": "adamw", "device": "cpu"},
        "evaluation": {"attacks": [{"name": "pgd", "eps": 0.1, "steps": 1000}], "max_points": 360,
                       "eps_curve": [0.0, 0.05, 0.1, 0.3], "curve_attack_steps": 500, "smoothing_sigma": 0.0,
                       "latency": False}}


def _kdiga(live_service, *args: str, every: float = 0.5) -> subprocess.CompletedProcess:
    env = {**os.environ, "KDIGA_URL": live_service.url, "KDIGA_API_KEY": live_service.admin_key,
           "KDIGA_PROGRESS_EVERY_S": str(every), "KDIGA_CONFIG": "/nonexistent/kdiga.toml", "TERM": "xterm-256color"}
    env.pop("FORCE_COLOR", None)
    code = "import sys; from kdiga_client.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, env=env, timeout=500, check=False)


def _lines(stdout: bytes) -> list[str]:
    text = stdout.decode()
    assert "\r" not in text and "\x1b" not in text, repr(text[:400])  # no bars redrawn, no colours
    return [line for line in text.splitlines() if " job " in line and LINE.match(line)]


@pytest.fixture(scope="module")
def digits_id(live_service) -> str:
    with Client(live_service.url, live_service.admin_key, timeout=60) as c:
        ds = c.wait_dataset(c.register_builtin_dataset("digits", "digits").id, timeout=180)
        assert ds.status == "ready", ds.error
        return ds.id


def test_submit_wait_prints_ci_lines_for_every_phase(live_service, digits_id, tmp_path: Path):
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(SPEC))
    done = _kdiga(live_service, "jobs", "submit", "--kind", "adversarial_train", "--dataset", digits_id,
                  "--name", "ci-lines", "--spec", str(spec), "--wait")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    lines = _lines(done.stdout)
    assert lines, done.stdout.decode()[-2000:]
    states = [line.split(": ", 1)[1] for line in lines]
    assert any(s.startswith("running · train · ") and "epoch " in s for s in states), states
    evaluation = [s for s in states if s.startswith("running · evaluate · ")]
    assert evaluation, states
    assert any("ETA " in s for s in evaluation), evaluation  # the evaluation has its ETA too
    assert len({s.split(" · ")[2] for s in evaluation}) >= 2, evaluation  # its stages move
    # (the export phase lasts well under the worker's 1 s progress throttle, so a poller may never see it:
    # tests/core/test_core_jobs.py asserts it in the job's own progress events)
    assert states[-1].startswith("succeeded · 100%")
    assert all("ci-lines (" in line for line in lines)


def test_follow_repeats_the_state_while_nothing_changes(live_service, digits_id, tmp_path: Path):
    with Client(live_service.url, live_service.admin_key, timeout=60) as c:
        job = c.submit_job({"kind": "adversarial_train", "dataset_id": digits_id, **SPEC})
    done = _kdiga(live_service, "jobs", "follow", job.id, every=0.3)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    lines = _lines(done.stdout)
    states = [line.split(": ", 1)[1] for line in lines]
    assert states and states[-1].startswith("succeeded")
    changes = [s for i, s in enumerate(states) if i == 0 or s.split(" · ")[:3] != states[i - 1].split(" · ")[:3]]
    assert len(states) > len(changes), states  # the ticker repeated a state (the job ran > 0.3 s per stage)
