"""Dual layers: one forward op (U_l, in_shape -> out_shape) and one feedback op (V_l, the mirror).

The paper's method. Layer l of the forward network F computes a_l = act_F(U_l · sg(a_{l-1})); the same layer
of the feedback network G computes b_{l-1} = act_B(V_l · sg(b_l)). The stop-gradient ``sg`` on
each layer's *input* is what makes CCL's credit assignment local; it is a switch
(:attr:`DualLayer.detach`) so the very same model can also be trained with backprop.

A side (forward or feedback) is: optional resampling in -> optional pre-norm -> projection ->
optional post-norm -> activation -> optional resampling out. The network builder turns off
the activation and norm on F's output layer and on G's bottom layer (the paper's method: the last layer of each network has no activation).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

ACTIVATIONS = {
    "elu": nn.ELU, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU, "identity": nn.Identity,
}


def make_activation(name: str | None) -> nn.Module:
    return nn.Identity() if name in (None, "identity") else ACTIVATIONS[name]()


def _norm(kind: str, channels: int, image: bool, affine: bool) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    return (nn.BatchNorm2d if image else nn.BatchNorm1d)(channels, affine=affine)


class Side(nn.Module):
    """One direction of a dual layer: resample -> [norm] -> projection -> [norm] -> act -> resample."""

    def __init__(self, *, proj: nn.Module, in_ch: int, out_ch: int, image: bool, act: str | None,
                 norm: str = "none", norm_affine: bool = True,
                 before: nn.Module | None = None, after: nn.Module | None = None) -> None:
        super().__init__()
        self.before = before or nn.Identity()
        self.pre_norm = _norm(norm if norm == "pre" else "none", in_ch, image, norm_affine)
        self.proj = proj
        self.post_norm = _norm(norm if norm == "post" else "none", out_ch, image, norm_affine)
        self.act = make_activation(act)
        self.after = after or nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # Identity stages are skipped, not called: a module call costs microseconds of Python,
        # and CCL's feedback side runs on C x d prototypes, where that overhead is the step time.
        for stage in (self.before, self.pre_norm, self.proj, self.post_norm, self.act, self.after):
            if not isinstance(stage, nn.Identity):
                x = stage(x)
        return x


class DualLayer(nn.Module):
    """Base class: ``forward`` runs U_l on sg(input); ``feedback`` runs V_l on sg(input)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def __init__(self, *, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.detach = True  # sg() on inputs; False turns the layer into a plain backprop layer

    @property
    def has_params(self) -> bool:
        return any(True for _ in self.parameters())

    def forward_parameters(self) -> list[nn.Parameter]:
        return list(self.fwd.parameters()) if hasattr(self, "fwd") else []

    def feedback_parameters(self) -> list[nn.Parameter]:
        return list(self.fbk.parameters()) if hasattr(self, "fbk") else []

    def _sg(self, x: Tensor) -> Tensor:
        return x.detach() if self.detach else x

    def forward(self, x: Tensor, *, keep_graph: bool = False) -> Tensor:
        return self.fwd(x if keep_graph else self._sg(x))

    def feedback(self, y: Tensor, *, keep_graph: bool = False) -> Tensor:
        """V_l on sg(y); ``keep_graph=True`` lets the gradient through to y (the local
        reconstruction terms V_l(U_l(a_l)) and U_l(V_l(b_{l+1})), each of which trains both)."""
        return self.fbk(y if keep_graph else self._sg(y))

    def projections(self) -> tuple[nn.Module, nn.Module]:
        """(U_l, V_l) as modules, e.g. for weight-alignment diagnostics."""
        return self.fwd.proj, self.fbk.proj

    def init_weights(self, scheme: str) -> None:
        for proj in self.projections():
            if scheme.startswith("orthogonal"):  # orthogonal, orthogonal_bn (autoencoders.published_init_)
                nn.init.orthogonal_(proj.weight)
            if proj.bias is not None:  # published code: biases start at zero
                nn.init.zeros_(proj.bias)

    def extra_repr(self) -> str:
        return f"{self.in_shape} <-> {self.out_shape}, detach={self.detach}"


class DualLinear(DualLayer):
    """Linear(in, out) / Linear(out, in). Image-shaped inputs are flattened (and unflattened back)."""

    def __init__(self, *, in_shape: tuple[int, ...], out_features: int, act_forward: str | None = "elu",
                 act_feedback: str | None = "elu", norm_forward: str = "none", norm_feedback: str = "none",
                 norm_affine: bool = True, bias: bool = False, init: str = "default") -> None:
        super().__init__(in_shape=in_shape, out_shape=(out_features,))
        d_in = math.prod(in_shape)
        self.fwd = Side(proj=nn.Linear(d_in, out_features, bias=bias), in_ch=d_in, out_ch=out_features,
                        image=False, act=act_forward, norm=norm_forward, norm_affine=norm_affine)
        self.fbk = Side(proj=nn.Linear(out_features, d_in, bias=bias), in_ch=out_features, out_ch=d_in,
                        image=False, act=act_feedback, norm=norm_feedback, norm_affine=norm_affine)
        self.init_weights(init)

    def forward(self, x: Tensor, *, keep_graph: bool = False) -> Tensor:
        if len(self.in_shape) == 3:
            x = rearrange(x, "b c h w -> b (c h w)")
        return super().forward(x, keep_graph=keep_graph)

    def feedback(self, y: Tensor, *, keep_graph: bool = False) -> Tensor:
        out = super().feedback(y, keep_graph=keep_graph)
        if len(self.in_shape) == 3:
            c, h, w = self.in_shape
            out = rearrange(out, "b (c h w) -> b c h w", c=c, h=h, w=w)
        return out


class DualConv(DualLayer):
    """Image-to-image dual layer in three kinds (the paper's conv dual layers), all 3x3 'same' convolutions.

    - ``strided``: Conv2d(stride 2) / nearest-upsample x2 then Conv2d(stride 1).
    - ``pool``:    Conv2d(stride 1) then MaxPool 2 / nearest-upsample x2 then Conv2d.
    - ``up``:      upsample x2 then Conv2d (decoders) / Conv2d(stride 2).
    - ``same``:    Conv2d / Conv2d, resolution unchanged.
    """

    KINDS = ("strided", "pool", "up", "same")

    def __init__(self, *, in_shape: tuple[int, int, int], out_channels: int, kind: str = "strided",
                 kernel_size: int = 3, act_forward: str | None = "elu", act_feedback: str | None = "elu",
                 norm_forward: str = "none", norm_feedback: str = "none", norm_affine: bool = True,
                 bias: bool = False, init: str = "default") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"DualConv kind must be one of {self.KINDS}, got {kind!r}")
        cin, h, w = in_shape
        scale = {"strided": 0.5, "pool": 0.5, "up": 2.0, "same": 1.0}[kind]
        if scale < 1 and (h % 2 or w % 2):
            from .errors import ShapeError
            raise ShapeError(f"a {kind} conv layer halves {h}x{w}, which is odd; pad the images "
                             f"(e.g. --set data.pad_to={2 ** math.ceil(math.log2(max(h, w)))}) or use fewer layers")
        super().__init__(in_shape=in_shape, out_shape=(out_channels, int(h * scale), int(w * scale)))
        pad = kernel_size // 2

        def conv(a: int, b: int, stride: int) -> nn.Conv2d:
            return nn.Conv2d(a, b, kernel_size, stride=stride, padding=pad, bias=bias)

        up = nn.Upsample(scale_factor=2, mode="nearest")
        common = dict(image=True, norm_affine=norm_affine)
        fwd_stride = 2 if kind == "strided" else 1
        fbk_stride = 2 if kind == "up" else 1
        self.fwd = Side(proj=conv(cin, out_channels, fwd_stride), in_ch=cin, out_ch=out_channels,
                        act=act_forward, norm=norm_forward,
                        before=up if kind == "up" else None,
                        after=nn.MaxPool2d(2) if kind == "pool" else None, **common)
        self.fbk = Side(proj=conv(out_channels, cin, fbk_stride), in_ch=out_channels, out_ch=cin,
                        act=act_feedback, norm=norm_feedback,
                        before=nn.Upsample(scale_factor=2, mode="nearest") if kind in ("strided", "pool") else None,
                        **common)
        self.kind = kind
        self.init_weights(init)


class DualFlatten(DualLayer):
    """Reshape (C, H, W) <-> (C*H*W,). No parameters, so no stop-gradient: a detach here would cut
    the feedback path from the next layer's V to the pair loss below it."""

    def __init__(self, *, in_shape: tuple[int, int, int]) -> None:
        super().__init__(in_shape=in_shape, out_shape=(math.prod(in_shape),))
        self.detach = False

    def forward(self, x: Tensor, *, keep_graph: bool = False) -> Tensor:
        return rearrange(x, "b c h w -> b (c h w)")

    def feedback(self, y: Tensor, *, keep_graph: bool = False) -> Tensor:
        c, h, w = self.in_shape
        return rearrange(y, "b (c h w) -> b c h w", c=c, h=h, w=w)

    def projections(self) -> tuple[nn.Module, nn.Module]:
        raise TypeError("DualFlatten has no projections")

    def init_weights(self, scheme: str) -> None:
        pass


def set_detach(module: nn.Module, flag: bool) -> None:
    """Switch every dual layer with parameters between CCL (sg on inputs) and backprop."""
    for m in module.modules():
        if isinstance(m, DualLayer) and m.has_params:
            m.detach = flag


def scale_weight_(proj: nn.Module, factor: float) -> None:
    """Scale a projection's weight in place (published AE init: 0.001, outermost 0)."""
    with torch.no_grad():
        proj.weight.mul_(factor)
