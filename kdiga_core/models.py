"""Model creation: our small registered architectures, timm, and the [0, 1] wrapper.

Every model the service handles is a `NormalizedModel`: it takes pixels in [0, 1]
and normalises inside, so gradients, attacks and ε all live in pixel space
(method.md §1, RobustBench's convention). Users pick architectures by name:
one of ours (registered with `register_model`, sized for 8x8..32x32 inputs) or
any timm name (always built with `pretrained=False`: we never download weights).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

from kdiga_core.config import ModelSpec
from kdiga_core.errors import KdigaError, UnknownNameError

ModelFn = Callable[[int, int, int], nn.Module]
_REGISTRY: dict[str, ModelFn] = {}


class NormalizedModel(nn.Module):
    """Wraps a classifier so that it takes pixels in [0, 1] and normalises inside.

    Args:
        net: the bare classifier, taking normalised inputs of shape (N, C, H, W).
        spec: what the model is; its mean/std (0.5 per channel when None) become
            buffers, so they travel with the state dict.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, spec: ModelSpec):
        super().__init__()
        self.net = net
        self.spec = spec
        mean = spec.mean if spec.mean is not None else (0.5,) * spec.in_chans
        std = spec.std if spec.std is not None else (0.5,) * spec.in_chans
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for a batch `x` of [0, 1] pixels shaped (N, C, H, W)."""
        expected = self.spec.input_shape
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise KdigaError(
                f"Expected input of shape (N, C, H, W) with (C, H, W) = {expected}, got {tuple(x.shape)}."
            )
        return self.net((x - self.mean) / self.std)


def register_model(fn: ModelFn) -> ModelFn:
    """Register `fn(num_classes, in_chans, img_size) -> nn.Module` under its own name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def our_models() -> list[str]:
    """Names of our registered architectures, sorted."""
    return sorted(_REGISTRY)


@functools.cache
def _timm_models() -> tuple[str, ...]:
    return tuple(timm.list_models())


def list_models() -> list[str]:
    """Every architecture name `create_model` accepts: ours plus timm's, sorted."""
    return sorted(set(_REGISTRY) | set(_timm_models()))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as mean/std or BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- our architectures


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]


def _pool_size(img_size: int) -> int:
    """Spatial size for the classifier head after two 2x2 max-pools.

    Chosen so the adaptive pool divides its input exactly (4, 2 or 1): exporters
    turn that into a plain AveragePool, while uneven adaptive pooling does not
    export cleanly to ONNX.
    """
    size = img_size // 4
    return next(p for p in (4, 2, 1) if size % p == 0)


class SimpleCNN(nn.Module):
    """VGG-style CNN: two conv pairs with max-pooling, adaptive pooling, MLP head.

    Plain ReLU and max-pooling only, so double backward (exact IGA) works.
    """

    def __init__(self, num_classes: int, in_chans: int, img_size: int, width: int, hidden: int):
        super().__init__()
        pool = _pool_size(img_size)
        self.features = nn.Sequential(
            *_conv_block(in_chans, width),
            *_conv_block(width, width),
            nn.MaxPool2d(2),
            *_conv_block(width, 2 * width),
            *_conv_block(2 * width, 2 * width),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(pool),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * pool * pool, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyCNN(nn.Module):
    """A few thousand parameters: for smoke tests and the smallest students."""

    def __init__(self, num_classes: int, in_chans: int, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_block(in_chans, width),
            nn.MaxPool2d(2),
            *_conv_block(width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016), as in the robustness literature's PreActResNet."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        # The projection shortcut reads the pre-activated input, as in the original PreAct design.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """CIFAR-style pre-activation ResNet; the stem keeps resolution so 8x8 inputs still work."""

    def __init__(self, num_classes: int, in_chans: int, widths: tuple[int, ...], depths: tuple[int, ...]):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            for j in range(depth):
                layers.append(PreActBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)  # global pooling: any input size works
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn(self.layers(self.stem(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


class MLP(nn.Module):
    """Two hidden layers on the flattened image."""

    def __init__(self, num_classes: int, in_chans: int, img_size: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_chans * img_size * img_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model
def cnn_tiny(num_classes: int, in_chans: int, img_size: int) -> nn.Module:  # noqa: ARG001 - the registry signature
    """~1.5k parameters (3 channels, 10 classes)."""
    return TinyCNN(num_classes, in_chans)


@register_model
def cnn_small(num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """Student for `cnn_medium`: half the width, about 4x fewer parameters."""
    return SimpleCNN(num_classes, in_chans, img_size, width=16, hidden=64)


@register_model
def cnn_medium(num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """Teacher-sized CNN for digits-like data."""
    return SimpleCNN(num_classes, in_chans, img_size, width=32, hidden=128)


@register_model
def resnet_small(num_classes: int, in_chans: int, img_size: int) -> nn.Module:  # noqa: ARG001 - the registry signature
    """PreActResNet-14-like (widths 16/32/64, two blocks per stage), ~0.17M parameters."""
    return PreActResNet(num_classes, in_chans, (16, 32, 64), (2, 2, 2))


@register_model
def preact_resnet18(num_classes: int, in_chans: int, img_size: int) -> nn.Module:  # noqa: ARG001 - the registry signature
    """PreActResNet-18 as used for CIFAR in the robustness literature (~11M parameters)."""
    return PreActResNet(num_classes, in_chans, (64, 128, 256, 512), (2, 2, 2, 2))


@register_model
def mlp(num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """Multi-layer perceptron with two hidden layers of 256 units."""
    return MLP(num_classes, in_chans, img_size)


# --------------------------------------------------------------------------- factory


def _unknown_architecture(name: str) -> UnknownNameError:
    """Build the error without listing timm's ~1,300 names in the sentence."""
    err = UnknownNameError("architecture", name, list_models())
    close = difflib.get_close_matches(name, list_models(), n=3)
    hint = f" (closest: {', '.join(close)})" if close else ""
    err.args = (
        f"Unknown architecture '{name}'; valid names are: {', '.join(our_models())}, "
        f"or any timm architecture name{hint}; see GET /v1/catalog for the full list.",
    )
    return err


def _disable_fused_attention(net: nn.Module) -> None:
    """Switch timm's fused attention off: its CPU kernel has no double backward (method.md §3)."""
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            setattr(module, "fused_attn", False)  # noqa: B010 (an attribute timm reads, not a submodule)


def _create_timm(name: str, num_classes: int, in_chans: int, img_size: int,
                 extra: dict[str, Any] | None = None) -> nn.Module:
    kwargs: dict[str, Any] = {**(extra or {}), "pretrained": False, "num_classes": num_classes, "in_chans": in_chans}
    try:
        try:
            # ViTs and friends need img_size to size their position embeddings.
            net = timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            net = timm.create_model(name, **kwargs)  # CNNs take any size and refuse the keyword
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        if not extra:
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in extra.items())
        raise KdigaError(f"Architecture '{name}' cannot be built with kwargs {given} "
                         f"({type(exc).__name__}: {str(exc)[:200]}).") from exc
    _disable_fused_attention(net)
    _use_twice_differentiable_activations(net)
    return net


class ClampHardsigmoid(nn.Module):
    """hardsigmoid(x) = clamp(x + 3, 0, 6) / 6, from ops that have a double-backward kernel.

    torch's own `hardsigmoid_backward` has none, so exact IGA (double backprop) failed on every
    network using nn.Hardsigmoid / nn.Hardswish (timm's MobileNetV3) and fell back to finite
    differences, whose gradient disagrees with the exact one on piecewise-linear networks
    (BENCHMARKS.md). Same function, same (absent) parameters, so weights load unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


class ClampHardswish(nn.Module):
    """hardswish(x) = x · clamp(x + 3, 0, 6) / 6 (see `ClampHardsigmoid`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


_TWICE_DIFFERENTIABLE = {nn.Hardsigmoid: ClampHardsigmoid, nn.Hardswish: ClampHardswish}


def _use_twice_differentiable_activations(net: nn.Module) -> None:
    """Swap nn.Hardsigmoid / nn.Hardswish for their clamp forms, in place (see `ClampHardsigmoid`)."""
    for name, child in list(net.named_children()):
        replacement = _TWICE_DIFFERENTIABLE.get(type(child))
        if replacement is not None:
            setattr(net, name, replacement())
        else:
            _use_twice_differentiable_activations(child)


def build_model(spec: ModelSpec) -> NormalizedModel:
    """Build a freshly initialised model (never pretrained) for `spec`.

    Raises:
        UnknownNameError: `spec.arch` is neither ours nor a timm architecture.
    """
    if spec.arch in _REGISTRY:
        if spec.kwargs:
            raise KdigaError(f"kwargs apply to timm architectures only; '{spec.arch}' is one of ours and takes none.")
        net = _REGISTRY[spec.arch](spec.num_classes, spec.in_chans, spec.img_size)
    elif spec.arch in _timm_models():
        net = _create_timm(spec.arch, spec.num_classes, spec.in_chans, spec.img_size, spec.kwargs)
    else:
        raise _unknown_architecture(spec.arch)
    return NormalizedModel(net, spec)


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    img_size: int = 32,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> NormalizedModel:
    """timm-style factory: `create_model("cnn_small", 10, in_chans=1, img_size=8)`."""
    spec = ModelSpec(
        arch=name, num_classes=num_classes, in_chans=in_chans, img_size=img_size, mean=mean, std=std
    )
    return build_model(spec)
