"""Defaults sized to the data: what a job runs with for every setting its request left out.

The static defaults of `kdiga_core.config` know nothing of the data, and on small images they were
wrong (issue 17: SGD at lr 0.1 left the digits CNNs at chance; ε 8/255 on 8×8 digits; AutoAttack on
every test point took 20 minutes of a 5-second job). This module fills what a request did not give
from the dataset's facts (image size, channels, classes, split sizes) and the job's kind, and says
which values it filled, so the stored spec shows what ran and the model card which values were
defaulted. Values the request gave are never changed.

Plain dicts in, plain dicts out, standard library only: the API (which imports neither torch nor the
rest of kdiga_core) resolves a request with it before storing the job, and `kdiga_core.jobs.run_job`
with the same rules when a library caller leaves settings out. The numbers come from REPRODUCTION.md
("Defaults sized to the data" lists the measurements behind each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

NORMS = ("Linf", "L2")

# L∞ radius by image side, in pixel units ([0, 1]): the digits measurements (8×8, 17 grey levels:
# 0.1 is ~1.6 levels), CIFAR's standard 8/255 up to 64 px, ImageNet's 4/255 above.
LINF_EPS_BY_SIZE: tuple[tuple[int, float], ...] = ((16, 0.1), (64, 8 / 255), (1 << 30, 4 / 255))
# L2 radius = the L∞ one × √d × this: the ratio of CIFAR-10's two standard radii, 0.5 / (8/255 · √3072).
L2_PER_LINF_SQRT_D = 0.5 / (8 / 255 * math.sqrt(3 * 32 * 32))
# Inner (training) attack: PGD-K with step 2.5ε/K (Madry et al.; REPRODUCTION.md's teachers used K = 7).
TRAIN_ATTACK_STEPS = 7
STEP_FACTOR = 2.5
# Training: AdamW 3e-3, weight decay 0.05, cosine (every digits measurement; SGD 0.05–0.1 left these
# batch-norm-free CNNs at chance). Epochs are sized to reach the optimizer steps the recipes took:
# 40 epochs × 22 steps for students, 10 × 22 for PGD-AT teachers (examples/digits/).
OPTIMIZER, LR, WEIGHT_DECAY = "adamw", 3e-3, 0.05
SMALL_DATA = 20_000  # training sets below this take batch 64 (the recipes), others 128
TARGET_STEPS = {"distill": 880, "adversarial_train": 220}
EPOCH_RANGE = (10, 100)
# Evaluation: at most this many test points; PGD-20 always, the full AutoAttack only when asked or
# expected to take at most AUTOATTACK_CHEAP_S (`kdiga_core.jobs` drops it otherwise, and says so).
EVAL_POINTS = 1000
EVAL_PGD_STEPS = 20
AUTOATTACK_CHEAP_S = 60.0
DEFAULT_METHOD = {"distill": "kdiga", "adversarial_train": "pgd_at"}
# Teacher bank (issue 13): with crop/flip augmentation a KDIGA job precomputes the teacher for K fixed
# augmentations per sample instead of running it every step. K = 4 kept KDIGA's AutoAttack accuracy
# on digits (3 seeds, 450 points; BENCHMARKS.md "Issue 13") and removes the teacher from the step.
# Up to BANK_MAX_BYTES (CIFAR-10 at K = 4: 1.2 GiB); a larger bank is left off, not refused.
BANK_K = 4
BANK_MAX_BYTES = 2 * 2**30


@dataclass(frozen=True)
class DataFacts:
    """What the defaults read from the dataset: image side, channels, classes and split sizes."""

    img_size: int
    in_chans: int
    num_classes: int
    train_size: int
    test_size: int
    streamed: bool = False  # read in place (image folder, WebDataset): no teacher bank, it needs the rows in memory

    @property
    def dims(self) -> int:
        return self.in_chans * self.img_size * self.img_size

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> DataFacts:
        """From a dataset's summary or row: ``input_shape`` [C, H, W], ``num_classes``, split sizes."""
        chans, side = int(summary["input_shape"][0]), int(summary["input_shape"][-1])
        return cls(img_size=side, in_chans=chans, num_classes=int(summary.get("num_classes") or 2),
                   train_size=int(summary.get("train_size") or 0), test_size=int(summary.get("test_size") or 0),
                   streamed=bool(summary.get("streamed")))

    def bank_bytes(self, k: int) -> int:
        """A KDIGA teacher bank's size (`kdiga_core.teacher_bank.bank_bytes`): bf16 logits and input
        gradients plus int16 augmentation parameters for train_size·k rows."""
        return self.train_size * k * ((self.num_classes + self.dims) * 2 + 3 * 2)


def default_eps(facts: DataFacts, norm: str) -> float:
    """The threat model's radius for this data under ``norm`` (pixel units)."""
    linf = next(eps for side, eps in LINF_EPS_BY_SIZE if facts.img_size <= side)
    if norm == "Linf":
        return linf
    return round(linf * math.sqrt(facts.dims) * L2_PER_LINF_SQRT_D, 4)


def threat_model(given: dict[str, Any] | None, facts: DataFacts) -> tuple[dict[str, Any], list[str]]:
    """The job's threat model ``{norm, eps, step}`` (step: the training attack's) and the keys defaulted."""
    tm, filled = {k: v for k, v in (given or {}).items() if v is not None}, []
    if "norm" not in tm:
        tm["norm"], filled = "Linf", filled + ["norm"]
    if "eps" not in tm:
        tm["eps"], filled = default_eps(facts, tm["norm"]), filled + ["eps"]
    if "step" not in tm:
        tm["step"], filled = STEP_FACTOR * tm["eps"] / TRAIN_ATTACK_STEPS, filled + ["step"]
    return tm, [f"threat_model.{k}" for k in filled]


class _Filler:
    """Fills absent keys of one section and remembers their dotted paths."""

    def __init__(self, section: str, given: dict[str, Any] | None):
        self.section, self.values, self.filled = section, dict(given or {}), []

    def fill(self, key: str, value: Any) -> Any:
        if self.values.get(key) is None:
            self.values[key] = value
            self.filled.append(f"{self.section}.{key}")
        return self.values[key]


def train_defaults(kind: str, given: dict[str, Any] | None, facts: DataFacts) -> tuple[dict[str, Any], list[str]]:
    """Optimizer, learning rate, weight decay, batch size and epochs for a training job."""
    f = _Filler("train", given)
    # a learning rate belongs to its optimizer: one given alone keeps the optimizer it was meant for
    # (TrainConfig's static SGD), and the measured AdamW rate and decay come only with AdamW
    if f.values.get("lr") is None or f.values.get("optimizer") is not None:
        if f.fill("optimizer", OPTIMIZER) == OPTIMIZER:
            f.fill("lr", LR)
            f.fill("weight_decay", WEIGHT_DECAY)
    batch = f.fill("batch_size", 64 if facts.train_size < SMALL_DATA else 128)
    per_device = max(int(batch) * int(f.values.get("grad_accum_steps") or 1), 1)
    steps_per_epoch = max(math.ceil(facts.train_size / per_device), 1)
    low, high = EPOCH_RANGE
    f.fill("epochs", min(max(math.ceil(TARGET_STEPS.get(kind, TARGET_STEPS["distill"]) / steps_per_epoch), low), high))
    return f.values, f.filled


def augments(train: dict[str, Any]) -> bool:
    """Whether a training section turns on the crop/flip preset (`TrainConfig.preset` == "cifar")."""
    preset = train.get("augmentation") or ("cifar" if train.get("augment") else "none")
    return preset == "cifar"


def objective_defaults(kind: str, given: dict[str, Any] | None, tm: dict[str, Any],
                       train: dict[str, Any] | None = None,
                       facts: DataFacts | None = None) -> tuple[dict[str, Any], list[str]]:
    """The kind's method, the training attacks' (and the IGA noise's) norm, radius and step from
    the threat model, and for KDIGA with augmentation on in-memory data the teacher bank."""
    f = _Filler("objective", given)
    method = f.fill("method", DEFAULT_METHOD.get(kind, "kdiga"))
    if kind == "distill" and method == "kdiga" and facts is not None and not facts.streamed and augments(train or {}):
        f.fill("teacher_bank_k", BANK_K if facts.bank_bytes(BANK_K) <= BANK_MAX_BYTES else 0)
    f.fill("attack_norm", tm["norm"])
    eps = f.fill("attack_eps", tm["eps"])
    steps = f.fill("attack_steps", TRAIN_ATTACK_STEPS)
    if f.values.get("attack_step") is None:
        same_ball = eps == tm["eps"]  # the threat model's step is for its own ε; another ε gets its own
        f.fill("attack_step", tm["step"] if same_ball else STEP_FACTOR * float(eps) / int(steps))
    return f.values, f.filled


def evaluation_defaults(given: dict[str, Any] | None, tm: dict[str, Any],
                        facts: DataFacts) -> tuple[dict[str, Any], list[str]]:
    """The report's attacks (at the threat model) and points, sized to the test split."""
    f = _Filler("evaluation", given)
    pgd = {"name": "pgd", "norm": tm["norm"], "eps": tm["eps"], "steps": EVAL_PGD_STEPS}
    autoattack = {"name": "autoattack", "norm": tm["norm"], "eps": tm["eps"], "max_seconds": AUTOATTACK_CHEAP_S}
    attacks = f.fill("attacks", [pgd, autoattack])
    for i, attack in enumerate(attacks):  # an attack given without a norm or radius takes the threat model's
        attack = dict(attack)
        for key in ("norm", "eps"):
            if attack.get(key) is None:
                attack[key] = tm[key]
                f.filled.append(f"evaluation.attacks[{i}].{key}")
        attacks[i] = attack
    f.fill("max_points", max(1, min(facts.test_size or EVAL_POINTS, EVAL_POINTS)))
    return f.values, f.filled


def resolve(kind: str, spec: dict[str, Any], facts: DataFacts) -> dict[str, Any]:
    """``spec`` with every data-sized setting it left out filled in, and ``spec["defaulted"]``: the
    dotted paths of the values filled here (earlier ones kept: resolving twice changes nothing).

    ``spec`` holds ``threat_model``, ``objective``, ``train`` and ``evaluation`` as given (absent or
    None: not given); ``kind`` is the job's. An evaluate job gets no ``objective`` or ``train``.
    """
    out = dict(spec)
    tm, defaulted = threat_model(spec.get("threat_model"), facts)
    out["threat_model"] = tm
    if kind != "evaluate":
        out["train"], filled = train_defaults(kind, spec.get("train"), facts)
        defaulted += filled
        out["objective"], filled = objective_defaults(kind, spec.get("objective"), tm, out["train"], facts)
        defaulted += filled
    out["evaluation"], filled = evaluation_defaults(spec.get("evaluation"), tm, facts)
    defaulted += filled
    out["defaulted"] = sorted(set(spec.get("defaulted") or []) | set(defaulted))
    return out


def check_threat_model(tm: dict[str, Any], facts: DataFacts | None = None) -> str | None:
    """One sentence when the threat model cannot be meant, else None (pixels live in [0, 1])."""
    if tm.get("norm") not in NORMS:
        return f"threat_model.norm must be one of: {', '.join(NORMS)}."
    eps = tm.get("eps")
    if eps is not None and tm["norm"] == "Linf" and eps >= 1.0:
        return f"threat_model.eps {eps} under Linf reaches every image (pixels are in [0, 1]); use a radius below 1."
    if eps is not None and facts is not None and tm["norm"] == "L2" and eps >= math.sqrt(facts.dims):
        return (f"threat_model.eps {eps} under L2 reaches every image of this dataset "
                f"(√{facts.dims} = {math.sqrt(facts.dims):.3g} is the largest distance); use a smaller radius.")
    step = tm.get("step")
    if step is not None and eps is not None and step > eps:
        return f"threat_model.step {step} is larger than its eps {eps}; use a step of at most eps (default 2.5·eps/7)."
    return None
