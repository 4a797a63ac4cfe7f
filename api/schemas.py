"""Pydantic schemas at the API edge.

The job hyperparameter schemas mirror `kdiga_core.config` field by field (names, defaults,
documentation); `tests/api/test_schema_drift.py` keeps them equal. The api never imports
kdiga_core, so the mirror is written out here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    field_validator,
    model_validator,
)

from api.arch_kwargs import (  # noqa: F401 (re-exported: the drift test reads them here)
    ARCH_KWARGS,
    MAX_ARCH_KWARGS,
    MAX_KWARG_FLOAT,
    MAX_KWARG_INT,
    MAX_KWARG_LIST,
    ArchKwargs,
    check_arch_kwargs,
)
from api.redact import redact_server_paths
from api.schemas_mlops import Labels, LabelsOut, NotifySpec

T = TypeVar("T")

JobKind = Literal["distill", "adversarial_train", "evaluate"]
JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled", "stopped"]
Method = Literal["ce", "kd", "kdiga", "ard", "rslad", "pgd_at", "trades"]
IGAMode = Literal["auto", "exact", "finite_difference"]
IGAReduction = Literal["per_sample", "author"]
Norm = Literal["Linf", "L2"]


class _Strict(BaseModel):
    # Non-finite numbers are refused (422): stored as null, they made every job fail later.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# -- mirrors of kdiga_core.config ---------------------------------------------------------------
class ModelSpecSchema(_Strict):
    """What is needed to rebuild a model: architecture + input spec + normalisation.

    `arch` is a timm name or one of our registered small architectures.
    Inputs are pixels in [0, 1] of shape (in_chans, img_size, img_size); the model
    normalises with `mean`/`std` inside.
    """

    arch: str
    num_classes: int = Field(ge=2)
    in_chans: int = Field(default=3, ge=1)
    img_size: int = Field(default=32, ge=4, le=1024)
    mean: list[float] | None = Field(default=None, description="None: 0.5 per channel.")
    std: list[float] | None = Field(default=None, description="None: 0.5 per channel.")
    class_names: list[str] | None = None
    kwargs: ArchKwargs = None

    @model_validator(mode="after")
    def _check(self) -> ModelSpecSchema:
        _check_norm(self.mean, self.std, self.in_chans)
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError("class_names must have exactly num_classes entries.")
        return self


def _check_norm(mean: list[float] | None, std: list[float] | None, in_chans: int) -> None:
    for name, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) != in_chans:
            raise ValueError(f"{name} must have one value per input channel ({in_chans}).")
    if std is not None and any(s <= 0 for s in std):
        raise ValueError("std values must be positive.")


SweepRule = Literal["robust_within_clean_drop", "max_robust", "max_clean_plus_robust"]
CleanReference = Literal["kd", "kd_or_teacher"]


class SweepConfigSchema(_Strict):
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

    gammas: list[float] = Field(default_factory=list, max_length=20,
                                description="γ values to try (each > 0); empty: a log-spaced range.")
    gamma_min: float = Field(default=0.3, gt=0)
    gamma_max: float = Field(default=30.0, gt=0, le=1e6)
    points: int = Field(default=7, ge=1, le=20)
    rule: SweepRule = "robust_within_clean_drop"
    max_clean_drop: float = Field(default=0.02, ge=0.0, le=1.0, description="Fraction: 0.02 is 2 points.")
    clean_reference: CleanReference = Field(
        default="kd_or_teacher", description="kd, or the lower of the KD student's and the teacher's clean accuracy.")
    budget: float = Field(default=3.0, ge=1.5, le=20.0, description="The job's training, in training runs.")
    validation_fraction: float = Field(default=0.2, ge=0.05, le=0.5)
    validation_points: int = Field(default=500, ge=10, le=10_000)
    attack_steps: int = Field(default=10, ge=1, le=100)
    reduction_factor: int = Field(default=3, ge=2, le=6)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SweepConfigSchema:
        if any(g <= 0 for g in self.gammas):
            raise ValueError("sweep.gammas must be positive (γ = 0, plain KD, is always tried).")
        if self.gamma_min >= self.gamma_max:
            raise ValueError("sweep.gamma_min must be below sweep.gamma_max.")
        return self


class ObjectiveConfigSchema(_Strict):
    """Loss hyperparameters (method.md §2 and §6).

    kd/kdiga: L = alpha*tau^2*KL(T||S) + (1-alpha)*CE + gamma*IGA.
    gamma_warmup: fraction of total steps over which gamma ramps linearly from 0.
    iga_noise_eps: if > 0, input gradients are taken at x + U(-eps, eps) (author's variant).
    iga_every / iga_fraction: lazy IGA (every k-th step, scaled by k; on a share of the batch).
    teacher_bank_k: K precomputed teacher augmentations per sample for augmented training (0: off).
    ard/rslad/pgd_at/trades use the attack_* fields for their inner PGD, in the `attack_norm` ball;
    the IGA noise (iga_noise_eps) is drawn from the same norm's ball. attack_step None: 2.5·eps/steps.
    A job's omitted attack_* values come from its threat model (`kdiga_core.defaults`).
    """

    method: Method = "kdiga"
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    tau: float = Field(default=1.0, gt=0)
    gamma: float | Literal["auto"] = Field(
        default="auto", description='IGA weight γ ≥ 0, or "auto": chosen per job by a sweep (see `sweep`).')
    gamma_warmup: float = Field(default=0.5, ge=0.0, lt=1.0)
    iga_mode: IGAMode = "auto"
    iga_reduction: IGAReduction = "per_sample"
    fd_step: float = Field(default=1e-2, gt=0, le=0.5)
    iga_noise_eps: float = Field(default=0.0, ge=0)
    iga_every: int = Field(
        default=1, ge=1, le=64,
        description="Lazy IGA: the IGA term every k-th step only, scaled by k (1: every step, exact).")
    iga_fraction: float = Field(
        default=1.0, gt=0.0, le=1.0,
        description="Lazy IGA: the IGA term on this share of each batch (its first ceil(f·B) samples).")
    teacher_bank_k: int = Field(
        default=0, ge=0, le=64,
        description="With train.augment: precompute the teacher for K fixed augmentations per sample (0: off). "
                    "Omitted: 4 for kdiga with crop/flip augmentation on a dataset held in memory (bank ≤ 2 GiB).")
    attack_norm: Norm = Field(default="Linf", description="Inner attack and IGA noise norm; omitted: the job's "
                              "threat_model.norm.")
    attack_eps: float = Field(default=8 / 255, ge=0, description="Inner attack radius (adversarial methods); "
                              "omitted: the job's threat_model.eps.")
    attack_step: float | None = Field(default=None, gt=0, description="Omitted: the threat model's step "
                                      "(2.5·eps/steps).")
    attack_steps: int = Field(default=10, ge=1, description="Omitted: 7 (PGD-7) in a job.")
    trades_beta: float = 6.0
    ard_tau: float = 30.0
    ard_alpha: float = 1.0
    sweep: SweepConfigSchema | None = Field(default=None, description='Only with gamma "auto".')

    @model_validator(mode="after")
    def _check_gamma(self) -> ObjectiveConfigSchema:
        if self.gamma != "auto" and self.gamma < 0:
            raise ValueError('gamma must be zero or positive, or "auto".')
        if self.sweep is not None and self.gamma != "auto":
            raise ValueError('objective.sweep is only read with gamma "auto".')
        return self

    def training_runs(self) -> float:
        """How many training runs of the job's TrainConfig this objective costs (the work estimate's multiple).

        kdiga with gamma "auto" trains a KD reference and γ trials before the final run; the sweep
        keeps all of it within `sweep.budget` runs (kdiga_core.sweep.work_multiple says the same).
        """
        if self.method == "kdiga" and self.gamma == "auto":
            return (self.sweep or SweepConfigSchema()).budget
        return 1.0


class TrainConfigSchema(_Strict):
    """The training loop's settings (nanoGPT-style: one dataclass).

    In a job, an omitted optimizer, lr, weight_decay, batch_size or epochs is sized to the data
    (`kdiga_core.defaults`: AdamW 3e-3, weight decay 0.05, batch 64 below 20,000 training images,
    epochs to reach the optimizer steps the digits recipes took); the job's `spec.defaulted` lists them.
    An lr given without an optimizer keeps the static SGD it was written for.
    """

    epochs: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(
        default=128, ge=1, le=65_536,
        description="Per device: one step sees batch_size × devices × grad_accum_steps samples.",
    )
    grad_accum_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches whose gradients add up to one optimizer step."
    )
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        default="none", description="lr follows the effective batch's multiple of batch_size (linear, sqrt) or not."
    )
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.1, gt=0)
    momentum: float = 0.9
    weight_decay: float = 2e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75], description="Fractions of total epochs (step schedule)."
    )
    step_gamma: float = 0.1
    augment: bool = Field(default=False, description="Random crop (pad img_size//8) + horizontal flip "
                          "(the same as augmentation \"cifar\").")
    hflip: bool = Field(default=True, description="Only used when augmenting; off for digits-like data.")
    seed: int = 0
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    bf16: bool = Field(default=True, description="bf16 autocast, only ever on CUDA.")
    cache_teacher: bool | None = Field(
        default=None, description="Cache teacher logits + input gradients (bf16, host memory) when the inputs "
        "repeat (augmentation none): null = where it fits the server's budget on in-memory data; true also on "
        "a dataset read in place; false never.",
    )
    augmentation: Literal["none", "cifar", "imagenet"] | None = Field(
        default=None, description="cifar: pad-crop-flip; imagenet: RandomResizedCrop + flip (resize + center "
        "crop to evaluate); none. null: cifar when augment, else none.",
    )
    img_size: int | None = Field(
        default=None, ge=4, le=1024, description="A dataset by reference is resized and cropped to this "
        "(default: the teacher's input size).",
    )
    loader_workers: int | None = Field(
        default=None, ge=0, le=64, description="Loader processes for a dataset by reference (null: one per "
        "core but one, at most 8).",
    )


class AttackSpecSchema(_Strict):
    """One attack to evaluate: a registered name, a norm and a radius in pixel units."""

    name: str = Field(default="pgd", description="pgd | autoattack | apgd-ce | apgd-t | fab-t | square")
    norm: Norm = "Linf"
    eps: float = Field(default=8 / 255, ge=0)
    steps: int | None = Field(
        default=None, ge=1, description="None: 20 for pgd/fgsm, 100 for AutoAttack and its parts (the standard)."
    )
    step_size: float | None = Field(default=None, description="None: 2.5*eps/steps.")
    restarts: int = 1
    max_seconds: float | None = Field(
        default=None, gt=0, description="Skip this attack (the report says so) when the evaluation plan expects "
        "it to take longer; the defaults give AutoAttack 60 s.")


class EvalConfigSchema(_Strict):
    """What the robustness report measures.

    In a job, omitted `attacks` are PGD-20 and AutoAttack at the threat model (AutoAttack with
    `max_seconds` 60: it runs only where it is cheap), an attack without `norm`/`eps` takes the
    threat model's, and omitted `max_points` is min(test split, 1000).
    """

    attacks: list[AttackSpecSchema] = Field(
        default_factory=lambda: [AttackSpecSchema(name="pgd"), AttackSpecSchema(name="autoattack")]
    )
    max_points: int = Field(default=1000, ge=1, description="Same points for teacher and student.")
    eps_curve: list[float] = Field(default_factory=list, description="[]: 0 to 4x the first attack's eps.")
    curve_attack_steps: int = 10
    alignment: bool = Field(
        default=True, description="Gradient alignment + local-linearity bound (needs a teacher)."
    )
    linearity_steps: int = 50
    smoothing_sigma: float = Field(default=0.25, ge=0, description="Randomized smoothing noise; 0 disables.")
    smoothing_samples: int = 100
    smoothing_points: int = 50
    latency: bool = True
    square_queries: int = Field(default=5000, ge=1, description="Square's query budget in AutoAttack (5000 is standard).")
    batch_size: int = 500
    seed: int = 0


class ThreatModelSchema(_Strict):
    """The job's one threat model: training attacks, the IGA noise and the report's attacks use it
    unless they give their own. None: sized to the data (`kdiga_core.defaults`); step is the training
    attack's (evaluation attacks take 2.5·eps/steps of their own)."""

    norm: Norm | None = Field(default=None, description="Linf or L2; omitted: Linf.")
    eps: float | None = Field(default=None, gt=0, description="Radius in pixel units; omitted: by image size "
                              "(L∞: 0.1 up to 16 px, 8/255 up to 64 px, 4/255 above; L2: that × √d × 0.287).")
    step: float | None = Field(default=None, gt=0, description="Training attack step; omitted: 2.5·eps/7.")


# -- requests ------------------------------------------------------------------------------------
class TeacherMetadata(_Strict):
    """The `metadata` part of a teacher upload (arch and num_classes required for safetensors)."""

    name: str | None = Field(default=None, max_length=200)
    arch: str | None = None
    num_classes: int | None = Field(default=None, ge=2)
    in_chans: int = Field(default=3, ge=1)
    img_size: int = Field(default=32, ge=4, le=1024)
    mean: list[float] | None = None
    std: list[float] | None = None
    class_names: list[str] | None = None
    kwargs: ArchKwargs = None
    labels: Labels | None = None

    @model_validator(mode="after")
    def _check(self) -> TeacherMetadata:
        _check_norm(self.mean, self.std, self.in_chans)
        if (
            self.class_names is not None
            and self.num_classes is not None
            and len(self.class_names) != self.num_classes
        ):
            raise ValueError("class_names must have exactly num_classes entries.")
        return self


class DatasetUploadMetadata(_Strict):
    """The `metadata` part of a dataset upload."""

    name: str | None = Field(default=None, max_length=200)
    kind: Literal["npz", "image_folder_zip"] | None = None
    labels: Labels | None = None


class DatasetBuiltinCreate(_Strict):
    """Register a built-in dataset by name (`GET /v1/catalog` lists them)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "digits", "builtin": "digits"}]})

    name: str | None = Field(default=None, max_length=200)
    builtin: str = Field(max_length=64, description="A built-in dataset: digits, cifar10 or cifar100.")
    labels: Labels | None = None


class DatasetReferenceCreate(_Strict):
    """Register a dataset read in place (nothing copied) from a URL under one of `KDIGA_DATASET_ROOTS`."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"name": "flowers", "uri": "file:///data/flowers", "format": "image_folder"},
        {"name": "imagenet-shards", "uri": "s3://datasets/imagenet-wds", "format": "webdataset"},
    ]})

    name: str | None = Field(default=None, max_length=200)
    uri: str = Field(
        min_length=1, max_length=2000,
        description="file:///folder or an fsspec URL (s3://bucket/prefix, ...) under an allowed data root.",
    )
    format: Literal["image_folder", "webdataset"] = Field(
        description="image_folder: train/<class>/* and val/<class>/* (or test/); webdataset: tar shards of "
        ".jpg|.png + .cls members under train/ and val/ (or named train-*.tar, val-*.tar).",
    )
    labels: Labels | None = None


class StudentSpec(_Strict):
    """The student to train: an architecture (plus optional normalisation, timm kwargs and initial weights)."""

    arch: str
    mean: list[float] | None = None
    std: list[float] | None = None
    kwargs: ArchKwargs = None
    weights_id: str | None = Field(
        default=None, description="A ready teacher whose weights initialise the student."
    )


class ModelRef(_Strict):
    """The model an `evaluate` job measures: an uploaded teacher or a finished job's student."""

    teacher_id: str | None = None
    job_id: str | None = None

    @model_validator(mode="after")
    def _one(self) -> ModelRef:
        if (self.teacher_id is None) == (self.job_id is None):
            raise ValueError("model must name exactly one of teacher_id or job_id.")
        return self


class ResourcesSchema(_Strict):
    """The devices one training job runs on: worker hosts × devices on each (GPUs, or processes on a CPU
    worker); one process per device, launched with torchrun."""

    nodes: int = Field(default=1, ge=1, description="Worker hosts (a gang that starts together).")
    devices_per_node: int = Field(default=1, ge=1, description="Devices used on each host.")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node


class LimitsSchema(_Strict):
    """How long one run of the job may take, and how often training saves its place."""

    time_budget_s: float | None = Field(
        default=None, gt=0,
        description="Seconds one run may take (at most KDIGA_MAX_TIME_BUDGET_S). A run that spends it stops "
                    "at a safe point, after a checkpoint, with status `stopped`; POST /v1/jobs/{id}/resume "
                    "continues it with a fresh budget. None: only the service's time limit.")
    checkpoint_every_s: float | None = Field(
        default=None, gt=0,
        description="Training also writes a checkpoint inside an epoch this often (one device; on several, at "
                    "epoch ends only); an evaluation stores its finished attack batches at most this often. "
                    "None: KDIGA_CHECKPOINT_EVERY_S.")


class ResumeRequest(_Strict):
    """Optional changes for the resumed run."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"time_budget_s": 3600}]})

    time_budget_s: float | None = Field(
        default=None, gt=0, description="A new `limits.time_budget_s` for the resumed run (None: keep the job's).")


class JobCreate(_Strict):
    """A job request; what `objective`, `train`, `evaluation` and `threat_model` leave out is sized to the
    dataset (`kdiga_core.defaults`), and the stored spec shows every value, with `defaulted` naming those."""

    kind: JobKind
    name: str | None = Field(default=None, max_length=200)
    dataset_id: str
    teacher_id: str | None = None
    student: StudentSpec | None = None
    model: ModelRef | None = None
    objective: ObjectiveConfigSchema | None = None
    train: TrainConfigSchema | None = None
    evaluation: EvalConfigSchema | None = None
    threat_model: ThreatModelSchema | None = Field(
        default=None, description="Norm, ε and step used by training attacks, IGA noise and evaluation alike.")
    labels: Labels | None = None
    notify: NotifySpec | None = None
    resources: ResourcesSchema | None = None
    limits: LimitsSchema | None = None


# -- responses -----------------------------------------------------------------------------------
class Page(BaseModel, Generic[T]):
    data: list[T]
    count: int


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_validator("error", mode="after", check_fields=False)
    @classmethod
    def _no_server_paths(cls, value: str | None) -> str | None:
        return redact_server_paths(value)


DEFAULT_SAFETENSORS_NORM = 0.5  # kdiga_core.config.ModelSpec: None means 0.5 per channel


class NormalizationPublic(BaseModel):
    """The mean/std a teacher normalises its [0, 1] inputs with, and where they come from."""

    mean: list[float] | None = Field(description="Per channel; null: the model's own graph normalises (ONNX).")
    std: list[float] | None
    source: Literal["spec", "default", "model"] = Field(
        description="spec: given in the metadata or recorded by validation; default: 0.5 per channel "
        "(safetensors without mean/std; a file that stores its own replaces it at validation); "
        "model: none added (ONNX without mean/std: the exported graph normalises itself)."
    )


class TeacherPublic(_Public):
    id: str
    name: str
    status: str
    format: str
    size_bytes: int
    sha256: str
    spec: dict[str, Any]
    error: str | None
    created_at: datetime
    source_job_id: str | None
    labels: LabelsOut = Field(default_factory=dict)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def normalization(self) -> NormalizationPublic:
        """What the model will use: the spec's mean/std, else the format's default."""
        mean, std = self.spec.get("mean"), self.spec.get("std")
        if mean is not None and std is not None:
            return NormalizationPublic(mean=mean, std=std, source="spec")
        if self.format == "onnx":
            return NormalizationPublic(mean=mean, std=std, source="model")
        channels = int(self.spec.get("in_chans") or 3)
        return NormalizationPublic(mean=mean or [DEFAULT_SAFETENSORS_NORM] * channels,
                                   std=std or [DEFAULT_SAFETENSORS_NORM] * channels, source="default")


WORKER_INDEX = frozenset({"test_labels", "train_shard_sizes"})  # layout keys kept on the row, out of the API


class DatasetPublic(_Public):
    id: str
    name: str
    kind: str
    builtin: str | None
    status: str
    num_classes: int | None
    class_names: list[str] | None
    input_shape: list[int] | None
    train_size: int | None
    test_size: int | None
    sha256: str | None
    size_bytes: int | None
    error: str | None
    created_at: datetime
    labels: LabelsOut = Field(default_factory=dict)
    uri: str | None = Field(default=None, description="Where a dataset by reference is read from.")
    layout: dict[str, Any] | None = Field(
        default=None, description="A dataset by reference: counts per split and class, image sizes seen, "
        "corrupt files (what validation found).",
    )

    @field_validator("layout")
    @classmethod
    def _public_layout(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # a webdataset's per-sample test labels and per-shard sizes are the worker's index (one entry per
        # sample or shard: thousands), not something to list
        return {k: v for k, v in value.items() if k not in WORKER_INDEX} if value else value


class ArtifactPublic(_Public):
    id: str
    job_id: str | None
    name: str
    kind: str
    content_type: str
    size_bytes: int
    sha256: str
    created_at: datetime


class JobPublic(_Public):
    id: str
    kind: str
    name: str | None
    status: str
    spec: dict[str, Any]
    progress: dict[str, Any]
    metrics: dict[str, Any]
    result: dict[str, Any]
    error: str | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    artifacts: list[ArtifactPublic]
    labels: LabelsOut = Field(default_factory=dict)
    pipeline_id: str | None = None
    pipeline_step: str | None = None


class CatalogPublic(BaseModel):
    architectures: list[str]
    attacks: list[str]
    methods: list[str]
    datasets: list[str]
    job_kinds: list[str]
    methods_by_kind: dict[str, list[str]] = Field(description="The methods each job kind accepts.")


class ApiKeyPublic(_Public):
    id: str
    name: str
    prefix: str
    is_admin: bool
    max_concurrent_jobs: int | None
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="The secret key; shown once, only its hash is stored.")


class HealthPublic(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


# -- examples (shown by /docs and by generated clients) ------------------------------------------
_DATASET_ID = "3f2b1c9e-5d4a-4e8b-9c1d-2a7e6f0b8c41"
_TEACHER_ID = "8a6d0f3e-1b2c-4d5e-8f9a-0b1c2d3e4f50"
JOB_EXAMPLES: dict[str, dict[str, Any]] = {
    "distill": {
        "summary": "Distill a robust teacher into a small student with KDIGA",
        "value": {
            "kind": "distill", "name": "kdiga-cnn-small", "dataset_id": _DATASET_ID, "teacher_id": _TEACHER_ID,
            "student": {"arch": "cnn_small"},
            "objective": {"method": "kdiga", "gamma": 5.0},
            "train": {"epochs": 20, "optimizer": "adamw", "lr": 0.003},
            "evaluation": {"attacks": [{"name": "pgd", "eps": 0.1}, {"name": "autoattack", "eps": 0.1}],
                           "max_points": 500},
        },
    },
    "adversarial_train": {
        "summary": "Make a robust teacher with PGD adversarial training",
        "value": {
            "kind": "adversarial_train", "name": "pgd-at-teacher", "dataset_id": _DATASET_ID,
            "student": {"arch": "cnn_medium"},
            "objective": {"method": "pgd_at", "attack_eps": 0.1, "attack_step": 0.025, "attack_steps": 10},
            "train": {"epochs": 10, "optimizer": "adamw", "lr": 0.003},
            "evaluation": {"attacks": [{"name": "pgd", "eps": 0.1}], "max_points": 500},
        },
    },
    "evaluate": {
        "summary": "Measure an uploaded model's robustness",
        "value": {
            "kind": "evaluate", "name": "teacher-report", "dataset_id": _DATASET_ID,
            "model": {"teacher_id": _TEACHER_ID},
            "evaluation": {"attacks": [{"name": "pgd", "eps": 0.1}, {"name": "square", "eps": 0.1}],
                           "max_points": 200},
        },
    },
}
