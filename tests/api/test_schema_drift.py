"""The API's pydantic schemas mirror kdiga_core.config field by field (names and defaults)."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("torch")
from api import schemas  # noqa: E402
from kdiga_core import config  # noqa: E402

PAIRS = [
    (config.ObjectiveConfig, schemas.ObjectiveConfigSchema, {}),
    (config.SweepConfig, schemas.SweepConfigSchema, {}),
    (config.TrainConfig, schemas.TrainConfigSchema, {}),
    (config.AttackSpec, schemas.AttackSpecSchema, {}),
    (config.EvalConfig, schemas.EvalConfigSchema, {}),
    (config.ModelSpec, schemas.ModelSpecSchema, {"arch": "cnn_tiny", "num_classes": 10}),
    (config.ThreatModel, schemas.ThreatModelSchema, {}),
    (config.LimitsConfig, schemas.LimitsSchema, {}),
]


def _plain(value):
    return json.loads(json.dumps(value))  # tuples become lists, like JSON on the wire


def _declared_defaults(dc) -> dict:
    """Plain defaults as declared (before __post_init__ resolves e.g. AttackSpec.steps=None)."""
    return {f.name: f.default for f in dataclasses.fields(dc) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize("dc, schema, required", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_same_fields_and_defaults(dc, schema, required):
    assert [f.name for f in dataclasses.fields(dc)] == list(schema.model_fields)
    declared = _declared_defaults(dc)
    schema_defaults = {
        name: f.get_default(call_default_factory=True) for name, f in schema.model_fields.items() if name in declared
    }
    assert _plain(declared) == _plain(schema_defaults)


@pytest.mark.parametrize("dc, schema, required", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_schema_output_builds_the_dataclass(dc, schema, required):
    assert dc.from_dict(schema(**required).model_dump()) == dc(**required)


def test_literal_choices_match():
    assert set(config.METHODS) == set(schemas.Method.__args__)
    assert set(config.IGAMode.__args__) == set(schemas.IGAMode.__args__)
    assert set(config.Norm.__args__) == set(schemas.Norm.__args__)
    assert set(config.SWEEP_RULES) == set(schemas.SweepRule.__args__)


def test_model_spec_kwargs_rules_match():
    """The timm keywords a model spec may give, and their bounds, are the same on both sides."""
    assert schemas.ARCH_KWARGS == config.ARCH_KWARGS
    assert (schemas.MAX_ARCH_KWARGS, schemas.MAX_KWARG_INT, schemas.MAX_KWARG_FLOAT, schemas.MAX_KWARG_LIST) == (
        config.MAX_ARCH_KWARGS, config.MAX_KWARG_INT, config.MAX_KWARG_FLOAT, config.MAX_KWARG_LIST)
    for bad in ({"pretrained": True}, {"checkpoint_path": "/etc/passwd"}, {"patch_size": 10**6},
                {"mlp_ratio": float("nan")}, {"depths": list(range(40))}, {f"depth{i}": 1 for i in range(20)}):
        with pytest.raises(Exception) as core:
            config.ModelSpec("vit_tiny_patch16_224", 10, kwargs=bad)
        with pytest.raises(Exception) as api:
            schemas.ModelSpecSchema(arch="vit_tiny_patch16_224", num_classes=10, kwargs=bad)
        assert str(core.value).split(";")[0].split(" must")[0] in str(api.value), (core.value, api.value)
