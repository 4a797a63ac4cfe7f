"""The demo's wall time, phase by phase (design.md §8: "the whole demo within a few minutes").

Runs the README's demo exactly as a user would after `make install`: `python -m kdiga_launcher.demo`
in a fresh process (it starts its own embedded service in a temporary KDIGA_HOME, trains the PGD-AT
teacher, the KD and KDIGA students, downloads the reports), and reads back the phase times and the
results table it writes with `--timings`. Nothing is hard-coded: a failing demo fails the case.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 1800


def run(*, quick: bool = False, log=print) -> dict:
    """{"phases": [(name, s)], "total_s", "process_s", "results_header", "results"} of one demo run."""
    with tempfile.TemporaryDirectory(prefix="kdg-demo-bench-") as tmp:
        timings = Path(tmp) / "timings.json"
        cmd = [sys.executable, "-m", "kdiga_launcher.demo", "--out", str(Path(tmp) / "out"), "--timings", str(timings)]
        if quick:
            cmd.append("--quick")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, check=False)
        process_s = time.perf_counter() - start
        if proc.returncode != 0 or not timings.exists():
            raise RuntimeError(f"the demo failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}")
        record = json.loads(timings.read_text())
    record["phases"] = [(name, float(seconds)) for name, seconds in record["phases"]]
    record["process_s"] = process_s
    log(f"  demo: {sum(s for _, s in record['phases']):.1f} s in its phases, {process_s:.1f} s for the process")
    return record
