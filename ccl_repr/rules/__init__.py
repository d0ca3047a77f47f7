"""Learning rules over the same dual network, one file each, registered in :data:`ccl_repr.registry.RULES`.

Adding a rule is one new module here (a :class:`LearningRule` subclass decorated with
``@RULES.register(name, description)``) and its name in the import line below.
"""

from __future__ import annotations

from ..config import Config
from ..registry import RULES
from .base import LearningRule, summed_backward
from . import bp, ccl, dfa, drtp, fa, fwdtp  # noqa: F401  (each module registers its rule)
from .bp import Backprop
from .ccl import CCL
from .dfa import DFA
from .drtp import DRTP
from .fa import FeedbackAlignment
from .fwdtp import FWDTP


def make_rule(cfg: Config) -> LearningRule:
    """The learning rule ``cfg.method`` names, configured from ``cfg``."""
    return RULES.get(cfg.method).from_config(cfg)


__all__ = ["LearningRule", "RULES", "make_rule", "summed_backward", "CCL", "Backprop", "FeedbackAlignment",
           "DFA", "DRTP", "FWDTP"]
