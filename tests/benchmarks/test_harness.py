"""Smoke test of the benchmark harness: it runs in --quick mode on one tiny case and prints a table.

No timing assertions: timings depend on the machine and its load (BENCHMARKS.md holds them).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_quick_step_case_prints_and_appends_a_table(tmp_path: Path) -> None:
    out = tmp_path / "BENCH.md"
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--cases", "step", "--models", "cnn_tiny",
           "--inputs", "8x8x1", "--teacher", "cnn_small", "--repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| student | input |" in proc.stdout
    assert "| cnn_tiny | 8x8x1 |" in proc.stdout
    text = out.read_text(encoding="utf-8")
    assert text.startswith("## Run of ") and "Command: `python -m benchmarks.run --quick" in text
    assert "grad cos" in text


def test_unknown_case_is_refused() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--cases", "nope", "--out", "-"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "unknown case(s) nope" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_demo_case_reports_phases_and_results() -> None:
    """The demo case runs the README's demo in its own process and tabulates what the demo measured."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--cases", "demo", "--out", "-"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    for phase in ("0. start the service", "2. robust teacher", "3. students", "total of the phases"):
        assert f"| {phase}" in proc.stdout
    for model in ("| teacher | cnn_medium |", "| KD student | cnn_small |", "| KDIGA student | cnn_small |"):
        assert model in proc.stdout
