"""What a job hands back: files, each with the kind its maker gave it.

A kind is decided where the file is written (`formats.save_model_bundle`, the report writer), never
guessed later from a file name: an adversarially trained model and a distilled student are both
``.safetensors`` files of different kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdiga_core.errors import KdigaError

ARTIFACT_KINDS: tuple[str, ...] = (
    "student_weights",  # a distilled student (distill jobs)
    "model_weights",  # a model trained from scratch (adversarial_train jobs): a teacher to be
    "onnx",  # the same model as ONNX, checked against PyTorch
    "model_card",  # model_card.json: architecture, input spec, normalisation, metrics, sha256 of the files
    "report_json",  # the robustness report (docs/contracts.md)
    "report_html",  # the same report as a page
)


def check_kind(kind: str) -> str:
    """``kind`` itself when it is one of `ARTIFACT_KINDS`; a one-sentence error otherwise."""
    if kind not in ARTIFACT_KINDS:
        raise KdigaError(f"Unknown artifact kind '{kind}'; valid kinds are: {', '.join(ARTIFACT_KINDS)}.")
    return kind


def artifact(path: str | Path, kind: str) -> dict[str, Any]:
    """``{"name": file name, "path": Path, "kind": kind}`` for a file just written."""
    path = Path(path)
    return {"name": path.name, "path": path, "kind": check_kind(kind)}
