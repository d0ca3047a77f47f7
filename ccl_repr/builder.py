"""One builder for what trains: (model, learning rule, optimisers) from a config.

The training loop, the benchmarks and the tests all build through :func:`build_trainable`, so
the order of the seeded random draws (weight init, then the rule's own state) and which networks
get an optimiser (the rule's ``trains``) are the same everywhere.
"""

from __future__ import annotations

import torch

from .config import Config
from .models import build_model
from .network import DualNetwork
from .optim import Optimizers
from .rules import LearningRule, make_rule


def build_trainable(cfg: Config, *, input_shape: tuple[int, ...], num_classes: int, total_steps: int,
                    device: torch.device | str = "cpu", model: DualNetwork | None = None,
                    ) -> tuple[DualNetwork, LearningRule, Optimizers]:
    """The model (``model``, or ``cfg.model`` from the registry) on ``device``, the rule
    ``cfg.method`` prepared on it, and one SGD per network the rule trains, scheduled over
    ``total_steps`` optimiser steps."""
    if model is None:
        model = build_model(cfg.model, input_shape=tuple(input_shape), num_classes=num_classes)
    model = model.to(device)
    rule = make_rule(cfg)
    rule.prepare(model)  # stop-gradients on or off, and the rule's own state (seeded)
    optim = Optimizers(model, cfg.optim, total_steps=total_steps, networks=rule.trains)
    return model, rule, optim
