"""Class-stratified subsets and the checks that refuse degenerate splits.

``data.train_subset`` / ``data.test_subset`` keep each class's share of the split (at least one
sample per class while the size allows), drawn with the fixed :data:`SUBSET_SEED`, not the run's
seed: every seed and every method of a comparison trains on the same subset and is scored on
the same test images, so seeds differ only in initialisation, shuffling and the validation split.
The validation split is stratified too (drawn with the run's seed), and never takes a class's
last training sample.

A split that holds a single class, or a training split that misses a class, trains or scores
something other than the task without any error; :func:`check_splits` refuses it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

SUBSET_SEED = 0  # fixed on purpose: the same subsets for every run seed (see the module docstring)


def class_quota(counts: np.ndarray, n: int) -> np.ndarray:
    """How many of each class a stratified sample of ``n`` takes: each class's share of ``n``
    rounded by largest remainder, then at least one per class (taken from the largest quota) while
    ``n`` allows; below the number of classes, one each for the ``n`` largest classes. Never more
    than a class holds; the quotas sum to ``min(n, total)``."""
    counts = np.asarray(counts, dtype=np.int64)
    if n >= counts.sum():
        return counts.copy()
    if (counts == 0).any():  # classes with nothing to give take no part
        quota = np.zeros_like(counts)
        quota[counts > 0] = class_quota(counts[counts > 0], n)
        return quota
    if n < len(counts):
        quota = np.zeros_like(counts)
        quota[np.argsort(-counts, kind="stable")[:n]] = 1
        return quota
    exact = counts * n / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(-(exact - quota), kind="stable")[:n - int(quota.sum())]] += 1
    for empty in np.flatnonzero(quota == 0):
        quota[np.argmax(quota)] -= 1
        quota[empty] = 1
    return quota


def stratified_sample(y: Tensor, n: int, *, seed: int = SUBSET_SEED, reserve: int = 0) -> Tensor:
    """Sorted indices of a class-stratified sample of ``n`` labels of ``y`` (all when ``n >= len(y)``);
    ``reserve`` samples of each class are never taken (fewer than ``n`` if they must stay)."""
    if n >= len(y) and not reserve:
        return torch.arange(len(y))
    y = y.cpu()
    classes, counts = torch.unique(y, return_counts=True)
    quota = class_quota((counts - reserve).clamp_min(0).numpy(), n)
    gen = torch.Generator().manual_seed(seed)
    picks = [torch.zeros(0, dtype=torch.long)]
    for c, k in zip(classes.tolist(), quota.tolist()):
        members = (y == c).nonzero().squeeze(1)
        picks.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.cat(picks).sort().values


def _names(classes: Sequence[str], ids: Sequence[int], limit: int = 3) -> str:
    shown = ", ".join(repr(classes[i]) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def check_splits(classes: Sequence[str], *, train: Tensor, val: Tensor, test: Tensor) -> None:
    """Refuse a training split that misses a class, and any non-empty split of a single class,
    when the dataset has more than one class. Each message names the setting that fixes it."""
    if len(classes) < 2:
        return
    present = set(torch.unique(train.cpu()).tolist())
    missing = [i for i in range(len(classes)) if i not in present]
    if missing:
        raise DataError(f"the training split has no samples of class {_names(classes, missing)} "
                        f"({len(present)} of {len(classes)} classes); raise data.train_subset (0 = all) "
                        f"or lower data.val_fraction")
    fixes = {"validation": (val, "raise data.val_fraction or data.train_subset, or set data.val_fraction=0 "
                                 "to validate on the training split"),
             "test": (test, "raise data.test_subset (0 = all)")}
    for split, (y, fix) in fixes.items():
        labels = torch.unique(y.cpu()).tolist()
        if len(labels) == 1:
            raise DataError(f"the {split} split holds {len(y)} sample(s), all of class "
                            f"{classes[labels[0]]!r}, of the dataset's {len(classes)} classes; {fix}")
