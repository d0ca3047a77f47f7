"""Baselines beside every result, so a number shows what learning added.

- ``pixels``: the standardised input images, flattened (layer 0 of the forward network).
- ``pca``: PCA of the pixels to the same dimension as the layer being evaluated (fitted on the
  training images; capped at the pixel count and the training-set size). Default solver:
  randomized when the dimension is below 80 % of the pixel count, seed 0.
- ``random_init``: the same architecture and configuration, freshly initialised with a fixed
  seed (default 0) and never trained, read at the same layer.
Each baseline returns (train features, test features) and is then scored by the same probe and
kNN as the learned features.

:class:`BaselineCache` keeps the scored baselines on disk (one JSON file each), so they are fitted
once per dataset rather than once per run: the key hashes every split's preprocessed images and
labels (so the dataset, subset, padding and standardisation), the baseline (name, width; for
random init the initial weights, network and layer), the scoring protocols' settings and the
scikit-learn version. Changing any of them misses the cache; a hit returns the stored record,
numbers identical to a refit's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ccl_repr import checkpoint as ckpt
from ccl_repr.models import DualNetwork, build_model

from . import EvalError
from .features import _digest

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


class BaselineCache:
    """Scored baselines on disk, keyed by the data and everything that decides the score.

    ``lookup(parts, compute)`` returns ``compute()``'s record, stored under a key hashing the
    data (``splits``: tensors, hashed once), ``parts`` (baseline name, width, model, ...) and
    ``settings`` (the protocols' configuration); ``hits`` and ``misses`` count the lookups.
    ``cache_dir=None`` computes every time."""

    VERSION = 1  # bump when a baseline's or a protocol's computation changes

    def __init__(self, cache_dir: Path | str | None, splits: list, settings: dict) -> None:
        from importlib import metadata

        self.dir = Path(cache_dir) if cache_dir is not None else None
        self.hits = self.misses = 0
        if self.dir is not None:
            self._base = _digest(self.VERSION, metadata.version("scikit-learn"),
                                 json.dumps(settings, sort_keys=True, default=str), *splits)

    def lookup(self, name: str, parts: tuple, compute: Callable[[], dict]) -> dict:
        if self.dir is None:
            self.misses += 1
            return compute()
        path = self.dir / f"{name.replace('/', '-')}-{_digest(self._base, *parts)}.json"
        try:
            record = json.loads(path.read_text())
            self.hits += 1
            return record
        except (OSError, ValueError):  # absent or damaged: compute and store
            pass
        self.misses += 1
        record = json.loads(json.dumps(compute(), default=str))  # what a later hit returns, to the last digit
        try:
            ckpt.write_json(path, record)
        except OSError:  # a read-only or full cache folder costs speed, not the evaluation
            pass
        return record

    def info(self) -> dict:
        return {"dir": None if self.dir is None else str(self.dir), "hits": self.hits, "misses": self.misses}
