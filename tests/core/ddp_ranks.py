"""What each gloo rank of tests/core/test_distributed.py runs (a module, so spawned ranks can import it).

Every scenario writes its findings to ``<out>/<name>-rank<r>.json``; the tests read them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from shard_ranks import shard_streams
from torch.nn.parallel import DistributedDataParallel

from kdiga_core import distributed
from kdiga_core.config import ObjectiveConfig, TrainConfig
from kdiga_core.errors import CancelledError, StoppedError
from kdiga_core.models import create_model
from kdiga_core.objectives import build_objective

BATCH, STEPS = 16, 2
HUNG_TIMEOUT_S = 8.0  # the group's collective timeout (init_from_env): long enough for a loaded machine


def join(rank: int, world: int, port: int, timeout_s: float = 60.0) -> distributed.RankContext:
    """Join a gloo group the way torchrun's environment makes `init_from_env` do it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    return distributed.init_from_env("cpu", timeout_s=timeout_s)


def save(out: str, name: str, rank: int, value) -> None:
    Path(out, f"{name}-rank{rank}.json").write_text(json.dumps(value))


# ----------------------------------------------------------------------------- gradients


def models():
    """A student without BatchNorm and a teacher, the same on every rank."""
    torch.manual_seed(0)
    student = create_model("cnn_tiny", num_classes=10, in_chans=1, img_size=8)
    torch.manual_seed(1)
    teacher = create_model("cnn_small", num_classes=10, in_chans=1, img_size=8)
    return student, teacher


def batches():
    gen = torch.Generator().manual_seed(5)
    return [(torch.rand(BATCH, 1, 8, 8, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
            for _ in range(STEPS)]


def objective_config(mode: str, **lazy) -> ObjectiveConfig:
    return ObjectiveConfig(method="kdiga", gamma=5.0, gamma_warmup=0.0, iga_mode=mode, **lazy)


def gradients_after_two_steps(student, trained, teacher, mode: str, data, **lazy) -> list[float]:
    """SGD step on the first batch, then the parameter gradients of the second."""
    objective = build_objective(objective_config(mode, **lazy), trained, teacher)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    for step, (x, y) in enumerate(data):
        optimizer.zero_grad(set_to_none=True)
        objective(x, y, progress=1.0)["loss"].backward()
        if step < len(data) - 1:
            optimizer.step()
    return torch.cat([p.grad.flatten() for p in student.parameters()]).tolist()


def reference_gradients(mode: str, **lazy) -> list[float]:
    """One process on the concatenated batch (what DDP must reproduce)."""
    student, teacher = models()
    return gradients_after_two_steps(student, student, teacher, mode, batches(), **lazy)


def every_scenario(rank: int, world: int, port: int, out: str) -> None:
    """One process group for all of them (starting ranks is the slow part): the hung peer is last,
    since a timed-out group cannot be used again."""
    ctx = join(rank, world, port, timeout_s=HUNG_TIMEOUT_S)
    gradient_match(ctx, out)
    lazy_gradient_match(ctx, out)
    train_loop(ctx, out)
    shard_streams(ctx, out)
    sharded_evaluation(ctx, out)
    hung_peer(ctx, out)


def gradient_match(ctx: distributed.RankContext, out: str) -> None:
    """Each IGA mode through `distributed.wrap` (static_graph off) and through static_graph=True."""
    rank, world = ctx.rank, ctx.world_size
    mine = [(x[rank::world], y[rank::world]) for x, y in batches()]
    for mode in ("exact", "finite_difference"):
        for wrapper in ("kdiga", "static_graph"):
            student, teacher = models()
            trained = (distributed.wrap(student, ctx) if wrapper == "kdiga"
                       else DistributedDataParallel(student, static_graph=True))
            grads = gradients_after_two_steps(student, trained, teacher, mode, mine)
            if rank == 0:
                save(out, f"grad-{mode}-{wrapper}", rank, grads)


LAZY = {"iga_every": 2}  # step 0 aligns with k·γ, step 1 is a KD step: both go through DDP


def lazy_gradient_match(ctx: distributed.RankContext, out: str) -> None:
    """Lazy IGA through `distributed.wrap`, and a part of each rank's batch (it only has to run)."""
    rank, world = ctx.rank, ctx.world_size
    mine = [(x[rank::world], y[rank::world]) for x, y in batches()]
    for name, lazy in (("lazy", LAZY), ("lazy-part", {"iga_every": 1, "iga_fraction": 0.5})):
        student, teacher = models()
        grads = gradients_after_two_steps(student, distributed.wrap(student, ctx), teacher, "exact", mine, **lazy)
        gathered = [None] * world
        dist.all_gather_object(gathered, grads)
        save(out, f"grad-{name}", rank, {"grads": grads, "ranks_agree": all(g == grads for g in gathered)})


# ----------------------------------------------------------------------------- the training loop


def toy_data(n: int = 90):
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = (torch.rand(n, 1, 8, 8, generator=gen) * 0.5 + 0.5 * y.view(-1, 1, 1, 1)).clamp(0, 1)
    return SimpleNamespace(x_train=x, y_train=y)


def train_loop(ctx: distributed.RankContext, out: str) -> None:
    """`train` under DDP: shards, agreement on metrics and weights, rank-0-only writes, cancel, cache."""
    from kdiga_core.train import train

    rank, world = ctx.rank, ctx.world_size
    torch.manual_seed(3)
    teacher = create_model("cnn_tiny", num_classes=2, in_chans=1, img_size=8)
    student = create_model("cnn_tiny", num_classes=2, in_chans=1, img_size=8)
    steps: list[dict] = []
    cfg = TrainConfig(epochs=2, batch_size=8, grad_accum_steps=2, lr=0.05, lr_scaling="linear", device="cpu")
    obj = ObjectiveConfig(method="kdiga", gamma=1.0, gamma_warmup=0.0, iga_mode="auto")
    checkpoints = Path(out, f"ckpt-rank{rank}")
    result = train(student, toy_data(), obj, cfg, teacher=teacher, on_step=steps.append,
                   checkpoint_dir=checkpoints, should_cancel=lambda: False)
    weights = torch.cat([p.detach().flatten() for p in student.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    order = distributed.epoch_order(90, epoch=0, seed=0, generator=torch.Generator(), ctx=ctx)
    save(out, "train", rank, {
        "steps": result.steps, "history": result.history, "on_step": len(steps),
        "lr": steps[0]["lr"] if steps else None, "checkpoint": (checkpoints / "last.json").exists(),
        "weights_agree": all(torch.equal(g, gathered[0]) for g in gathered), "order": order.tolist(),
        "plan": distributed.batch_plan(cfg, ctx), "cache": _cache_matches(ctx, teacher),
        "cancelled_at": _cancel_step(ctx), "stopped": _budget_stop(ctx, Path(out, f"stop-rank{rank}")),
    })


def _cache_matches(ctx, teacher) -> bool:
    """The gathered teacher cache equals the one a single process computes."""
    data = toy_data()
    cfg = ObjectiveConfig(method="kdiga", gamma=1.0)
    whole = build_objective(cfg, create_model("cnn_tiny", num_classes=2, in_chans=1, img_size=8), teacher)
    whole.precompute_teacher(data.x_train, data.y_train, batch_size=32)
    shared = build_objective(cfg, create_model("cnn_tiny", num_classes=2, in_chans=1, img_size=8), teacher)
    distributed.precompute_teacher(shared, data.x_train, data.y_train, batch_size=32, ctx=ctx)
    return bool(torch.allclose(whole.cache.logits, shared.cache.logits, atol=1e-6)
                and torch.allclose(whole.cache.grads, shared.cache.grads, atol=1e-6))


def _cancel_step(ctx) -> int | None:
    """Only rank 0 is asked, and says yes the third time: every rank must stop after 2 steps."""
    from kdiga_core.train import train

    asked: list[int] = []

    def cancel() -> bool:
        asked.append(1)
        return len(asked) >= 3

    forwards: list[int] = []
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, device="cpu")
    student = create_model("cnn_tiny", num_classes=2, in_chans=1, img_size=8)
    student.register_forward_hook(lambda *_: forwards.append(1))  # ce: one forward a step
    try:
        train(student, toy_data(), ObjectiveConfig(method="ce"), cfg, should_cancel=cancel)
    except CancelledError:
        dist.barrier()  # the group still pairs up after every rank stopped
        return len(forwards)
    return None


def _budget_stop(ctx, checkpoints: Path) -> dict | None:
    """Only rank 0 has a spent budget: every rank stops at the end of the first epoch (6 steps), no
    checkpoint is written inside the epoch (other ranks' RNG states are not saved), rank 0 writes one."""
    from kdiga_core.train import train

    steps: list[dict] = []
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, device="cpu")
    student = create_model("cnn_tiny", num_classes=2, in_chans=1, img_size=8)
    saved: list[int] = []
    try:
        train(student, toy_data(), ObjectiveConfig(method="ce"), cfg, on_step=steps.append,
              checkpoint_dir=checkpoints, checkpoint_every_s=1e-9,
              on_checkpoint=lambda d: saved.append(json.loads((d / "last.json").read_text())["global_step"]),
              should_stop=(lambda: "Spent.") if ctx.is_main else None)
    except StoppedError as exc:
        dist.barrier()
        return {"message": str(exc), "saved": saved}
    return None


# ----------------------------------------------------------------------------- evaluation

EVAL = {"attacks": [{"name": "pgd", "eps": 0.1, "steps": 5}], "max_points": 101, "eps_curve": (0.0, 0.1),
            "curve_attack_steps": 3, "linearity_steps": 3, "smoothing_sigma": 0.25, "smoothing_points": 21,
            "smoothing_samples": 20, "latency": False, "batch_size": 32}


def digits_student():
    """A cnn_tiny trained for 4 epochs on digits (about 50% accurate; under DDP when called in a rank)."""
    from kdiga_core.data import load_builtin
    from kdiga_core.train import train

    data = load_builtin("digits")
    torch.manual_seed(0)
    model = create_model("cnn_tiny", num_classes=10, in_chans=1, img_size=8)
    train(model, data, ObjectiveConfig(method="ce"), TrainConfig(epochs=4, batch_size=32, lr=0.1, device="cpu"))
    torch.manual_seed(1)
    teacher = create_model("cnn_tiny", num_classes=10, in_chans=1, img_size=8).eval()
    return data, model.eval(), teacher


def sharded_evaluation(ctx: distributed.RankContext, out: str) -> None:
    """`evaluate` on every rank, each on its share of the points; twice, the second time with the
    teacher's evaluation in rank 0's cache only (rank 1 has another folder, as on another host)."""
    from safetensors.torch import save_file

    from kdiga_core.config import EvalConfig
    from kdiga_core.evaluate import DirectoryReportCache, evaluate

    data, model, teacher = digits_student()
    cfg = EvalConfig(**EVAL)
    cache = DirectoryReportCache(Path(out, f"cache-rank{ctx.rank}"))
    first = evaluate(model, data, cfg, teacher=teacher, teacher_cache=cache)
    second = evaluate(model, data, cfg, teacher=teacher, teacher_cache=cache)
    if ctx.is_main:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out, "eval-model.safetensors")))
    save(out, "eval", ctx.rank, {"first": first, "second": second})


# ----------------------------------------------------------------------------- a hung peer


def hung_peer(ctx: distributed.RankContext, out: str) -> None:
    """Rank 1 never joins the all-reduce; rank 0 must fail within its timeout, not wait for ever."""
    dist.barrier()
    if ctx.rank == 1:  # hang (until rank 0 has its answer, or 30 s)
        deadline = time.monotonic() + 30
        while not Path(out, "hung-rank0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(0)
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        outcome = "returned"
    except RuntimeError as exc:
        outcome = type(exc).__name__
    save(out, "hung", 0, {"outcome": outcome, "seconds": time.monotonic() - started})
    os._exit(0)
