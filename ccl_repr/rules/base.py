"""The learning-rule interface: what a rule computes, which parameters it trains, what it keeps.

A rule sees the dual network only through :class:`ccl_repr.network.DualNetwork`'s interface.
The training loop, the benchmarks, the tests and the evaluations call exactly these methods:

- ``prepare(model)``: switch the layers' input stop-gradients on or off, check the rule applies
  to the model's task, and build the rule's own state (e.g. fixed random feedback matrices);
- ``losses(model, x, y)``: the named loss terms whose gradients are the rule's update;
- ``backward(model, x, y)``: those losses and their gradients, accumulated into ``.grad``;
  returns the losses detached. It is the rule's *own* update: diagnostics read it, never
  another rule's;
- ``end_step()``: called by the training loop after each optimiser step (state that advances
  per training step, e.g. CCL's delayed feedback values);
- ``trains``: the networks whose parameters the optimiser steps ("forward", "feedback");
- ``feedback_weights(model)`` (optional): the per-layer weights standing in for U_l on the
  way down, in U_l's layout, for weight-alignment diagnostics; None where the rule has none;
- ``state_dict()`` / ``load_state_dict()``: the rule's own state, saved in checkpoints and
  restored on resume.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, ClassVar, ContextManager

import numpy as np
import torch
from torch import Tensor

from ..config import RuleConfig
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
        if cfg.train.feedback_delay or cfg.train.parallel != "none":
            raise ConfigError(f"train.feedback_delay and train.parallel apply to CCL only (method {cls.name} has no "
                              f"trained feedback network to delay or split); drop them or use --method ccl")
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

    def end_step(self) -> None:
        """Called by the training loop once after each optimiser step (never by diagnostics that
        call ``backward`` on a probe batch): rules whose state advances per training step (CCL's
        delayed feedback) advance it here. Nothing by default."""

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


class FixedFeedbackRule(LearningRule):
    """A classifier rule whose feedback is fixed and random (FA, DFA, DRTP, FW-DTP): configured by
    ``cfg.rule``, seeded from the run's seed (:func:`rule_generator`); its matrices ``B``, drawn in
    ``setup``, are its checkpointed state. Trains F only."""

    tasks = ("classify",)
    trains = ("forward",)

    @classmethod
    def from_config(cls, cfg: "Config") -> "FixedFeedbackRule":
        super().from_config(cfg)  # refuses the options that apply to CCL only (train.layerwise, ...)
        return cls(cfg.loss, rule=cfg.rule, seed=cfg.seed)

    def __init__(self, cfg, *, rule: RuleConfig | None = None, seed: int = 0) -> None:
        super().__init__(cfg)
        self.rule, self.seed = rule or RuleConfig(), seed
        self.B: dict[str, Tensor] = {}  # layer name -> that layer's fixed matrix, drawn in setup()

    def state_dict(self) -> dict[str, Tensor]:
        return {f"B/{k}": v for k, v in self.B.items()}  # live tensors: load_state_dict copies into them


def rule_generator(seed: int, *, tag: int) -> torch.Generator:
    """A CPU generator for a rule's own random state (e.g. fixed feedback matrices): the run seed
    mixed with the rule's tag. Not the run seed itself, which seeds the weight init (matrices drawn
    from the init's stream would start correlated with U), nor an offset of it (seed + k is run
    seed + k's init stream, and torch's CPU generator keeps only the low 32 bits of a larger seed)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, tag]).generate_state(1)[0]))


def summed_backward(rule: LearningRule, model: "DualNetwork", x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """One backward pass from all the losses at once (forward work under the rule's autocast):
    the gradients of sum(losses).backward(), without building the graph of the sum."""
    with rule.autocast():
        losses = rule.losses(model, x, y)
    torch.autograd.backward([v for v in losses.values() if v.requires_grad])
    return {k: v.detach() for k, v in losses.items()}
