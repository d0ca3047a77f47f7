"""Representation evaluations over the uniform dual-network interface (see ccl_repr.models).

One protocol per module, each with its defaults stated at the top:
:mod:`evals.features` (any layer of either network), :mod:`evals.linear_probe`,
:mod:`evals.knn`, :mod:`evals.umap_plot`, :mod:`evals.cka`, :mod:`evals.alignment`,
:mod:`evals.baselines`; :mod:`evals.evaluate` runs them on a run folder and
:mod:`evals.report` writes ``eval.json`` and a Markdown report.

evals reads models only through the uniform interface and run folders only through
``ccl_repr.checkpoint``; it never imports ``ccl_repr.train`` or ``ccl_repr.cli``.
"""

from ccl_repr.errors import UserError


class EvalError(UserError):
    """A bad evaluation request (unknown layer or protocol, missing labels, too few samples)."""


__all__ = ["EvalError"]
