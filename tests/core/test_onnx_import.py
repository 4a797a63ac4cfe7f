"""kdiga_core.onnx_import: our ONNX → torch interpreter against PyTorch and onnxruntime.

The opset 17 files come from the legacy (TorchScript) exporter: torch 2.14's dynamo
exporter cannot emit 17 (asked for 17, it writes 18). The legacy exporter is also
the one that hides initializers behind Identity nodes, so it covers that case.
Dynamo exports (18, 20) take seconds each, so they are marked slow.
"""

import io
import warnings
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from kdiga_core.errors import ModelFormatError
from kdiga_core.formats import load_model
from kdiga_core.models import create_model
from kdiga_core.onnx_import import onnx_to_torch, supported_ops

torch.set_num_threads(1)


def _timm(name: str) -> torch.nn.Module:
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1} if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, num_classes=10, in_chans=3, **kwargs)


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, 10, in_chans=3, img_size=32) if name == "cnn_small" else _timm(name)
    return model.eval()


def _export(model: torch.nn.Module, path, opset: int, dynamo: bool, batch: int = 2):
    x = torch.rand(batch, 3, 32, 32)
    kwargs = {"external_data": False} if dynamo else {}
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, opset_version=opset, **kwargs)
    return path


def _file_opset(path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def _ort(path_or_proto, *inputs: np.ndarray) -> list[np.ndarray]:
    data = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs, strict=True)})


def _input_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return grad


# Each dynamo export takes 5-35 s on a shared 2-core machine, so only four are kept here. The
# dynamo exports of mobilenetv3_small_100 and efficientnet_b0 (opsets 18 and 20) were checked by
# hand when this was written: they use the same ops as resnet18's (plus HardSwish, HardSigmoid,
# Sigmoid, Mul and ReduceMean-18 with axes as input, all covered by the legacy cases and the
# hand-built graphs below).
CASES = [
    ("cnn_small", 17, False),
    pytest.param("cnn_small", 18, True, marks=pytest.mark.slow),
    pytest.param("cnn_small", 20, True, marks=pytest.mark.slow),
    ("resnet18", 17, False),
    ("mobilenetv3_small_100", 17, False),
    ("efficientnet_b0", 17, False),
    ("vit_tiny_patch16_224", 17, False),
    pytest.param("resnet18", 20, True, marks=pytest.mark.slow),
    pytest.param("vit_tiny_patch16_224", 18, True, marks=pytest.mark.slow),  # Erf-based GELU
]


@pytest.mark.parametrize("name,opset,dynamo", CASES)
def test_exported_models_convert_back_exactly(name, opset, dynamo, tmp_path):
    model = _build(name)
    path = _export(model, tmp_path / "m.onnx", opset, dynamo)
    assert _file_opset(path) == opset
    converted = onnx_to_torch(path)
    x, y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7])
    with torch.no_grad():
        expected, got = model(x), converted(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got.numpy(), _ort(str(path), x.numpy())[0], atol=1e-4, rtol=1e-4)
    g_torch, g_onnx = _input_grad(model, x, y), _input_grad(converted, x, y)
    assert F.cosine_similarity(g_torch.flatten(), g_onnx.flatten(), dim=0) > 0.999
    if dynamo:  # exported without a dynamic batch axis: other batch sizes run in chunks
        x3 = torch.rand(3, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(converted(x3), model(x3), atol=1e-4, rtol=1e-4)


def test_imported_mobilenet_supports_double_backward(tmp_path):
    """timm's hardsigmoid has no double-backward kernel; the imported graph uses clamp instead."""
    converted = onnx_to_torch(_export(_build("mobilenetv3_small_100"), tmp_path / "m.onnx", 17, False))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(F.cross_entropy(converted(x), torch.tensor([0, 1])), x, create_graph=True)
    grad.norm().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in converted.parameters())


def test_weights_are_parameters_and_statistics_are_buffers(tmp_path):
    """resnet_small is pre-activation, so its BatchNorms cannot be folded into convs and stay nodes."""
    torch.manual_seed(0)
    model = create_model("resnet_small", 10, in_chans=3, img_size=32).eval()
    for module in model.modules():  # trained-looking statistics: the exporter dedups identical fresh ones
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5), module.bias.data.uniform_(-0.1, 0.1)
    path = _export(model, tmp_path / "m.onnx", 17, False)
    graph = onnx.load(str(path)).graph
    bn = next(n for n in graph.node if n.op_type == "BatchNormalization")
    conv = next(n for n in graph.node if n.op_type == "Conv")
    converted = onnx_to_torch(path)
    params = {converted._slots[n] for n in (conv.input[1], bn.input[1], bn.input[2])}
    buffers = {converted._slots[n] for n in (bn.input[3], bn.input[4])}
    assert params <= dict(converted.weights.named_parameters()).keys()
    assert buffers <= dict(converted.weights.named_buffers()).keys()
    x = torch.rand(2, 3, 32, 32)
    F.cross_entropy(converted(x), torch.tensor([0, 1])).backward()
    assert getattr(converted.weights, converted._slots[conv.input[1]]).grad.abs().sum() > 0  # trainable


# --------------------------------------------------------------------------- hand-built graphs


def _model(nodes, inputs, outputs, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _value(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


GRAPHS = {
    "split18_num_outputs": (
        18,
        [helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)],
        [(2, 7)],
        ["a", "b", "c"],
        [],
    ),
    "split13_input": (
        13,
        [helper.make_node("Split", ["x", "s"], ["a", "b"], axis=1)],
        [(2, 7)],
        ["a", "b"],
        [_const("s", [3, 4])],
    ),
    "split11_equal": (11, [helper.make_node("Split", ["x"], ["a", "b"], axis=0)], [(4, 3)], ["a", "b"], []),
    "reducemean18_axes_input": (
        18,
        [helper.make_node("ReduceMean", ["x", "ax"], ["y"], keepdims=0)],
        [(2, 3, 4)],
        ["y"],
        [_const("ax", [1, -1])],
    ),
    "reducemean13_axes_attr": (
        13,
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2])],
        [(2, 3, 4)],
        ["y"],
        [],
    ),
    "slice_negative_step": (
        13,
        [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
        [(3, 6)],
        ["y"],
        [_const("st", [-1]), _const("en", [-(2**62)]), _const("ax", [1]), _const("sp", [-2])],
    ),
    "identity_initializer_into_conv": (
        17,
        [
            helper.make_node("Identity", ["w0"], ["w"]),
            helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
        ],
        [(1, 2, 5, 5)],
        ["y"],
        [_const("w0", np.ones((3, 2, 3, 3)) / 9, np.float32)],
    ),
    "constant_node": (
        13,
        [
            helper.make_node("Constant", [], ["k"], value_float=2.5),
            helper.make_node("Mul", ["x", "k"], ["y"]),
        ],
        [(2, 3)],
        ["y"],
        [],
    ),
    "shape_gather_expand": (
        13,
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "i"], ["d"], axis=0),
            helper.make_node("Unsqueeze", ["d", "zero"], ["d1"]),
            helper.make_node("Concat", ["d1", "one"], ["shape"], axis=0),
            helper.make_node("Expand", ["b", "shape"], ["y"]),
        ],
        [(4, 3)],
        ["y"],
        [
            _const("i", -1),
            _const("zero", [0]),
            _const("one", [1]),
            _const("b", np.arange(3.0).reshape(1, 3), np.float32),
        ],
    ),
    "where_range_constantofshape": (
        13,
        [
            helper.make_node("Range", ["r0", "r1", "r2"], ["r"]),
            helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
            helper.make_node(
                "ConstantOfShape", ["n"], ["z"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [7.0])
            ),
            helper.make_node("Greater", ["x", "rf"], ["m"]),
            helper.make_node("Where", ["m", "x", "z"], ["y"]),
        ],
        [(2, 4)],
        ["y"],
        [_const("r0", 0), _const("r1", 4), _const("r2", 1), _const("n", [4])],
    ),
    "pad_reflect_squeeze": (
        13,
        [
            helper.make_node("Pad", ["x", "p"], ["q"], mode="reflect"),
            helper.make_node("Squeeze", ["q", "ax"], ["y"]),
        ],
        [(1, 1, 3, 4)],
        ["y"],
        [_const("p", [0, 0, 1, 2, 0, 0, 1, 0]), _const("ax", [0])],
    ),
    "layernorm_softmax_gelu": (
        20,
        [
            helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], epsilon=1e-5),
            helper.make_node("Gelu", ["n"], ["e"]),
            helper.make_node("Softmax", ["e"], ["y"], axis=-1),
        ],
        [(2, 3, 4)],
        ["y"],
        [_const("g", [1.0, 2.0, 0.5, 1.5], np.float32), _const("b", [0.1, 0.0, -0.1, 0.2], np.float32)],
    ),
    "hardswish_hardsigmoid_clip": (
        18,
        [
            helper.make_node("HardSwish", ["x"], ["h"]),
            helper.make_node("HardSigmoid", ["h"], ["s"], alpha=1 / 6, beta=0.5),
            helper.make_node("Clip", ["s", "lo", "hi"], ["y"]),
        ],
        [(2, 8)],
        ["y"],
        [_const("lo", 0.2, np.float32), _const("hi", 0.8, np.float32)],
    ),
}


@pytest.mark.parametrize("case", sorted(GRAPHS))
def test_hand_built_graphs_match_onnxruntime(case):
    opset, nodes, shapes, outputs, inits = GRAPHS[case]
    inputs = [_value("x", list(shapes[0]))]
    proto = _model(nodes, inputs, [_value(o, None) for o in outputs], inits, opset)
    x = (np.random.default_rng(0).standard_normal(shapes[0]) * 3).astype(np.float32)
    expected = _ort(proto, x)
    with torch.no_grad():
        got = onnx_to_torch(proto)(torch.from_numpy(x))
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g.detach().numpy(), e, atol=1e-5, rtol=1e-5)


def test_the_ops_of_common_exports_are_supported():
    needed = """Conv Gemm BatchNormalization MaxPool AveragePool GlobalAveragePool Relu HardSwish HardSigmoid
    Sigmoid MatMul Softmax LayerNormalization Erf Gelu Transpose Reshape Flatten Split Slice Concat Gather Shape
    Unsqueeze Squeeze ReduceMean Pow Sqrt Div Sub Add Mul Expand Where Cast ConstantOfShape Range Equal Clip Pad"""
    assert set(needed.split()) <= set(supported_ops())


def test_old_opsets_are_upgraded_first():
    nodes = [
        helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0]),
        helper.make_node("Softmax", ["u"], ["y"], axis=1),
    ]
    proto = _model(nodes, [_value("x", [2, 3])], [_value("y", None)], opset=9)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    module = onnx_to_torch(proto)
    assert module.opset == 13
    np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), _ort(proto, x)[0], atol=1e-6)


# --------------------------------------------------------------------------- refusals


def _tiny_conv_model():
    return _model(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        [_value("x", [1, 1, 4, 4])],
        [_value("y", None)],
        [_const("w", np.ones((2, 1, 3, 3)), np.float32)],
        17,
    )


def test_external_data_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(
        _tiny_conv_model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (tmp_path / "weights.bin").exists()
    message = (
        "This ONNX model keeps its weights in an external data file, which a bare .onnx upload cannot bring; "
        "inline the weights with `import onnx; onnx.save(onnx.load('model.onnx'), 'inline.onnx', "
        "save_as_external_data=False)` (or export with `torch.onnx.export(..., external_data=False)`), "
        "or upload model.onnx and model.onnx.data together as one zip or tar archive."
    )
    with pytest.raises(ModelFormatError) as info:
        onnx_to_torch(path)
    assert str(info.value) == message
    with pytest.raises(ModelFormatError, match="external data"):
        load_model(path)  # through the upload path too


def test_control_flow_is_refused():
    branch = helper.make_graph([], "b", [], [_value("x", [1])])
    proto = _model(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        [_value("c", [1], TensorProto.BOOL)],
        [_value("y", None)],
    )
    with pytest.raises(
        ModelFormatError, match=r"^ONNX models with dynamic control flow \(If\) are not supported"
    ):
        onnx_to_torch(proto)


def test_unsupported_operators_are_listed():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("NonZero", ["a"], ["b"]),
        helper.make_node("Foo", ["b"], ["y"], domain="com.example"),
    ]
    proto = _model(nodes, [_value("x", [2])], [_value("y", None)])
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(ModelFormatError) as info:
        onnx_to_torch(proto)
    assert str(info.value) == "The ONNX model uses unsupported operators: NonZero, com.example::Foo."


def test_garbage_is_not_onnx():
    with pytest.raises(ModelFormatError, match="^The file is not a readable ONNX model"):
        onnx_to_torch(b"\xff\xfe definitely not protobuf")


def test_a_batch_baked_into_reshape_and_expand_runs_whole_not_in_chunks():
    """A static export (batch 2) with the batch in a Reshape target (allowzero=1, as dynamo writes it)
    and an Expand target (a cls token): the importer runs any batch at once, exactly."""
    w = np.random.default_rng(0).normal(size=(3, 17)).astype(np.float32)
    cls = np.random.default_rng(1).normal(size=(1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["f"], allowzero=1),  # (2, 16)
        helper.make_node("Expand", ["cls", "cls_shape"], ["c"]),  # (2, 1)
        helper.make_node("Concat", ["c", "f"], ["fc"], axis=1),  # (2, 17)
        helper.make_node("Gemm", ["fc", "w"], ["y"], transB=1),
    ]
    inits = [_const("flat", [2, 16]), _const("cls_shape", [2, 1]), _const("cls", cls, np.float32),
             _const("w", w, np.float32)]
    proto = _model(nodes, [_value("x", [2, 1, 4, 4])], [_value("y", [2, 3])], inits)
    converted = onnx_to_torch(proto)
    assert converted.fixed_batch is None and converted.free_batch == 2
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = torch.cat([torch.ones(5, 1) * float(cls[0, 0]), x.reshape(5, 16)], 1) @ torch.from_numpy(w).T
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(converted(x[:2]), expected[:2], atol=1e-5, rtol=1e-5)
