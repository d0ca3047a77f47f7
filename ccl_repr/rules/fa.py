"""Feedback alignment (Lillicrap et al., 2016): backpropagation whose error travels down through
fixed random matrices B_l instead of the transposed forward weights U_l^T (no weight transport).

Signals (F only; G is unused). With z_l = U_l a_{l-1} and a_l = f(z_l):

- the output layer U_L gets its own error e = dCE/dlogits, so its gradient e^T a_{L-1} is BP's;
- below it, the error at layer l is delta_l = (delta_{l+1} B_{l+1}) * f'(z_l), where BP would use
  delta_{l+1} U_{l+1} (a batch norm before or after U_l passes the error by its true derivative:
  only the step through U_{l+1} is replaced);
- every weight's gradient is the usual local product, delta_l^T a_{l-1}.

B_l has U_l's weight shape: (out, in) for a linear layer, (c_out, c_in, k, k) for a conv layer,
whose error goes down through the transposed convolution with B_l (the layer's stride and padding).

Mechanism: while :meth:`FeedbackAlignment.losses` runs F's forward pass, a full backward hook on
each projection U_l replaces the gradient passed to the projection's input by the one computed
with B_l; autograd keeps computing each weight's own gradient. The hooks are removed as soon as
the forward ends (the graph keeps them), so the same model backpropagated anywhere else (e.g. an
evaluation computing BP's gradient) gets the true gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..network import DualNetwork
from ..registry import RULES
from .base import FixedFeedbackRule, rule_generator


@RULES.register("fa", "feedback alignment (Lillicrap et al. 2016): BP's error sent down through fixed "
                      "random matrices B_l instead of U_l^T; G unused")
class FeedbackAlignment(FixedFeedbackRule):
    """Feedback alignment (Lillicrap et al. 2016). Output layer: its own error, as in BP. Layer l
    below: delta_{l+1} B_{l+1} through its activation derivative, with B_{l+1} a fixed random
    matrix of U_{l+1}'s shape (module docstring). Trains F only; G is unused."""

    name = "fa"
    detach_inputs = False  # the error travels through the layers, as in BP

    def setup(self, model: DualNetwork) -> None:
        """Draw every B_l once, on the CPU in float64 by a generator of its own (the global RNG
        is left alone; B is the same on every device and dtype), then move it to U_l's."""
        gen = rule_generator(self.seed, tag=0xFA)
        self.B = {}
        for name, side in _forward_sides(model):
            w = side.proj.weight
            std = self.rule.proj_std or w[0].numel() ** -0.5  # 0 -> 1/sqrt(fan-in of U_l)
            b = torch.randn(w.shape, generator=gen, dtype=torch.float64) * std + self.rule.proj_mean
            self.B[name] = b.to(device=w.device, dtype=w.dtype)

    def losses(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        with self._feedback_hooks(model, x):
            out = model(x)
        return {"ce": F.cross_entropy(out, y)}

    @contextlib.contextmanager
    def _feedback_hooks(self, model: DualNetwork, x: Tensor) -> Iterator[None]:
        """B_l in place of U_l^T for the backward of the graph built inside this block."""
        if not self.B:
            raise RuntimeError("FeedbackAlignment: call prepare(model) before computing losses")
        handles = [side.proj.register_full_backward_hook(_send_down(side.proj, self.B[name]))
                   for name, side in _carrying_error(model, x)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def feedback_weights(self, model: DualNetwork) -> dict[str, Tensor]:
        """B_l, which carries the error down in U_l's place, in U_l's layout: FA's alignment is
        cos(U_l, B_l), the quantity that grows as F learns to follow its fixed feedback."""
        return dict(self.B)


def _forward_sides(model: DualNetwork) -> list[tuple[str, nn.Module]]:
    """(layer name, F's side of the layer, whose ``proj`` is U_l) for every layer with parameters."""
    return [(model.layer_names[i + 1], layer.fwd) for i, layer in enumerate(model.layers) if layer.has_params]


def _carrying_error(model: DualNetwork, x: Tensor) -> list[tuple[str, nn.Module]]:
    """The entries of :func:`_forward_sides` whose U_l's input carries a gradient. The first
    layer's usually does not (it is the data), unless x or a parametrised stage before U_l (a
    pre-norm) needs one: a hook there would have nothing to replace (and torch warns)."""
    out, carries = [], x.requires_grad
    for name, side in _forward_sides(model):
        if carries or _trainable(side.before, side.pre_norm):
            out.append((name, side))
        carries = carries or _trainable(side)
    return out


def _trainable(*modules: nn.Module) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


def _send_down(proj: nn.Module, b: Tensor):
    """A full backward hook: the gradient w.r.t. the projection's input computed with B, not U."""
    def hook(module: nn.Module, grad_input: tuple, grad_output: tuple) -> tuple | None:
        if grad_input[0] is None:  # the network's input: nothing travels further down
            return None
        g, below = grad_output[0], grad_input[0]
        bg = b.to(g.dtype)  # the error's dtype (bf16 under autocast)
        if isinstance(proj, nn.Conv2d):
            down = torch.nn.grad.conv2d_input(below.shape, bg, g, stride=proj.stride, padding=proj.padding,
                                              dilation=proj.dilation, groups=proj.groups)
        else:
            down = g @ bg
        return (down.to(below.dtype),)
    return hook
