"""User-facing errors.

Every error a user can cause (a bad recipe, a missing dataset, a wrong shape, a corrupt
checkpoint) is raised as a subclass of :class:`UserError` whose message names the problem
*and* the fix. The CLI prints that one line and exits with code 2; library callers can catch
the specific subclass.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user controls; its message says how to fix it."""


class ConfigError(UserError):
    """Unknown key, wrong type or out-of-range value in a recipe or override."""


class DataError(UserError):
    """Dataset missing, unreadable, or incompatible with the model."""


class ShapeError(UserError):
    """A tensor or image size that does not fit the model."""


class CheckpointError(UserError):
    """A checkpoint or run folder that is missing, truncated, corrupt or incompatible."""


class DivergenceError(UserError):
    """Training produced a non-finite loss or parameter."""


class DependencyError(UserError):
    """An optional package that a requested feature needs is not installed."""
