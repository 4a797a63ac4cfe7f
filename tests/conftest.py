"""Suite-wide: one intra-op thread per process unless the caller chose otherwise.

Without OMP_NUM_THREADS, `kdiga_core.train` gives an in-process training every core (and the pytest
process keeps that for the rest of the run), and two OpenMP threads beside the suite's own worker,
rank and service processes on a 2-core host spend their time waiting for each other: the L2
PGD-AT test took 47-188 s that way on a busy 2-core machine, 15-19 s with one thread. Set here, before
any test imports torch, so the processes the tests start (workers, ranks, benchmarks) inherit it;
tests of the thread defaults set or delete it themselves (monkeypatch).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
