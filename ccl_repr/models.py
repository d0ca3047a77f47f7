"""Classifier builders of the paper (MLPs and CNNs), registered in :data:`ccl_repr.registry.MODELS`.

Every builder returns a :class:`ccl_repr.network.DualNetwork`; autoencoders are their peers in
:mod:`ccl_repr.autoencoders`. :func:`build_model` and :func:`list_models` read the registry.
"""

from __future__ import annotations

import math

from .config import ModelConfig
from .errors import ShapeError
from .layers import DualConv, DualLayer, DualLinear
from .network import TASKS, DualNetwork, layer_options  # noqa: F401  (re-exported)
from .registry import MODELS

register = MODELS.register


def list_models() -> dict[str, str]:
    """{name: description} of every registered model."""
    return MODELS.describe()


def build_model(cfg: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int) -> DualNetwork:
    model = MODELS.get(cfg.name)(cfg, input_shape=tuple(input_shape), num_classes=num_classes)
    model.name = cfg.name
    return model


def _mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, default: list[int]) -> DualNetwork:
    widths = (cfg.widths or default) + [num_classes]
    layers: list[DualLayer] = []
    shape = input_shape
    for i, w in enumerate(widths):
        layers.append(DualLinear(in_shape=shape, out_features=w, **layer_options(cfg, i, len(widths))))
        shape = (w,)
    return DualNetwork(layers=layers, input_shape=input_shape, task="classify", num_classes=num_classes)


@register("mlp_small", "MLP input-128-128-C (fast default for the bundled digits)")
def mlp_small(cfg: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int) -> DualNetwork:
    return _mlp(cfg, input_shape, num_classes, [128, 128])


@register("mlp_mnist", "paper MLP for MNIST/FashionMNIST: 784-256x5-C, no bias, ELU (6 weight layers)")
def mlp_mnist(cfg: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int) -> DualNetwork:
    return _mlp(cfg, input_shape, num_classes, [256] * 5)


@register("mlp_cifar", "paper MLP for CIFAR10/100: 3072-1024x3-C, no bias, ELU (4 weight layers)")
def mlp_cifar(cfg: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int) -> DualNetwork:
    return _mlp(cfg, input_shape, num_classes, [1024] * 3)


def _cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, kind: str) -> DualNetwork:
    widths = cfg.widths or [128, 128, 256, 256, 512]
    if len(input_shape) != 3:
        raise ShapeError(f"CNN models need image inputs (C, H, W), got {input_shape}")
    c, h, w = input_shape
    if h % 2 ** len(widths) or w % 2 ** len(widths):
        size = 2 ** len(widths) * math.ceil(max(h, w) / 2 ** len(widths))
        raise ShapeError(f"{len(widths)} halving conv layers need H and W divisible by {2 ** len(widths)}, "
                         f"got {h}x{w}; set data.pad_to={size} or use fewer widths (model.widths)")
    n = len(widths) + 1
    layers: list[DualLayer] = []
    shape: tuple[int, ...] = input_shape
    for i, ch in enumerate(widths):
        layers.append(DualConv(in_shape=shape, out_channels=ch, kind=kind, **layer_options(cfg, i, n)))
        shape = layers[-1].out_shape
    layers.append(DualLinear(in_shape=shape, out_features=num_classes, **layer_options(cfg, n - 1, n)))
    return DualNetwork(layers=layers, input_shape=input_shape, task="classify", num_classes=num_classes)


@register("cnn", "paper CIFAR CNN: five 3x3 conv+maxpool layers 128-128-256-256-512, then linear to C")
def cnn(cfg: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int) -> DualNetwork:
    return _cnn(cfg, input_shape, num_classes, "pool")


@register("cnn_strided", "paper MNIST/FashionMNIST CNN: same widths with stride-2 convs instead of pooling")
def cnn_strided(cfg: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int) -> DualNetwork:
    return _cnn(cfg, input_shape, num_classes, "strided")
