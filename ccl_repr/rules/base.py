"""The learning-rule interface: what a rule computes, which parameters it trains, what it keeps.

A rule sees the dual network only through :class:`ccl_repr.network.DualNetwork`'s interface.
The training loop, the benchmarks, the tests and the evaluations call exactly these methods:

- ``prepare(model)``: switch the layers' input stop-gradients on or off, check the rule applies
  to the model's task, and build the rule's own state (e.g. fixed random feedback matrices);
- ``losses(model, x, y)``: the named loss terms whose gradients are the rule's update;
- ``backward(model, x, y)``: those losses and their gradients, accumulated into ``.grad``;
  returns the losses detached. It is the rule's *own* update: diagnostics read it, never
  another rule's;
- ``trains``: the networks whose parameters the optimiser steps ("forward", "feedback");
- ``feedback_weights(model)`` (optional): the per-layer weights standing in for U_l on the
  way down, in U_l's layout, for weight-alignment diagnostics; None where the rule has none;
- ``state_dict()`` / ``load_state_dict()``: the rule's own state, saved in checkpoints and
  restored on resume.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, ClassVar, ContextManager

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from ..config import Config
    from ..network import DualNetwork


class LearningRule:
    name: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = ("classify",)  # model tasks the rule is defined for
    trains: ClassVar[tuple[str, ...]] = ("forward",)  # networks whose parameters it updates
    detach_inputs: ClassVar[bool] = True  # sg() on every layer's input (the paper's locality)
    # Set by the fast path (ccl_repr.fastpath) to bf16 autocast on CUDA; wraps forward work only.
    autocast: Callable[[], ContextManager] = contextlib.nullcontext

    @classmethod
    def from_config(cls, cfg: "Config") -> "LearningRule":
        """The rule a resolved run config asks for (rules with options override this)."""
        if cfg.train.layerwise:
            raise ConfigError(f"train.layerwise applies to CCL only (method {cls.name} has no per-layer pair "
                              f"losses to backpropagate early); set it under the recipe's ccl: section or drop it")
        return cls(cfg.loss)

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def prepare(self, model: "DualNetwork") -> None:
        if model.task not in self.tasks:
            raise ConfigError(f"method {self.name} trains {' and '.join(self.tasks)} models, not a {model.task} "
                              f"model ({model.name or 'this model'}); choose one of the rules for it")
        model.set_detach(self.detach_inputs)
        self.setup(model)

    def setup(self, model: "DualNetwork") -> None:
        """Build the rule's own state for ``model`` (nothing by default)."""

    def losses(self, model: "DualNetwork", x: Tensor, y: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def backward(self, model: "DualNetwork", x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Losses and their gradients (accumulated into ``.grad``); returns the losses detached."""
        return summed_backward(self, model, x, y)

    def feedback_weights(self, model: "DualNetwork") -> dict[str, Tensor] | None:
        """{layer name: the weight that carries the signal down through layer l in place of U_l},
        in U_l's own layout, so that cos(U_l, W_l) is the rule's weight alignment (BP's would be
        U_l itself: 1). None (the default): the rule has no per-layer feedback weight of U_l's
        shape (BP transports U_l itself; DFA and DRTP project the output error or target
        straight to each layer through a C x d_l matrix, which has no U_l to align with)."""
        return None

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        own = self.state_dict()
        if set(state) != set(own):
            raise CheckpointError(f"the checkpoint holds state {sorted(state)} for method {self.name}, which "
                                  f"keeps {sorted(own)}; resume with the method the run was trained with")
        for k, v in own.items():
            v.copy_(state[k])


def summed_backward(rule: LearningRule, model: "DualNetwork", x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """One backward pass from all the losses at once (forward work under the rule's autocast):
    the gradients of sum(losses).backward(), without building the graph of the sum."""
    with rule.autocast():
        losses = rule.losses(model, x, y)
    torch.autograd.backward([v for v in losses.values() if v.requires_grad])
    return {k: v.detach() for k, v in losses.items()}
