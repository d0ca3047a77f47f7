"""Backpropagation over the dual network's forward side (the baseline of every comparison)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..network import DualNetwork
from ..registry import RULES
from .base import LearningRule


@RULES.register("bp", "backpropagation: the task loss on F's output, gradients through every layer; G unused")
class Backprop(LearningRule):
    """Backpropagation, the baseline: stop-gradients off, the task loss on F's output only
    (cross-entropy, or the reconstruction MSE of an autoencoder); the error reaches layer l
    through U_{l+1}^T ... U_L^T (weight transport). Trains F only; G is unused.
    """

    name = "bp"
    tasks = ("classify", "reconstruct")
    trains = ("forward",)
    detach_inputs = False

    def losses(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        out = model(x)
        if model.task == "reconstruct":
            return {"mse": F.mse_loss(out, x)}
        return {"ce": F.cross_entropy(out, y)}
