"""ccl_repr: Counter-Current Learning (Kao & Hariharan, NeurIPS 2024) and representation evaluations."""

from .config import Config, make_config
from .errors import UserError
from .layers import DualConv, DualFlatten, DualLayer, DualLinear
from .models import DualNetwork, build_model, list_models
from . import autoencoders, rules  # noqa: F401  (register the autoencoders and the learning rules)
from .api import Run, fit, load  # noqa: E402  (the notebook API: train on your data, use a run on raw images)

__version__ = "0.1.0"
__all__ = ["Config", "make_config", "UserError", "DualLayer", "DualLinear", "DualConv", "DualFlatten",
           "DualNetwork", "build_model", "list_models", "Run", "fit", "load", "__version__"]
