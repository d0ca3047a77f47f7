"""Autoencoders (the paper's autoencoder experiment): the feedback network reconstructs.

F is encoder + decoder (x -> code -> x̂); G is its mirror, fed with the target image x, so G is an
autoencoder running the other way and its bottom output b_0 is a second reconstruction of x.
Every boundary is a pair with an MSE loss (handled by :class:`ccl_repr.rules.CCL`), including
the reconstruction x̂ against x and the input x against b_0.

Two builders register themselves in the model registry (:data:`ccl_repr.registry.MODELS`), peers of the classifiers:

- ``ae_conv``: stride-2 conv encoder (paper: 128-256-1024-2048), mirrored up-conv decoder.
- ``ae_mlp``:  linear encoder (default 512-256-64) and its mirror, reshaped back to the image.

``model.widths`` sets the encoder; the decoder mirrors it. ``feature_index`` is the bottleneck,
so ``forward_features(x)`` is the code and ``feedback_intermediates(x)[model.feature_index]`` the
feedback network's middle layer. With ``model.init: orthogonal`` the published initialisation
is applied: orthogonal weights, the decoder's forward weights and the encoder's
feedback weights scaled by 0.001, the outermost of each set to zero, biases zero;
``orthogonal_bn`` leaves out the 0.001 where a batch norm follows (see :func:`published_init_`).
"""

from __future__ import annotations

import math

from einops import rearrange
from torch import Tensor, nn

from .config import ModelConfig
from .errors import ShapeError
from .layers import DualConv, DualLayer, DualLinear, scale_weight_
from .network import DualNetwork, layer_options
from .registry import MODELS

register = MODELS.register

PUBLISHED_SCALE = 1e-3  # published AE code: decoder forward / encoder feedback weights x0.001, outermost x0


class DualLinearToImage(DualLinear):
    """The MLP decoder's last layer: Linear(d, C*H*W) reshaped to (C, H, W) / flatten then Linear.

    One dual layer (not linear + unflatten), so the reconstruction pair is counted once."""

    def __init__(self, *, in_shape: tuple[int, ...], image_shape: tuple[int, int, int], **options) -> None:
        super().__init__(in_shape=in_shape, out_features=math.prod(image_shape), **options)
        self.out_shape = tuple(image_shape)

    def forward(self, x: Tensor, *, keep_graph: bool = False) -> Tensor:
        c, h, w = self.out_shape
        return rearrange(super().forward(x, keep_graph=keep_graph), "b (c h w) -> b c h w", c=c, h=h, w=w)

    def feedback(self, y: Tensor, *, keep_graph: bool = False) -> Tensor:
        return super().feedback(rearrange(y, "b c h w -> b (c h w)"), keep_graph=keep_graph)


def published_init_(layers: list[DualLayer], *, n_encoder: int, keep_normed: bool = False) -> None:
    """The published AE init: scale the decoder's forward weights and the encoder's feedback weights by 0.001;
    the outermost of each set (F's output layer, G's bottom layer) starts at zero.

    ``keep_normed`` (``model.init: orthogonal_bn``): a projection that a batch norm follows keeps
    its orthogonal scale. Scaled by 0.001, its pre-activations have a variance of order 1e-7,
    below the norm's eps (1e-5): the norm does not normalise, and its gradient, amplified
    1/sqrt(eps) times, takes over the network's grad-norm clip. With the paper's equal learning
    rates such a layer grows out of this in a few steps; with a slow feedback network (ae_mnist)
    G's layer stays in it and shrinks, and the code it feeds collapses (docs/results_ae.md)."""
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        decoder = i >= n_encoder
        proj, side = (layer.projections()[0], layer.fwd) if decoder else (layer.projections()[1], layer.fbk)
        outermost = i == (last if decoder else 0)
        if outermost or not (keep_normed and _normalised(side)):
            scale_weight_(proj, 0.0 if outermost else PUBLISHED_SCALE)


def _normalised(side: nn.Module) -> bool:
    """Whether a batch norm sits before or after the side's projection."""
    return not (isinstance(side.pre_norm, nn.Identity) and isinstance(side.post_norm, nn.Identity))


def _image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ShapeError(f"{model} needs image inputs (C, H, W), got {input_shape}; use an image dataset")
    c, h, w = input_shape
    return c, h, w


def check_conv_ae_size(input_shape: tuple[int, ...], depth: int) -> None:
    """Each stride-2 encoder layer halves H and W, so both must be divisible by 2**depth.
    Name the sizes (and depths) that would work instead."""
    _, h, w = _image_shape(input_shape, "ae_conv")
    step = 2 ** depth
    if h % step == 0 and w % step == 0:
        return
    pad = step * math.ceil(max(h, w) / step)
    max_depth = 0
    while h % 2 ** (max_depth + 1) == 0 and w % 2 ** (max_depth + 1) == 0:
        max_depth += 1
    fewer = (f"or use at most {max_depth} encoder widths (model.widths)" if max_depth
             else "no depth fits odd sizes")
    raise ShapeError(f"ae_conv with {depth} stride-2 encoder layers needs H and W divisible by {step} "
                     f"(sizes that work: {step}, {2 * step}, {3 * step}, ...), got {h}x{w}; set data.pad_to={pad}, {fewer}")


def _autoencoder(cfg: ModelConfig, input_shape: tuple[int, ...], layers: list[DualLayer],
                 n_encoder: int) -> DualNetwork:
    if cfg.init in ("orthogonal", "orthogonal_bn"):
        published_init_(layers, n_encoder=n_encoder, keep_normed=cfg.init == "orthogonal_bn")
    return DualNetwork(layers=layers, input_shape=input_shape, task="reconstruct", feature_index=n_encoder)


@register("ae_conv", "paper conv autoencoder: stride-2 conv encoder 128-256-1024-2048 (model.widths), "
                     "mirrored up-conv decoder; H, W divisible by 2**len(widths)")
def ae_conv(cfg: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int) -> DualNetwork:
    widths = cfg.widths or [128, 256, 1024, 2048]
    check_conv_ae_size(input_shape, len(widths))
    c = input_shape[0]
    channels = widths + widths[-2::-1] + [c]  # encoder outputs, then the mirrored decoder outputs
    n, layers, shape = len(channels), [], tuple(input_shape)
    for i, ch in enumerate(channels):
        kind = "strided" if i < len(widths) else "up"
        layers.append(DualConv(in_shape=shape, out_channels=ch, kind=kind, **layer_options(cfg, i, n)))
        shape = layers[-1].out_shape
    return _autoencoder(cfg, input_shape, layers, len(widths))


@register("ae_mlp", "MLP autoencoder: input-512-256-64 (model.widths) and its mirror back to the image")
def ae_mlp(cfg: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int) -> DualNetwork:
    image = _image_shape(input_shape, "ae_mlp")
    widths = cfg.widths or [512, 256, 64]
    features = widths + widths[-2::-1]
    n = len(features) + 1
    layers: list[DualLayer] = []
    shape: tuple[int, ...] = image
    for i, w in enumerate(features):
        layers.append(DualLinear(in_shape=shape, out_features=w, **layer_options(cfg, i, n)))
        shape = (w,)
    layers.append(DualLinearToImage(in_shape=shape, image_shape=image, **layer_options(cfg, n - 1, n)))
    return _autoencoder(cfg, input_shape, layers, len(widths))
