"""Will robustness transfer? The γ sweep's diagnosis, said before the final run and in the report.

Three questions, each answered with its numbers (method.md §4 and §7):

- **Is there robustness to transfer?** The teacher's PGD accuracy on the validation split and its
  local linearity γ_t(ε, x) = max_{‖δ‖≤ε} |ℓ(x+δ) − ℓ(x) − δᵀ∇ℓ(x)| (the estimator of method.md §4,
  `kdiga_core.evaluate.local_linearity`). IGA copies the teacher's input gradients; that bounds the
  student's adversarial loss only when the teacher is locally linear. A natural (non-robust)
  teacher has a remainder comparable to the loss of a uniform guess (ln K) and no robust accuracy.
- **Can the student hold it?** Parameters against the teacher's, and the clean accuracy of the
  plain KD student against the teacher's: a student that cannot match the teacher on clean data has
  no spare capacity for the gradient constraint either.
- **Did any γ keep clean accuracy?** When no γ stays within the user's drop, the rule keeps γ = 0
  (plain KD) and the verdict says so, instead of handing back a collapsed student.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kdiga_core.config import AttackSpec, SweepConfig
from kdiga_core.evaluate import clean_accuracy, input_gradients, local_linearity, robust_accuracy

__all__ = ["teacher_facts", "verdict", "check_final"]

# The estimator runs two 50-step ascents per point: 100 points give the mean to a few percent, and on
# digits cost the teacher ~1 s of CPU (200 points cost a third of a whole student run there).
LINEARITY_POINTS = 100
LINEARITY_STEPS = 50  # method.md §4, as in the author's code
# A remainder above half the loss of a uniform guess (0.5·ln K): on digits, PGD-AT teachers measured
# 0.13 (ε 0.1) and 0.58 (ε 0.2), a naturally trained one 1.92 (REPRODUCTION.md); a heuristic line.
LINEARITY_LIMIT = 0.5
NOT_MORE_ROBUST = 0.02  # a teacher less than 2 points more robust than the KD student has little to give
CAPACITY_GAP = 0.05  # a KD student 5 points below the teacher on clean data is short of capacity


def teacher_facts(teacher: nn.Module, x: Tensor, y: Tensor, attack: AttackSpec) -> dict[str, Any]:
    """The teacher's clean and PGD accuracy on the validation points, and its local linearity at ε."""
    from kdiga_core.evaluate import adversarial_examples

    n_classes = int(y.max()) + 1 if len(y) else 2
    xs, ys = x[:LINEARITY_POINTS], y[:LINEARITY_POINTS]
    adv = adversarial_examples(teacher, xs, ys, attack.eps, norm=attack.norm)
    remainder = local_linearity(teacher, xs, ys, attack.eps, norm=attack.norm, steps=LINEARITY_STEPS, x_start=adv)
    _, grads = input_gradients(teacher, xs, ys)
    dual = 1 if attack.norm == "Linf" else 2
    first_order = attack.eps * grads.flatten(1).norm(p=dual, dim=1)
    return {
        "clean_accuracy": clean_accuracy(teacher, x, y),
        "robust_accuracy": robust_accuracy(teacher, x, y, attack)["accuracy"],
        "linearity": float(remainder.mean()),
        "first_order_term": float(first_order.mean()),
        "uniform_guess_loss": math.log(max(n_classes, 2)),
        "linearity_points": int(len(ys)),
        "linearity_steps": LINEARITY_STEPS,
        "params": int(sum(p.numel() for p in teacher.parameters())),
    }


def verdict(teacher: dict[str, Any], kd: dict[str, Any], choice: dict[str, Any], rows: list[dict[str, Any]],
            cfg: SweepConfig, *, student_params: int, teacher_params: int) -> dict[str, Any]:
    """Whether robustness transfers to this student, with one sentence per reason.

    Returns:
        ``{"transfers": bool, "summary": str, "reasons": [str], "capacity": {...}}``. ``transfers``
        is False when the teacher has nothing robust to give or no γ > 0 was chosen.
    """
    reasons: list[str] = []
    nothing = _nothing_to_transfer(teacher, kd)
    if nothing:
        reasons.append(nothing)
    capacity = _capacity(teacher, kd, student_params, teacher_params)
    if capacity["short"]:
        reasons.append(capacity["sentence"])
    gain = choice["robust"] - kd["robust"]
    if choice["gamma"] == 0:
        reasons.append(choice["reason"])
    elif gain < NOT_MORE_ROBUST:
        reasons.append(f"the chosen γ = {choice['gamma']:g} makes the student only {100 * gain:.1f} points more robust "
                       f"than plain KD ({100 * choice['robust']:.1f}% against {100 * kd['robust']:.1f}% under PGD on "
                       "the validation split).")
    elif nothing:
        reasons.append(f"γ = {choice['gamma']:g} still makes the student more robust than plain KD "
                       f"({100 * choice['robust']:.1f}% against {100 * kd['robust']:.1f}%): aligning input gradients "
                       "regularises the student even towards a teacher with little robustness of its own.")
    elif choice["clean"] < kd["clean"] - cfg.max_clean_drop - 1e-9:
        reasons.append(f"the chosen student's clean validation accuracy ({100 * choice['clean']:.1f}%) is more than "
                       f"{100 * cfg.max_clean_drop:.1f} points below the KD student's ({100 * kd['clean']:.1f}%) but "
                       f"within that drop of the robust teacher's own ({100 * teacher['clean_accuracy']:.1f}%): "
                       "robustness costs clean accuracy, for the teacher too.")
    transfers = not nothing and choice["gamma"] != 0 and gain >= NOT_MORE_ROBUST
    kept = _kept(choice, teacher)
    summary = (f"robustness transfers: the chosen student keeps {kept} of the teacher's validation robust "
               "accuracy" if transfers else "robustness will not transfer to this student: " + reasons[0])
    return {"transfers": transfers, "summary": summary, "reasons": reasons, "capacity": capacity,
            "collapsed_gammas": [r["gamma"] for r in rows if r["clean"] is not None and r["gamma"] != 0
                                 and r["clean"] < choice["reference_clean"] - cfg.max_clean_drop - 1e-9]}


def _nothing_to_transfer(teacher: dict[str, Any], kd: dict[str, Any]) -> str | None:
    if teacher["linearity"] >= LINEARITY_LIMIT * teacher["uniform_guess_loss"]:
        return (f"the teacher is not locally linear at this ε (its loss departs from its linear approximation by "
                f"{teacher['linearity']:.2f}, more than half of ln K = {teacher['uniform_guess_loss']:.2f}, the loss "
                "of a uniform guess), so there is no robust behaviour to copy; train or upload a robust teacher "
                "(an adversarial_train job makes one).")
    if teacher["robust_accuracy"] < kd["robust"] + NOT_MORE_ROBUST:
        return (f"the teacher is barely more robust than a plain KD student ({100 * teacher['robust_accuracy']:.1f}% "
                f"against {100 * kd['robust']:.1f}% under PGD on the validation split), so there is little "
                "robustness to transfer.")
    return None


def _capacity(teacher: dict[str, Any], kd: dict[str, Any], student_params: int, teacher_params: int) -> dict[str, Any]:
    gap = teacher["clean_accuracy"] - kd["clean"]
    short = gap > CAPACITY_GAP
    sentence = (f"the student ({student_params:,} parameters, {teacher_params / max(student_params, 1):.1f}× fewer "
                f"than the teacher) reaches only {100 * kd['clean']:.1f}% clean accuracy with plain KD against the "
                f"teacher's {100 * teacher['clean_accuracy']:.1f}%: it has little spare capacity for the gradient "
                "constraint, so expect a lower γ and less robustness; a larger student would keep more.")
    return {"student_params": student_params, "teacher_params": teacher_params,
            "ratio": round(teacher_params / max(student_params, 1), 3), "kd_clean_accuracy": kd["clean"],
            "teacher_clean_accuracy": teacher["clean_accuracy"], "short": short,
            "sentence": sentence if short else ""}


def _kept(choice: dict[str, Any], teacher: dict[str, Any]) -> str:
    if teacher["robust_accuracy"] <= 0:
        return "all"
    return f"{100 * choice['robust'] / teacher['robust_accuracy']:.0f}%"


def check_final(report: dict[str, Any], kd_clean_on_points: float | None, cfg: SweepConfig) -> dict[str, Any]:
    """After the final run: is the student's clean accuracy on the report's test points within the drop?

    Compares it with the sweep's KD reference measured on the same points (and, under the
    kd_or_teacher reference, the teacher's clean accuracy there). A student further below gets a
    sentence in the report's verdict, never silence; one below the KD student but not the teacher
    gets a sentence saying so.
    """
    models = report.get("models") or {}
    clean = (models.get("student") or {}).get("clean_accuracy")
    teacher = (models.get("teacher") or {}).get("clean_accuracy")
    out: dict[str, Any] = {"student_clean_accuracy": clean, "kd_reference_clean_accuracy": kd_clean_on_points,
                           "teacher_clean_accuracy": teacher, "max_clean_drop": cfg.max_clean_drop,
                           "collapsed": False, "sentence": ""}
    if clean is None or kd_clean_on_points is None:
        return out
    floor = kd_clean_on_points if teacher is None or cfg.clean_reference == "kd" else min(kd_clean_on_points, teacher)
    drop = 100 * cfg.max_clean_drop
    if clean < floor - cfg.max_clean_drop - 1e-9:
        out["collapsed"] = True
        out["sentence"] = (f"On the test points the student's clean accuracy ({100 * clean:.1f}%) is more than "
                           f"{drop:.1f} points below the KD reference's ({100 * kd_clean_on_points:.1f}%)"
                           + ("" if floor == kd_clean_on_points else f" and the teacher's ({100 * teacher:.1f}%)")
                           + ": the γ chosen on the validation split cost more clean accuracy on the full run "
                           "than in the trials.")
    elif clean < kd_clean_on_points - cfg.max_clean_drop - 1e-9:
        out["sentence"] = (f"On the test points the student's clean accuracy ({100 * clean:.1f}%) is more than "
                           f"{drop:.1f} points below the KD reference's ({100 * kd_clean_on_points:.1f}%) but within "
                           f"{drop:.1f} points of the robust teacher's ({100 * teacher:.1f}%).")
    return out


def kd_clean_on(model: nn.Module | None, x: Tensor, y: Tensor) -> float | None:
    """Clean accuracy of the sweep's KD reference on the report's points (None without one)."""
    if model is None:
        return None
    with torch.no_grad():
        return clean_accuracy(model, x, y)
