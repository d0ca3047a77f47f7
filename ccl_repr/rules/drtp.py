"""Direct random target projection (Frenkel, Lefebvre & Bol, Frontiers in Neuroscience 2021):
DFA with the output error replaced by the target, so no hidden layer waits for the output.

Signals:

- the output layer U_L: its own error, the cross-entropy on a_L (its input detached), as in DFA;
- hidden layer l: the gradient reaching a_l is -onehot(y) B_l / N, a fixed random projection of
  the one-hot target only. Why the target can stand in for the error: for one-hot targets the
  error e = softmax(a_L) - onehot(y) of the true class is always negative (e_y = p_y - 1 < 0),
  so -onehot(y) carries the sign of the error's true-class component, known before the forward
  pass ends (the paper's argument for dropping the error). The 1/N matches the batch-mean scale
  of DFA's e. The signal depends on nothing of the output, so hidden layers could update during
  the forward pass.

The fixed random B_l are DFA's (:func:`ccl_repr.rules.dfa.random_projections`); G is unused.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..registry import RULES
from .dfa import DFA


@RULES.register("drtp", "direct random target projection: the one-hot target reaches each hidden layer through "
                        "a fixed random matrix, no error (Frenkel et al. 2021); G unused")
class DRTP(DFA):
    """Direct random target projection (Frenkel et al. 2021). Output layer: cross-entropy on its
    logits. Hidden layer l: gradient -onehot(y) B_l / N at a_l, independent of the output's error
    (module docstring). Trains F only; G is unused."""

    name = "drtp"

    def hidden_signal(self, logits: Tensor, y: Tensor) -> Tensor:
        """The target in place of the error: -onehot(y) / N (N x C), nothing of the logits."""
        return -F.one_hot(y, logits.shape[1]).to(logits.dtype) / len(y)
