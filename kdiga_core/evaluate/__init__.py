"""The robustness report, one module per measurement family.

- `points`: which test points (a seeded, class-stratified sample, the same for every model).
- `accuracy`: clean and robust accuracy, and the sampling error of an accuracy.
- `curves`: robust accuracy against ε.
- `sanity`: checks that flag a broken evaluation (masked gradients, weak attacks).
- `alignment`: input gradients, their alignment, local linearity and the bound of method.md §4.
- `smoothing`: randomized-smoothing certification.
- `stats`: parameters, MACs and latency.
- `cache`: teacher evaluations kept between jobs, and their fingerprint.
- `partials`: each attack's per-point results kept after every batch, so a stopped job resumes there.
- `progress` / `plan`: one percent and ETA over stages weighted by their expected cost.
- `report`: `evaluate` (the whole ``kdiga.report/1`` dict) and `evaluate_model`.

Each measurement is a public function that can be used and tested on its own; the names below
are importable from ``kdiga_core.evaluate`` directly.
"""

from kdiga_core.evaluate.accuracy import attack_key, clean_accuracy, robust_accuracy, sampling_error
from kdiga_core.evaluate.alignment import (
    adversarial_examples,
    alignment_of,
    alignment_report,
    gradient_alignment,
    input_gradients,
    linearity_bound,
    local_linearity,
    per_sample_loss,
)
from kdiga_core.evaluate.cache import DirectoryReportCache, ReportCache, teacher_fingerprint
from kdiga_core.evaluate.common import SCHEMA, batch_seed, model_device
from kdiga_core.evaluate.curves import LARGE_EPS, curve_grid, default_eps_grid, eps_curve, with_large_eps
from kdiga_core.evaluate.partials import PartialStore
from kdiga_core.evaluate.plan import MEASURED_LOSS_STEPS
from kdiga_core.evaluate.points import EvalPoints, evaluation_points, stratified_order
from kdiga_core.evaluate.progress import Progress, Tracker
from kdiga_core.evaluate.report import (
    evaluate,
    evaluate_model,
    evaluation_plan,
    expected_seconds,
    threat_model,
)
from kdiga_core.evaluate.sanity import report_sanity, sanity_flags
from kdiga_core.evaluate.smoothing import certify_smoothing, smoothing_sample
from kdiga_core.evaluate.stats import Speed, cpu_latency_ms, forward_macs, forward_speed, model_stats

__all__ = [
    "LARGE_EPS",
    "MEASURED_LOSS_STEPS",
    "SCHEMA",
    "DirectoryReportCache",
    "EvalPoints",
    "PartialStore",
    "Progress",
    "ReportCache",
    "Speed",
    "Tracker",
    "adversarial_examples",
    "alignment_of",
    "alignment_report",
    "attack_key",
    "batch_seed",
    "certify_smoothing",
    "clean_accuracy",
    "cpu_latency_ms",
    "curve_grid",
    "default_eps_grid",
    "eps_curve",
    "evaluate",
    "evaluate_model",
    "evaluation_plan",
    "evaluation_points",
    "expected_seconds",
    "forward_macs",
    "forward_speed",
    "gradient_alignment",
    "input_gradients",
    "linearity_bound",
    "local_linearity",
    "model_device",
    "model_stats",
    "per_sample_loss",
    "robust_accuracy",
    "sampling_error",
    "report_sanity",
    "sanity_flags",
    "smoothing_sample",
    "stratified_order",
    "teacher_fingerprint",
    "threat_model",
    "with_large_eps",
]
