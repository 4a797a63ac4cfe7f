"""Sanity checks that flag a broken evaluation (method.md §5, design.md §9)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

WHITE_BOX = ("pgd", "fgsm", "apgd-ce", "apgd-t", "fab-t")
CURVE_TOLERANCE = 0.02  # accuracy may rise this much between ε-curve points (sampling noise)
LARGE_EPS_MAX_ACCURACY = 0.05
BLACK_BOX_TOLERANCE = 0.01  # one percentage point
# A model "has learned" when its clean accuracy is at least halfway from chance to perfect: a 47% teacher
# of 10 digits (chance 10%) is no teacher to distil, whatever its robust accuracy says.
LEARNED_FRACTION = 0.5
# A student far below its teacher's clean accuracy (or KD's, the same student without IGA) has not
# learned the teacher: below this fraction of the teacher's, or this many points below KD's.
TEACHER_CLEAN_RATIO = 0.85
KD_CLEAN_DROP = 0.05
REFERENCE_ROLE = "teacher"


def sanity_flags(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Checks that flag a broken evaluation (method.md §5, design.md §9), per model.

    - ``accuracy_falls_with_eps``: the ε-curve never rises by more than 2 points.
    - ``reaches_zero_at_large_eps``: accuracy at the largest ε is at most 5%.
    - ``black_box_not_better``: Square (alone, or as AutoAttack's last stage on the
      survivors of the white-box attacks) does not beat the white-box attacks by more
      than 1 point; if it does, gradients are probably masked.
    - ``robust_not_above_clean``: no attack raises accuracy above clean accuracy.

    Args:
        models: ``{"student": model_report, "teacher": ...}`` as built by `evaluate`.
    """
    flags = []
    for name, rep in models.items():
        flags += [dict(check=check, model=name, **fn(rep)) for check, fn in _CHECKS.items()]
    return flags


def _check_curve(rep: dict[str, Any]) -> dict[str, Any]:
    curve = rep.get("eps_curve") or []
    for a, b in pairwise(curve):
        if b["accuracy"] > a["accuracy"] + CURVE_TOLERANCE:
            return {
                "ok": False,
                "message": f"Accuracy rises from {a['accuracy']:.3f} at eps {a['eps']:g} to "
                f"{b['accuracy']:.3f} at eps {b['eps']:g}, which suggests a weak attack or masked gradients.",
            }
    return {"ok": True, "message": "Robust accuracy falls as eps grows."}


def _check_large_eps(rep: dict[str, Any]) -> dict[str, Any]:
    curve = rep.get("eps_curve") or []
    if not curve:
        return {"ok": True, "message": "No eps curve was measured."}
    last = curve[-1]
    if last["accuracy"] > LARGE_EPS_MAX_ACCURACY:
        return {
            "ok": False,
            "message": f"Accuracy is still {last['accuracy']:.3f} at eps {last['eps']:g}, where "
            "it should be about 0, which suggests masked gradients.",
        }
    return {"ok": True, "message": f"Accuracy reaches {last['accuracy']:.3f} at eps {last['eps']:g}."}


def _check_black_box(rep: dict[str, Any]) -> dict[str, Any]:
    attacks = rep.get("attacks", {})
    # Keys with "@" use another threat model than Square's, so they are not comparable.
    white = [
        acc for key, acc in attacks.items() if "@" not in key and (key.startswith("pgd-") or key in WHITE_BOX)
    ]
    stages = {s["attack"]: s["robust_accuracy"] for s in rep.get("autoattack_breakdown") or []}
    if "square" in stages and "fab-t" in stages:
        gain = stages["fab-t"] - stages["square"]
        if gain > BLACK_BOX_TOLERANCE + 1e-9:
            return {
                "ok": False,
                "message": f"Square broke {gain:.1%} of the points that survived the white-box "
                "attacks of AutoAttack, which suggests masked gradients.",
            }
    if "square" in attacks and white and attacks["square"] < min(white) - BLACK_BOX_TOLERANCE - 1e-9:
        return {
            "ok": False,
            "message": f"Black-box Square accuracy ({attacks['square']:.3f}) is below the best "
            f"white-box attack ({min(white):.3f}), which suggests masked gradients.",
        }
    return {"ok": True, "message": "The black-box attack does not beat the white-box attacks."}


def _check_below_clean(rep: dict[str, Any]) -> dict[str, Any]:
    worst = max(rep.get("attacks", {}).items(), key=lambda kv: kv[1], default=None)
    if worst is not None and worst[1] > rep["clean_accuracy"] + 1e-9:
        return {
            "ok": False,
            "message": f"Accuracy under {worst[0]} ({worst[1]:.3f}) is above clean accuracy "
            f"({rep['clean_accuracy']:.3f}), which means the evaluation is broken.",
        }
    return {"ok": True, "message": "No attack raises accuracy above clean accuracy."}


def report_sanity(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every check of a report: `sanity_flags` per model, then the ones that compare models.

    - ``clean_accuracy_learned`` (per model): clean accuracy is at least halfway from chance
      (1/classes, from ``points.per_class``) to 100%.
    - ``near_teacher_clean_accuracy``: the measured model (student, or an evaluated model) keeps at
      least 85% of its teacher's clean accuracy.
    - ``near_kd_clean_accuracy`` (γ "auto" jobs): the student is at most 5 points below the KD
      reference (the same student trained without IGA) on the same points.
    """
    models = {k: v for k, v in (report.get("models") or {}).items() if isinstance(v, dict)}
    flags = sanity_flags(models)
    classes = len((report.get("points") or {}).get("per_class") or {})
    if classes > 1:
        flags += [dict(check="clean_accuracy_learned", model=role, **_check_learned(rep, classes))
                  for role, rep in models.items()]
    subject = next((r for r in models if r != REFERENCE_ROLE), None)
    if subject is None:
        return flags
    clean = models[subject].get("clean_accuracy")
    if REFERENCE_ROLE in models:
        flags.append(dict(check="near_teacher_clean_accuracy", model=subject,
                          **_check_near_teacher(clean, models[REFERENCE_ROLE].get("clean_accuracy"), subject)))
    kd = ((report.get("gamma_sweep") or {}).get("final_check") or {}).get("kd_reference_clean_accuracy")
    if kd is not None:
        flags.append(dict(check="near_kd_clean_accuracy", model=subject, **_check_near_kd(clean, kd, subject)))
    return flags


def _check_learned(rep: dict[str, Any], classes: int) -> dict[str, Any]:
    chance = 1.0 / classes
    floor = chance + LEARNED_FRACTION * (1.0 - chance)
    clean = rep.get("clean_accuracy")
    if clean is None or clean < floor:
        return {"ok": False, "message": f"Clean accuracy is {_pct(clean)}, below {_pct(floor)} (halfway from chance, "
                f"{_pct(chance)}, to 100%): this model has not learned the task, so its robust accuracy means little."}
    return {"ok": True, "message": f"Clean accuracy {_pct(clean)} is well above chance ({_pct(chance)})."}


def _check_near_teacher(clean: float | None, teacher: float | None, subject: str) -> dict[str, Any]:
    if clean is None or teacher is None:
        return {"ok": False, "message": "A clean accuracy is missing, so the models cannot be compared."}
    if clean < TEACHER_CLEAN_RATIO * teacher:
        return {"ok": False, "message": f"The {subject}'s clean accuracy ({_pct(clean)}) is far below the teacher's "
                f"({_pct(teacher)}): it keeps less than {TEACHER_CLEAN_RATIO:.0%} of it, so it has not learned "
                "the teacher (train longer, or check the optimiser and learning rate)."}
    return {"ok": True, "message": f"The {subject}'s clean accuracy ({_pct(clean)}) is close to the teacher's "
            f"({_pct(teacher)})."}


def _check_near_kd(clean: float | None, kd: float, subject: str) -> dict[str, Any]:
    if clean is None or clean < kd - KD_CLEAN_DROP - 1e-9:
        return {"ok": False, "message": f"The {subject}'s clean accuracy ({_pct(clean)}) is far below the KD "
                f"reference's ({_pct(kd)}), the same student trained without gradient alignment."}
    return {"ok": True, "message": f"The {subject}'s clean accuracy ({_pct(clean)}) is within "
            f"{KD_CLEAN_DROP:.0%} of the KD reference's ({_pct(kd)})."}


def _pct(value: float | None) -> str:
    return "unknown" if value is None else f"{100 * value:.1f}%"


_CHECKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "accuracy_falls_with_eps": _check_curve,
    "reaches_zero_at_large_eps": _check_large_eps,
    "black_box_not_better": _check_black_box,
    "robust_not_above_clean": _check_below_clean,
}
