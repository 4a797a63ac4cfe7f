"""kdiga_core.formats: sniffing, safe loading, refusals, and the student bundle."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kdiga_core import formats
from kdiga_core.config import ModelSpec
from kdiga_core.errors import KdigaError, ModelFormatError
from kdiga_core.formats import load_model, load_model_bundle, save_model_bundle, sniff_format
from kdiga_core.models import create_model

torch.set_num_threads(1)
SPEC = ModelSpec(arch="cnn_small", num_classes=10, in_chans=1, img_size=8)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("cnn_small", 10, in_chans=1, img_size=8).eval()


def _export_legacy(model, path, batch=2):
    """The legacy exporter is ~15x faster than dynamo; these tests are about our code, not the exporter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.rand(batch, *model.spec.input_shape),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            dynamic_axes={"input": {0: "batch"}},
        )
    return path


def _same(a, b, x=None):
    x = torch.rand(3, 1, 8, 8) if x is None else x
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


# --------------------------------------------------------------------------- sniffing


def test_sniff_recognises_each_format(model, tmp_path):
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    torch.save(model.state_dict(), tmp_path / "zip.pt")
    torch.save(model.state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.trace(model, torch.rand(1, 1, 8, 8)), tmp_path / "ts.pt")
    _export_legacy(model, tmp_path / "m.onnx")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01garbage" * 10)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "card.json").write_text('{"a": 1}')
    found = {p.name: sniff_format(p) for p in tmp_path.iterdir()}
    assert found == {
        "w.safetensors": "safetensors",
        "zip.pt": "pickle",
        "old.pt": "pickle",
        "ts.pt": "torchscript",
        "m.onnx": "onnx",
        "junk.bin": "unknown",
        "empty": "unknown",
        "card.json": "unknown",
    }


# --------------------------------------------------------------------------- refusals


def test_pickle_is_refused_with_how_to_convert(model, tmp_path):
    torch.save(model, tmp_path / "teacher.pt")  # a whole pickled module: loading it would run code
    with pytest.raises(ModelFormatError) as info:
        load_model(tmp_path / "teacher.pt", SPEC)
    assert str(info.value) == formats.PICKLE_MESSAGE
    assert "save_file(model.state_dict(), 'teacher.safetensors')" in str(info.value)


def test_torchscript_needs_the_operator_switch(model, tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.trace(model.net, torch.rand(1, 1, 8, 8)), path)
    with pytest.raises(ModelFormatError, match="KDIGA_ALLOW_TORCHSCRIPT"):
        load_model(path, SPEC)
    loaded = load_model(path, SPEC, allow_torchscript=True)
    assert loaded.spec.arch == "torchscript" and _same(model, loaded)


def test_unknown_file_is_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"hello world, not a model")
    with pytest.raises(ModelFormatError) as info:
        load_model(tmp_path / "x.bin", SPEC)
    assert str(info.value) == formats.UNKNOWN_MESSAGE


# --------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("layout", ["wrapped", "bare", "module_prefix"])
def test_safetensors_accepts_wrapped_bare_and_prefixed_keys(model, tmp_path, layout):
    state = {
        "wrapped": model.state_dict(),
        "bare": model.net.state_dict(),
        "module_prefix": {f"module.{k}": v for k, v in model.net.state_dict().items()},
    }[layout]
    save_file(dict(state), tmp_path / "w.safetensors")
    loaded = load_model(tmp_path / "w.safetensors", SPEC)
    assert not loaded.training and _same(model, loaded)


def test_safetensors_without_spec_says_what_is_needed(model, tmp_path):
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(KdigaError, match="^Safetensors weights need a model spec: give arch and num_classes"):
        load_model(tmp_path / "w.safetensors")


def test_mismatched_weights_name_the_first_keys(model, tmp_path):
    state = dict(model.net.state_dict())
    del state["features.0.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(ModelFormatError) as info:
        load_model(tmp_path / "w.safetensors", SPEC)
    assert str(info.value) == (
        "The weights do not fit architecture 'cnn_small' with num_classes=10, in_chans=1, img_size=8: "
        "missing net.features.0.weight; unexpected net.extra.weight."
    )
    save_file(model.state_dict(), tmp_path / "ok.safetensors")
    with pytest.raises(
        ModelFormatError, match=r"wrong shape net\.head\.3\.weight \(file \(10, 64\), model \(12, 64\)\)"
    ):
        load_model(
            tmp_path / "ok.safetensors", ModelSpec(arch="cnn_small", num_classes=12, in_chans=1, img_size=8)
        )


def test_file_normalisation_fills_in_a_spec_without_mean(tmp_path):
    model = create_model("cnn_tiny", 3, in_chans=1, img_size=8, mean=(0.2,), std=(0.3,))
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    loaded = load_model(
        tmp_path / "w.safetensors", ModelSpec(arch="cnn_tiny", num_classes=3, in_chans=1, img_size=8)
    )
    assert loaded.spec.mean == pytest.approx((0.2,)) and loaded.spec.std == pytest.approx((0.3,))


# --------------------------------------------------------------------------- ONNX uploads


def test_onnx_upload_takes_its_spec_from_the_graph(model, tmp_path):
    path = _export_legacy(model, tmp_path / "teacher.onnx")
    loaded = load_model(path)
    assert loaded.spec == ModelSpec(
        arch="onnx", num_classes=10, in_chans=1, img_size=8, mean=(0.0,), std=(1.0,)
    )
    assert _same(model, loaded)
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(loaded(x).sum(), x)
    assert grad.abs().sum() > 0  # input gradients exist: the point of converting


def test_onnx_upload_checked_against_metadata(model, tmp_path):
    path = _export_legacy(model, tmp_path / "teacher.onnx")
    with pytest.raises(KdigaError, match="^The ONNX model outputs 10 classes but the metadata says 12.$"):
        load_model(path, ModelSpec(arch="x", num_classes=12, in_chans=1, img_size=8))
    with pytest.raises(
        KdigaError,
        match=r"^The ONNX model takes inputs of shape \(1, 8, 8\) but the metadata says \(3, 8, 8\)\.$",
    ):
        load_model(path, ModelSpec(arch="x", num_classes=10, in_chans=3, img_size=8))


def test_channels_last_onnx_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    path = tmp_path / "nhwc.onnx"
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    with pytest.raises(ModelFormatError, match=r"channels-last images \(1, 8, 8, 3\); re-export it"):
        load_model(path)


# --------------------------------------------------------------------------- bundles


def _by_kind(artifacts: list[dict]) -> dict[str, Path]:
    return {a["kind"]: a["path"] for a in artifacts}


def test_bundle_roundtrip_and_card(model, tmp_path):
    artifacts = save_model_bundle(
        model,
        tmp_path,
        name="student",
        training={"method": "kdiga", "milestones": (0.5,)},
        metrics={"clean_accuracy": 0.9},
        exporter="legacy",
    )
    paths = _by_kind(artifacts)
    assert [(a["name"], a["kind"]) for a in artifacts] == [
        ("student.safetensors", "student_weights"), ("student.onnx", "onnx"), ("model_card.json", "model_card")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model_card.json",
        "student.onnx",
        "student.safetensors",
    ]
    card = json.loads(paths["model_card"].read_text())
    assert card["architecture"] == "cnn_small" and card["spec"]["num_classes"] == 10
    assert card["input"]["shape"] == [1, 8, 8] and card["normalisation"]["mean"] == [0.5]
    assert card["training"]["milestones"] == [0.5] and card["metrics"]["clean_accuracy"] == 0.9
    assert card["onnx"]["ok"] and card["onnx"]["max_abs_diff"] <= 1e-3 and card["onnx"]["opset"] == 18
    assert card["params"] == sum(p.numel() for p in model.parameters())
    assert card["files"]["student.onnx"]["sha256"] == formats._sha256(paths["onnx"])
    assert {name: f["kind"] for name, f in card["files"].items()} == {
        "student.safetensors": "student_weights", "student.onnx": "onnx"}
    for source in (tmp_path, paths["model_card"]):
        assert _same(model, load_model_bundle(source))
    # the spec travels in the metadata; the stored normalisation makes the default explicit
    assert load_model(paths["student_weights"]).spec == ModelSpec(
        **{**SPEC.to_dict(), "mean": (0.5,), "std": (0.5,)}
    )
    assert _same(model, load_model(paths["onnx"]))


def test_bundle_of_a_model_trained_from_scratch_says_so(model, tmp_path):
    artifacts = save_model_bundle(model, tmp_path, name="model", weights_kind="model_weights", exporter="legacy")
    assert _by_kind(artifacts)["model_weights"].name == "model.safetensors"
    card = json.loads(_by_kind(artifacts)["model_card"].read_text())
    assert card["files"]["model.safetensors"]["kind"] == "model_weights"
    with pytest.raises(KdigaError, match="^Unknown artifact kind 'weights'; valid kinds are: student_weights, "):
        save_model_bundle(model, tmp_path / "other", weights_kind="weights")
    assert not (tmp_path / "other").exists()


def test_bundle_refuses_modified_files(model, tmp_path):
    paths = _by_kind(save_model_bundle(model, tmp_path, exporter="legacy"))
    weights = paths["student_weights"]
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(ModelFormatError) as info:
        load_model_bundle(tmp_path)
    assert str(info.value) == (
        "The file student.safetensors does not match the sha256 in model_card.json; "
        "the bundle is corrupted or was modified."
    )


def test_bundle_loads_from_weights_and_card_alone(model, tmp_path):
    paths = _by_kind(save_model_bundle(model, tmp_path, exporter="legacy"))
    paths["onnx"].unlink()  # the worker downloads only what it needs
    assert _same(model, load_model_bundle(tmp_path))
    paths["student_weights"].unlink()
    with pytest.raises(
        ModelFormatError, match="^The bundle is missing student.safetensors, listed in its model card.$"
    ):
        load_model_bundle(tmp_path)


def test_bundle_of_a_converted_onnx_model(model, tmp_path):
    onnx_model = load_model(_export_legacy(model, tmp_path / "up.onnx"))
    save_model_bundle(onnx_model, tmp_path / "out", exporter="legacy")
    assert _same(model, load_model_bundle(tmp_path / "out"))


def test_onnx_check_fails_loudly(model, tmp_path):
    path = _export_legacy(model, tmp_path / "m.onnx")
    other = create_model("cnn_small", 10, in_chans=1, img_size=8).eval()
    with pytest.raises(formats.OnnxExportError, match="differs from PyTorch"):
        formats._check_onnx(other, path, dynamic=True)


def test_failed_export_leaves_no_half_bundle(model, tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "ONNX_TOLERANCE", -1.0)  # every check now fails
    monkeypatch.setattr(formats, "_export_attempts", lambda preferred: [("legacy", {"dynamo": False})])
    with pytest.raises(formats.OnnxExportError, match="^ONNX export failed with every exporter: legacy"):
        save_model_bundle(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bundle_with_the_dynamo_exporter(tmp_path):
    model = create_model("cnn_tiny", 3, in_chans=1, img_size=8).eval()
    paths = _by_kind(save_model_bundle(model, tmp_path, exporter="dynamo"))
    card = json.loads(paths["model_card"].read_text())
    assert (
        card["onnx"]["exporter"] == "dynamo" and card["onnx"]["dynamic_batch"] and card["onnx"]["opset"] == 18
    )
    assert _same(model, load_model(paths["onnx"]), torch.rand(5, 1, 8, 8))


def test_the_model_card_says_whether_the_normalisation_was_defaulted(tmp_path):
    """Issue 17.4: a model built without mean/std normalises with 0.5, and its card says so."""
    defaulted = create_model("cnn_tiny", 10, in_chans=1, img_size=8)
    given = create_model("cnn_tiny", 10, in_chans=1, img_size=8, mean=(0.1,), std=(0.3,))
    cards = {}
    for name, m in (("defaulted", defaulted), ("given", given)):
        artifacts = save_model_bundle(m, tmp_path / name, name=name, exporter="legacy")
        cards[name] = json.loads(_by_kind(artifacts)["model_card"].read_text())["normalisation"]
    assert cards["defaulted"] == {"mean": [0.5], "std": [0.5], "inside_model": True, "source": "default",
                                  "defaulted": True, "note": "no mean/std was given: 0.5 per channel was used"}
    assert cards["given"]["source"] == "spec" and cards["given"]["defaulted"] is False
    assert cards["given"]["mean"] == pytest.approx([0.1]) and cards["given"]["std"] == pytest.approx([0.3])
