"""Baselines beside every result, so a number shows what learning added.

- ``pixels``: the standardised input images, flattened (layer 0 of the forward network).
- ``pca``: PCA of the pixels to the same dimension as the layer being evaluated (fitted on the
  training images; capped at the pixel count and the training-set size). Default solver:
  randomized when the dimension is below 80 % of the pixel count, seed 0.
- ``random_init``: the same architecture and configuration, freshly initialised with a fixed
  seed (default 0) and never trained, read at the same layer.
Each baseline returns (train features, test features) and is then scored by the same probe and
kNN as the learned features.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from ccl_repr.models import DualNetwork, build_model

from . import EvalError

BASELINES = ("pixels", "pca", "random_init")
SEED = 0


def pixels(*splits: Tensor) -> list[Tensor]:
    """The images of each split, flattened."""
    return [x.flatten(1).float() for x in splits]


def pca(*splits: Tensor, dim: int, seed: int = SEED) -> tuple[list[Tensor], dict]:
    """PCA to ``dim`` components, fitted on the first split (the training images), applied to
    every split; also returns its protocol (incl. the explained variance)."""
    from sklearn.decomposition import PCA

    arrays = [a.flatten(1).float().cpu().numpy() for a in splits]
    fit_on = arrays[0]
    n = min(dim, fit_on.shape[1], len(fit_on))
    if n < 1:
        raise EvalError(f"PCA needs a positive dimension, got {dim}")
    t0 = time.perf_counter()
    solver = "randomized" if n < 0.8 * fit_on.shape[1] else "full"
    model = PCA(n_components=n, svd_solver=solver, random_state=seed).fit(fit_on)
    info = {"name": "pca", "dim": n, "requested_dim": dim, "svd_solver": solver, "seed": seed,
            "explained_variance": float(model.explained_variance_ratio_.sum()),
            "seconds": time.perf_counter() - t0}
    return [torch.from_numpy(model.transform(a).astype(np.float32)) for a in arrays], info


def random_init_model(cfg, model: DualNetwork, *, seed: int = SEED) -> DualNetwork:
    """The same architecture (from the run's model config) at a seeded random initialisation."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        fresh = build_model(cfg.model, input_shape=tuple(model.input_shape),
                            num_classes=model.num_classes or 0)
    finally:
        torch.random.set_rng_state(state)
    p = next(model.parameters(), None)
    return fresh.to(p.device if p is not None else "cpu").eval()


class PCACache:
    """PCA features per dimension, fitted once and reused by every layer of that width."""

    def __init__(self, *splits: Tensor, seed: int = SEED) -> None:
        self.splits, self.seed = splits, seed
        self._cache: dict[int, tuple[list[Tensor], dict]] = {}

    def __call__(self, dim: int) -> tuple[list[Tensor], dict]:
        n = min(dim, self.splits[0][0].numel(), len(self.splits[0]))
        if n not in self._cache:
            self._cache[n] = pca(*self.splits, dim=n, seed=self.seed)
        return self._cache[n]
