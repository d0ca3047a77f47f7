"""Direct feedback alignment (Nøkland, NeurIPS 2016): the output error, sent straight to every
hidden layer through a fixed random matrix of its own.

Signals. With logits a_L and e = dCE/da_L = (softmax(a_L) - onehot(y)) / N (mean cross-entropy):

- the output layer U_L: its own error, the cross-entropy on a_L (its input detached);
- hidden layer l (every parametrised boundary below the output): the gradient reaching its
  output a_l is e B_l, with B_l a fixed random C x d_l matrix (d_l = a_l's size flattened, so
  C x (C_l*H*W) for a conv layer), instead of backprop's e U_L ... U_{l+1}. Inside the layer
  autograd turns it into the paper's update (e B_l) ⊙ f'(z_l) times the layer's (detached) input.

Nothing crosses a layer: every input is detached and e is a value, not a graph. G is unused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import RuleConfig
from ..network import DualNetwork
from ..registry import RULES
from .base import FixedFeedbackRule, rule_generator


def hidden_indices(model: DualNetwork) -> list[int]:
    """Boundaries l of the hidden parametrised layers (a_l with 0 < l < L): the ones that
    receive a projected signal. Boundaries of parameter-free layers (flatten) are skipped."""
    return [l for l in model.pair_indices(include_output=False) if l > 0]


def random_projections(model: DualNetwork, rule: RuleConfig, *, seed: int) -> dict[int, Tensor]:
    """A fixed random C x d_l matrix per hidden boundary, B_l ~ N(proj_mean, proj_std^2)
    (proj_std 0 = 1/sqrt(C), the projection's fan-in).

    Drawn on the CPU in float64 by a generator of its own, so the global RNG (weight init, data
    order) is untouched and B is the same on every device; then moved to the model's device and
    dtype. The generator's seed mixes the run seed with a tag: the run seed itself seeds the
    weight init, and B drawn from that same stream would start correlated with U."""
    assert model.num_classes is not None
    c = model.num_classes
    std = rule.proj_std or c ** -0.5
    param = next(model.parameters())
    gen = rule_generator(seed, tag=0xDFA)
    return {l: (torch.randn(c, model.feature_dims[l], generator=gen, dtype=torch.float64) * std
                + rule.proj_mean).to(device=param.device, dtype=param.dtype)
            for l in hidden_indices(model)}


def signal_term(a: Tensor, signal: Tensor) -> Tensor:
    """A surrogate whose gradient w.r.t. a is exactly ``signal`` (N x d, reshaped to a's shape):
    sum(a * sg(signal)). Its value is not a loss; only its gradient is the rule's update."""
    return (a.flatten(1) * signal.detach()).sum()


@RULES.register("dfa", "direct feedback alignment: the output error reaches each hidden layer through a fixed "
                       "random matrix (Nøkland 2016); G unused")
class DFA(FixedFeedbackRule):
    """Direct feedback alignment (Nøkland 2016). Output layer: cross-entropy on its logits.
    Hidden layer l: the output error e through its fixed random B_l, gradient e B_l at a_l
    (module docstring). Trains F only; G is unused."""

    name = "dfa"
    detach_inputs = True

    def setup(self, model: DualNetwork) -> None:
        """B: layer name -> its C x d_l matrix."""
        self.B = {model.layer_names[l]: b for l, b in random_projections(model, self.rule, seed=self.seed).items()}

    def hidden_signal(self, logits: Tensor, y: Tensor) -> Tensor:
        """What is projected to every hidden layer: the output error e = dCE/dlogits (N x C), a value."""
        logits = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))  # bf16 autocast: fp32
        return (logits.softmax(1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / len(y)

    def losses(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        a = model.forward_intermediates(x)
        logits = a[-1]
        s = self.hidden_signal(logits, y)
        out: dict[str, Tensor] = {}
        for l in hidden_indices(model):
            name = model.layer_names[l]
            b = self.B[name]
            out[f"signal/{name}"] = signal_term(a[l], s.to(b.dtype) @ b)
        out["ce"] = F.cross_entropy(logits, y)  # U_L's own error; its input is detached
        return out
