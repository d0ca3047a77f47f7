"""Run guards: a graceful stop on Ctrl-C/SIGTERM and a divergence check without per-step syncs.

:class:`StopRequest` turns the first SIGINT/SIGTERM into a flag that the training loop reads
between optimiser steps, so the checkpoint it then writes is a consistent state (never half an
update); a second signal interrupts at once. :class:`DivergenceGuard` records on the device the
first step whose loss was non-finite and is read only where the loop synchronises anyway
(epoch end, every ``CHECK_EVERY`` steps, before each checkpoint), so it adds no host sync per step.

It also stops a run whose losses explode while staying finite (a cross-entropy of 59, 25x that
of a uniform guess, then trains on at chance). Two rules, each a config factor (0 = off):

- ``train.diverge_factor`` (absolute): the loss terms that have an uninformed reference: the
  cross-entropy ``ce`` against log C (a uniform guess over C classes), and an autoencoder's image
  MSEs (BP's ``mse``; CCL's ``pair/input`` and ``pair/output``, times the image height for the
  weighted form) against the larger of the MSEs of two uninformed outputs: the training split's
  mean image, and a blank image, which the published zero-initialised decoder outputs at first
  (its MSE is the mean image's plus the mean image's mean square: larger on bright images).
  Checked at every read on the mean since the previous read, so it also catches a blow-up in the
  first epoch.
- ``train.diverge_growth`` (relative): every term against its own first-epoch mean, at epoch ends
  on the epoch mean (the ``train/*`` values of metrics.jsonl). Only terms whose first-epoch mean is
  positive: a ratio to a zero or negative value means nothing (pair-loss forms may be either). Its
  default is large because a healthy CCL pair loss can grow by 10^3 (mlp_mnist's input pair).
"""

from __future__ import annotations

import math
import signal
import threading
from types import FrameType
from typing import Any

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


def loss_references(task: str, num_classes: int | None, train_x: Tensor, *, ae_form: str = "mse") -> dict[str, float]:
    """{loss term: its value for an uninformed model}: log C for the cross-entropy; for an
    autoencoder's image losses the MSE of a blank (all-zero) output, mean(x^2) over the training
    split, which is the mean image's MSE plus its mean square, so never below it (one host sync,
    at setup)."""
    if task == "classify":
        return {"ce": math.log(num_classes)} if (num_classes or 0) > 1 else {}
    var, mean = torch.var_mean(train_x.float(), dim=0, correction=0)  # reductions: no copy of the split
    blank = float(var.mean() + mean.square().mean())
    # CCL's image pairs use the AE pair loss: its weighted form multiplies the MSE by the height.
    height = train_x.shape[2] if ae_form == "weighted" and train_x.dim() == 4 else 1
    return {"mse": blank, "pair/input": blank * height, "pair/output": blank * height}


def first_epoch_means(rows: list[dict]) -> dict[str, float] | None:
    """The first metrics row's training losses ({term: mean}), e.g. of a resumed run."""
    return {k[len("train/"):]: v for k, v in rows[0].items() if k.startswith("train/")} if rows else None


class DivergenceGuard:
    """Remembers, on the device, the first step whose total loss was non-finite, and stops a run
    whose losses explode while finite (the two rules of this module's docstring)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, *, references: dict[str, float] | None = None,
                 factor: float = 0.0, growth: float = 0.0, early: dict[str, float] | None = None) -> None:
        self.model = model
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.references = {k: v for k, v in (references or {}).items() if v > 0} if factor > 0 else {}
        self.factor, self.growth = factor, growth
        self.early = early  # first-epoch means; set at the first epoch end when not given
        self._mark: tuple[int, int, dict[str, Tensor]] | None = None  # (epoch, batches, sums) at the last read

    @classmethod
    def for_run(cls, model: torch.nn.Module, device: torch.device, cfg: Any, *, train_x: Tensor,
                rows: list[dict]) -> DivergenceGuard:
        """The guard of a run of ``cfg`` (a Config): references from the training split, first-epoch
        means from the metrics rows so far (a resumed run keeps its reference)."""
        factor, task = cfg.train.diverge_factor, model.task
        refs = loss_references(task, model.num_classes, train_x,  # type: ignore[arg-type]
                               ae_form=cfg.loss.ae_form if task == "reconstruct" else "mse") if factor > 0 else {}
        return cls(model, device, references=refs, factor=factor, growth=cfg.train.diverge_growth,
                   early=first_epoch_means(rows))

    def observe(self, loss: Tensor, step: int) -> None:
        """Record ``step`` if ``loss`` is non-finite and nothing was recorded yet (no sync)."""
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def check(self, *, step: int, epoch: int, loss_sums: dict[str, Tensor], last_good: str,
              batches: int = 0, means: dict[str, float] | None = None) -> None:
        """Raise DivergenceError naming the step, the non-finite or exploded losses and layers, and the fix.

        Inside an epoch pass ``batches`` (the steps that ``loss_sums`` add up); at its end pass
        ``means``, the epoch's mean losses the loop has already read (averaged over ranks)."""
        window = self._window(epoch, batches, loss_sums) if means is None else None
        # One read for the step and the window means (float64: steps stay exact past 2**24).
        values = torch.stack([self.first_bad.double(), *(v.double() for v in window.values())]).tolist() \
            if window else [int(self.first_bad)]
        first = int(values[0])
        layers = nonfinite_layers(self.model)
        if first >= 0 or layers:
            self._raise_nonfinite(first, step, epoch, loss_sums, layers, last_good)
        if means is not None:
            self._mark = None
            exploded = self._exploded(means, epoch_end=True)
            if self.early is None:
                self.early = dict(means)
        else:
            exploded = self._exploded(dict(zip(window or {}, values[1:])), epoch_end=False)
        if exploded:
            raise DivergenceError(_explosion_message(exploded, step, epoch, last_good))

    def _window(self, epoch: int, batches: int, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Device-side means of the referenced terms since the previous read of this epoch."""
        if not self.references or batches <= 0:
            return {}
        mark = self._mark if self._mark is not None and self._mark[0] == epoch and self._mark[1] < batches else None
        done, before = (mark[1], mark[2]) if mark else (0, {})
        self._mark = (epoch, batches, {k: v.detach().clone() for k, v in sums.items()})
        return {k: (sums[k] - before.get(k, 0)) / (batches - done) for k in self.references if k in sums}

    def _exploded(self, values: dict[str, float], *, epoch_end: bool) -> list[tuple[str, float, float, str]]:
        """(term, value, limit, what the limit is) of every term above its limit, worst first."""
        out = []
        for k, v in values.items():
            if k in self.references and v > self.factor * self.references[k]:
                what = ("log C, the cross-entropy of a uniform guess" if k == "ce"
                        else "the MSE of a blank image, above the training mean image's")
                out.append((k, v, self.factor * self.references[k],
                            f"train.diverge_factor={self.factor:g} x {self.references[k]:.4g}, {what}"))
            elif epoch_end and self.growth > 0 and self.early and self.early.get(k, 0) > 0 \
                    and v > self.growth * self.early[k]:
                out.append((k, v, self.growth * self.early[k],
                            f"train.diverge_growth={self.growth:g} x {self.early[k]:.4g}, its first-epoch mean"))
        return sorted(out, key=lambda t: t[1] / t[2], reverse=True)

    def _raise_nonfinite(self, first: int, step: int, epoch: int, loss_sums: dict[str, Tensor],
                         layers: dict[str, list[str]], last_good: str) -> None:
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


def _term_name(term: str) -> str:
    """A loss term in words: which layer's loss it is."""
    if term.startswith("pair/"):
        return f"the pair loss of layer {term[len('pair/'):]} ({term})"
    if term.startswith(("recon/", "recon_g/")):
        return f"the local reconstruction term of layer {term.split('/', 1)[1]} ({term})"
    return {"ce": "the output layer's cross-entropy (ce)", "mse": "the reconstruction MSE (mse)"}.get(term, term)


def _explosion_message(exploded: list[tuple[str, float, float, str]], step: int, epoch: int, last_good: str) -> str:
    term, value, limit, why = exploded[0]
    others = f" (also {', '.join(t for t, *_ in exploded[1:])})" if len(exploded) > 1 else ""
    nets = ["forward", "feedback"] if term.startswith(("pair/", "recon/", "recon_g/")) else ["forward"]
    knob = why.split("=")[0]
    return (f"training diverged by step {step} (epoch {epoch}): {_term_name(term)} is {value:.4g}, above "
            f"{limit:.4g} ({why}){others}; lower {' or '.join(f'optim.{n}.lr' for n in nets)}, raise "
            f"optim.warmup_steps or clip gradients ({' / '.join(f'optim.{n}.clip=1.0' for n in nets)}); "
            f"{knob}=0 turns this check off; {last_good}")
