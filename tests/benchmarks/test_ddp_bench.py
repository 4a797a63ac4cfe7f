"""The scaling benchmark at tiny size on CPU: the command the GPU run uses, with --device cpu.

No timing assertions (BENCHMARKS.md holds the numbers); it checks that both world sizes ran the
real training loop under torchrun and that the JSON has what the GPU run will be read for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_scaling_run_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "benchmarks.ddp_bench", "--device", "cpu", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    runs = {r["world_size"]: r for r in result["runs"]}
    assert sorted(runs) == [1, 2] and {r["backend"] for r in runs.values()} == {"gloo"}
    settings = result["settings"]
    for world, run in runs.items():
        assert run["steps_timed"] == settings["timed_steps"]
        assert run["images_timed"] == settings["timed_steps"] * settings["batch_size"] * world
        assert run["images_per_s"] > 0 and run["step_ms_median"] > 0
        assert run["images_per_cpu_s"] == pytest.approx(run["images_timed"] / run["cpu_s_timed_all_ranks"])
    assert result["scaling_efficiency"] == pytest.approx(
        runs[2]["images_per_s"] / (2 * runs[1]["images_per_s"]))
    assert result["cpu_time_efficiency"] == pytest.approx(runs[2]["images_per_cpu_s"] / runs[1]["images_per_cpu_s"])
    assert result["machine"]["logical_cpus"] >= 1 and result["note"] is None


def test_a_missing_out_is_refused() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ddp_bench"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2 and "--out is required" in proc.stderr
