"""Adversarial attacks sharing one contract: ``attack(model, x, y) -> x_adv``.

Inputs are pixels in [0, 1] (models normalise inside, method.md §1); outputs lie inside
the ε-ball around ``x`` and inside [0, 1]. The model is passed per call because KDIGA's
neighbours attack a student that changes every step (style.md habit 1).

PGD/FGSM are our own (batched, no per-sample Python, tested against torchattacks), built on
`pgd`, the one projected-gradient loop that the training objectives' inner attacks use too;
APGD-CE, APGD-T, FAB-T and Square wrap torchattacks. `run_autoattack` chains the four
in AutoAttack's standard order, running later attacks only on points that survived.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiga_core.config import AttackSpec
from kdiga_core.errors import KdigaError, UnknownNameError

logger = logging.getLogger(__name__)

NORMS: tuple[str, ...] = ("Linf", "L2")
AUTOATTACK_ORDER: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
SQUARE_QUERIES = 5000
AUTOATTACK_TARGETS = 9  # AutoAttack's standard version attacks at most 9 target classes

AttackProgress = Callable[[str, int, int], None]  # (attack name, points done, points total)


# ----------------------------------------------------------------------------- helpers

StepLoss = Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]
"""What `pgd` ascends: ``loss_fn(x_adv, active) -> (loss, keep)``.

``x_adv`` holds the iterates of the points still attacked, ``active`` their rows in ``x`` (None:
every row). ``loss`` is the scalar whose input gradient gives the step; ``keep`` is a bool mask
over those points of the ones to go on attacking, or None to attack them all again.
"""


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project ``x_adv`` onto the ``norm``-ball of radius ``eps`` around ``x``, then onto [0, 1].

    L∞ clamps ``x_adv`` between ``x − eps`` and ``x + eps`` directly (never through ``x_adv − x``),
    so a point already inside the ball is returned bit for bit and projecting twice changes
    nothing. Clamping to [0, 1] after the L2 projection only moves coordinates towards ``x``
    (which is in [0, 1]), so the result stays inside the ball.
    """
    if norm == "Linf":
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    delta = x_adv - x
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    delta = delta * (eps / norms).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0)


def direction(grad: Tensor, norm: str) -> Tensor:
    """The steepest-ascent direction of unit ``norm``: sign(g) for L∞, g/‖g‖₂ for L2 (per sample)."""
    if norm == "Linf":
        return grad.sign()
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / norms.view(-1, *([1] * (grad.dim() - 1)))


def uniform_noise(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    """U(−eps, eps) noise shaped like ``x``, drawn on the generator's device (reproducible runs)."""
    device = generator.device if generator is not None else x.device
    noise = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float32)
    return ((2 * noise - 1) * eps).to(device=x.device, dtype=x.dtype)


def random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """A random point of the ball around ``x``: uniform in the L∞ cube, or a uniform radius along a
    Gaussian direction for L2 (not yet projected onto [0, 1]; `pgd` does that)."""
    if norm == "Linf":
        return x + uniform_noise(x, eps, generator)
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device)
    radius = torch.rand(x.shape[0], generator=generator, device=device) * eps
    shape = (-1, *([1] * (x.dim() - 1)))
    noise = noise / noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape) * radius.view(shape)
    return x + noise.to(device=x.device, dtype=x.dtype)


def pgd(loss_fn: StepLoss, x: Tensor, start: Tensor, *, eps: float, norm: str, step_size: float,
        steps: int) -> Tensor:
    """Projected gradient ascent of ``loss_fn`` over the ``norm``-ball of radius ``eps`` around ``x``.

    Madry et al. (2018): x' ← Π_{B(x,ε)∩[0,1]}(x' + step_size·d(∇ₓ′ loss)), d = `direction`, from
    ``start`` (projected first). The one PGD of kdiga_core: `PGD` (evaluation), the training
    objectives' inner attacks and the local-linearity ascent all run this loop. Points that
    ``loss_fn`` stops keeping keep their iterate of that step and cost nothing afterwards.
    Gradients are taken with respect to the input only; the caller decides the model's mode.

    Returns:
        The iterates (detached), inside the ball and [0, 1].
    """
    out = project(start.detach(), x, eps, norm)
    active: Tensor | None = None  # rows still attacked; None while that is every row
    for _ in range(steps):
        x_adv = _rows(out, active).detach().requires_grad_(True)
        with torch.enable_grad():
            loss, keep = loss_fn(x_adv, active)
            (grad,) = torch.autograd.grad(loss, x_adv)
        if keep is not None:
            active = _rows(torch.arange(len(x), device=x.device), active)[keep]
            x_adv, grad = x_adv[keep], grad[keep]
            if len(active) == 0:
                break
        stepped = project(x_adv.detach() + step_size * direction(grad, norm), _rows(x, active), eps, norm)
        out = stepped if active is None else out.index_put_((active,), stepped)
    return out.detach()


def _rows(t: Tensor, active: Tensor | None) -> Tensor:
    return t if active is None else t[active]


def batch_loss(fn: Callable[[Tensor], Tensor]) -> StepLoss:
    """A `StepLoss` from a plain ``x_adv -> scalar`` function that attacks every point every step."""
    return lambda x_adv, _active: (fn(x_adv), None)


def predict(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Predicted classes of ``x``, in no-grad batches."""
    with torch.no_grad():
        return torch.cat([model(xb).argmax(1) for xb in x.split(batch_size)])


@contextmanager
def model_mode(model: nn.Module, *, train: bool | None = False, freeze_params: bool = True,
               freeze_bn_stats: bool = False) -> Iterator[nn.Module]:
    """Set how ``model`` runs for a block; restore everything on exit, even on error.

    The one mode switch of kdiga_core. The defaults (eval mode, frozen parameters) are what
    attacks and input-gradient measurements want: gradients with respect to inputs only, so
    frozen parameters skip their gradient work and keep ``.grad`` of a training model clean.

    Args:
        model: The model.
        train: False for eval mode (attacks run in eval mode, as TRADES/ARD do, so they neither
            see nor update batch-norm statistics); None to leave the mode as it is.
        freeze_params: Turn ``requires_grad`` off on every parameter.
        freeze_bn_stats: Batch-norm layers in training mode keep using batch statistics but stop
            updating their running ones (momentum 0): for extra passes that evaluate the same
            function (finite differences, noised copies) rather than show new data.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()] if freeze_params else []
    momenta = [(m, m.momentum) for m in _training_batchnorms(model)] if freeze_bn_stats else []
    if train is not None:
        model.train(train)
    for p, _ in flags:
        p.requires_grad_(False)
    for m, _ in momenta:
        m.momentum = 0.0
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, momentum in momenta:
            m.momentum = momentum
        if train is not None:
            model.train(was_training)


def _training_batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise KdigaError(f"norm must be one of: {', '.join(NORMS)}.")


def _margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample CW margin max_{j≠y} z_j − z_y (larger means closer to misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - true


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ce": lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
    "margin": _margin_loss,
}


# ----------------------------------------------------------------------------- base


class Attack:
    """Base class: model-mode and requires_grad bookkeeping, final projection.

    Subclasses implement `perturb(model, x, y)`; the base `__call__` puts the model in
    eval mode, freezes its parameters (attacks need input gradients only, and frozen
    parameters skip their gradient work), and restores both afterwards, even on error.
    """

    name = "attack"

    def __init__(self, eps: float, norm: str = "Linf"):
        _check_norm(norm)
        if eps < 0:
            raise KdigaError("eps must be zero or positive.")
        self.eps, self.norm = float(eps), norm

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise KdigaError("Attack inputs must be pixels in [0, 1]; normalise inside the model.")
        if self.eps == 0 or x.shape[0] == 0:
            return x.detach().clone()
        with model_mode(model), torch.enable_grad():
            x_adv = self.perturb(model, x.detach(), y.detach())
        return project(x_adv.detach(), x.detach(), self.eps, self.norm)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Return adversarial inputs (projected again by `__call__`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:g}, norm={self.norm!r})"


# ----------------------------------------------------------------------------- PGD


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018), L∞ or L2, batched.

    Each step ascends the per-sample loss (summed, so one sample's step never depends
    on the batch size): L∞ steps by ``step_size * sign(grad)``, L2 steps by
    ``step_size * grad / ‖grad‖₂``; then projects onto the ε-ball and [0, 1] (the `pgd`
    loop, shared with the training objectives). Returns the last iterate, as torchattacks'
    PGD does.

    Args:
        eps: Radius in pixel units.
        norm: ``"Linf"`` or ``"L2"``.
        steps: Number of steps.
        step_size: Step length; default ``2.5 * eps / steps`` (method.md §5).
        random_start: Start uniformly in the L∞ ball, or at a random point of the L2 ball.
        loss: ``"ce"`` or ``"margin"`` (CW margin).
        generator: Generator for the random start (drawn on its device, moved to the inputs').
        stop_when_misclassified: For evaluation: keep the first iterate that the model
            misclassifies and stop attacking that point (as AutoAttack's APGD keeps its best
            iterate). Never weaker than the last iterate, and cheaper: later steps run on the
            points still standing only. Off for training-time attacks, whose examples must take
            every step.
    """

    name = "pgd"

    def __init__(
        self,
        eps: float,
        norm: str = "Linf",
        steps: int = 20,
        step_size: float | None = None,
        random_start: bool = True,
        loss: str = "ce",
        generator: torch.Generator | None = None,
        stop_when_misclassified: bool = False,
    ):
        super().__init__(eps, norm)
        self.stop_when_misclassified = stop_when_misclassified
        if steps < 1:
            raise KdigaError("steps must be at least 1.")
        if loss not in LOSSES:
            raise UnknownNameError("attack loss", loss, list(LOSSES))
        self.steps, self.random_start, self.loss, self.generator = int(steps), random_start, loss, generator
        self.step_size = float(step_size) if step_size is not None else 2.5 * self.eps / self.steps

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        start = random_start(x, self.eps, self.norm, self.generator) if self.random_start else x
        return pgd(self.step_loss(model, y), x, start, eps=self.eps, norm=self.norm, step_size=self.step_size,
                   steps=self.steps)

    def step_loss(self, model: nn.Module, y: Tensor) -> StepLoss:
        """The summed per-sample loss (so one sample's step never depends on the batch), and, when
        stopping at misclassification, the points that each step's logits still classify right."""
        per_sample = LOSSES[self.loss]

        def loss_fn(x_adv: Tensor, active: Tensor | None) -> tuple[Tensor, Tensor | None]:
            labels = _rows(y, active)
            logits = model(x_adv)
            standing = logits.argmax(1) == labels if self.stop_when_misclassified else None
            return per_sample(logits, labels).sum(), standing

        return loss_fn


def FGSM(eps: float, norm: str = "Linf") -> PGD:  # noqa: N802 -- reads like the attack's class name
    """Fast gradient sign method (Goodfellow et al. 2015): one full-size step, no random start."""
    return PGD(eps, norm, steps=1, step_size=eps, random_start=False)


# ----------------------------------------------------------------------------- torchattacks wrappers


class _TorchAttack(Attack):
    """Wraps one torchattacks attack, built per call because the model changes per call.

    torchattacks seeds the global RNG (``torch.random.manual_seed``) inside its attacks;
    forking the RNG keeps that from leaking into the caller's training randomness.
    """

    def __init__(
        self,
        eps: float,
        norm: str = "Linf",
        *,
        steps: int = 100,
        restarts: int = 1,
        seed: int = 0,
        n_classes: int | None = None,
    ):
        super().__init__(eps, norm)
        self.steps, self.restarts, self.seed, self.n_classes = int(steps), int(restarts), int(seed), n_classes

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        n_classes = self.n_classes or int(predict_logits_shape(model, x))
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            atk = self.build(model, n_classes)
            atk.set_device(x.device)
            return atk(x, y)

    def build(self, model: nn.Module, n_classes: int) -> Any:
        raise NotImplementedError


def predict_logits_shape(model: nn.Module, x: Tensor) -> int:
    """Number of classes the model outputs (one forward pass on one input)."""
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


class APGDCE(_TorchAttack):
    """APGD on cross-entropy (Croce & Hein 2020), via torchattacks."""

    name = "apgd-ce"

    def build(self, model: nn.Module, n_classes: int) -> Any:  # noqa: ARG002 - the registry signature
        import torchattacks

        return torchattacks.APGD(
            model,
            norm=self.norm,
            eps=self.eps,
            steps=self.steps,
            n_restarts=self.restarts,
            seed=self.seed,
            loss="ce",
        )


class APGDT(_TorchAttack):
    """Targeted APGD on the DLR loss over the top-9 target classes, via torchattacks.

    The targeted DLR loss reads the four largest logits, so with fewer than 4 classes
    the attack is skipped (returns ``x`` unchanged) instead of failing.
    """

    name = "apgd-t"
    min_classes = 4

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if (self.n_classes or predict_logits_shape(model, x)) < self.min_classes:
            logger.warning("APGD-T skipped: it needs at least %d classes.", self.min_classes)
            return x.clone()
        return super().perturb(model, x, y)

    def build(self, model: nn.Module, n_classes: int) -> Any:
        import torchattacks

        atk = torchattacks.APGDT(
            model,
            norm=self.norm,
            eps=self.eps,
            steps=self.steps,
            n_restarts=self.restarts,
            seed=self.seed,
            n_classes=n_classes,
        )
        # torchattacks would try all n_classes-1 targets; AutoAttack's standard uses 9.
        atk.n_target_classes = min(AUTOATTACK_TARGETS, n_classes - 1)
        return atk


class FABT(_TorchAttack):
    """Targeted FAB (Croce & Hein 2020) over the top-9 target classes, via torchattacks."""

    name = "fab-t"

    def build(self, model: nn.Module, n_classes: int) -> Any:
        import torchattacks

        atk = torchattacks.FAB(
            model,
            norm=self.norm,
            eps=self.eps,
            steps=self.steps,
            n_restarts=self.restarts,
            seed=self.seed,
            multi_targeted=True,
            n_classes=n_classes,
        )
        atk.n_target_classes = min(AUTOATTACK_TARGETS, n_classes - 1)
        return atk


class Square(_TorchAttack):
    """Square attack (Andriushchenko et al. 2020): black-box, score-based, via torchattacks.

    Needs no gradients, so it exposes gradient masking (design.md §9).
    """

    name = "square"

    def __init__(
        self,
        eps: float,
        norm: str = "Linf",
        *,
        n_queries: int = SQUARE_QUERIES,
        restarts: int = 1,
        seed: int = 0,
        n_classes: int | None = None,
    ):
        super().__init__(eps, norm, steps=1, restarts=restarts, seed=seed, n_classes=n_classes)
        self.n_queries = int(n_queries)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.norm == "L2" and min(x.shape[-2:]) < 5:
            # torchattacks' L2 Square tiles the image with 5x5 windows (it divides by h // 5).
            raise KdigaError("The L2 Square attack needs images of at least 5x5 pixels.")
        # Square only queries the model: no autograd graph needed.
        with torch.no_grad():
            return super().perturb(model, x, y)

    def build(self, model: nn.Module, n_classes: int) -> Any:  # noqa: ARG002 - the registry signature
        import torchattacks

        return torchattacks.Square(
            model,
            norm=self.norm,
            eps=self.eps,
            n_queries=self.n_queries,
            n_restarts=self.restarts,
            seed=self.seed,
        )


# ----------------------------------------------------------------------------- AutoAttack


def _autoattack_members(
    eps: float, norm: str, *, steps: int, seed: int, n_classes: int | None, n_queries: int
) -> list[Attack]:
    kw: dict[str, Any] = {"steps": steps, "seed": seed, "n_classes": n_classes}
    return [
        APGDCE(eps, norm, **kw),
        APGDT(eps, norm, **kw),
        FABT(eps, norm, **kw),
        Square(eps, norm, n_queries=n_queries, seed=seed, n_classes=n_classes),
    ]


@dataclass(frozen=True)
class AutoAttackPoint:
    """Where a run of `run_autoattack` is after a batch: enough to go on from there.

    Attributes:
        member: Index of the member attack running (in `AUTOATTACK_ORDER`). batches: Its batches done.
        clean: Points classified correctly at the clean input. entering: Points still robust when
            ``member`` started (the survivors it attacks). robust: Points robust now.
        breakdown: The breakdown entries of the members before ``member``.
    """

    member: int
    batches: int
    clean: Tensor
    entering: Tensor
    robust: Tensor
    breakdown: list[dict[str, Any]]


def run_autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "Linf",
    *,
    seed: int = 0,
    n_classes: int | None = None,
    steps: int = 100,
    n_queries: int = SQUARE_QUERIES,
    batch_size: int | None = None,
    progress: AttackProgress | None = None,
    start: AutoAttackPoint | None = None,
    on_batch: Callable[[AutoAttackPoint], None] | None = None,
) -> dict[str, Any]:
    """AutoAttack, standard version: APGD-CE, APGD-T, FAB-T, Square (Croce & Hein 2020).

    Each attack runs only on the points that every earlier attack failed to break, as in
    the reference implementation; a point counts as robust only if it is classified
    correctly at the clean input and at every attack's output.

    Args:
        model: Classifier taking [0, 1] pixels.
        x: Inputs in [0, 1]. y: True labels.
        eps: Radius. norm: ``"Linf"`` or ``"L2"``.
        seed: Seed for every member attack (torchattacks seeds its RNG with it at every call, so
            each batch's randomness does not depend on the batches run before it).
        n_classes: Classes of the model (inferred from one forward pass when None).
        steps: Iterations of APGD and FAB (the standard version uses 100).
        n_queries: Square's query budget (the standard version uses 5000).
        batch_size: Attack at most this many points at once (None: all).
        progress: Called with (attack name, points done, points total) as each attack starts
            and after each of its batches; the total is the number of survivors it runs on.
            A member finished before ``start`` is told (name, 0, 0).
        start: Go on from this point of an earlier run (as its ``on_batch`` was told it) instead
            of the beginning; the result is the uninterrupted run's.
        on_batch: Told the point reached after each batch (its tensors are the run's own: copy
            or serialise them during the call).

    Returns:
        ``{"robust": bool mask, "x_adv": adversarial inputs (x where no attack
        succeeded; a run from ``start`` has only those it found itself), "clean_accuracy": float,
        "robust_accuracy": float, "breakdown": [{"attack", "robust_accuracy"}] after each attack}``.
    """
    _check_norm(norm)
    # Eval mode throughout: the survivors' predictions must not use batch statistics.
    with model_mode(model):
        clean = start.clean if start is not None else predict(model, x) == y
        robust = (start.robust if start is not None else clean).clone()
        x_adv = x.detach().clone()
        n_classes = n_classes or predict_logits_shape(model, x)
        breakdown = list(start.breakdown) if start is not None else []
        members = _autoattack_members(eps, norm, steps=steps, seed=seed, n_classes=n_classes, n_queries=n_queries)
        first = start.member if start is not None else 0
        for m, attack in enumerate(members):
            if m < first:  # finished before the run was resumed: its entry is in the breakdown
                if progress is not None:
                    progress(attack.name, 0, 0)
                continue
            resumed = start is not None and m == first
            entering = start.entering if start is not None and resumed else robust.clone()
            kept = _keeper(on_batch, AutoAttackPoint(m, 0, clean, entering, robust, breakdown))
            _attack_survivors(attack, model, x, y, robust, x_adv, batch_size, progress,
                              survivors=entering.nonzero().squeeze(1),
                              skip=start.batches if start is not None and resumed else 0, on_batch=kept)
            breakdown.append(_stage(attack, robust, n_classes))
    return {
        "robust": robust,
        "x_adv": x_adv,
        "clean_accuracy": _fraction(clean),
        "robust_accuracy": breakdown[-1]["robust_accuracy"],
        "breakdown": breakdown,
    }


def _keeper(on_batch: Callable[[AutoAttackPoint], None] | None,
            point: AutoAttackPoint) -> Callable[[int], None] | None:
    """``on_batch`` told ``point`` with its batches done (None without ``on_batch``)."""
    if on_batch is None:
        return None
    return lambda batches: on_batch(dataclasses.replace(point, batches=batches))


def _fraction(mask: Tensor) -> float:
    return float(mask.float().mean().item()) if mask.numel() else 0.0


def _stage(attack: Attack, robust: Tensor, n_classes: int) -> dict[str, Any]:
    """One breakdown entry: robust accuracy after ``attack`` (noting attacks that were skipped)."""
    stage: dict[str, Any] = {"attack": attack.name, "robust_accuracy": _fraction(robust)}
    min_classes = getattr(attack, "min_classes", 0)
    if n_classes < min_classes:
        stage["note"] = f"skipped: needs at least {min_classes} classes"
    return stage


def _attack_survivors(
    attack: Attack,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    robust: Tensor,
    x_adv: Tensor,
    batch_size: int | None,
    progress: AttackProgress | None,
    *,
    survivors: Tensor,
    skip: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Attack the ``survivors`` (rows), batch by batch from batch ``skip``; update ``robust`` and
    ``x_adv`` in place and tell ``on_batch`` the batches done after each."""
    chunks = survivors.split(batch_size or max(len(survivors), 1))
    done = sum(len(chunk) for chunk in chunks[:skip])
    if progress is not None:
        progress(attack.name, done, len(survivors))
    for i in range(skip, len(chunks)):
        chunk = chunks[i]
        adv = attack(model, x[chunk], y[chunk])
        fooled = predict(model, adv) != y[chunk]
        robust[chunk[fooled]] = False
        x_adv[chunk[fooled]] = adv[fooled]
        done += len(chunk)
        if on_batch is not None:
            on_batch(i + 1)
        if progress is not None:
            progress(attack.name, done, len(survivors))


class AutoAttack(Attack):
    """`run_autoattack` behind the common attack contract (returns the adversarial inputs)."""

    name = "autoattack"

    def __init__(
        self,
        eps: float,
        norm: str = "Linf",
        *,
        steps: int = 100,
        seed: int = 0,
        n_classes: int | None = None,
        n_queries: int = SQUARE_QUERIES,
    ):
        super().__init__(eps, norm)
        self.steps, self.seed, self.n_classes, self.n_queries = steps, seed, n_classes, n_queries

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return run_autoattack(
            model,
            x,
            y,
            self.eps,
            self.norm,
            seed=self.seed,
            n_classes=self.n_classes,
            steps=self.steps,
            n_queries=self.n_queries,
        )["x_adv"]


# ----------------------------------------------------------------------------- registry


def _build_pgd(spec: AttackSpec, **kw: Any) -> Attack:
    return PGD(spec.eps, spec.norm, steps=spec.steps, step_size=spec.step_size, generator=kw.get("generator"),
               stop_when_misclassified=kw.get("stop_when_misclassified", False))


def _iterative(cls: type[Attack]) -> Callable[..., Attack]:
    """A builder for APGD-CE, APGD-T and FAB-T: the same arguments, from the spec and the options."""

    def build(spec: AttackSpec, **kw: Any) -> Attack:
        return cls(spec.eps, spec.norm, steps=spec.steps, restarts=spec.restarts, seed=kw["seed"],
                   n_classes=kw["n_classes"])

    return build


ATTACKS: dict[str, Callable[..., Attack]] = {
    "pgd": _build_pgd,
    "fgsm": lambda spec, **kw: FGSM(spec.eps, spec.norm),  # noqa: ARG005 - the registry signature
    "apgd-ce": _iterative(APGDCE),
    "apgd-t": _iterative(APGDT),
    "fab-t": _iterative(FABT),
    "square": lambda spec, **kw: Square(
        spec.eps, spec.norm, n_queries=kw["n_queries"], restarts=spec.restarts, seed=kw["seed"],
        n_classes=kw["n_classes"],
    ),
    "autoattack": lambda spec, **kw: AutoAttack(
        spec.eps, spec.norm, steps=spec.steps, seed=kw["seed"], n_classes=kw["n_classes"],
        n_queries=kw["n_queries"],
    ),
}


def list_attacks() -> list[str]:
    """Names accepted by `build_attack`."""
    return sorted(ATTACKS)


def build_attack(
    spec: AttackSpec,
    *,
    n_classes: int | None = None,
    seed: int = 0,
    n_queries: int = SQUARE_QUERIES,
    generator: torch.Generator | None = None,
    stop_when_misclassified: bool = False,
) -> Attack:
    """Build the attack named by ``spec.name``.

    ``spec.steps`` is PGD's step count and the iteration count of APGD/FAB (AutoAttack's
    standard version uses 100); Square uses ``n_queries`` instead. ``stop_when_misclassified``
    (PGD only) is for measuring robust accuracy, never for training-time examples.

    Raises:
        UnknownNameError: the name is not registered (the message lists valid names).
    """
    if spec.name not in ATTACKS:
        raise UnknownNameError("attack", spec.name, list(ATTACKS))
    return ATTACKS[spec.name](spec, n_classes=n_classes, seed=seed, n_queries=n_queries, generator=generator,
                              stop_when_misclassified=stop_when_misclassified)
