"""Linear probes on frozen features: how linearly decodable the classes are from a layer.

(a) :func:`probe` — scikit-learn: StandardScaler (statistics of the training features) then a
    multinomial LogisticRegression (lbfgs). The inverse regularisation C is chosen on a
    validation split (given, or ``val_fraction`` of the training rows, stratified, seeded). The
    search fits at most ``search_rows`` training rows (a seeded random subset; small C first,
    each fit warm-started from the last); the best C is then refitted on all training rows,
    warm-started from its search solution (same objective, so the same optimum in about half
    the iterations of a cold start), and scored on the test set. A grid of one C is used as
    given (no search fits). Defaults: C in {1e-3, 1e-2, 1e-1, 1, 10}, search_rows 10000,
    max_iter 200, tol 1e-4, val_fraction 0.1, seed 0, BLAS threads 1 (threadpoolctl: on a small
    shared machine multi-threaded BLAS spins and was 8-40x slower than one thread for these fits).
(b) :func:`probe_torch` — a torch linear head for large feature sets: standardised features,
    SGD (momentum 0.9, weight decay 0), cosine learning-rate schedule to 0, cross-entropy.
    Defaults: 30 epochs, batch 256, lr 0.1, seed 0. Reports the test accuracy of the last
    epoch and the validation accuracy it reached.
Both return a dict with ``test_accuracy`` and the ``protocol`` they ran.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import EvalError


@dataclass
class ProbeConfig:
    Cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    search_rows: int = 10000
    max_iter: int = 200
    tol: float = 1e-4
    val_fraction: float = 0.1
    seed: int = 0
    blas_threads: int | None = 1  # None: leave the BLAS thread pools alone

    def __post_init__(self) -> None:
        self.Cs = tuple(float(c) for c in self.Cs)
        if not self.Cs or min(self.Cs) <= 0:
            raise EvalError(f"the probe's C grid must hold positive values (--probe-C), got {list(self.Cs)}")


@dataclass
class TorchProbeConfig:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    val_fraction: float = 0.1


def _np(a, dtype=np.float32) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return a.reshape(len(a), -1).astype(dtype) if dtype is np.float32 else a.astype(dtype)


def _split_val(x: np.ndarray, y: np.ndarray, val_x, val_y, fraction: float, seed: int):
    if val_x is not None:
        return x, y, _np(val_x), _np(val_y, np.int64)
    from sklearn.model_selection import train_test_split
    n_classes = len(np.unique(y))
    n_val = max(n_classes, int(round(fraction * len(y))))
    if len(y) - n_val < n_classes:
        raise EvalError(f"only {len(y)} training rows for {n_classes} classes; too few to hold out a "
                        f"validation split; pass val_feats/val_y or more training rows")
    counts = np.bincount(y)
    strat = y if counts[counts > 0].min() >= 2 else None
    tr, va = train_test_split(np.arange(len(y)), test_size=n_val, random_state=seed, stratify=strat)
    return x[tr], y[tr], x[va], y[va]


def probe(train_feats, train_y, test_feats, test_y, *, val_feats=None, val_y=None,
          config: ProbeConfig = ProbeConfig()) -> dict:
    """scikit-learn logistic-regression probe; C chosen by validation accuracy."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    x, y = _np(train_feats), _np(train_y, np.int64)
    x, y, vx, vy = _split_val(x, y, val_feats, val_y, config.val_fraction, config.seed)
    scaler = StandardScaler().fit(x)
    x, vx, tx = scaler.transform(x), scaler.transform(vx), scaler.transform(_np(test_feats))
    sub = np.random.default_rng(config.seed).permutation(len(y))[: config.search_rows]
    val_acc: dict[str, float] = {}
    with warnings.catch_warnings(), threadpool_limits(limits=config.blas_threads):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=config.Cs[0], max_iter=config.max_iter, tol=config.tol, warm_start=True)
        best_c, n_iter = _search_C(clf, x, y, vx, vy, sub, config.Cs, val_acc)
        if len(sub) < len(y) or len(config.Cs) == 1:  # refit the chosen C on every training row
            clf.set_params(C=best_c).fit(x, y)  # warm start: coef_ holds the search solution at best_c
            n_iter.append(int(clf.n_iter_[0]))
        val_acc.setdefault(repr(best_c), float(clf.score(vx, vy)))
    ty = _np(test_y, np.int64)
    pred = clf.predict(tx)
    return {"test_accuracy": float((pred == ty).mean()), "val_accuracy": float(clf.score(vx, vy)), "best_C": best_c,
            "val_accuracy_per_C": val_acc, "per_class_accuracy": per_class_accuracy(pred, ty),
            "n_iter": n_iter, "seconds": time.perf_counter() - t0,
            "protocol": {"name": "sklearn_logistic_regression", "standardize": True, "solver": "lbfgs",
                         "Cs": list(config.Cs), "selection": "validation accuracy",
                         "refit": "all training rows, warm-started from the search solution",
                         "search_rows": min(config.search_rows, len(y)), "max_iter": config.max_iter,
                         "tol": config.tol, "val_fraction": None if val_feats is not None else config.val_fraction,
                         "seed": config.seed, "blas_threads": config.blas_threads, "num_train": len(y),
                         "num_val": len(vy), "num_test": len(tx), "dim": x.shape[1]}}


def _search_C(clf, x, y, vx, vy, sub, Cs, val_acc: dict) -> tuple[float, list[int]]:
    """Fit each C on the search rows (small C first, warm-started), keep the best by validation
    accuracy; ``clf`` ends holding the best C's solution. One C: no search, it is the answer."""
    if len(Cs) == 1:
        return Cs[0], []
    best_c, best, n_iter = None, None, []
    for c in sorted(Cs):  # small C first; each fit starts from the previous solution
        clf.set_params(C=c).fit(x[sub], y[sub])
        n_iter.append(int(clf.n_iter_[0]))
        val_acc[repr(c)] = float(clf.score(vx, vy))
        if best_c is None or val_acc[repr(c)] > val_acc[repr(best_c)]:
            best_c, best = c, (clf.coef_.copy(), clf.intercept_.copy())
    clf.set_params(C=best_c)
    clf.coef_, clf.intercept_ = best
    return best_c, n_iter


def per_class_accuracy(pred: np.ndarray, y: np.ndarray) -> list[float | None]:
    """Accuracy on the test samples of each class, in label order (None: class absent)."""
    n = int(max(pred.max(initial=0), y.max(initial=0))) + 1
    hits, counts = np.bincount(y, weights=(pred == y).astype(np.float64), minlength=n), np.bincount(y, minlength=n)
    return [float(h / c) if c else None for h, c in zip(hits, counts)]


def probe_torch(train_feats, train_y, test_feats, test_y, *, val_feats=None, val_y=None,
                config: TorchProbeConfig = TorchProbeConfig(), device: str | torch.device = "cpu") -> dict:
    """Linear head trained with SGD + cosine schedule, weight decay 0 (large feature sets)."""
    t0 = time.perf_counter()
    x, y = _np(train_feats), _np(train_y, np.int64)
    x, y, vx, vy = _split_val(x, y, val_feats, val_y, config.val_fraction, config.seed)
    mean, std = x.mean(0), x.std(0) + 1e-6

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a - mean) / std).to(device)

    x_t, vx_t, tx_t = t(x), t(vx), t(_np(test_feats))
    y_t, vy_t = torch.from_numpy(y).to(device), torch.from_numpy(vy).to(device)
    ty_t = torch.from_numpy(_np(test_y, np.int64)).to(device)
    n_classes = int(max(y.max(), vy.max(), ty_t.max().item())) + 1
    gen = torch.Generator().manual_seed(config.seed)
    head = torch.nn.Linear(x.shape[1], n_classes).to(device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(y) / config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    def accuracy(a: torch.Tensor, b: torch.Tensor) -> float:
        with torch.no_grad():
            return (head(a).argmax(1) == b).float().mean().item()

    for _ in range(config.epochs):
        order = torch.randperm(len(y), generator=gen).to(device)
        for i in range(0, len(y), config.batch_size):
            idx = order[i:i + config.batch_size]
            loss = F.cross_entropy(head(x_t[idx]), y_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return {"test_accuracy": accuracy(tx_t, ty_t), "val_accuracy": accuracy(vx_t, vy_t),
            "seconds": time.perf_counter() - t0,
            "protocol": {"name": "torch_linear_head", "standardize": True, "optimizer": "SGD",
                         "schedule": "cosine", **dataclasses.asdict(config),
                         "num_train": len(y), "num_val": len(vy), "num_test": len(ty_t), "dim": x.shape[1]}}
