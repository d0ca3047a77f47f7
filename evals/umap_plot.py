"""UMAP (umap-learn) of test features coloured by class, with the feedback network in the same map.

The paper's feature-space analysis (t-SNE/UMAP): forward features of images next to feedback
features of the class prototypes. Both are embedded by *one* UMAP fit, so their positions are comparable:
- classifier: the C prototypes b_l (feedback network fed the C x C identity) as large stars;
- autoencoder: per-sample feedback features b_l (G fed the same images) as small triangles.

Defaults: n_neighbors 15, min_dist 0.1, metric "cosine" (forward and feedback activations differ
in scale; CCL's layer loss compares their directions), the exact neighbour graph for the cosine
and euclidean metrics (computed in torch, not umap-learn's approximate pynndescent search, whose
numba compilation took about 40 s in every new process), random_state 0, 200 optimisation epochs
(umap-learn's own choice above 10k points; the 500 it picks below that take 2.5x as long), at
most 10000 test points and 2000 per-sample feedback points (the first ones). With a
random_state umap-learn runs single-threaded and is reproducible. The parameters, seed, point
counts, versions and time are written beside the plot as JSON (same stem), and the 2-D
coordinates with each point's label, class name and source as ``STEM_coords.npz`` and
``STEM_coords.csv``. Heavy imports (umap, matplotlib) are lazy; plotting uses matplotlib's object
API only (a ``Figure``; no pyplot state, no backend switch).
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
from ccl_repr.plots import spread_indices

from . import EvalError


@dataclass
class UMAPConfig:
    n_neighbors: int = 15
    min_dist: float = 0.1
    metric: str = "cosine"
    seed: int = 0
    max_points: int = 10000
    max_feedback_points: int = 2000  # per-sample feedback features (autoencoders), spread evenly over them
    n_epochs: int | None = 200  # umap-learn's large-data default (it uses 500 up to 10k points); None: its choice

    def __post_init__(self) -> None:
        if self.n_neighbors < 2:
            raise EvalError(f"UMAP n_neighbors must be at least 2 (--umap-neighbors), got {self.n_neighbors}")
        if not 0 <= self.min_dist:
            raise EvalError(f"UMAP min_dist must be at least 0 (--umap-min-dist), got {self.min_dist}")


def _np(a) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return a.reshape(len(a), -1).astype(np.float32)


def embed(feats, *, config: UMAPConfig = UMAPConfig()) -> np.ndarray:
    """2-D UMAP embedding of the rows of ``feats``; for the cosine and euclidean metrics the
    neighbour graph is the exact one (:func:`exact_knn`), handed to umap-learn as
    ``precomputed_knn``."""
    import umap

    x = _np(feats)
    if len(x) < 4:
        raise EvalError(f"UMAP needs at least 4 points, got {len(x)}; pass more test samples")
    k = min(config.n_neighbors, len(x) - 1)
    knn = (None, None, None)
    if config.metric in EXACT_METRICS:
        # umap-learn warns unless the third entry is a pynndescent index, which only transform()
        # uses; embed never calls it, so an empty instance stands in (no warning filters touched:
        # this runs in a background thread beside the probes)
        from pynndescent import NNDescent
        knn = (*exact_knn(x, k, config.metric), NNDescent.__new__(NNDescent))
    reducer = umap.UMAP(n_components=2, n_neighbors=k, min_dist=config.min_dist, metric=config.metric,
                        random_state=config.seed, n_epochs=config.n_epochs, n_jobs=1,  # seeded: single-threaded
                        precomputed_knn=knn)
    return reducer.fit_transform(x)


EXACT_METRICS = ("cosine", "euclidean")


@torch.no_grad()
def exact_knn(x: np.ndarray, k: int, metric: str, *, chunk_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest neighbours of every row (itself first, at distance 0), as umap-learn's
    own exact search returns them: (indices int64, distances float32), both (N, k).

    Why: above 4096 points umap-learn builds an approximate graph with pynndescent, whose
    search is compiled by numba in every new process (about 40 s on one core, more than the
    embedding itself); the exact graph of 10k points costs one (N x N) matrix product in chunks."""
    t = torch.from_numpy(x)
    cosine = metric == "cosine"
    t = torch.nn.functional.normalize(t, dim=1) if cosine else t
    sq = (t * t).sum(1)
    idx, dist = [], []
    for start in range(0, len(t), chunk_size):
        q = t[start:start + chunk_size]
        # cosine distance 1 - cos; euclidean: squared distance, its root taken after the top-k
        d = 1 - q @ t.T if cosine else sq[start:start + len(q), None] + sq[None, :] - 2 * (q @ t.T)
        rows = torch.arange(len(q))
        d[rows, rows + start] = -1.0  # the point itself first, whatever the rounding
        d, i = d.topk(k, dim=1, largest=False)
        idx.append(i)
        dist.append(d.clamp_min(0) if cosine else d.clamp_min(0).sqrt())
    return torch.cat(idx).numpy(), torch.cat(dist).numpy().astype(np.float32)


def umap_plot(feats, labels, out_png: Path | str, *, feedback_feats=None, feedback_labels=None,
              feedback_kind: str = "prototypes", title: str = "", class_names=None,
              config: UMAPConfig = UMAPConfig()) -> dict:
    """Embed test features (+ optional feedback features), plot coloured by class, write the PNG,
    its parameters (JSON) and the 2-D coordinates (``*_coords.npz`` and ``*_coords.csv``).
    ``class_names`` (label order) name the classes in the legend and the coordinates files;
    default: the label numbers."""
    t0 = time.perf_counter()
    x = _np(feats)
    keep = spread_indices(len(x), config.max_points).numpy()
    x, y = x[keep], np.asarray(labels)[keep].astype(np.int64)
    parts, part_y = [x], [y]
    if feedback_feats is not None:
        fb = _np(feedback_feats)
        keep = spread_indices(len(fb), config.max_feedback_points).numpy()
        fb_y = np.asarray(feedback_labels)[keep] if feedback_labels is not None else keep
        fb = fb[keep]
        if fb.shape[1] != x.shape[1]:
            raise EvalError(f"feedback features have {fb.shape[1]} dims, forward features {x.shape[1]}; "
                            f"take both from the same layer index")
        parts.append(fb)
        part_y.append(fb_y.astype(np.int64))
    emb = embed(np.concatenate(parts), config=config)
    all_y = np.concatenate(part_y)
    names = _class_names(class_names, int(all_y.max()) + 1)
    source = np.array(["forward"] * len(x) + [f"feedback_{feedback_kind}"] * (len(all_y) - len(x)))
    png = _draw(emb, all_y, len(x), names, Path(out_png), feedback_kind=feedback_kind, title=title)
    coords = save_coords(png, emb, all_y, source, names)
    record = {"png": png.name, **{k: p.name for k, p in coords.items()}, "num_points": len(x),
              "num_feedback_points": len(all_y) - len(x),
              "feedback_kind": feedback_kind if feedback_feats is not None else None,
              "class_names": names, "seconds": time.perf_counter() - t0,
              "params": {**dataclasses.asdict(config), "n_components": 2, "joint_fit": True},
              "versions": {p: metadata.version(p) for p in ("umap-learn", "numba", "scikit-learn")}}
    ckpt.write_json(png.with_suffix(".json"), record)
    return record


def _class_names(class_names, n_classes: int) -> list[str]:
    """The given names in label order, or the label numbers (also for labels beyond the names)."""
    names = [str(c) for c in (class_names or [])]
    return names + [str(i) for i in range(len(names), n_classes)]


def _draw(emb: np.ndarray, y: np.ndarray, n_forward: int, names: list[str], out_png: Path, *,
          feedback_kind: str, title: str) -> Path:
    """Scatter plot through matplotlib's object API (a Figure, no pyplot state, no backend switch)."""
    import matplotlib
    from matplotlib.figure import Figure

    from .cka import save_figure

    fig = Figure(figsize=(6.4, 5.6))
    ax = fig.subplots()
    n_classes = len(names)
    cmap = matplotlib.colormaps["tab10" if n_classes <= 10 else "tab20" if n_classes <= 20 else "turbo"]
    colours = lambda c: cmap(c % cmap.N if cmap.N < 256 else c / max(1, n_classes - 1))  # noqa: E731
    dot = max(3.0, min(16.0, 6000 / max(1, n_forward)))  # 3 for 10k points; a few hundred stay visible
    ax.scatter(emb[:n_forward, 0], emb[:n_forward, 1], c=[colours(c) for c in y[:n_forward]], s=dot, alpha=0.6,
               linewidths=0, label="forward features (test images)")
    if len(y) > n_forward:
        e, big = emb[n_forward:], feedback_kind == "prototypes"
        ax.scatter(e[:, 0], e[:, 1], c=[colours(c) for c in y[n_forward:]], s=260 if big else 10,
                   marker="*" if big else "^", edgecolors="black", linewidths=1.0 if big else 0.2,
                   label=f"feedback {'class prototypes' if big else 'features (same images)'}")
    for c in range(min(n_classes, 20)):  # class legend entries, by name
        ax.scatter([], [], color=colours(c), s=20, label=names[c])
    ax.legend(fontsize=6, markerscale=0.8, loc="best", ncol=2)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "UMAP of test features", fontsize=9)
    return save_figure(fig, out_png)


def save_coords(png: Path, emb: np.ndarray, y: np.ndarray, source: np.ndarray, names: list[str]) -> dict[str, Path]:
    """The 2-D coordinates beside the PNG: ``STEM_coords.npz`` (coords (N, 2) float32, labels,
    class (name per row), source ("forward" or "feedback_..."), class_names) and the same rows
    as ``STEM_coords.csv`` (x, y, label, class, source), both written atomically."""
    import csv
    import io

    classes = np.array([names[c] for c in y])
    npz, csv_path = png.with_name(f"{png.stem}_coords.npz"), png.with_name(f"{png.stem}_coords.csv")
    buf = io.BytesIO()
    np.savez(buf, coords=emb.astype(np.float32), labels=y, classes=classes, source=source,
             class_names=np.array(names))
    ckpt.atomic_write_bytes(npz, buf.getvalue())
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["x", "y", "label", "class", "source"])
    writer.writerows((f"{a:.6g}", f"{b:.6g}", int(c), n, s) for (a, b), c, n, s in zip(emb, y, classes, source))
    ckpt.atomic_write_bytes(csv_path, text.getvalue().encode())
    return {"coords_npz": npz, "coords_csv": csv_path}
