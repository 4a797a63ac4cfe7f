"""Training objectives: one small class per method, each returning a dict (style.md habit 2).

`build_objective(cfg, student, teacher)` picks the class by `cfg.method`; calling the result
with a batch returns ``{"loss", "logits", <named parts>}``. The training loop backpropagates
``loss`` and logs the rest by name. Methods (method.md §2 and §6):

- ``ce``: plain cross-entropy (baseline student).
- ``kd``: Hinton distillation, α·τ²·KL(T‖S) + (1−α)·CE.
- ``kdiga``: ``kd`` + γ·IGA, the input gradient alignment of Shao et al. (arXiv 2110.12072),
  computed exactly (double backprop) or by a central finite difference (first-order only).
- ``ard`` / ``rslad``: adversarial distillation with an inner PGD-10 (Goldblum 2020, Zi 2021).
- ``pgd_at`` / ``trades``: adversarial training without a teacher, to make robust teachers.

The teacher is frozen: eval mode and ``requires_grad_(False)`` on its parameters. Its logits and
input gradients depend only on the input, so `precompute_teacher` can cache them for the whole
training set when there is no augmentation (method.md §3).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiga_core.attacks import batch_loss, model_mode, pgd, random_start
from kdiga_core.config import METHODS, ObjectiveConfig
from kdiga_core.errors import KdigaError, UnknownNameError
from kdiga_core.losses import (
    ard_loss,
    cross_entropy,
    iga_author,
    iga_per_sample,
    kd_kl,
    rslad_loss,
    trades_kl,
    upcast,
)

__all__ = [
    "Objective",
    "TeacherCache",
    "build_objective",
    "effective_gamma",
    "list_methods",
    "supports_double_backward",
    "teacher_outputs",
]

TEACHER_METHODS = ("kd", "kdiga", "ard", "rslad")

# ----------------------------------------------------------------------------- helpers


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _normal(x: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return (noise * std).to(device=x.device, dtype=x.dtype)


def _same_function(model: nn.Module) -> contextlib.AbstractContextManager:
    """Extra passes that evaluate the same function, not new data: batch-norm running stats stay put."""
    return model_mode(model, train=None, freeze_params=False, freeze_bn_stats=True)


def effective_gamma(cfg: ObjectiveConfig, progress: float) -> float:
    """γ after warm-up: γ·min(1, progress / gamma_warmup), or γ when there is no warm-up.

    Ramping γ from 0 lets the student first fit the labels/teacher; a large constant γ from
    step 0 pulls it to a flat (gradient-free) function and collapses clean accuracy.
    """
    if cfg.gamma_warmup <= 0:
        return cfg.gamma
    return cfg.gamma * min(1.0, max(0.0, progress) / cfg.gamma_warmup)


# ----------------------------------------------------------------------------- double backward probe

_PROBES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], bool]] = weakref.WeakKeyDictionary()


def supports_double_backward(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether the model's input gradient can itself be differentiated (exact IGA needs it).

    Probes once per (model, input shape) with a batch of 2 random images and caches the answer.
    Fails, for instance, on timm's MobileNetV3 (no double backward for ``hardsigmoid_backward``)
    and on ViTs with fused attention (method.md §3).
    """
    shape = tuple(int(s) for s in input_shape)
    known = _PROBES.setdefault(model, {})
    if shape not in known:
        known[shape] = _probe_double_backward(model, shape)
    return known[shape]


def _probe_double_backward(model: nn.Module, shape: tuple[int, ...]) -> bool:
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
    x = torch.rand(2, *shape, device=device, dtype=dtype, requires_grad=True)
    with model_mode(model, freeze_params=False), torch.enable_grad():
        try:
            (grad,) = torch.autograd.grad(upcast(model(x)).logsumexp(1).sum(), x, create_graph=True)
            if params and grad.requires_grad:
                torch.autograd.grad(grad.square().sum(), params, allow_unused=True)
        except (RuntimeError, NotImplementedError):
            return False
    return True


# ----------------------------------------------------------------------------- teacher side


def teacher_outputs(teacher: nn.Module, x: Tensor, y: Tensor, *, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Teacher logits z_t and, if asked, per-sample input gradients g_t = ∇ₓ CE(f_t(x), y).

    Gradients of the summed CE give each sample its own ∇ₓ ℓ_i (the teacher is in eval mode,
    so samples do not interact).
    """
    if not need_grad:
        with torch.no_grad():
            return upcast(teacher(x)), None
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = upcast(teacher(x_in))
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x_in)
    return logits.detach(), grad.detach()


class TeacherCache:
    """Teacher logits (and input gradients) for every training sample, indexed by sample id.

    Built in one pass in fixed order and batch size, so a resumed run reads exactly the values
    an uninterrupted run reads (bit-identical resume). Kept in host memory (pinned on CUDA) in
    16-bit floats by default — fp16 logits (their precision matters to KD), bf16 input gradients
    (their range matters more) — never the whole set on the device; each batch's rows are copied
    to the device when they are read (`kdiga_core.cache_policy` decides whether it fits at all).
    """

    def __init__(self, logits: Tensor, grads: Tensor | None, device: torch.device | None = None):
        self.logits, self.grads = logits, grads
        self.device = device if device is not None else logits.device

    @classmethod
    def build(cls, teacher: nn.Module, x: Tensor, y: Tensor, *, need_grad: bool, device: torch.device,
              batch_size: int = 256, dtype: torch.dtype | None = None) -> TeacherCache:
        """Run the teacher over (x, y) in order on `device`; keep its outputs on the host in `dtype`
        (None: fp16 logits, bf16 gradients)."""
        batches = ((x[s:s + batch_size], y[s:s + batch_size], torch.arange(s, min(s + batch_size, len(x))))
                   for s in range(0, len(x), batch_size))
        return cls.build_from(teacher, batches, len(x), need_grad=need_grad, device=device, dtype=dtype)

    @classmethod
    def build_from(cls, teacher: nn.Module, batches: Any, rows: int, *, need_grad: bool, device: torch.device,
                   dtype: torch.dtype | None = None) -> TeacherCache:
        """The same from (x, y, row index) batches in any order (a streaming loader's), ``rows`` in all."""
        from kdiga_core.data import pixels

        pin = device.type == "cuda"
        logits = grads = None
        for xb, yb, index in batches:
            z, g = teacher_outputs(teacher, pixels(xb.to(device)), yb.to(device), need_grad=need_grad)
            if logits is None:  # sized on the first batch: the class count comes from the teacher
                logits = torch.empty((rows, *z.shape[1:]), dtype=dtype or torch.float16, pin_memory=pin)
                grads = (torch.empty((rows, *g.shape[1:]), dtype=dtype or torch.bfloat16, pin_memory=pin)
                         if g is not None else None)
            index = index.cpu()
            logits[index] = z.to(logits.dtype).cpu()
            if g is not None and grads is not None:
                grads[index] = g.to(grads.dtype).cpu()
        assert logits is not None
        return cls(logits, grads, device)

    def lookup(self, index: Tensor) -> tuple[Tensor, Tensor | None]:
        rows = index.to(self.logits.device)
        logits = self.logits[rows].to(self.device, non_blocking=True).float()
        return logits, None if self.grads is None else self.grads[rows].to(self.device, non_blocking=True).float()


# ----------------------------------------------------------------------------- objectives


class Objective:
    """Base class: ``objective(x, y, *, progress, index=None) -> dict``.

    Args (of the call):
        x: batch of pixels in [0, 1], (B, C, H, W), on the model's device.
        y: int64 labels (B,).
        progress: fraction of training done, in [0, 1] (drives γ warm-up).
        index: the samples' positions in the training set; when given and `precompute_teacher`
            was called, the teacher's outputs are read from the cache instead of recomputed.
        step: the optimizer step (0-based) this batch belongs to, which lazy IGA's schedule reads;
            micro-batches of one step share it. None: the calls are counted.

    Returns:
        dict with ``loss`` (scalar to backpropagate), ``logits`` (student logits on the batch it
        was fitted on, detached) and the loss parts by name (detached scalars).
    """

    method = "base"

    def __init__(self, cfg: ObjectiveConfig, student: nn.Module, teacher: nn.Module | None = None, *,
                 generator: torch.Generator | None = None):
        self.cfg, self.student, self.teacher, self.generator = cfg, student, teacher, generator
        self.attack_norm = cfg.attack_norm  # the job's threat model (kdiga_core.defaults): L∞ or L2
        self.cache: TeacherCache | None = None
        # the optimizer step this call belongs to (lazy IGA): the loop passes it, else calls are counted
        self.calls = self.step = 0
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    def __call__(self, x: Tensor, y: Tensor, *, progress: float = 0.0, index: Tensor | None = None,
                 step: int | None = None) -> dict[str, Any]:
        self.step = self.calls if step is None else step
        self.calls += 1
        return self.forward(x, y, progress=progress, index=index)

    def forward(self, x: Tensor, y: Tensor, *, progress: float, index: Tensor | None) -> dict[str, Any]:
        raise NotImplementedError

    # teacher-side helpers, used by the distillation methods
    def needs_teacher_grads(self) -> bool:
        return False

    def precompute_teacher(self, x: Tensor, y: Tensor, *, batch_size: int = 256,
                           dtype: torch.dtype | None = None) -> None:
        """Cache the teacher's outputs for the whole training set (only without augmentation), in host
        memory (`TeacherCache`; `dtype` None: fp16 logits, bf16 gradients)."""
        if self.teacher is None:
            return
        device = next(self.student.parameters()).device
        self.cache = TeacherCache.build(self.teacher, x, y, need_grad=self.needs_teacher_grads(),
                                        device=device, batch_size=batch_size, dtype=dtype)

    def teacher_batch(self, x: Tensor, y: Tensor, index: Tensor | None, *, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        """Teacher logits (and input gradients) for this batch, from the cache when possible."""
        assert self.teacher is not None
        if index is not None and self.cache is not None:
            logits, grads = self.cache.lookup(index)
            if grads is not None or not need_grad:
                return logits, grads
        return teacher_outputs(self.teacher, x, y, need_grad=need_grad)

    def check_classes(self, z_s: Tensor, z_t: Tensor) -> None:
        if z_s.shape[1] != z_t.shape[1]:
            raise KdigaError(f"The teacher predicts {z_t.shape[1]} classes but the student predicts {z_s.shape[1]}.")

    def random_start(self, x: Tensor) -> Tensor:
        return random_start(x, self.cfg.attack_eps, self.attack_norm, self.generator)

    def attack(self, loss_fn: Callable[[Tensor], Tensor], x: Tensor, start: Tensor) -> Tensor:
        """Inner attack on the student: `attacks.pgd` in eval mode with frozen parameters, with the
        config's eps/step/steps; every point takes every step (training examples)."""
        c = self.cfg
        with model_mode(self.student):
            return pgd(batch_loss(loss_fn), x, start, eps=c.attack_eps, norm=self.attack_norm,
                       step_size=c.attack_step, steps=c.attack_steps)


class CEObjective(Objective):
    """Cross-entropy on clean inputs: the undefended baseline."""

    method = "ce"

    def forward(self, x, y, *, progress, index):  # noqa: ARG002 - the Objective signature
        logits = self.student(x)
        ce = cross_entropy(logits, y)
        return {"loss": ce, "logits": logits.detach(), "ce": ce.detach()}


class PGDATObjective(Objective):
    """PGD adversarial training (Madry et al. 2018): CE(f(x+δ*), y), δ* = PGD-10 on CE, random start."""

    method = "pgd_at"

    def forward(self, x, y, *, progress, index):  # noqa: ARG002 - the Objective signature
        x_adv = self.attack(lambda xa: cross_entropy(self.student(xa), y), x, self.random_start(x))
        logits = self.student(x_adv)
        ce = cross_entropy(logits, y)
        return {"loss": ce, "logits": logits.detach(), "ce": ce.detach(), "adv_ce": ce.detach()}


class TRADESObjective(Objective):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + β·KL(f(x) ‖ f(x+δ*)), δ* = PGD-10 on that KL."""

    method = "trades"

    def forward(self, x, y, *, progress, index):  # noqa: ARG002 - the Objective signature
        with torch.no_grad(), model_mode(self.student):
            z_ref = upcast(self.student(x))
        start = x + _normal(x, 0.001, self.generator)  # TRADES starts next to x, not uniformly
        x_adv = self.attack(lambda xa: trades_kl(self.student(xa), z_ref), x, start)
        logits = self.student(x)
        ce = cross_entropy(logits, y)
        kl = trades_kl(self.student(x_adv), logits)
        loss = ce + self.cfg.trades_beta * kl
        return {"loss": loss, "logits": logits.detach(), "ce": ce.detach(), "kl": kl.detach()}


class ARDObjective(Objective):
    """ARD (Goldblum et al. 2020): α·t²·KL(T(x) ‖ S(x+δ*)) + (1−α)·CE(S(x), y), δ* = PGD on student CE."""

    method = "ard"

    def forward(self, x, y, *, progress, index):  # noqa: ARG002 - the Objective signature
        c = self.cfg
        z_t, _ = self.teacher_batch(x, y, index, need_grad=False)
        x_adv = self.attack(lambda xa: cross_entropy(self.student(xa), y), x, self.random_start(x))
        z_adv = self.student(x_adv)
        self.check_classes(z_adv, z_t)
        # with α = 1 (the paper's default) the clean forward is not needed at all
        z_clean = self.student(x) if c.ard_alpha < 1.0 else z_adv
        loss = ard_loss(z_adv, z_clean, z_t, y, c.ard_tau, c.ard_alpha)
        kd = kd_kl(z_adv, z_t, c.ard_tau)
        return {"loss": loss, "logits": z_clean.detach(), "kd": kd.detach(), "ce": cross_entropy(z_clean, y).detach()}


class RSLADObjective(Objective):
    """RSLAD (Zi et al. 2021): (5/6)·KL(T(x) ‖ S(x+δ*)) + (1/6)·KL(T(x) ‖ S(x)), δ* = PGD on the first KL."""

    method = "rslad"

    def forward(self, x, y, *, progress, index):  # noqa: ARG002 - the Objective signature
        z_t, _ = self.teacher_batch(x, y, index, need_grad=False)
        start = x + _normal(x, 0.001, self.generator)
        x_adv = self.attack(lambda xa: kd_kl(self.student(xa), z_t), x, start)
        z_adv, z_clean = self.student(x_adv), self.student(x)
        self.check_classes(z_clean, z_t)
        loss = rslad_loss(z_adv, z_clean, z_t)
        return {"loss": loss, "logits": z_clean.detach(), "kd": kd_kl(z_clean, z_t).detach(),
                "kd_adv": kd_kl(z_adv, z_t).detach(), "ce": cross_entropy(z_clean, y).detach()}


class KDIGAObjective(Objective):
    """KD and KDIGA (Shao et al., arXiv 2110.12072, method.md §2):

        L = α·τ²·KL(T(x) ‖ S(x)) + (1−α)·CE(S(x), y) + γ·IGA(x, y)

    with IGA = mean_i ‖g_s,i − g_t,i‖₂ (``per_sample``) or (1/B²)·‖G_s − G_t‖_F (``author``),
    g = ∇ₓ CE with the true labels. With ``author`` the KL is also averaged over batch×classes, as in
    the author's code. For method ``kd`` the IGA term is skipped.

    The IGA parameter gradient is computed either exactly (``exact``: g_s with create_graph, one
    double backward) or by a central finite difference (``finite_difference``, method.md §3):
    with v = stopgrad(g_s − g_t), d/dθ ‖v‖ = (∂g_s/∂θ)ᵀ v̂ ≈ d/dθ [ℓ_s(x + h v̂) − ℓ_s(x − h v̂)]/(2h),
    exact up to O(h²) and first-order only. ``auto`` uses exact when the student supports double
    backward and finite difference otherwise.
    """

    method = "kdiga"

    def __init__(self, cfg, student, teacher=None, *, generator=None):
        super().__init__(cfg, student, teacher, generator=generator)
        self.use_iga = cfg.method == "kdiga"
        self.reduce_iga = iga_author if cfg.iga_reduction == "author" else iga_per_sample
        self.kd_reduction = "mean" if cfg.iga_reduction == "author" else "batchmean"
        self.mode: str | None = None  # resolved on the first batch (needs the input shape)
        self.batchnorm = _has_batchnorm(student)
        self.last_iga = torch.zeros(())  # lazy steps report the last measured IGA

    def needs_teacher_grads(self) -> bool:
        # with input noise the gradients are taken at a fresh random point each step: not cacheable
        return self.use_iga and self.cfg.iga_noise_eps == 0

    def resolve_mode(self, input_shape: tuple[int, ...]) -> str:
        """'exact' or 'finite_difference' for this student (probing double backward once)."""
        if self.mode is None:
            wanted = self.cfg.iga_mode
            if wanted == "finite_difference":
                self.mode = wanted
            elif supports_double_backward(self.student, input_shape):
                self.mode = "exact"
            elif wanted == "exact":
                raise KdigaError("This student has a layer without double backward, so exact IGA cannot run; "
                                 "use iga_mode 'finite_difference' or 'auto'.")
            else:
                self.mode = "finite_difference"
        return self.mode

    def iga_due(self) -> bool:
        """Lazy IGA: the term runs on every `iga_every`-th optimizer step (StyleGAN2's lazy R1)."""
        return self.use_iga and self.step % self.cfg.iga_every == 0

    def forward(self, x, y, *, progress, index):
        c = self.cfg
        due = self.iga_due()
        noisy = due and c.iga_noise_eps > 0
        part = max(1, math.ceil(c.iga_fraction * len(x))) if due else 0
        whole = due and not noisy and part == len(x)  # the exact full-batch path shares the clean forward
        # a lazy step needs neither g_t nor ∇ₓ: no teacher backward, no input gradient
        z_t, g_t = self.teacher_batch(x, y, index, need_grad=whole)
        x_in = x.detach().requires_grad_(whole)
        logits = self.student(x_in)
        self.check_classes(logits, z_t)
        ce = cross_entropy(logits, y)
        kd = kd_kl(logits, z_t, c.tau, reduction=self.kd_reduction)
        loss = c.alpha * kd + (1.0 - c.alpha) * ce
        out = {"logits": logits.detach(), "ce": ce.detach(), "kd": kd.detach()}
        if not self.use_iga:
            return {"loss": loss, **out}
        gamma = effective_gamma(c, progress)
        if not due:  # the epoch mean reads the last measured IGA, not a zero
            return {"loss": loss, **out, "iga": self.last_iga, "gamma": gamma}
        if whole:
            x_in, y_in, g_in = x_in, y, g_t
            ce_sum = ce * x.shape[0]  # Σ_i ℓ_i, so each slice of ∇ₓ is that sample's own gradient
        else:
            x_in, y_in, g_in, ce_sum = self.iga_inputs(x[:part], y[:part], g_t, noisy)
        # every k-th step carries k steps' worth of the term; a part of the batch estimates the whole
        weight = c.iga_every * self.part_scale(part, len(x))
        penalty, iga = self.iga_penalty(x_in, y_in, ce_sum, g_in, gamma * weight)
        self.last_iga = (iga * self.part_scale(part, len(x))).detach()
        return {"loss": loss + penalty, **out, "iga": self.last_iga, "gamma": gamma}

    def part_scale(self, part: int, batch: int) -> float:
        """The mean (per_sample) over a part estimates the whole batch's as is; the author's
        (1/B²)·‖G‖_F over m samples is (B/m)^1.5 times the whole batch's estimate."""
        return 1.0 if self.cfg.iga_reduction == "per_sample" else (part / batch) ** 1.5

    def iga_inputs(self, x: Tensor, y: Tensor, g_t: Tensor | None,
                   noisy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Inputs, labels, teacher gradients and Σ_i ℓ_i of the IGA samples, by a pass of their own.

        Used for a part of the batch (lazy IGA) and for the author's noised point; the extra
        forward evaluates the same function, so batch-norm running statistics stay put.
        """
        if noisy:  # author's variant: gradients at a random point of the threat model's ε-ball
            # (L∞: U(−ε, ε) per pixel, as the author's), KD/CE still on clean x
            x = random_start(x, self.cfg.iga_noise_eps, self.cfg.attack_norm, self.generator).clamp(0, 1)
        x_in = x.detach().requires_grad_(True)
        if noisy or g_t is None:
            _, g_t = teacher_outputs(self.teacher, x_in, y, need_grad=True)
        else:
            g_t = g_t[: len(x)]
        with _same_function(self.student):
            ce_sum = F.cross_entropy(upcast(self.student(x_in)), y, reduction="sum")
        return x_in, y, g_t, ce_sum

    def iga_penalty(self, x_in: Tensor, y: Tensor, ce_sum: Tensor, g_t: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
        """γ·IGA as a differentiable term (exact or finite-difference surrogate) and IGA's value."""
        exact = self.resolve_mode(tuple(x_in.shape[1:])) == "exact" and gamma > 0
        (g_s,) = torch.autograd.grad(ce_sum, x_in, create_graph=exact, retain_graph=True)
        iga = self.reduce_iga(g_s, g_t)
        if exact:
            return gamma * iga, iga
        if gamma == 0:  # warm-up start: report IGA, spend no passes on its gradient
            return iga.detach() * 0.0, iga
        surrogate = self.fd_surrogate(x_in.detach(), y, (g_s - g_t).detach())
        # the value stays γ·IGA (what the logs show); the gradient is the FD one
        return gamma * (iga.detach() + surrogate - surrogate.detach()), iga

    def fd_surrogate(self, x: Tensor, y: Tensor, diff: Tensor) -> Tensor:
        """Scalar whose θ-gradient approximates ∂IGA/∂θ by a central difference (method.md §3).

        Both reductions are Σ_i w_i·(∂g_s,i/∂θ)ᵀ v̂_i with v̂_i = d_i/‖d_i‖; per_sample has
        w_i = 1/B, author has w_i = ‖d_i‖/(B²‖D‖_F). We perturb sample i by h·u_i with
        u_i = (w_i/s)·v̂_i, s = max_i w_i, so the largest step is h, and multiply by s. Each ± batch
        is its own forward, so batch-norm batch statistics match those of the exact gradient.
        """
        h, batch = self.cfg.fd_step, x.shape[0]
        flat = upcast(diff.flatten(1))
        norms = flat.norm(dim=1)
        if self.cfg.iga_reduction == "author":
            weights = norms / (batch * batch * flat.norm().clamp_min(1e-30))
        else:
            weights = torch.full_like(norms, 1.0 / batch)
        scale = weights.max()
        u = (flat * (weights / (scale * norms.clamp_min(1e-30))).unsqueeze(1)).view_as(diff).to(x.dtype)
        # float32 on purpose: a difference of two nearby losses in bf16 would be mostly rounding noise
        with _same_function(self.student), _no_autocast(x):
            if self.batchnorm:
                plus = F.cross_entropy(upcast(self.student(x + h * u)), y, reduction="sum")
                minus = F.cross_entropy(upcast(self.student(x - h * u)), y, reduction="sum")
            else:  # no batch coupling: one forward of 2B is cheaper than two of B
                z = upcast(self.student(torch.cat([x + h * u, x - h * u])))
                plus = F.cross_entropy(z[:batch], y, reduction="sum")
                minus = F.cross_entropy(z[batch:], y, reduction="sum")
        return scale.detach() * (plus - minus) / (2 * h)


def _no_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


_OBJECTIVES: dict[str, type[Objective]] = {
    "ce": CEObjective,
    "kd": KDIGAObjective,
    "kdiga": KDIGAObjective,
    "ard": ARDObjective,
    "rslad": RSLADObjective,
    "pgd_at": PGDATObjective,
    "trades": TRADESObjective,
}


def list_methods() -> list[str]:
    """Method names users can pick (the catalog exposes this list)."""
    return sorted(METHODS)


def build_objective(cfg: ObjectiveConfig, student: nn.Module, teacher: nn.Module | None = None, *,
                    generator: torch.Generator | None = None) -> Objective:
    """Create the objective for ``cfg.method``.

    Args:
        cfg: loss hyperparameters.
        student: the model being trained (takes [0, 1] pixels).
        teacher: the frozen teacher; required by kd, kdiga, ard and rslad, ignored otherwise.
        generator: CPU generator for attack starts and input noise (reproducible runs).

    Raises:
        UnknownNameError: unknown method.
        KdigaError: a distillation method without a teacher, or kdiga with gamma "auto".
    """
    if cfg.method not in _OBJECTIVES:
        raise UnknownNameError("method", cfg.method, list(_OBJECTIVES))
    if cfg.method in TEACHER_METHODS and teacher is None:
        raise KdigaError(f"Method '{cfg.method}' needs a teacher model.")
    if cfg.sweeps_gamma:
        raise KdigaError('gamma "auto" is chosen by the sweep (kdiga_core.sweep.choose_gamma) before '
                         "training; give a number to train with a fixed γ.")
    if cfg.method not in TEACHER_METHODS:
        teacher = None
    return _OBJECTIVES[cfg.method](cfg, student, teacher, generator=generator)
