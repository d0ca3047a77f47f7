"""UMAP (umap-learn) of test features coloured by class, with the feedback network in the same map.

Spec §6 / the paper's alignment figure: forward features of images next to feedback features of
the class prototypes. Both are embedded by *one* UMAP fit, so their positions are comparable:
- classifier: the C prototypes b_l (feedback network fed the C x C identity) as large stars;
- autoencoder: per-sample feedback features b_l (G fed the same images) as small triangles.

Defaults: n_neighbors 15, min_dist 0.1, metric "cosine" (forward and feedback activations differ
in scale; CCL's layer loss compares their directions), random_state 0, 200 optimisation epochs
(umap-learn's own choice above 10k points; the 500 it picks below that take 2.5x as long), at
most 10000 test points and 2000 per-sample feedback points (the first ones). With a
random_state umap-learn runs single-threaded and is reproducible. The parameters, seed, point
counts, versions and time are written beside the plot as JSON (same stem). Heavy imports (umap,
matplotlib with the Agg backend) are lazy.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from ccl_repr import checkpoint as ckpt

from . import EvalError


@dataclass
class UMAPConfig:
    n_neighbors: int = 15
    min_dist: float = 0.1
    metric: str = "cosine"
    seed: int = 0
    max_points: int = 10000
    max_feedback_points: int = 2000  # per-sample feedback features (autoencoders): the first ones
    n_epochs: int | None = 200  # umap-learn's large-data default (it uses 500 up to 10k points); None: its choice


def _np(a) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return a.reshape(len(a), -1).astype(np.float32)


def embed(feats, *, config: UMAPConfig = UMAPConfig()) -> np.ndarray:
    """2-D UMAP embedding of the rows of ``feats``."""
    import umap

    x = _np(feats)
    if len(x) < 4:
        raise EvalError(f"UMAP needs at least 4 points, got {len(x)}; pass more test samples")
    reducer = umap.UMAP(n_components=2, n_neighbors=min(config.n_neighbors, len(x) - 1),
                        min_dist=config.min_dist, metric=config.metric, random_state=config.seed,
                        n_epochs=config.n_epochs, n_jobs=1)  # seeded umap-learn is single-threaded
    return reducer.fit_transform(x)


def umap_plot(feats, labels, out_png: Path | str, *, feedback_feats=None, feedback_labels=None,
              feedback_kind: str = "prototypes", title: str = "", config: UMAPConfig = UMAPConfig()) -> dict:
    """Embed test features (+ optional feedback features), plot coloured by class, write PNG + JSON."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .cka import save_figure

    t0 = time.perf_counter()
    x, y = _np(feats)[: config.max_points], np.asarray(labels)[: config.max_points]
    parts = [x]
    if feedback_feats is not None:
        fb = _np(feedback_feats)[: config.max_feedback_points]
        fb_y = np.asarray(feedback_labels)[: len(fb)] if feedback_labels is not None else np.arange(len(fb))
        if fb.shape[1] != x.shape[1]:
            raise EvalError(f"feedback features have {fb.shape[1]} dims, forward features {x.shape[1]}; "
                            f"take both from the same layer index")
        parts.append(fb)
    emb = embed(np.concatenate(parts), config=config)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    n_classes = int(max(y.max(), fb_y.max() if feedback_feats is not None else 0)) + 1
    cmap = plt.get_cmap("tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else "turbo")
    colours = lambda c: cmap(c % cmap.N if cmap.N < 256 else c / max(1, n_classes - 1))  # noqa: E731
    ax.scatter(emb[: len(x), 0], emb[: len(x), 1], c=[colours(c) for c in y], s=3, alpha=0.6, linewidths=0,
               label="forward features (test images)")
    if feedback_feats is not None:
        e = emb[len(x):]
        big = feedback_kind == "prototypes"
        ax.scatter(e[:, 0], e[:, 1], c=[colours(c) for c in fb_y], s=260 if big else 10,
                   marker="*" if big else "^", edgecolors="black", linewidths=1.0 if big else 0.2,
                   label=f"feedback {'class prototypes' if big else 'features (same images)'}")
    for c in range(min(n_classes, 20)):  # class legend entries
        ax.scatter([], [], color=colours(c), s=20, label=str(c))
    ax.legend(fontsize=6, markerscale=0.8, loc="best", ncol=2)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "UMAP of test features", fontsize=9)
    png = save_figure(fig, out_png)
    record = {"png": png.name, "num_points": len(x),
              "num_feedback_points": 0 if feedback_feats is None else len(parts[1]),
              "feedback_kind": feedback_kind if feedback_feats is not None else None,
              "seconds": time.perf_counter() - t0,
              "params": {**dataclasses.asdict(config), "n_components": 2, "joint_fit": True},
              "versions": {p: metadata.version(p) for p in ("umap-learn", "numba", "scikit-learn")}}
    ckpt.write_json(png.with_suffix(".json"), record)
    return record
