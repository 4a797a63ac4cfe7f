"""Typed, validated configurations shared by every part of kdiga_core.

Frozen dataclasses, validated on creation (style.md habit 5). The service builds
them from its pydantic schemas with `from_dict`; `asdict` turns them back into
plain JSON for model cards and reports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from kdiga_core.errors import KdigaError

IGAMode = Literal["auto", "exact", "finite_difference"]
IGAReduction = Literal["per_sample", "author"]
Method = Literal["ce", "kd", "kdiga", "ard", "rslad", "pgd_at", "trades"]
Norm = Literal["Linf", "L2"]

METHODS: tuple[str, ...] = ("ce", "kd", "kdiga", "ard", "rslad", "pgd_at", "trades")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise KdigaError(message)


class _FromDict:
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None):
        """Build from a plain dict, refusing unknown keys with one sentence."""
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        _check(not unknown, f"Unknown {cls.__name__} field(s): {', '.join(unknown)}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class ModelSpec(_FromDict):
    """What is needed to rebuild a model: architecture + input spec + normalisation.

    `arch` is a timm name or one of our registered small architectures.
    Inputs are pixels in [0, 1] of shape (in_chans, img_size, img_size); the model
    normalises with `mean`/`std` inside.
    """

    arch: str
    num_classes: int
    in_chans: int = 3
    img_size: int = 32
    mean: tuple[float, ...] | None = None  # None: 0.5 per channel
    std: tuple[float, ...] | None = None  # None: 0.5 per channel
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check(self.num_classes >= 2, "num_classes must be at least 2.")
        _check(self.in_chans >= 1, "in_chans must be at least 1.")
        _check(4 <= self.img_size <= 1024, "img_size must be between 4 and 1024 pixels.")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
                _check(len(getattr(self, name)) == self.in_chans,
                       f"{name} must have one value per input channel ({self.in_chans}).")
        if self.std is not None:
            _check(all(s > 0 for s in self.std), "std values must be positive.")
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
            _check(len(self.class_names) == self.num_classes,
                   "class_names must have exactly num_classes entries.")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.img_size, self.img_size)


@dataclass(frozen=True)
class ObjectiveConfig(_FromDict):
    """Loss hyperparameters (method.md §2 and §6).

    kd/kdiga: L = alpha*tau^2*KL(T||S) + (1-alpha)*CE + gamma*IGA.
    gamma_warmup: fraction of total steps over which gamma ramps linearly from 0.
    iga_noise_eps: if > 0, input gradients are taken at x + U(-eps, eps) (author's variant).
    ard/rslad/pgd_at/trades use the attack_* fields for their inner PGD.
    """

    method: Method = "kdiga"
    alpha: float = 0.5
    tau: float = 1.0
    gamma: float = 5.0  # chosen by the digits γ sweep in REPRODUCTION.md (10 and above collapsed there)
    gamma_warmup: float = 0.5
    iga_mode: IGAMode = "auto"
    iga_reduction: IGAReduction = "per_sample"
    fd_step: float = 1e-2
    iga_noise_eps: float = 0.0
    # inner attack for adversarial methods (ARD, RSLAD, PGD-AT, TRADES)
    attack_eps: float = 8 / 255
    attack_step: float = 2 / 255
    attack_steps: int = 10
    trades_beta: float = 6.0
    ard_tau: float = 30.0
    ard_alpha: float = 1.0

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"Unknown method '{self.method}'; valid names are: {', '.join(sorted(METHODS))}.")
        _check(0.0 <= self.alpha <= 1.0, "alpha must be between 0 and 1.")
        _check(self.tau > 0, "tau must be positive.")
        _check(self.gamma >= 0, "gamma must be zero or positive.")
        _check(0.0 <= self.gamma_warmup < 1.0, "gamma_warmup must be a fraction in [0, 1).")
        _check(self.iga_mode in ("auto", "exact", "finite_difference"),
               "iga_mode must be one of: auto, exact, finite_difference.")
        _check(self.iga_reduction in ("per_sample", "author"), "iga_reduction must be one of: author, per_sample.")
        _check(0 < self.fd_step <= 0.5, "fd_step must be in (0, 0.5].")
        _check(self.iga_noise_eps >= 0, "iga_noise_eps must be zero or positive.")
        _check(self.attack_eps >= 0 and self.attack_step > 0 and self.attack_steps >= 1,
               "attack_eps must be >= 0, attack_step > 0 and attack_steps >= 1.")


@dataclass(frozen=True)
class TrainConfig(_FromDict):
    """The training loop's settings (nanoGPT-style: one dataclass)."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of total epochs (step schedule)
    step_gamma: float = 0.1
    augment: bool = False  # random crop (pad img_size//8) + horizontal flip
    hflip: bool = True  # only used when augment; off for digits-like data where flips change meaning
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = True  # bf16 autocast, only ever on CUDA
    cache_teacher: bool = True  # cache teacher logits + input gradients when augment is off

    def __post_init__(self) -> None:
        _check(1 <= self.epochs <= 10_000, "epochs must be between 1 and 10000.")
        _check(1 <= self.batch_size <= 65_536, "batch_size must be between 1 and 65536.")
        _check(self.optimizer in ("sgd", "adamw"), "optimizer must be one of: adamw, sgd.")
        _check(self.lr > 0, "lr must be positive.")
        _check(self.schedule in ("cosine", "step", "constant"), "schedule must be one of: constant, cosine, step.")
        object.__setattr__(self, "step_milestones", tuple(float(m) for m in self.step_milestones))


@dataclass(frozen=True)
class AttackSpec(_FromDict):
    """One attack to evaluate: a registered name, a norm and a radius in pixel units."""

    name: str = "pgd"  # pgd | autoattack | apgd-ce | apgd-t | fab-t | square
    norm: Norm = "Linf"
    eps: float = 8 / 255
    steps: int | None = None  # None: 20 for pgd/fgsm, 100 for AutoAttack and its parts (the standard)
    step_size: float | None = None  # None: 2.5*eps/steps
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.steps is None:
            standard = 100 if self.name in ("autoattack", "apgd-ce", "apgd-t", "fab-t") else 20
            object.__setattr__(self, "steps", standard)
        _check(self.norm in ("Linf", "L2"), "norm must be one of: L2, Linf.")
        _check(self.eps >= 0, "eps must be zero or positive.")
        _check(self.steps >= 1, "steps must be at least 1.")


@dataclass(frozen=True)
class EvalConfig(_FromDict):
    """What the robustness report measures."""

    attacks: tuple[AttackSpec, ...] = field(default_factory=lambda: (AttackSpec("pgd"), AttackSpec("autoattack")))
    max_points: int = 1000  # evaluate on at most this many test points (same points for teacher and student)
    eps_curve: tuple[float, ...] = ()  # () -> a default curve from 0 to 4x the first attack's eps
    curve_attack_steps: int = 10
    alignment: bool = True  # gradient alignment + local-linearity bound (needs a teacher)
    linearity_steps: int = 50
    smoothing_sigma: float = 0.25  # randomized smoothing noise; 0 disables
    smoothing_samples: int = 100
    smoothing_points: int = 50
    latency: bool = True
    square_queries: int = 5000  # Square's query budget inside AutoAttack (5000 is the standard)
    batch_size: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        attacks = tuple(a if isinstance(a, AttackSpec) else AttackSpec.from_dict(a) for a in self.attacks)
        object.__setattr__(self, "attacks", attacks)
        object.__setattr__(self, "eps_curve", tuple(float(e) for e in self.eps_curve))
        _check(self.max_points >= 1, "max_points must be at least 1.")
        _check(self.smoothing_sigma >= 0, "smoothing_sigma must be zero or positive.")
        _check(self.square_queries >= 1, "square_queries must be at least 1.")
