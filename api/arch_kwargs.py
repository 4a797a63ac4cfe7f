"""timm keyword arguments a model spec may give (`kwargs` of a student, a teacher upload, a pipeline step):
the mirror of `kdiga_core.config.ARCH_KWARGS` and `check_arch_kwargs` (tests/api/test_schema_drift.py keeps
them equal; the api never imports kdiga_core)."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, Field

# timm keywords a model spec may give (kdiga_core.config.ARCH_KWARGS, the same list and bounds)
ARCH_KWARGS: tuple[str, ...] = (
    "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "class_token", "global_pool",
    "no_embed_class", "reg_tokens", "init_values", "drop_rate", "drop_path_rate", "window_size", "depths",
    "dims", "channels", "widths", "num_features", "stem_type", "stem_width",
)
MAX_ARCH_KWARGS, MAX_KWARG_INT, MAX_KWARG_FLOAT, MAX_KWARG_LIST = 16, 4096, 64.0, 16
ArchKwargs = Annotated[
    dict[str, bool | int | float | str | list[int]] | None,
    AfterValidator(lambda v: check_arch_kwargs(v)),
    Field(default=None, description="timm keyword arguments that shape the network, e.g. a ViT's "
          '{"patch_size": 4, "depth": 6} (timm architectures only; README, "Model kwargs", lists the names).'),
]


def check_arch_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Mirror of `kdiga_core.config.check_arch_kwargs`: known timm keywords, bounded values."""
    if kwargs is None:
        return None
    if len(kwargs) > MAX_ARCH_KWARGS:
        raise ValueError(f"kwargs may hold at most {MAX_ARCH_KWARGS} entries.")
    for key, value in kwargs.items():
        if key not in ARCH_KWARGS:
            raise ValueError(f"kwargs.{key} is not a keyword a model spec may set; valid names are: "
                             f"{', '.join(sorted(ARCH_KWARGS))}.")
        if not _kwarg_ok(value):
            raise ValueError(f"kwargs.{key} must be a boolean, an integer in [0, {MAX_KWARG_INT}], a number in "
                             f"[0, {MAX_KWARG_FLOAT:g}], a name of at most 64 characters, or a list of at most "
                             f"{MAX_KWARG_LIST} such integers.")
    return kwargs


def _kwarg_ok(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return 0 <= value <= MAX_KWARG_INT
    if isinstance(value, float):
        return math.isfinite(value) and 0.0 <= value <= MAX_KWARG_FLOAT
    if isinstance(value, str):
        return 0 < len(value) <= 64
    if isinstance(value, list):
        return len(value) <= MAX_KWARG_LIST and all(isinstance(v, int) and not isinstance(v, bool)
                                                   and 0 <= v <= MAX_KWARG_INT for v in value)
    return False
