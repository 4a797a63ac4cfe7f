"""Typed, validated configurations shared by every part of kdiga_core.

Frozen dataclasses, validated on creation (style.md habit 5). The service builds
them from its pydantic schemas with `from_dict`; `asdict` turns them back into
plain JSON for model cards and reports.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from kdiga_core.errors import KdigaError

IGAMode = Literal["auto", "exact", "finite_difference"]
IGAReduction = Literal["per_sample", "author"]
Method = Literal["ce", "kd", "kdiga", "ard", "rslad", "pgd_at", "trades"]
Norm = Literal["Linf", "L2"]
SweepRule = Literal["robust_within_clean_drop", "max_robust", "max_clean_plus_robust"]
CleanReference = Literal["kd", "kd_or_teacher"]

AUTO = "auto"  # objective.gamma: chosen per job by the γ sweep (kdiga_core.sweep)
SWEEP_RULES: tuple[str, ...] = ("robust_within_clean_drop", "max_robust", "max_clean_plus_robust")

METHODS: tuple[str, ...] = ("ce", "kd", "kdiga", "ard", "rslad", "pgd_at", "trades")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise KdigaError(message)


# timm keyword arguments a model spec may give (`ModelSpec.kwargs`): the shape of the network only. Nothing
# that loads weights or files (pretrained, checkpoint_path, pretrained_cfg...) and nothing the spec already
# sets (num_classes, in_chans, img_size). api/schemas.py mirrors this list (tests/api/test_schema_drift.py).
ARCH_KWARGS: tuple[str, ...] = (
    "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "class_token", "global_pool",
    "no_embed_class", "reg_tokens", "init_values", "drop_rate", "drop_path_rate", "window_size", "depths",
    "dims", "channels", "widths", "num_features", "stem_type", "stem_width",
)
MAX_ARCH_KWARGS = 16
MAX_KWARG_INT = 4096  # ints (and list items) in [0, 4096]; floats in [0, 64]; strings up to 64 characters
MAX_KWARG_FLOAT = 64.0
MAX_KWARG_LIST = 16


def check_arch_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """`ModelSpec.kwargs` checked: known names (`ARCH_KWARGS`), bounded scalars or short lists of ints.

    Raises:
        KdigaError: one sentence naming the first bad entry.
    """
    if kwargs is None:
        return None
    _check(isinstance(kwargs, dict), "kwargs must be an object of timm keyword arguments.")
    _check(len(kwargs) <= MAX_ARCH_KWARGS, f"kwargs may hold at most {MAX_ARCH_KWARGS} entries.")
    for key, value in kwargs.items():
        _check(key in ARCH_KWARGS, f"kwargs.{key} is not a keyword a model spec may set; valid names are: "
               f"{', '.join(sorted(ARCH_KWARGS))}.")
        _check(_kwarg_ok(value), f"kwargs.{key} must be a boolean, an integer in [0, {MAX_KWARG_INT}], a number in "
               f"[0, {MAX_KWARG_FLOAT:g}], a name of at most 64 characters, or a list of at most {MAX_KWARG_LIST} "
               "such integers.")
    return {k: list(v) if isinstance(v, list | tuple) else v for k, v in kwargs.items()}


def _kwarg_ok(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return 0 <= value <= MAX_KWARG_INT
    if isinstance(value, float):
        return math.isfinite(value) and 0.0 <= value <= MAX_KWARG_FLOAT
    if isinstance(value, str):
        return 0 < len(value) <= 64
    if isinstance(value, list | tuple):
        return len(value) <= MAX_KWARG_LIST and all(isinstance(v, int) and not isinstance(v, bool)
                                                   and 0 <= v <= MAX_KWARG_INT for v in value)
    return False


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
    # timm keyword arguments that shape the network (a ViT's patch_size, depth...): `check_arch_kwargs`
    kwargs: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", check_arch_kwargs(self.kwargs))
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
class SweepConfig(_FromDict):
    """How ``objective.gamma: "auto"`` chooses γ (kdiga_core.sweep; REPRODUCTION.md, "γ chosen per job").

    gammas: the γ values to try; empty → `points` values spaced evenly in log γ over
        [gamma_min, gamma_max]. The KD student (γ = 0) is always trained too, as the reference.
    rule: robust_within_clean_drop (the most robust student whose clean validation accuracy is
        within `max_clean_drop` of the reference's), max_robust, or max_clean_plus_robust.
    clean_reference: kd (the KD student's clean accuracy) or kd_or_teacher (the lower of the KD
        student's and the teacher's: a robust teacher pays for its robustness with clean accuracy,
        and a student as accurate as it has not collapsed).
    budget: the whole job's training (trials, KD reference and final run) in units of one
        training run of the job's TrainConfig; the API's work estimate multiplies by it.
    validation_fraction: share of the training split held out (seeded, stratified) to score trials.
    reduction_factor: successive halving keeps the best 1/reduction_factor of the trials at each rung.
    """

    gammas: tuple[float, ...] = ()
    gamma_min: float = 0.3
    gamma_max: float = 30.0
    points: int = 7
    rule: SweepRule = "robust_within_clean_drop"
    max_clean_drop: float = 0.02
    clean_reference: CleanReference = "kd_or_teacher"
    budget: float = 3.0
    validation_fraction: float = 0.2
    validation_points: int = 500
    attack_steps: int = 10
    reduction_factor: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "gammas", tuple(float(g) for g in self.gammas))
        _check(all(g > 0 for g in self.gammas), "sweep.gammas must be positive (γ = 0, plain KD, is always tried).")
        _check(len(self.gammas) <= 20, "sweep.gammas may hold at most 20 values.")
        _check(0 < self.gamma_min < self.gamma_max, "sweep.gamma_min must be positive and below sweep.gamma_max.")
        _check(1 <= self.points <= 20, "sweep.points must be between 1 and 20.")
        _check(self.rule in SWEEP_RULES, f"sweep.rule must be one of: {', '.join(SWEEP_RULES)}.")
        _check(0.0 <= self.max_clean_drop <= 1.0, "sweep.max_clean_drop must be a fraction in [0, 1].")
        _check(self.clean_reference in ("kd", "kd_or_teacher"), "sweep.clean_reference must be one of: kd, kd_or_teacher.")
        _check(1.5 <= self.budget <= 20.0, "sweep.budget must be between 1.5 and 20 training runs.")
        _check(0.05 <= self.validation_fraction <= 0.5, "sweep.validation_fraction must be in [0.05, 0.5].")
        _check(10 <= self.validation_points <= 10_000, "sweep.validation_points must be between 10 and 10000.")
        _check(1 <= self.attack_steps <= 100, "sweep.attack_steps must be between 1 and 100.")
        _check(2 <= self.reduction_factor <= 6, "sweep.reduction_factor must be between 2 and 6.")

    def grid(self) -> tuple[float, ...]:
        """The γ values to try (ascending): `gammas`, or `points` log-spaced values."""
        if self.gammas:
            return tuple(sorted(set(self.gammas)))
        if self.points == 1:
            return (round(math.sqrt(self.gamma_min * self.gamma_max), 4),)
        ratio = (self.gamma_max / self.gamma_min) ** (1 / (self.points - 1))
        return tuple(round(self.gamma_min * ratio**i, 4) for i in range(self.points))


@dataclass(frozen=True)
class ObjectiveConfig(_FromDict):
    """Loss hyperparameters (method.md §2 and §6).

    kd/kdiga: L = alpha*tau^2*KL(T||S) + (1-alpha)*CE + gamma*IGA.
    gamma_warmup: fraction of total steps over which gamma ramps linearly from 0.
    iga_noise_eps: if > 0, input gradients are taken at x + U(-eps, eps) (author's variant).
    iga_every / iga_fraction: lazy IGA (StyleGAN2's lazy R1): the IGA term only on every
        iga_every-th step, scaled by iga_every, and on the first ceil(iga_fraction·B) samples of
        the (already shuffled) batch. 1 and 1.0: exact full-batch IGA on every step.
    teacher_bank_k: with augmentation, precompute the teacher's logits and input gradients for
        this many fixed augmentations of every training sample (kdiga_core.teacher_bank); 0: off.
        A job that leaves it out gets 4 for kdiga with crop/flip augmentation (kdiga_core.defaults).
    ard/rslad/pgd_at/trades use the attack_* fields for their inner PGD, in the `attack_norm` ball;
    the IGA noise (iga_noise_eps) is drawn from the same norm's ball. attack_step None: 2.5·eps/steps.
    A job's omitted attack_* values come from its threat model (`kdiga_core.defaults`).
    """

    method: Method = "kdiga"
    alpha: float = 0.5
    tau: float = 1.0
    # "auto": chosen per job by a sweep (kdiga_core.sweep, `sweep` says how): the best γ depends on the
    # teacher/student pair, ε and the schedule (REPRODUCTION.md: 5 worked for one digits pair, collapsed others)
    gamma: float | str = AUTO
    gamma_warmup: float = 0.5
    iga_mode: IGAMode = "auto"
    iga_reduction: IGAReduction = "per_sample"
    fd_step: float = 1e-2
    iga_noise_eps: float = 0.0
    iga_every: int = 1
    iga_fraction: float = 1.0
    teacher_bank_k: int = 0
    # inner attack for adversarial methods (ARD, RSLAD, PGD-AT, TRADES)
    attack_norm: Norm = "Linf"
    attack_eps: float = 8 / 255
    attack_step: float | None = None  # None: 2.5*attack_eps/attack_steps (scales with the radius)
    attack_steps: int = 10
    trades_beta: float = 6.0
    ard_tau: float = 30.0
    ard_alpha: float = 1.0
    sweep: SweepConfig | None = None  # only with gamma "auto"; None: SweepConfig's defaults

    def __post_init__(self) -> None:
        if isinstance(self.sweep, dict):
            object.__setattr__(self, "sweep", SweepConfig.from_dict(self.sweep))
        if self.gamma != AUTO:
            _check(isinstance(self.gamma, int | float) and not isinstance(self.gamma, bool),
                   'gamma must be a number or "auto".')
            object.__setattr__(self, "gamma", float(self.gamma))
        _check(self.method in METHODS, f"Unknown method '{self.method}'; valid names are: {', '.join(sorted(METHODS))}.")
        _check(0.0 <= self.alpha <= 1.0, "alpha must be between 0 and 1.")
        _check(self.tau > 0, "tau must be positive.")
        _check(self.gamma == AUTO or self.gamma >= 0, 'gamma must be zero or positive, or "auto".')
        _check(self.sweep is None or self.gamma == AUTO, 'objective.sweep is only read with gamma "auto".')
        _check(0.0 <= self.gamma_warmup < 1.0, "gamma_warmup must be a fraction in [0, 1).")
        _check(self.iga_mode in ("auto", "exact", "finite_difference"),
               "iga_mode must be one of: auto, exact, finite_difference.")
        _check(self.iga_reduction in ("per_sample", "author"), "iga_reduction must be one of: author, per_sample.")
        _check(0 < self.fd_step <= 0.5, "fd_step must be in (0, 0.5].")
        _check(self.iga_noise_eps >= 0, "iga_noise_eps must be zero or positive.")
        _check(isinstance(self.iga_every, int) and 1 <= self.iga_every <= 64,
               "iga_every must be a whole number between 1 and 64.")
        _check(0.0 < self.iga_fraction <= 1.0, "iga_fraction must be in (0, 1].")
        _check(isinstance(self.teacher_bank_k, int) and 0 <= self.teacher_bank_k <= 64,
               "teacher_bank_k must be a whole number between 0 and 64.")
        _check(self.attack_norm in ("Linf", "L2"), "attack_norm must be one of: L2, Linf.")
        _check(self.attack_eps >= 0 and self.attack_steps >= 1, "attack_eps must be >= 0 and attack_steps >= 1.")
        if self.attack_step is None:
            object.__setattr__(self, "attack_step", 2.5 * self.attack_eps / self.attack_steps if self.attack_eps else 1e-3)
        _check(self.attack_step > 0, "attack_step must be positive.")

    @property
    def sweeps_gamma(self) -> bool:
        """True when this objective's γ is chosen by the sweep (kdiga with gamma "auto")."""
        return self.method == "kdiga" and self.gamma == AUTO

    def sweep_config(self) -> SweepConfig:
        """The sweep's settings (SweepConfig's defaults when none were given)."""
        return self.sweep if self.sweep is not None else SweepConfig()


@dataclass(frozen=True)
class TrainConfig(_FromDict):
    """The training loop's settings (nanoGPT-style: one dataclass)."""

    epochs: int = 10
    batch_size: int = 128  # per device: one step sees batch_size × devices × grad_accum_steps samples
    grad_accum_steps: int = 1  # micro-batches whose gradients add up to one optimizer step
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # lr follows the effective batch's multiple of batch_size
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of total epochs (step schedule)
    step_gamma: float = 0.1
    augment: bool = False  # random crop (pad img_size//8) + horizontal flip (= augmentation "cifar")
    hflip: bool = True  # only used when augmenting; off for digits-like data where flips change meaning
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = True  # bf16 autocast, only ever on CUDA
    # teacher logits + input gradients cached (bf16, host memory) when the inputs repeat: None = where it
    # fits KDIGA_TEACHER_CACHE_BUDGET_BYTES on the in-memory path; True also asks for it on the streaming
    # path; False never
    cache_teacher: bool | None = None
    # none | cifar (pad-crop-flip) | imagenet (RandomResizedCrop + flip; resize + center crop to evaluate);
    # None: "cifar" when augment else "none"
    augmentation: Literal["none", "cifar", "imagenet"] | None = None
    img_size: int | None = None  # a dataset read in place is resized/cropped to this (default: the teacher's)
    loader_workers: int | None = None  # streaming loader processes (None: one per core but one, at most 8)

    @property
    def preset(self) -> str:
        """The augmentation preset in force (`augmentation`, else the legacy `augment` flag)."""
        return self.augmentation or ("cifar" if self.augment else "none")

    def __post_init__(self) -> None:
        _check(1 <= self.epochs <= 10_000, "epochs must be between 1 and 10000.")
        _check(1 <= self.batch_size <= 65_536, "batch_size must be between 1 and 65536.")
        _check(1 <= self.grad_accum_steps <= 1024, "grad_accum_steps must be between 1 and 1024.")
        _check(self.lr_scaling in ("none", "linear", "sqrt"), "lr_scaling must be one of: linear, none, sqrt.")
        _check(self.optimizer in ("sgd", "adamw"), "optimizer must be one of: adamw, sgd.")
        _check(self.lr > 0, "lr must be positive.")
        _check(self.schedule in ("cosine", "step", "constant"), "schedule must be one of: constant, cosine, step.")
        _check(self.augmentation in (None, "none", "cifar", "imagenet"),
               "augmentation must be one of: cifar, imagenet, none.")
        _check(self.img_size is None or 4 <= self.img_size <= 1024, "img_size must be between 4 and 1024 pixels.")
        _check(self.loader_workers is None or 0 <= self.loader_workers <= 64,
               "loader_workers must be between 0 and 64.")
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
    # skip this attack (the report says so) when the evaluation plan expects it to take longer; the
    # defaults give the full AutoAttack a small budget so it runs only where it is cheap
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.steps is None:
            standard = 100 if self.name in ("autoattack", "apgd-ce", "apgd-t", "fab-t") else 20
            object.__setattr__(self, "steps", standard)
        _check(self.norm in ("Linf", "L2"), "norm must be one of: L2, Linf.")
        _check(self.eps >= 0, "eps must be zero or positive.")
        _check(self.steps >= 1, "steps must be at least 1.")
        _check(self.max_seconds is None or self.max_seconds > 0, "max_seconds must be positive.")


@dataclass(frozen=True)
class ThreatModel(_FromDict):
    """The job's one threat model: training attacks, the IGA noise and the report's attacks use it
    unless they give their own. None: sized to the data (`kdiga_core.defaults`); step is the training
    attack's (evaluation attacks take 2.5·eps/steps of their own)."""

    norm: Norm | None = None
    eps: float | None = None
    step: float | None = None

    def __post_init__(self) -> None:
        _check(self.norm in (None, "Linf", "L2"), "threat_model.norm must be one of: L2, Linf.")
        _check(self.eps is None or self.eps > 0, "threat_model.eps must be positive.")
        _check(self.step is None or self.step > 0, "threat_model.step must be positive.")


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


@dataclass(frozen=True)
class LimitsConfig(_FromDict):
    """How long one run of a job may take, and how often training saves its place.

    A run that spends `time_budget_s` stops at a safe point (after a checkpoint) with
    `StoppedError`; resuming the job gives it another budget and continues from that checkpoint.
    """

    time_budget_s: float | None = None  # None: only the service's time limit
    checkpoint_every_s: float | None = None  # None: checkpoints at epoch ends only

    def __post_init__(self) -> None:
        _check(self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s must be positive.")
        _check(self.checkpoint_every_s is None or self.checkpoint_every_s > 0, "checkpoint_every_s must be positive.")
