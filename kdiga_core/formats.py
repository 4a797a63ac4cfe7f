"""Model files in and out: sniffing, safe loading, and the student bundle.

Accepted uploads (design.md §4): safetensors weights plus a `ModelSpec`, or an
ONNX model (converted by our own interpreter so input gradients exist).
Pickle-based files (`torch.save`) are refused without being opened: unpickling
runs arbitrary code. TorchScript loads only when an operator allows it.

A bundle is what a job produces: `{name}.safetensors` (spec in its metadata),
`{name}.onnx` checked against PyTorch with onnxruntime, and `model_card.json`
with the sha256 of both.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import functools
import hashlib
import io
import json
import logging
import os
import uuid
import warnings
import zipfile
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdiga_core import onnx_archive
from kdiga_core.artifacts import artifact, check_kind
from kdiga_core.config import ModelSpec
from kdiga_core.errors import KdigaError, ModelFormatError
from kdiga_core.models import NormalizedModel, build_model, count_parameters

log = logging.getLogger(__name__)

ONNX_ARCH = "onnx"  # spec.arch of a model converted from an uploaded ONNX graph
TORCHSCRIPT_ARCH = "torchscript"
SPEC_METADATA_KEY = "kdiga_spec"
CARD_SCHEMA = "kdiga.model_card/1"
ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-3
# "dynamo" (torch's default exporter) or "legacy" (TorchScript-based); the other one is tried
# when the preferred one fails. The legacy TorchScript-based exporter is 5-20x faster on small models here (0.2-0.8 s vs 4-18 s
# under load); every export is checked against PyTorch with onnxruntime either way, and the
# dynamo exporter remains the fallback.
DEFAULT_EXPORTER = "legacy"

PICKLE_MESSAGE = (
    "Pickle-based checkpoints (torch.save) are refused because loading them can run arbitrary code; "
    "convert with `from safetensors.torch import save_file; save_file(model.state_dict(), 'teacher.safetensors')` "
    "and upload that with the architecture name."
)
TORCHSCRIPT_MESSAGE = (
    "TorchScript files are refused unless the operator sets KDIGA_ALLOW_TORCHSCRIPT; upload safetensors "
    "weights with the architecture name, or an ONNX export, instead."
)
UNKNOWN_MESSAGE = (
    "Unrecognised model file: upload safetensors weights (with the architecture name) or an ONNX model."
)


class OnnxExportError(RuntimeError):
    """Our own ONNX export failed or disagrees with PyTorch: a bug to report, not bad input."""


# =========================================================================== sniffing


def sniff_format(path: str | Path) -> str:
    """Name a model file's format from its bytes, never its extension.

    Returns:
        "safetensors", "onnx", "pickle", "torchscript" or "unknown".
    """
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04"):
        return _sniff_zip(path)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "pickle"
    if _looks_like_safetensors(head, size):
        return "safetensors"
    if _looks_like_onnx(path):
        return "onnx"
    if onnx_archive.archive_kind(path) == "tar" and _archive_onnx(path):
        return "onnx"  # model.onnx + model.onnx.data in one tar
    return "unknown"


def _archive_onnx(path: Path) -> bool:
    try:
        return onnx_archive.onnx_member(path) is not None
    except ModelFormatError:
        return True  # an ONNX archive, refused with its own sentence when loaded


def _sniff_zip(path: Path) -> str:
    """torch.save (and torch.jit.save) write zip archives; tell them apart by their members."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return "unknown"
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "pickle"
    if _archive_onnx(path):
        return "onnx"  # model.onnx + model.onnx.data in one zip
    return "unknown"


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """8-byte little-endian header length, then a JSON object that fits in the file."""
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def _looks_like_onnx(path: Path) -> bool:
    import onnx

    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # any parse failure simply means "not ONNX"
        return False
    return proto.ir_version > 0 and len(proto.graph.node) > 0


# =========================================================================== loading


def load_model(
    path: str | Path, spec: ModelSpec | None = None, *, allow_torchscript: bool = False
) -> NormalizedModel:
    """Load an uploaded model as a `NormalizedModel` (taking [0, 1] pixels), in eval mode.

    Args:
        path: the file; its format is sniffed from its bytes.
        spec: architecture and input spec. Needed for safetensors (unless the file
            carries one in its metadata, as our bundles do) and TorchScript; optional
            for ONNX, where it is read from the graph.
        allow_torchscript: the operator's KDIGA_ALLOW_TORCHSCRIPT setting.

    Raises:
        ModelFormatError: refused or unreadable file, or weights that do not fit.
        KdigaError: the spec is missing or contradicts the file.
    """
    fmt = sniff_format(path)
    if fmt == "pickle":
        raise ModelFormatError(PICKLE_MESSAGE)
    if fmt == "torchscript":
        if not allow_torchscript:
            raise ModelFormatError(TORCHSCRIPT_MESSAGE)
        return _load_torchscript(Path(path), spec)
    if fmt == "safetensors":
        return _load_safetensors(Path(path), spec)
    if fmt == "onnx":
        return _load_onnx(Path(path), spec)
    raise ModelFormatError(UNKNOWN_MESSAGE)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ModelFormatError(f"The safetensors file could not be read ({exc}).") from exc
    return tensors, metadata


def _spec_from_metadata(metadata: dict[str, str]) -> ModelSpec | None:
    if SPEC_METADATA_KEY not in metadata:
        return None
    try:
        return ModelSpec.from_dict(json.loads(metadata[SPEC_METADATA_KEY]))
    except (ValueError, TypeError) as exc:
        raise ModelFormatError(
            f"The model spec stored in the safetensors metadata is invalid ({exc})."
        ) from exc


def _load_safetensors(path: Path, spec: ModelSpec | None) -> NormalizedModel:
    tensors, metadata = _read_safetensors(path)
    spec = spec or _spec_from_metadata(metadata)
    if spec is None:
        raise KdigaError(
            "Safetensors weights need a model spec: give arch and num_classes, plus in_chans, img_size, "
            "mean and std when they differ from the defaults (3, 32, 0.5, 0.5)."
        )
    spec = _adopt_file_normalisation(spec, tensors)
    model = build_model(spec)
    model.load_state_dict(_match_state_dict(tensors, model))
    return model.eval()


def _adopt_file_normalisation(spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> ModelSpec:
    """A file that stores mean/std (our NormalizedModel does) fills in what the spec leaves out."""
    updates: dict[str, Any] = {}
    for name in ("mean", "std"):
        value = tensors.get(name)
        if getattr(spec, name) is None and value is not None and value.numel() == spec.in_chans:
            updates[name] = tuple(float(v) for v in value.reshape(-1))
    return dataclasses.replace(spec, **updates) if updates else spec


def _strip_prefixes(key: str) -> str:
    # DataParallel / DDP ("module.") and torch.compile ("_orig_mod.") wrap the real names.
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _match_state_dict(tensors: dict[str, torch.Tensor], model: NormalizedModel) -> dict[str, torch.Tensor]:
    """Map a file's keys onto `model` (whole NormalizedModel or bare net), or explain the mismatch."""
    expected = model.state_dict()
    keys = {_strip_prefixes(k): v for k, v in tensors.items()}
    prefixed = {f"net.{k}": v for k, v in keys.items()}
    state = max((keys, prefixed), key=lambda cand: len(expected.keys() & cand.keys()))
    # Normalisation comes from the spec (already reconciled with the file).
    state = {k: v for k, v in state.items() if k not in ("mean", "std")}
    state["mean"], state["std"] = expected["mean"], expected["std"]
    for key, value in expected.items():  # older checkpoints lack BatchNorm's step counter
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    _check_keys(state, expected, model.spec)
    return state


def _preview(items: list[str], limit: int = 3) -> str:
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _check_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {_preview(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {_preview(wrong)}")
    if problems:
        raise ModelFormatError(
            f"The weights do not fit architecture '{spec.arch}' with num_classes={spec.num_classes}, "
            f"in_chans={spec.in_chans}, img_size={spec.img_size}: {'; '.join(problems)}."
        )


def _load_torchscript(path: Path, spec: ModelSpec | None) -> NormalizedModel:
    if spec is None:
        raise KdigaError(
            "TorchScript models need num_classes, in_chans, img_size and normalisation in the metadata."
        )
    log.warning("loading TorchScript %s because the operator allows it", path.name)
    net = torch.jit.load(str(path), map_location="cpu")
    spec = dataclasses.replace(spec, arch=TORCHSCRIPT_ARCH)
    return NormalizedModel(net, spec).eval()


def _load_onnx(path: Path, spec: ModelSpec | None) -> NormalizedModel:
    import onnx

    from kdiga_core.onnx_import import input_shape, onnx_to_torch

    if onnx_archive.archive_kind(path) is not None:
        proto = onnx_archive.load_archive(path)  # external data read from the archive, never from paths
    else:
        proto = onnx.load_model(str(path), load_external_data=False)
    net = onnx_to_torch(proto)
    if len(net.input_names) != 1:
        raise ModelFormatError(
            f"The ONNX model must take exactly one image input, it takes {len(net.input_names)}."
        )
    chw = _onnx_input_chw(input_shape(proto, net.input_names[0]), spec)
    num_classes = _onnx_num_classes(net.eval(), chw)
    if spec is None:
        spec = ModelSpec(arch=ONNX_ARCH, num_classes=num_classes, in_chans=chw[0], img_size=chw[1])
    elif spec.num_classes != num_classes:
        raise KdigaError(
            f"The ONNX model outputs {num_classes} classes but the metadata says {spec.num_classes}."
        )
    # Identity normalisation unless told otherwise: an exported graph usually normalises inside itself.
    mean = spec.mean if spec.mean is not None else (0.0,) * spec.in_chans
    std = spec.std if spec.std is not None else (1.0,) * spec.in_chans
    spec = dataclasses.replace(spec, arch=ONNX_ARCH, mean=mean, std=std)
    return NormalizedModel(net, spec).eval()


def _onnx_input_chw(shape: tuple[int | None, ...], spec: ModelSpec | None) -> tuple[int, int, int]:
    """(C, H, W) from the graph's declared input, checked against the metadata when given."""
    if len(shape) != 4:
        raise ModelFormatError(
            f"The ONNX model's input must be an image batch (N, C, H, W), it has {len(shape)} dimensions."
        )
    c, h, w = shape[1:]
    if w in (1, 3) and c == h and c not in (1, 3):
        raise ModelFormatError(
            f"The ONNX model seems to take channels-last images {shape}; re-export it to take (N, C, H, W)."
        )
    if spec is not None:
        if None not in (c, h, w) and (c, h, w) != spec.input_shape:
            raise KdigaError(
                f"The ONNX model takes inputs of shape {(c, h, w)} but the metadata says {spec.input_shape}."
            )
        return spec.input_shape
    if c is None or h is None or w is None:
        raise KdigaError(
            "The ONNX model's input has dynamic (C, H, W); give in_chans and img_size in the metadata."
        )
    if h != w:
        raise ModelFormatError(f"Only square inputs are supported, the ONNX model takes {h}x{w} images.")
    return c, h, w


def _onnx_num_classes(net: nn.Module, chw: tuple[int, int, int]) -> int:
    """Run the graph once: it validates the conversion and reveals the number of classes."""
    x = torch.rand(1, *chw)
    try:
        with torch.no_grad():
            out = net(x)
    except KdigaError:
        raise
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFormatError(
            f"The ONNX model failed to run on an input of shape {tuple(x.shape)}: {first_line}."
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelFormatError(
            f"The ONNX model must output logits of shape (N, classes), it outputs {shape}."
        )
    return int(out.shape[1])


# =========================================================================== saving the bundle


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Write through a temporary sibling and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path | dt.datetime):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)  # type: ignore[arg-type]
    return str(value)


def save_model_bundle(
    model: NormalizedModel,
    out_dir: str | Path,
    *,
    name: str = "student",
    weights_kind: str = "student_weights",
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    exporter: str | None = None,
) -> list[dict[str, Any]]:
    """Write `{name}.safetensors`, `{name}.onnx` and `model_card.json` into `out_dir`.

    The ONNX file is exported from a CPU float32 copy of the model and checked
    against PyTorch with onnxruntime; a disagreement above 1e-3 raises.

    Args:
        model: the model to save (any device and dtype; it is not modified).
        out_dir: created if needed; files are replaced atomically.
        name: file stem of the weights and ONNX files.
        weights_kind: the weights' artifact kind: ``student_weights`` for a distilled student,
            ``model_weights`` for a model trained from scratch (`artifacts.ARTIFACT_KINDS`).
        training / metrics: JSON-able dicts copied into the model card.
        exporter: "dynamo" or "legacy", tried first; None means `DEFAULT_EXPORTER`.

    Returns:
        The three artifacts, ``{"name", "path", "kind"}`` each (`artifacts.artifact`): the
        weights (``weights_kind``), ``onnx`` and ``model_card``; the card lists each file's kind.

    Raises:
        OnnxExportError: no exporter produced a file that matches PyTorch.
    """
    check_kind(weights_kind)  # before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cpu_model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    weights = _atomic(out / f"{name}.safetensors", lambda tmp: _write_safetensors(cpu_model, tmp))
    try:
        onnx_path, onnx_info = _export_onnx(cpu_model, out / f"{name}.onnx", exporter or DEFAULT_EXPORTER)
    except Exception:
        weights.unlink(missing_ok=True)  # no half bundle: without its card nobody could trust it
        raise
    files = [artifact(weights, weights_kind), artifact(onnx_path, "onnx")]
    card = _model_card(cpu_model, name, files, onnx_info, training, metrics)
    text = json.dumps(card, indent=2, sort_keys=True, default=_json_default)
    card_path = _atomic(out / "model_card.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return [*files, artifact(card_path, "model_card")]


def _write_safetensors(model: NormalizedModel, path: Path) -> None:
    from safetensors.torch import save_file

    # clone(): safetensors refuses tensors that share storage (tied weights).
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(
        state, str(path), metadata={SPEC_METADATA_KEY: json.dumps(model.spec.to_dict()), "format": "pt"}
    )


def _export_attempts(preferred: str) -> list[tuple[str, dict[str, Any]]]:
    """Exporters to try in order: the preferred one, the other, then dynamo with a fixed batch.

    All but the last keep the batch dimension dynamic; weights always stay inside the file.
    """
    if preferred not in ("dynamo", "legacy"):
        raise ValueError(f"Unknown ONNX exporter '{preferred}'; valid names are: dynamo, legacy.")
    batch = {"x": {0: torch.export.Dim("batch", min=1, max=65536)}}
    attempts = [
        ("dynamo", {"dynamo": True, "dynamic_shapes": batch, "external_data": False}),
        ("legacy", {"dynamo": False, "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}),
    ]
    attempts.sort(key=lambda a: a[0] != preferred)
    return attempts + [("dynamo-static", {"dynamo": True, "external_data": False})]


def _export_onnx(model: NormalizedModel, path: Path, preferred: str) -> tuple[Path, dict[str, Any]]:
    x = torch.rand(2, *model.spec.input_shape)
    errors = []
    for exporter, kwargs in _export_attempts(preferred):
        try:
            _atomic(path, functools.partial(_torch_onnx_export, model, x, kwargs=kwargs))
            dynamic = exporter != "dynamo-static"
            diff = _check_onnx(model, path, dynamic)
        except Exception as exc:  # each exporter fails in its own way; try the next one
            errors.append(
                f"{exporter}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            )
            log.warning("ONNX export with %s failed: %s", exporter, errors[-1])
            path.unlink(missing_ok=True)
            continue
        info = {
            "exporter": exporter,
            "opset": _file_opset(path),
            "dynamic_batch": dynamic,
            "max_abs_diff": diff,
            "tolerance": ONNX_TOLERANCE,
            "ok": True,
        }
        return path, info
    raise OnnxExportError(f"ONNX export failed with every exporter: {' | '.join(errors)}.")


def _torch_onnx_export(model: nn.Module, x: torch.Tensor, path: Path, *, kwargs: dict[str, Any]) -> None:
    # The exporters print progress and warn a lot; keep the worker's log readable.
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            opset_version=ONNX_OPSET,
            **kwargs,
        )


def _file_opset(path: Path) -> int:
    import onnx

    proto = onnx.load_model(str(path), load_external_data=False)
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _check_onnx(model: NormalizedModel, path: Path, dynamic: bool) -> float:
    """Largest |onnxruntime − PyTorch| over a few random batches; raises above tolerance."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny batches; do not fight the trainer for cores
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in (1, 2, 3) if dynamic else (2, 2):
        x = torch.rand(batch, *model.spec.input_shape, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {input_name: x.numpy()})[0]
        worst = max(worst, float(abs(got - expected).max()))
    if not worst <= ONNX_TOLERANCE:  # also catches NaN
        raise OnnxExportError(
            f"The ONNX export differs from PyTorch by {worst:.3g} (tolerance {ONNX_TOLERANCE})."
        )
    return worst


DEFAULT_NORMALISATION = 0.5  # NormalizedModel: a spec without mean/std normalises with 0.5 per channel


def card_normalisation(model: NormalizedModel) -> dict[str, Any]:
    """What the model normalises its [0, 1] inputs with, and where that came from (issue 17.4).

    source: "spec" (given by the user or stored in their file), "default" (none given: 0.5 per
    channel, stated so nobody mistakes it for a choice), or "model" (an ONNX graph normalising itself).
    """
    spec = model.spec
    mean, std = model.mean.reshape(-1).tolist(), model.std.reshape(-1).tolist()
    if spec.mean is None or spec.std is None:
        source = "default"
    elif spec.arch in (ONNX_ARCH, TORCHSCRIPT_ARCH) and set(mean) == {0.0} and set(std) == {1.0}:
        source = "model"
    else:
        source = "spec"
    notes = {"default": f"no mean/std was given: {DEFAULT_NORMALISATION} per channel was used",
             "model": "none added: the graph normalises inside itself", "spec": "as given"}
    return {"mean": mean, "std": std, "inside_model": True, "source": source, "defaulted": source == "default",
            "note": notes[source]}


def _model_card(
    model: NormalizedModel,
    name: str,
    files: list[dict[str, Any]],
    onnx_info: dict[str, Any],
    training: dict[str, Any] | None,
    metrics: dict[str, Any] | None,
) -> dict[str, Any]:
    spec = model.spec
    return {
        "schema": CARD_SCHEMA,
        "name": name,
        "architecture": spec.arch,
        "spec": spec.to_dict(),
        "num_classes": spec.num_classes,
        "class_names": list(spec.class_names) if spec.class_names else None,
        "input": {"shape": list(spec.input_shape), "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0]},
        "normalisation": card_normalisation(model),
        "params": count_parameters(model),
        "training": training,
        "metrics": metrics,
        "onnx": onnx_info,
        "files": {f["name"]: {"sha256": _sha256(f["path"]), "size_bytes": f["path"].stat().st_size, "kind": f["kind"]}
                  for f in files},
        "framework": {"torch": torch.__version__},
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


# =========================================================================== loading the bundle


def load_model_bundle(path: str | Path) -> NormalizedModel:
    """Rebuild a model from a bundle directory (or its model_card.json), in eval mode.

    Every file listed in the card that is present is checked against its sha256 first; only the
    file actually loaded must be there (the weights, or the .onnx for converted graphs).

    Raises:
        ModelFormatError: the card is missing or invalid, or a file was modified.
    """
    card_path = Path(path)
    card_path = card_path / "model_card.json" if card_path.is_dir() else card_path
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        spec = ModelSpec.from_dict(card["spec"])
        files = dict(card["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFormatError(
            f"The model card {card_path.name} is missing or invalid ({type(exc).__name__})."
        ) from exc
    # Rebuildable architectures need only the weights; converted graphs (ONNX, TorchScript) only
    # the .onnx file, which already normalises inside, hence identity normalisation on reload.
    graph_only = spec.arch in (ONNX_ARCH, TORCHSCRIPT_ARCH)
    needed = next((n for n in files if n.endswith(".onnx" if graph_only else ".safetensors")), None)
    if needed is None:
        raise ModelFormatError(
            f"The model card lists no {'.onnx' if graph_only else '.safetensors'} file to load."
        )
    _verify_files(card_path.parent, files, needed)
    if graph_only:
        return load_model(card_path.parent / needed, dataclasses.replace(spec, mean=None, std=None))
    return load_model(card_path.parent / needed, spec)


def _verify_files(folder: Path, files: dict[str, Any], needed: str) -> None:
    """Check every listed file that is present (the one we load must be) against its sha256."""
    for file_name, entry in files.items():
        if Path(file_name).name != file_name:  # the card names siblings only, never other paths
            raise ModelFormatError(f"The model card names a file outside its folder: {file_name}.")
        file_path = folder / file_name
        if not file_path.is_file():
            if file_name == needed:
                raise ModelFormatError(f"The bundle is missing {file_name}, listed in its model card.")
            continue  # e.g. the worker fetches only the weights and the card
        if _sha256(file_path) != entry.get("sha256"):
            raise ModelFormatError(
                f"The file {file_name} does not match the sha256 in model_card.json; the bundle is corrupted or was modified."
            )
