"""Scratch folders of dead attempts are swept on the worker's host; live ones, other hosts' and fresh
unmarked ones stay. Real processes: a child makes its folder and is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import kdiga_svc_helpers as h

from worker.leftovers import OWNER_FILE, make_scratch, sweep_scratch


def _folder_of_a_killed_attempt(settings) -> str:
    code = ("import sys, time; from kdiga_service.settings import Settings; from worker.leftovers import make_scratch; "
            f"p = make_scratch(Settings(home={str(settings.home)!r}, work_dir={str(settings.work_dir)!r}), 'kdiga-job-dead0000-'); "
            "(p / 'student.safetensors').write_bytes(b'tenant weights'); print(p, flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=h.ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(h.ROOT)})
    path = proc.stdout.readline().strip()
    os.kill(proc.pid, signal.SIGKILL)  # never reaches its `finally`
    proc.wait(10)
    return path


def test_the_sweep_removes_only_dead_attempts_folders(settings, tmp_path):
    settings.work_dir = tmp_path / "scratch"
    dead = _folder_of_a_killed_attempt(settings)
    mine = make_scratch(settings, "kdiga-job-live0000-")  # this process: alive
    elsewhere = make_scratch(settings, "kdiga-job-else0000-")
    (elsewhere / OWNER_FILE).write_text("another-host:1:1")
    old_unmarked = settings.work_dir / "kdiga-join-old00000-x"
    old_unmarked.mkdir()
    long_ago = time.time() - settings.effective_hard_time_limit_s - 60
    os.utime(old_unmarked, (long_ago, long_ago))
    fresh_unmarked = settings.work_dir / "kdiga-job-new00000-x"
    fresh_unmarked.mkdir()
    unrelated = settings.work_dir / "someone-else"
    unrelated.mkdir()

    removed = {str(p) for p in sweep_scratch(settings)}
    assert removed == {dead, str(old_unmarked)}
    assert not os.path.exists(dead) and not old_unmarked.exists()
    for kept in (mine, elsewhere, fresh_unmarked, unrelated):
        assert kept.exists()
