"""Weighted k-nearest-neighbour classification on frozen features.

Protocol (Wu et al. 2018, "instance discrimination"; the usual self-supervised kNN monitor):
features are L2-normalised, similarity is the cosine, each of the k nearest training samples
votes for its class with weight exp(sim / T), and the class scores rank the predictions.

Defaults: k = 20, T = 0.07 (k = 200 is the other common setting: ``KNNConfig(k=200)``),
top-1 and top-5 accuracy, test samples processed in chunks of 1024 so that only a
(chunk x bank) similarity block is ever in memory (1024 x 60k floats = 245 MB at most).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import EvalError

K, TEMPERATURE, CHUNK_SIZE, TOPK = 20, 0.07, 1024, (1, 5)


@dataclass
class KNNConfig:
    k: int = K
    temperature: float = TEMPERATURE
    chunk_size: int = CHUNK_SIZE
    topk: tuple[int, ...] = TOPK

    def __post_init__(self) -> None:
        if self.k < 1:
            raise EvalError(f"kNN k must be at least 1 (--knn-k), got {self.k}")
        if not self.temperature > 0:
            raise EvalError(f"kNN temperature must be positive (--knn-temperature), got {self.temperature}")


def _tensor(a, dtype=torch.float32) -> Tensor:
    return a.to(dtype) if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a), dtype=dtype)


@torch.no_grad()
def knn_scores(train_feats, train_y, test_feats, *, k: int = K, temperature: float = TEMPERATURE,
               chunk_size: int = CHUNK_SIZE, num_classes: int | None = None) -> Tensor:
    """(N_test, C) class scores: sum over the k most similar training samples of exp(sim/T)."""
    bank = F.normalize(_tensor(train_feats).flatten(1), dim=1)
    query = _tensor(test_feats).flatten(1).to(bank.device)
    labels = _tensor(train_y, torch.long).to(bank.device)
    if bank.shape[1] != query.shape[1]:
        raise EvalError(f"train features have {bank.shape[1]} dims but test features {query.shape[1]}; "
                        f"extract both from the same layer")
    if len(bank) != len(labels):
        raise EvalError(f"{len(bank)} train features but {len(labels)} labels; pass one label per row")
    if not 1 <= k:
        raise EvalError(f"k must be at least 1, got {k}")
    k = min(k, len(bank))
    c = int(num_classes or int(labels.max()) + 1)
    out = torch.empty(len(query), c, device=bank.device)
    # one (chunk x bank) block reused by every chunk: a fresh 245 MB block per chunk costs its
    # page faults again each time (about a third of the matrix product's time on a CPU)
    block = torch.empty(min(chunk_size, len(query)), len(bank), device=bank.device)
    for start in range(0, len(query), chunk_size):
        q = F.normalize(query[start:start + chunk_size], dim=1)
        sim, nn_idx = torch.mm(q, bank.T, out=block[: len(q)]).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(q), c, device=bank.device)
        out[start:start + len(q)] = votes.scatter_add_(1, labels[nn_idx], weights)
    return out


def topk_accuracy(scores: Tensor, y, topk: tuple[int, ...] = TOPK) -> dict[int, float]:
    y = _tensor(y, torch.long).to(scores.device)
    ranked = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices
    hits = ranked == y[:, None]
    return {t: hits[:, :t].any(1).float().mean().item() for t in topk}


def knn_accuracy(train_feats, train_y, test_feats, test_y, *, k: int = K, temperature: float = TEMPERATURE,
                 chunk_size: int = CHUNK_SIZE, topk: tuple[int, ...] = TOPK,
                 num_classes: int | None = None) -> dict:
    """Top-1/top-5 accuracy of the weighted kNN, with its protocol; numpy or torch inputs."""
    t0 = time.perf_counter()
    if num_classes is None:
        num_classes = int(max(np.max(np.asarray(train_y)), np.max(np.asarray(test_y)))) + 1
    scores = knn_scores(train_feats, train_y, test_feats, k=k, temperature=temperature,
                        chunk_size=chunk_size, num_classes=num_classes)
    acc = topk_accuracy(scores, test_y, topk)
    return {"top1": acc[1] if 1 in acc else None, **{f"top{t}": a for t, a in acc.items()},
            "seconds": time.perf_counter() - t0,
            "protocol": {"name": "weighted_knn", "similarity": "cosine", "vote": "exp(sim/T)", "k": k,
                         "temperature": temperature, "chunk_size": chunk_size,
                         "num_train": len(train_y), "num_test": len(test_y)}}


def knn(train_feats, train_y, test_feats, test_y, *, config: KNNConfig = KNNConfig()) -> dict:
    """:func:`knn_accuracy` with a :class:`KNNConfig`."""
    return knn_accuracy(train_feats, train_y, test_feats, test_y, **dataclasses.asdict(config))
