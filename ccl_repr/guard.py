"""Run guards: a graceful stop on Ctrl-C/SIGTERM and a divergence check without per-step syncs.

:class:`StopRequest` turns the first SIGINT/SIGTERM into a flag that the training loop reads
between optimiser steps, so the checkpoint it then writes is a consistent state (never half an
update); a second signal interrupts at once. :class:`DivergenceGuard` records on the device the
first step whose loss was non-finite and is read only where the loop synchronises anyway
(epoch end, every ``CHECK_EVERY`` steps, before each checkpoint), so it adds no host sync per step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
from torch import Tensor

from .errors import DivergenceError

CHECK_EVERY = 200  # steps between divergence reads inside an epoch (one host sync each)


class Interrupted(KeyboardInterrupt):
    """Training stopped on request after writing a resumable checkpoint."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM set ``requested`` instead of raising.

    Signal handlers can only be installed from the main thread; elsewhere this is inert and
    Ctrl-C keeps its default behaviour."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # second signal: the user insists, stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()


def nonfinite_layers(model: torch.nn.Module) -> dict[str, list[str]]:
    """{network: [layer names]} of the layers holding a non-finite parameter.

    One host sync when everything is finite (the common case)."""
    groups = [(net, name, ps) for net in ("forward", "feedback")
              for name, ps in model.parameter_groups(net)]  # type: ignore[operator]
    flags = [torch.stack([torch.isfinite(p).all() for p in ps]).all() for _, _, ps in groups]
    if not flags or bool(torch.stack(flags).all()):
        return {}
    bad: dict[str, list[str]] = {}
    for (net, name, _), ok in zip(groups, flags):
        if not ok:
            bad.setdefault(net, []).append(name)
    return bad


class DivergenceGuard:
    """Remembers, on the device, the first step whose total loss was non-finite."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, loss: Tensor, step: int) -> None:
        """Record ``step`` if ``loss`` is non-finite and nothing was recorded yet (no sync)."""
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def check(self, *, step: int, epoch: int, loss_sums: dict[str, Tensor], last_good: str) -> None:
        """Raise DivergenceError naming the step, the non-finite losses and layers, and the fix."""
        first = int(self.first_bad)
        layers = nonfinite_layers(self.model)
        if first < 0 and not layers:
            return
        losses = [k for k, v in loss_sums.items() if not bool(torch.isfinite(v).all())]
        what = [f"non-finite loss {', '.join(losses)}"] if losses else []
        what += [f"non-finite parameters in {net} network layer{'s' if len(names) > 1 else ''} {', '.join(names)}"
                 for net, names in layers.items()]
        nets = list(layers) or ["forward", "feedback"]
        fix = " or ".join(f"optim.{n}.lr" for n in nets)
        clip = " / ".join(f"optim.{n}.clip=1.0" for n in nets)
        raise DivergenceError(
            f"training diverged at step {first if first >= 0 else step} (epoch {epoch}): {' and '.join(what)}; "
            f"lower {fix} or clip gradients ({clip}); {last_good}")
