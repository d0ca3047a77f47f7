"""Fixed-weight difference target propagation (Shibuya et al., AAAI 2023): every layer is trained
towards a target, and the targets travel down through fixed random feedback functions.

Signals (F only; G is unused). With F's values a_l (every layer's input detached) and e =
softmax(a_L) - onehot(y), the per-sample gradient of the summed cross-entropy at the logits:

- the output's target is a gradient step on its own loss, t_L = a_L - beta * e
  (``rule.target_step`` = beta);
- below it the target comes down through layer l's feedback function g_l with the difference
  correction of DTP: t_l = a_l + g_l(t_{l+1}) - g_l(a_{l+1}), where g_l(h) = tanh(h B_l) and B_l
  is a fixed random matrix of U_l's shape. The correction makes t_l = a_l wherever t_{l+1} =
  a_{l+1}, however poorly g_l inverts U_l: that is what lets the feedback stay untrained (the
  method's point: DTP's trained inverses cost most of its compute and stability);
- every layer l with weights minimises its own distance to its target,
  ``target/NAME`` = sum over units of (a_l - sg(t_l))^2, averaged over the batch: its input is
  detached, so the update stays inside the layer.

No error travels through a weight: the only quantities crossing a layer are the values a_{l+1}
and t_{l+1}, through the fixed B_l. ``ce``, the cross-entropy of the logits, is reported and not
trained on.

Defined for MLP classifiers (a chain of linear layers, after a flatten): targets on conv feature
maps would need conv feedback functions, which this rule does not build.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..layers import DualLinear
from ..network import DualNetwork
from ..registry import RULES
from .base import FixedFeedbackRule, rule_generator
from .dfa import hidden_indices


@RULES.register("fwdtp", "fixed-weight difference target propagation (Shibuya et al. 2023): each layer regresses "
                         "a target sent down through fixed random feedback functions; MLP classifiers; G unused")
class FWDTP(FixedFeedbackRule):
    """Fixed-weight difference target propagation (Shibuya et al. 2023). Output layer: target
    a_L - beta e. Hidden layer l: target a_l + g_l(t_{l+1}) - g_l(a_{l+1}) with g_l(h) =
    tanh(h B_l), B_l fixed and random (module docstring). Trains F only; G is unused."""

    name = "fwdtp"
    detach_inputs = True
    chain: tuple[tuple[int, str], ...] = ()  # (l, name) of the layers carrying a target down, set by setup()

    def setup(self, model: DualNetwork) -> None:
        """Check the model is a chain of linear layers and draw every B_l (layer name -> U_l's
        shape) once, on the CPU in float64 by a generator of its own (the global RNG is left
        alone), N(proj_mean, proj_std^2) with proj_std 0 = 1/sqrt(fan-in of g_l)."""
        self.chain = tuple((l, model.layer_names[l + 1]) for l in feedback_layers(model))
        gen = rule_generator(self.seed, tag=0xD7B)
        self.B = {}
        for l, name in self.chain:
            w = model.layers[l].fwd.proj.weight
            std = self.rule.proj_std or w.shape[0] ** -0.5
            b = torch.randn(w.shape, generator=gen, dtype=torch.float64) * std + self.rule.proj_mean
            self.B[name] = b.to(device=w.device, dtype=w.dtype)

    def feedback(self, name: str, h: Tensor) -> Tensor:
        """g_l(h) = tanh(h B_l) for layer ``name``: from its output space down to its input's."""
        return torch.tanh(h @ self.B[name].to(h.dtype))

    @torch.no_grad()
    def targets(self, a: list[Tensor], y: Tensor) -> dict[int, Tensor]:
        """{boundary: target} from the output down (module docstring), in float32 or wider."""
        if not self.B:
            raise RuntimeError("FWDTP: call prepare(model) before computing losses")
        a = [v.detach().to(torch.promote_types(v.dtype, torch.float32)) for v in a]
        last = len(a) - 1
        e = a[last].softmax(1) - F.one_hot(y, a[last].shape[1]).to(a[last].dtype)
        t = {last: a[last] - self.rule.target_step * e}
        for l, name in reversed(self.chain):  # layer l: a_l -> a_{l+1}
            t[l] = a[l] + (self.feedback(name, t[l + 1]) - self.feedback(name, a[l + 1]))  # exactly a_l when t = a
        return t

    def losses(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        a = model.forward_intermediates(x)
        out = {f"target/{model.layer_names[l]}": (a[l] - t.to(a[l].dtype)).square().sum(1).mean()
               for l, t in self.targets(a, y).items()}
        out["ce"] = F.cross_entropy(a[-1].detach(), y)  # reported only: no gradient
        return out

    def feedback_weights(self, model: DualNetwork) -> dict[str, Tensor]:
        """B_l in U_l's layout: g_l carries a value down through h B_l where backprop's error
        would go through U_l (grad @ U_l), so cos(U_l, B_l) is FW-DTP's weight alignment."""
        return dict(self.B)


def feedback_layers(model: DualNetwork) -> list[int]:
    """The layers l that carry a target down (a_{l+1} -> a_l): every layer whose input is a hidden
    boundary. Refuses, with one line, a model whose trained layers are not a chain of linear
    layers (targets on conv maps are not built)."""
    if model.num_classes is None:
        raise ConfigError("method fwdtp trains classifiers; choose ccl or bp for an autoencoder")
    hidden, last = hidden_indices(model), len(model.layers)
    for i, layer in enumerate(model.layers):
        if layer.has_params and not isinstance(layer, DualLinear):
            raise ConfigError(f"method fwdtp is built for MLPs (linear layers); {model.name or 'this model'} has "
                              f"{type(layer).__name__} layer {model.layer_names[i + 1]}: use an mlp_* recipe")
    for l in hidden:
        if not model.layers[l].has_params or (l + 1 not in hidden and l + 1 != last):
            raise ConfigError(f"method fwdtp needs every hidden layer followed by a trained layer; "
                              f"{model.layer_names[l + 1]} is not: use an mlp_* recipe")
    return hidden
