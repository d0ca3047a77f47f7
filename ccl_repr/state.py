"""The training state: everything a checkpoint holds, listed once.

:class:`TrainingState` is the one place that says what ``checkpoint.pt`` contains: the model's
parameters and buffers, the learning rule's own state (e.g. fixed random feedback matrices), the
optimisers and schedules, the epoch and step counters, the best validation epoch and its weights,
the metrics rows so far, the position inside an interrupted epoch, and every random stream a
resumed run must continue. Saving and restoring read the same list, so a resumed run ends as the
uninterrupted one would (bit-for-bit on CPU).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .errors import CheckpointError
from .network import DualNetwork
from .optim import Optimizers
from .rules import LearningRule


@dataclass
class TrainingState:
    model: DualNetwork
    rule: LearningRule
    optim: Optimizers
    shuffle: torch.Generator  # the order of the training samples
    aug: torch.Generator | None  # crops and flips, when data.augment is on
    device: torch.device
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    elapsed: float = 0.0  # training seconds so far (validation excluded)
    best: dict | None = None  # validation metrics of the best epoch
    best_epoch: int = -1
    best_state: dict | None = None  # that epoch's weights: the ones tested at the end
    rows: list[dict] = field(default_factory=list)  # metrics rows so far
    partial: dict | None = None  # position inside an epoch when saved mid-epoch (order, batches, sums, seconds)
    saved: tuple[int, int] | None = None  # (epoch, step) that checkpoint.pt holds now; not saved itself

    def save(self, path: Path, *, epoch: int, meta: dict, config: dict, partial: dict | None = None) -> None:
        ckpt.save_checkpoint(path, {
            "model": self.model.state_dict(), "model_meta": meta, "rule": self.rule.state_dict(),
            "optim": self.optim.state_dict(), "epoch": epoch, "step": self.step, "train_seconds": self.elapsed,
            "config": config, "best": self.best, "best_epoch": self.best_epoch, "best_model": self.best_state,
            "metrics": self.rows, "device": self.device.type, "partial": partial, "rng": self._rng_state()})
        self.saved = (epoch, self.step)

    def restore(self, state: dict, path: Path) -> None:
        """Load a checkpoint written by :meth:`save`; a checkpoint that does not fit is named with the fix."""
        try:
            self.model.load_state_dict(state["model"])
            self.rule.load_state_dict(state.get("rule") or {})
            self.optim.load_state_dict(state["optim"])
            self._set_rng_state(state["rng"])
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(f"{path} does not fit this run ({type(e).__name__}: {first}); restore the run "
                                  f"folder's original files or start a new run with --out") from None
        self.epoch, self.step, self.elapsed = state["epoch"], state["step"], state["train_seconds"]
        self.best, self.best_epoch, self.best_state = state["best"], state["best_epoch"], state["best_model"]
        self.rows, self.partial = list(state["metrics"]), state.get("partial")
        self.saved = (self.epoch, self.step)

    def last_good(self, path: Path) -> str:
        if self.saved is None:
            return "no checkpoint had been written yet; start again with --overwrite"
        return f"the last good checkpoint (epoch {self.saved[0]}, step {self.saved[1]}) is kept in {path}"

    def _rng_state(self) -> dict:
        """Every random stream a resumed run must continue (numpy's as a tensor: weights_only loads)."""
        name, keys, pos, has_gauss, cached = np.random.get_state()
        return {"shuffle": self.shuffle.get_state(), "augment": self.aug.get_state() if self.aug is not None else None,
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
                "python": random.getstate(),
                "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}

    def _set_rng_state(self, rng: dict) -> None:
        # Generator states are CPU byte tensors whatever the generator's device.
        self.shuffle.set_state(rng["shuffle"].cpu())
        if self.aug is not None:
            self.aug.set_state(rng["augment"].cpu())
        torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") is not None:
            torch.cuda.set_rng_state_all([t.cpu() for t in rng["cuda"]])
        random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in rng["python"]))
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
