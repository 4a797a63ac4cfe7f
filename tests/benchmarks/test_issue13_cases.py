"""The issue-13 benchmark pieces run end to end on tiny models (no timing assertions)."""

from __future__ import annotations

import torch

from benchmarks import epoch_bench, time_to_robust
from kdiga_core.models import create_model


def tiny_pair() -> epoch_bench.Pair:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return epoch_bench.Pair("tiny", create_model("cnn_small", 4, in_chans=1, img_size=8),
                            create_model("cnn_tiny", 4, in_chans=1, img_size=8),
                            torch.rand(48, 1, 8, 8, generator=gen), torch.randint(0, 4, (48,), generator=gen),
                            hflip=True, eps=0.1, batch=16)


def test_every_method_runs_an_epoch_and_the_table_has_a_row_each():
    pair = tiny_pair()
    specs = epoch_bench.methods(pair.eps)
    timings = epoch_bench.run_pair(pair, specs, rounds=1, log=lambda m: None)
    assert set(timings) == set(specs) and all(t.wall[0] > 0 and t.cpu[0] >= 0 for t in timings.values())
    assert timings["kdiga_bank"].bank_build["mib"] > 0 and timings["ce"].bank_build is None
    rows = {name: {"wall_s": t.wall[0], "cpu_s": max(t.cpu[0], 1e-9), "wall_vs_ce": t.wall[0] / timings["ce"].wall[0],
                   "cpu_vs_ce": 1.0, "bank_build": t.bank_build} for name, t in timings.items()}
    out = {"load_start": "x", "load_end": "y", "lazy": epoch_bench.LAZY, "bank_k": 4, "gamma": 1.0,
           "pairs": [{"pair": "tiny", "samples": 48, "batch": 16, "rounds": 1, "rows": rows}]}
    text = epoch_bench.markdown(out)
    assert all(f"| {name} |" in text for name in specs) and "of RSLAD" in text


def test_time_to_target_is_the_first_epoch_at_or_above_it():
    rows = [{"epoch": 1, "wall_s": 1.0, "pgd20": 0.5}, {"epoch": 2, "wall_s": 2.0, "pgd20": 0.8},
            {"epoch": 3, "wall_s": 3.0, "pgd20": 0.9}]
    assert time_to_robust.first_reach(rows, 0.75)["epoch"] == 2
    assert time_to_robust.first_reach(rows, 0.95) is None
    names = time_to_robust.student_methods(time_to_robust.LAZY_GRID, 4)
    assert {"kdiga", "kdiga_bank", "rslad", "ard", "pgd_at"} <= set(names)
    assert names["kdiga_lazy_k4_f0.5"]["iga_every"] == 4
    grid = time_to_robust.parse_lazy("8:1:bank,2:0.25")
    assert grid == ((8, 1.0, True), (2, 0.25, False))
    named = time_to_robust.student_methods(grid, 4)
    assert named["kdiga_bank_lazy_k8_f1"] == {"method": "kdiga", "gamma": 5.0, "gamma_warmup": 0.5, "iga_every": 8,
                                              "iga_fraction": 1.0, "teacher_bank_k": 4}
