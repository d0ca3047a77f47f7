"""The dual network: an ordered list of dual layers behind one uniform interface.

The interface (timm-style) is what every learning rule and evaluation uses, with no special cases:

- ``forward_intermediates(x)``  -> [a_0 = x, a_1, ..., a_L]        (forward network F)
- ``feedback_intermediates(t)`` -> [b_0, b_1, ..., b_L = t]        (feedback network G)
- ``intermediates(inputs, network="forward"|"feedback")``           either of the above
- ``forward_features(x)``       -> flattened a_k at ``feature_index`` (penultimate / bottleneck)
- ``num_features``, ``feature_dims``, ``layer_names``, ``feature_index``
- ``feedback_input(x, y)``      -> what G is fed: class prototypes, per-sample one-hots or x

Classifiers (:mod:`ccl_repr.models`) and autoencoders (:mod:`ccl_repr.autoencoders`) build it
and register their builders in :data:`ccl_repr.registry.MODELS`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .errors import ShapeError
from .layers import DualConv, DualFlatten, DualLayer, DualLinear, set_detach

TASKS = ("classify", "reconstruct")


class DualNetwork(nn.Module):
    def __init__(self, *, layers: list[DualLayer], input_shape: tuple[int, ...], task: str,
                 num_classes: int | None = None, feature_index: int | None = None, name: str = "") -> None:
        super().__init__()
        assert task in TASKS
        for i in range(1, len(layers)):
            if layers[i - 1].out_shape != layers[i].in_shape:
                raise ShapeError(f"layer {i} expects input {layers[i].in_shape} but layer {i - 1} "
                                 f"produces {layers[i - 1].out_shape}; fix the model's widths")
        self.layers = nn.ModuleList(layers)
        self.input_shape = tuple(input_shape)
        self.task, self.num_classes, self.name = task, num_classes, name
        self.feature_index = len(layers) - 1 if feature_index is None else feature_index
        counts: dict[str, int] = {}
        names = ["input"]
        for layer in layers:
            kind = {DualLinear: "linear", DualConv: "conv", DualFlatten: "flatten"}.get(type(layer), "layer")
            counts[kind] = counts.get(kind, 0) + 1
            names.append(f"{kind}{counts[kind]}")
        names[-1] = "output"
        self.layer_names = names

    # ----------------------------------------------------------------- shapes
    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [self.input_shape] + [layer.out_shape for layer in self.layers]

    @property
    def feature_dims(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def num_features(self) -> int:
        return self.feature_dims[self.feature_index]

    def pair_indices(self, *, include_output: bool) -> list[int]:
        """Boundaries l whose (a_l, b_l) pair gets a local loss (the paper's layer pairs).

        Boundaries produced by parameter-free layers (flatten) are skipped: they repeat the pair
        just below them. The output boundary L is paired only for autoencoders; classifiers train
        U_L with cross-entropy instead.
        """
        n = len(self.layers)
        idx = [l for l in range(n) if l == 0 or self.layers[l - 1].has_params]
        return idx + ([n] if include_output else [])

    def check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(f"model {self.name or 'DualNetwork'} expects inputs of shape "
                             f"{self.input_shape} per sample, got {tuple(x.shape[1:])}; build the model "
                             f"for this data (or set data.pad_to / data.image_size)")

    # ----------------------------------------------------------------- the two networks
    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        self.check_input(x)
        outs = [x]
        for layer in self.layers:
            outs.append(layer(outs[-1]))
        return outs

    def feedback_intermediates(self, target: Tensor) -> list[Tensor]:
        outs = [target]
        for layer in reversed(self.layers):
            outs.append(layer.feedback(outs[-1]))
        return outs[::-1]

    def intermediates(self, inputs: Tensor, network: str = "forward") -> list[Tensor]:
        if network == "forward":
            return self.forward_intermediates(inputs)
        if network == "feedback":
            return self.feedback_intermediates(inputs)
        raise ValueError(f"network must be 'forward' or 'feedback', got {network!r}")

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_features(self, x: Tensor, index: int | None = None) -> Tensor:
        k = self.feature_index if index is None else index
        self.check_input(x)
        for layer in self.layers[:k]:
            x = layer(x)
        return x.flatten(1)

    def feedback_input(self, x: Tensor, y: Tensor | None = None, *, targets: str = "prototypes") -> Tensor:
        """What G is fed (the paper's method): C x C identity (prototypes), one-hot(y) per sample, or x (AE)."""
        if self.task == "reconstruct":
            return x
        assert self.num_classes is not None
        if targets == "prototypes":
            return torch.eye(self.num_classes, device=x.device, dtype=x.dtype)
        assert y is not None, "per-sample feedback targets need labels"
        return F.one_hot(y, self.num_classes).to(x.dtype)

    # ----------------------------------------------------------------- parameters
    def set_detach(self, flag: bool) -> None:
        set_detach(self, flag)

    def parameter_groups(self, network: str) -> list[tuple[str, list[nn.Parameter]]]:
        """Per-layer parameter lists of one network, e.g. for per-layer clipping."""
        get = "forward_parameters" if network == "forward" else "feedback_parameters"
        return [(self.layer_names[i + 1], getattr(layer, get)())
                for i, layer in enumerate(self.layers) if getattr(layer, get)()]

    def network_parameters(self, network: str) -> list[nn.Parameter]:
        return [p for _, ps in self.parameter_groups(network) for p in ps]


def layer_options(cfg: ModelConfig, i: int, n: int) -> dict:
    """Per-layer options: F's output layer and G's bottom layer get no activation and no norm."""
    last, first = i == n - 1, i == 0
    return dict(act_forward=None if last else cfg.act_forward,
                act_feedback=None if first else cfg.act_feedback,
                norm_forward="none" if last else cfg.norm,
                norm_feedback="none" if first else cfg.norm,
                norm_affine=cfg.norm_affine, bias=cfg.bias, init=cfg.init)
