"""ONNX with external data, uploaded as one zip or tar archive (kdiga_core.onnx_archive, issue 16).

The friendly path: torch's default export writes `model.onnx` + `model.onnx.data`; the pair in
one archive loads. The hostile paths: a tensor naming a file outside the archive, a member
escaping the archive, a link, a bare external-data .onnx: each one sentence, nothing read.
"""

from __future__ import annotations

import io
import tarfile
import warnings
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from kdiga_core import onnx_archive
from kdiga_core.errors import ModelFormatError
from kdiga_core.formats import load_model, sniff_format
from kdiga_core.models import create_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A real `torch.onnx.export` (dynamo, torch's default) that writes external data."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = create_model("cnn_small", 10, in_chans=1, img_size=8).eval()
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 1, 8, 8),), str(folder / "model.onnx"), dynamo=True,
                          external_data=True)
    assert (folder / "model.onnx.data").stat().st_size > 10_000  # the weights really are outside
    return folder, model


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _pair(folder: Path) -> dict[str, bytes]:
    return {"model.onnx": (folder / "model.onnx").read_bytes(), "model.onnx.data": (folder / "model.onnx.data").read_bytes()}


def _agrees(loaded, model) -> None:
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "zip in a folder"])
def test_an_export_with_external_data_loads_from_one_archive(exported, tmp_path, kind):
    folder, model = exported
    pair = _pair(folder)
    if kind == "zip":
        path = _zip(tmp_path / "m.zip", pair)
    elif kind == "zip in a folder":
        path = _zip(tmp_path / "m.zip", {f"export/{k}": v for k, v in pair.items()})
    else:
        path = _tar(tmp_path / "m.tar", pair, "w:gz" if kind == "tar.gz" else "w")
    assert sniff_format(path) == "onnx"
    loaded = load_model(path)
    assert loaded.spec.num_classes == 10 and loaded.spec.input_shape == (1, 8, 8)
    _agrees(loaded, model)


def test_a_bare_external_data_onnx_is_refused_with_how_to_inline(exported, tmp_path):
    folder, model = exported
    with pytest.raises(ModelFormatError) as err:
        load_model(folder / "model.onnx")
    assert "save_as_external_data=False" in str(err.value) and "one zip or tar archive" in str(err.value)
    # following the advice works
    proto = onnx.load(str(folder / "model.onnx"))
    onnx.save(proto, str(tmp_path / "inline.onnx"), save_as_external_data=False)
    _agrees(load_model(tmp_path / "inline.onnx"), model)


def _external_model(location: str) -> bytes:
    """A 1x1x4x4 → 2 logits graph whose only weight says it lives in `location`."""
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 16])
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(2 * 16 * 4))):
        w.external_data.add(key=key, value=value)
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


WEIGHTS = np.arange(32, dtype=np.float32).tobytes()


def test_a_hand_built_pair_loads_and_its_weights_are_the_files(tmp_path):
    path = _zip(tmp_path / "m.zip", {"m.onnx": _external_model("w.bin"), "w.bin": WEIGHTS})
    net = load_model(path).net
    (weight,) = list(net.parameters())
    assert weight.detach().reshape(-1).tolist() == list(range(32))


@pytest.mark.parametrize("location,members,message", [
    ("../../etc/passwd", {"w.bin": WEIGHTS}, "names external data '../../etc/passwd'; only a file next to the .onnx"),
    ("/etc/passwd", {"w.bin": WEIGHTS}, "names external data '/etc/passwd'; only a file next to the .onnx"),
    ("sub/w.bin", {"sub/w.bin": WEIGHTS}, "names external data 'sub/w.bin'; only a file next to the .onnx"),
    ("other.bin", {"w.bin": WEIGHTS}, "keeps its data in 'other.bin', which is not in the archive next to"),
    ("w.bin", {"w.bin": WEIGHTS[:40]}, "points past the end of 'w.bin'"),
    ("w.bin", {"w.bin": WEIGHTS, "../evil": b"x"}, "The archive entry '../evil' points outside the archive."),
    ("w.bin", {"w.bin": WEIGHTS, "second.onnx": b"x"}, "The archive holds 2 .onnx files"),
])
def test_hostile_archives_are_refused_in_one_sentence(tmp_path, location, members, message):
    path = _zip(tmp_path / "m.zip", {"m.onnx": _external_model(location), **members})
    with pytest.raises(ModelFormatError, match="^" + "|".join(["The", "This"])) as err:
        load_model(path)
    assert message in str(err.value)


def test_a_link_inside_a_tar_is_refused(tmp_path):
    path = tmp_path / "m.tar"
    with tarfile.open(path, "w") as tf:
        data = _external_model("w.bin")
        info = tarfile.TarInfo("m.onnx")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("w.bin")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(ModelFormatError, match="^The archive entry 'w.bin' is a link or a special file"):
        load_model(path)


def test_external_data_above_the_memory_limit_is_refused_before_it_is_read(tmp_path):
    from kdiga_core.onnx_import import allocation_limit

    path = _zip(tmp_path / "m.zip", {"m.onnx": _external_model("w.bin"), "w.bin": WEIGHTS * 1000})
    with allocation_limit(64 * 1024), pytest.raises(ModelFormatError, match="external data 'w.bin' holds"):
        onnx_archive.load_archive(path)
