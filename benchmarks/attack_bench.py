"""Attack-evaluation throughput: our PGD-20 and AutoAttack against torchattacks.

Same model, same points, same ε: a `cnn_small` trained for a few seconds on the builtin
digits (8x8, 1 channel), so that accuracies are meaningful rather than chance. Each side's
time is the median of its repeats after one warm-up run, the two sides interleaved; the
table gives images per second, the ratio, each side's robust accuracy and their difference
in percentage points. AutoAttack is run once per side on a subset of the points (it is long),
in chunks of points with the two sides alternating chunk by chunk, so that a change in the
load from other processes during the long run falls on both sides alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kdiga_core.attacks import predict, run_autoattack
from kdiga_core.config import AttackSpec
from kdiga_core.data import load_builtin
from kdiga_core.evaluate import robust_accuracy
from kdiga_core.models import create_model

EPS = 0.1  # pixel units on [0, 1] digits
PGD_STEPS = 20


@dataclass
class AttackRow:
    """One attack: ours vs torchattacks on the same points."""

    attack: str
    n_points: int
    ours_s: float
    theirs_s: float
    ours_robust: float
    theirs_robust: float
    repeats: int
    ours_cpu_s: float = 0.0  # process CPU time, same statistic as the wall times
    theirs_cpu_s: float = 0.0

    @property
    def cpu_speedup(self) -> float:
        return self.theirs_cpu_s / self.ours_cpu_s if self.ours_cpu_s else 0.0

    @property
    def speedup(self) -> float:
        return self.theirs_s / self.ours_s

    @property
    def diff_points(self) -> float:
        """|robust accuracy difference| in percentage points."""
        return abs(self.ours_robust - self.theirs_robust) * 100


def trained_digits_model(epochs: int = 15, seed: int = 0):
    """cnn_small fitted with plain CE on digits (a few seconds on CPU); returns (model, x_test, y_test)."""
    torch.manual_seed(seed)
    data = load_builtin("digits")
    model = create_model("cnn_small", data.num_classes, in_chans=data.in_chans, img_size=data.img_size)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train), generator=gen)
        for idx in order.split(64):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
    return model.eval(), data.x_test, data.y_test


def _accuracy(model, x_adv, y) -> float:
    return (predict(model, x_adv) == y).float().mean().item()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def _time_pair(ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int,
               ) -> tuple[list[float], list[float], Any, Any]:
    """Warm up both, then alternate them (ABBA...); return (median [wall, cpu] of ours, of theirs,
    last outputs)."""
    ours(), theirs()
    t_ours, t_theirs = [], []
    for i in range(repeats):
        order = ((ours, t_ours), (theirs, t_theirs))
        for fn, sink in (order if i % 2 == 0 else order[::-1]):
            out, wall, cpu = _timed(fn)
            sink.append((wall, cpu, out))
    med = lambda v: [statistics.median(w for w, _, _ in v), statistics.median(c for _, c, _ in v)]  # noqa: E731
    return med(t_ours), med(t_theirs), t_ours[-1][2], t_theirs[-1][2]


def bench_pgd(model, x, y, *, repeats: int) -> AttackRow:
    """Robust accuracy under PGD-20 (L∞, random start, step 2.5ε/20) on the same points.

    Ours is what every report runs, `kdiga_core.evaluate.robust_accuracy`: clean predictions, then
    PGD on the correctly classified points only (the others cannot count as robust, as in
    AutoAttack). Theirs is how torchattacks is used for the same number: PGD on every point, then
    predictions on the adversarial examples. Both sides' times include their predictions.
    """
    import torchattacks

    step = 2.5 * EPS / PGD_STEPS
    spec = AttackSpec("pgd", eps=EPS, norm="Linf", steps=PGD_STEPS, step_size=step)
    theirs_attack = torchattacks.PGD(model, eps=EPS, alpha=step, steps=PGD_STEPS, random_start=True)

    def ours() -> float:
        return float(robust_accuracy(model, x, y, spec, n_classes=10, batch_size=len(x), seed=0)["accuracy"])

    def theirs() -> float:
        torch.manual_seed(0)
        return _accuracy(model, theirs_attack(x, y), y)

    t_o, t_t, acc_o, acc_t = _time_pair(ours, theirs, repeats)
    return AttackRow("PGD-20 (L∞)", len(x), t_o[0], t_t[0], acc_o, acc_t, repeats, ours_cpu_s=t_o[1],
                     theirs_cpu_s=t_t[1])


def bench_autoattack(model, x, y, *, steps: int = 100, n_queries: int = 5000, chunk: int = 20) -> AttackRow:
    """AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square), survivors only: ours vs torchattacks.

    torchattacks builds its AutoAttack members with 10 iterations; both sides are set to the same
    budget here (`steps` for APGD/FAB, 100 in AutoAttack's standard version; `n_queries` for Square).
    Points go in chunks of `chunk`, the side that starts alternating from chunk to chunk; times
    and robust points are summed over the chunks (AutoAttack treats points independently).
    """
    import torchattacks

    theirs = torchattacks.AutoAttack(model, norm="Linf", eps=EPS, version="standard", n_classes=10, seed=0)
    for sub in theirs._autoattack.attacks:
        if isinstance(sub, torchattacks.Square):
            sub.n_queries = n_queries
        else:
            sub.steps = steps

    def ours(xc, yc):
        return run_autoattack(model, xc, yc, EPS, "Linf", seed=0, n_classes=10, steps=steps,
                              n_queries=n_queries)["x_adv"]

    # warm-up on two points: imports, kernels and allocator, without paying for a whole AutoAttack
    run_autoattack(model, x[:2], y[:2], EPS, "Linf", seed=0, n_classes=10, steps=2, n_queries=5)
    theirs(x[:2], y[:2])
    totals = {"ours": [0.0, 0.0, 0], "theirs": [0.0, 0.0, 0]}  # wall, cpu, robust points
    for i, (xc, yc) in enumerate(zip(x.split(chunk), y.split(chunk), strict=True)):
        sides = [("ours", lambda: ours(xc, yc)), ("theirs", lambda: theirs(xc, yc))]  # noqa: B023
        for name, fn in (sides if i % 2 == 0 else sides[::-1]):
            adv, wall, cpu = _timed(fn)
            totals[name][0] += wall
            totals[name][1] += cpu
            totals[name][2] += int((predict(model, adv) == yc).sum())
    (o_wall, o_cpu, o_rob), (t_wall, t_cpu, t_rob) = totals["ours"], totals["theirs"]
    return AttackRow("AutoAttack standard (L∞)", len(x), o_wall, t_wall, o_rob / len(x), t_rob / len(x), 1,
                     ours_cpu_s=o_cpu, theirs_cpu_s=t_cpu)


def run(*, quick: bool = False, log=print) -> tuple[list[AttackRow], dict]:
    """Both attacks; quick mode uses fewer points and a smaller Square budget."""
    torch.manual_seed(0)
    start = time.perf_counter()
    model, x_test, y_test = trained_digits_model(epochs=3 if quick else 15)
    clean = _accuracy(model, x_test, y_test)
    log(f"  attack model trained in {time.perf_counter() - start:.1f} s, clean accuracy {clean:.3f}")
    n_pgd, n_aa = (64, 8) if quick else (len(x_test), 40)
    rows = [bench_pgd(model, x_test[:n_pgd], y_test[:n_pgd], repeats=2 if quick else 7)]
    log(f"  PGD done ({time.perf_counter() - start:.1f} s)")
    rows.append(bench_autoattack(model, x_test[:n_aa], y_test[:n_aa], steps=5 if quick else 100,
                                 n_queries=20 if quick else 5000, chunk=4 if quick else 10))
    log(f"  AutoAttack done ({time.perf_counter() - start:.1f} s)")
    return rows, {"model": "cnn_small trained on digits (CE)", "clean_accuracy": clean, "eps": EPS}
