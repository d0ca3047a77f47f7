"""Learning rules over the same dual network, one file each, registered in :data:`ccl_repr.registry.RULES`.

Adding a rule is one new module here (a :class:`LearningRule` subclass decorated with
``@RULES.register(name, description)``) and one import line below.
"""

from __future__ import annotations

from ..config import Config
from ..registry import RULES
from .base import LearningRule, summed_backward
from . import bp, ccl  # noqa: F401,E402  (each registers its rule)
from . import dfa, drtp  # noqa: F401,E402  (direct feedback: DFA, DRTP)
from .bp import Backprop
from .ccl import CCL
from .fa import FeedbackAlignment  # noqa: F401  (registers "fa")


def make_rule(cfg: Config) -> LearningRule:
    """The learning rule ``cfg.method`` names, configured from ``cfg``."""
    return RULES.get(cfg.method).from_config(cfg)


__all__ = ["LearningRule", "RULES", "make_rule", "summed_backward", "CCL", "Backprop"]
