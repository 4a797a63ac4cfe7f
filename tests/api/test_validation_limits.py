"""Nothing unusable is marked `ready` (issue 16): uploads through the REST API, validated by the
worker's own validation function against the app's database (SQLite and PostgreSQL) and store.

Each test uploads what a careless or hostile user would, runs the validation the worker runs, and
reads the answer back through the API: `invalid` with one sentence, never `ready`.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from api_helpers import upload_teacher
from onnx import TensorProto, helper
from safetensors.torch import save

from kdiga_core.models import create_model
from worker import validation

TINY = {"name": "t", "arch": "cnn_tiny", "num_classes": 10, "in_chans": 1, "img_size": 8}


def _weights(poison: float | None = None) -> bytes:
    torch.manual_seed(0)
    model = create_model("cnn_tiny", num_classes=10, in_chans=1, img_size=8)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if poison is not None:
        first = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1 and k not in ("mean", "std"))
        state[first].view(-1)[3] = poison
    return save(state)


def _validated(client, headers, data: bytes, meta: dict, filename: str = "teacher.safetensors") -> dict:
    r = upload_teacher(client, headers, data, meta=meta, filename=filename)
    assert r.status_code == 202, r.text
    validation.validate_teacher(r.json()["id"], settings=client.app.state.settings)
    return client.get(f"/v1/teachers/{r.json()['id']}", headers=headers).json()


def test_a_sound_teacher_is_ready(client, owner):
    body = _validated(client, owner, _weights(), TINY)
    assert body["status"] == "ready" and body["error"] is None


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_weights_are_invalid(client, owner, poison):
    body = _validated(client, owner, _weights(poison), TINY)
    assert body["status"] == "invalid"
    assert body["error"].startswith("The teacher's weights hold non-finite values (NaN or Inf) in '")


def test_non_finite_normalisation_stored_in_the_file_is_invalid(client, owner):
    torch.manual_seed(0)
    state = {k: v.contiguous().clone() for k, v in create_model("cnn_tiny", num_classes=10, in_chans=1,
                                                                   img_size=8).state_dict().items()}
    state["mean"] = torch.tensor([float("nan")])  # our NormalizedModel keeps mean/std in the file
    body = _validated(client, owner, save(state), TINY)
    assert body["status"] == "invalid" and body["error"] == "The teacher's normalisation mean [nan] is not finite."


def test_non_finite_normalisation_in_metadata_is_a_422_sentence(client, owner):
    for bad in ("NaN", "Infinity", "-Infinity"):
        metadata = json.dumps(TINY)[:-1] + f', "mean": [{bad}], "std": [0.5]}}'
        r = client.post("/v1/teachers", headers=owner, files={"file": ("t.safetensors", _weights())},
                        data={"metadata": metadata})
        assert r.status_code == 422 and r.json()["detail"].endswith("numbers must be finite.")
    r = upload_teacher(client, owner, _weights(), meta={**TINY, "mean": [0.5], "std": [0.0]})
    assert r.status_code == 422 and "std values must be positive" in json.dumps(r.json())


def _onnx_bytes(nodes, outputs, initializers=(), opset: int = 17, in_shape=(1, 1, 8, 8)) -> bytes:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


def _linear_onnx(weight: np.ndarray) -> bytes:
    """x (1,1,8,8) → flatten → Gemm with `weight` (classes, 64)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, list(weight.shape), weight.reshape(-1).tolist())
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[0]])
    return _onnx_bytes(nodes, [out], [w])


def test_onnx_teacher_with_inf_weights_is_invalid(client, owner):
    weight = np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32)
    assert _validated(client, owner, _linear_onnx(weight), {}, "m.onnx")["status"] == "ready"
    weight[2, 5] = np.inf
    body = _validated(client, owner, _linear_onnx(weight), {}, "m.onnx")
    assert body["status"] == "invalid" and "non-finite values (NaN or Inf)" in body["error"]


def test_onnx_teacher_with_non_finite_outputs_is_invalid(client, owner):
    """Finite weights, but log(-1) = NaN in the graph: the probe batch catches it."""
    weight = np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32)
    minus = helper.make_tensor("m", TensorProto.FLOAT, [1], [-1.0])
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["g"], transB=1),
             helper.make_node("Mul", ["g", "m"], ["n"]), helper.make_node("Abs", ["n"], ["a"]),
             helper.make_node("Mul", ["a", "m"], ["b"]), helper.make_node("Log", ["b"], ["y"])]
    w = helper.make_tensor("w", TensorProto.FLOAT, [10, 64], weight.reshape(-1).tolist())
    data = _onnx_bytes(nodes, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [w, minus])
    body = _validated(client, owner, data, {}, "m.onnx")
    assert body["status"] == "invalid"
    assert body["error"] == ("The teacher outputs non-finite logits (NaN or Inf) on a probe batch of random "
                             "images in [0, 1].")


def test_onnx_teacher_building_a_1gb_constant_is_refused_before_it_is_built(client, owner):
    """A ~1 KB file whose graph asks for a 1 GB tensor: refused by the estimate, nothing allocated."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [250_000_000])  # 250M float32 = 1 GB
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=1),
             helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Slice", ["f", "starts", "ends", "axes"], ["ten"]),
             helper.make_node("Add", ["ten", "s"], ["y"])]
    inits = [shape, helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
             helper.make_tensor("ends", TensorProto.INT64, [1], [10]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    data = _onnx_bytes(nodes, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    assert len(data) < 2048
    body = _validated(client, owner, data, {}, "m.onnx")
    assert body["status"] == "invalid"
    assert body["error"] == (
        "The ONNX model's ConstantOfShape node would build a tensor of shape [250000000] (954 MiB), above "
        "this service's teacher memory limit of 512 MiB (KDIGA_MAX_TEACHER_MEMORY_BYTES).")


def test_teacher_metadata_above_the_class_and_channel_caps_is_a_422(client, owner, settings):
    r = upload_teacher(client, owner, _weights(), meta={**TINY, "num_classes": settings.max_classes + 1})
    assert r.status_code == 422 and r.json() == {"detail": (
        f"The teacher has {settings.max_classes + 1} classes, above this service's limit of "
        f"{settings.max_classes} (KDIGA_MAX_CLASSES).")}
    chans = settings.max_input_channels + 1
    r = upload_teacher(client, owner, _weights(), meta={**TINY, "in_chans": chans, "mean": [0.5] * chans,
                                                        "std": [0.5] * chans})
    assert r.status_code == 422 and r.json() == {"detail": (
        f"The teacher takes {chans} input channels, above this service's limit of "
        f"{settings.max_input_channels} (KDIGA_MAX_INPUT_CHANNELS).")}
    assert client.get("/v1/teachers", headers=owner).json()["count"] == 0


def test_onnx_teacher_above_the_class_cap_is_invalid_at_validation(client, owner, settings, monkeypatch):
    """An ONNX graph declares its classes only by running: validation applies the cap."""
    monkeypatch.setattr(settings, "max_classes", 5)
    weight = np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32)
    body = _validated(client, owner, _linear_onnx(weight), {}, "m.onnx")
    assert body["status"] == "invalid" and body["error"] == (
        "The teacher has 10 classes, above this service's limit of 5 (KDIGA_MAX_CLASSES).")


def test_teacher_above_the_parameter_cap_is_invalid(client, owner, settings, monkeypatch):
    monkeypatch.setattr(settings, "max_teacher_params", 1000)  # cnn_tiny on 1x8x8 has 1418
    body = _validated(client, owner, _weights(), TINY)
    assert body["status"] == "invalid" and body["error"] == (
        "The teacher has 1,418 parameters, above this service's limit of 1,000 (KDIGA_MAX_TEACHER_PARAMS).")


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _upload_dataset(client, headers, data: bytes) -> dict:
    r = client.post("/v1/datasets", headers=headers, files={"file": ("d.npz", data)},
                    data={"metadata": json.dumps({"name": "d", "kind": "npz"})})
    assert r.status_code == 202, r.text
    validation.validate_dataset(r.json()["id"], settings=client.app.state.settings)
    return client.get(f"/v1/datasets/{r.json()['id']}", headers=headers).json()


def test_npz_declaring_two_million_classes_is_invalid_and_stores_no_class_list(client, owner):
    rng = np.random.default_rng(0)
    x = rng.random((8, 1, 8, 8), dtype=np.float32)
    y = np.arange(8) % 2
    fine = _upload_dataset(client, owner, _npz(x_train=x, y_train=y, x_test=x, y_test=y))
    assert fine["status"] == "ready"
    data = _npz(x_train=x, y_train=y, x_test=x, y_test=y, num_classes=np.array(2_000_000))
    assert len(data) < 16_384
    body = _upload_dataset(client, owner, data)
    assert body["status"] == "invalid" and body["error"] == (
        "The dataset has 2000000 classes, above this service's limit of 10000 (KDIGA_MAX_CLASSES).")
    listed = client.get("/v1/datasets", headers=owner)
    assert len(listed.content) < 10_000  # the 2M class names were never stored nor returned


def test_npz_above_the_channel_cap_is_invalid(client, owner, settings, monkeypatch):
    monkeypatch.setattr(settings, "max_input_channels", 2)  # npz itself takes 1 to 4 channels
    chans = 3
    x = np.random.default_rng(0).random((4, chans, 4, 4), dtype=np.float32)
    y = np.arange(4) % 2
    body = _upload_dataset(client, owner, _npz(x_train=x, y_train=y, x_test=x, y_test=y))
    assert body["status"] == "invalid" and body["error"] == (
        f"The dataset takes {chans} input channels, above this service's limit of "
        f"{settings.max_input_channels} (KDIGA_MAX_INPUT_CHANNELS).")


# -- ONNX with external data, as one archive ------------------------------------------------------


@pytest.fixture(scope="module")
def external_export(tmp_path_factory):
    """torch's default exporter (dynamo) writing model.onnx + model.onnx.data, for a model that fits
    the tests' 64 KiB upload cap."""
    import warnings
    from contextlib import redirect_stderr, redirect_stdout

    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = create_model("cnn_tiny", 10, in_chans=1, img_size=8).eval()
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 1, 8, 8),), str(folder / "model.onnx"), dynamo=True,
                          external_data=True)
    assert (folder / "model.onnx.data").stat().st_size > 4000
    return folder


def _archive(folder, fmt: str, extra: dict[str, bytes] | None = None) -> bytes:
    import tarfile
    import zipfile

    members = {n: (folder / n).read_bytes() for n in ("model.onnx", "model.onnx.data")} | (extra or {})
    buf = io.BytesIO()
    if fmt == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz" if fmt == "tgz" else "w") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["zip", "tar", "tgz"])
def test_an_onnx_export_with_external_data_is_accepted_as_one_archive(client, owner, external_export, fmt):
    r = upload_teacher(client, owner, _archive(external_export, fmt), meta={"name": "ext"}, filename=f"m.{fmt}")
    assert r.status_code == 202, r.text
    assert r.json()["format"] == "onnx"
    validation.validate_teacher(r.json()["id"], settings=client.app.state.settings)
    body = client.get(f"/v1/teachers/{r.json()['id']}", headers=owner).json()
    assert body["status"] == "ready", body["error"]
    assert body["spec"]["num_classes"] == 10 and body["spec"]["in_chans"] == 1


def test_a_bare_external_data_onnx_is_invalid_with_how_to_inline(client, owner, external_export):
    body = _validated(client, owner, (external_export / "model.onnx").read_bytes(), {}, "model.onnx")
    assert body["status"] == "invalid"
    assert "onnx.save(onnx.load('model.onnx'), 'inline.onnx', save_as_external_data=False)" in body["error"]
    assert "upload model.onnx and model.onnx.data together as one zip or tar archive" in body["error"]


def test_an_archive_escaping_itself_is_refused_at_upload(client, owner, external_export):
    r = upload_teacher(client, owner, _archive(external_export, "zip", {"../model.onnx.data": b"x"}),
                       meta={"name": "evil"}, filename="m.zip")
    assert r.status_code == 422
    assert r.json() == {"detail": "The archive entry '../model.onnx.data' points outside the archive."}
    assert client.get("/v1/teachers", headers=owner).json()["count"] == 0


def test_a_gzip_that_is_no_tar_named_onnx_is_one_sentence(client, owner):
    import gzip

    r = upload_teacher(client, owner, gzip.compress(b"not a tar at all" * 10), meta={}, filename="m.onnx")
    assert r.status_code == 422
    assert r.json() == {"detail": "The teacher file is neither an ONNX model nor a readable zip or tar archive."}
