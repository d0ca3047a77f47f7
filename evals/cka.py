"""Linear CKA between every forward layer and every feedback layer (the paper's CKA analysis).

Linear centred kernel alignment (Kornblith et al. 2019, Eq. 5 in feature space):
    CKA(X, Y) = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F),
with X (n x p), Y (n x q) column-centred. It is 1 for X = Y and invariant to orthogonal
transforms and isotropic scaling of either side. Computed in float64; when a width exceeds
the sample count the equivalent Gram form tr(K_c L_c) / (||K_c|| ||L_c||) is used instead.

Samples pair up row by row: forward layer l sees image x_i; feedback layer m sees what G is fed
for that sample (one-hot label for classifiers, the image for autoencoders). Defaults: the
first 2000 test samples; every layer, input included. The paper plots this matrix at several
training steps (alignment grows first at F's top and G's bottom); :func:`cka_across` does so
for several checkpoints (e.g. random init, best epoch, last epoch).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ccl_repr import checkpoint as ckpt
from ccl_repr.models import DualNetwork

from . import EvalError
from .features import extract

MAX_SAMPLES = 2000


def _centred(a) -> np.ndarray:
    a = a.detach().cpu().double().numpy() if isinstance(a, Tensor) else np.asarray(a, dtype=np.float64)
    a = a.reshape(len(a), -1)
    return a - a.mean(0, keepdims=True)


def linear_cka(x, y) -> float:
    """Linear CKA of two representations of the same n samples (rows)."""
    x, y = _centred(x), _centred(y)
    if len(x) != len(y):
        raise EvalError(f"CKA needs the same samples on both sides, got {len(x)} and {len(y)} rows")
    if max(x.shape[1], y.shape[1]) > len(x):  # Gram form is cheaper for wide layers
        k, l = x @ x.T, y @ y.T
        num, den = (k * l).sum(), np.linalg.norm(k) * np.linalg.norm(l)
    else:
        num = np.linalg.norm(y.T @ x) ** 2
        den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(num / den) if den > 0 else 0.0


def cka_matrix(model: DualNetwork, x: Tensor, y: Tensor | None = None, *,
               max_samples: int = MAX_SAMPLES) -> dict:
    """{'forward_layers', 'feedback_layers', 'matrix'[forward][feedback]} on the first samples."""
    x = x[:max_samples]
    y = y[:max_samples] if y is not None else None
    a = extract(model, x, network="forward", layers=range(len(model.layer_names)))
    b = extract(model, x, y=y, network="feedback", layers=range(len(model.layer_names)))
    names = model.layer_names
    matrix = [[linear_cka(a[i], b[j]) for j in range(len(names))] for i in range(len(names))]
    return {"forward_layers": names, "feedback_layers": names, "matrix": matrix, "num_samples": len(x)}


def cka_across(models: dict[str, DualNetwork], x: Tensor, y: Tensor | None = None, *,
               max_samples: int = MAX_SAMPLES) -> dict[str, dict]:
    """One CKA matrix per labelled checkpoint (same samples for all)."""
    return {label: cka_matrix(m, x, y, max_samples=max_samples) for label, m in models.items()}


def plot_cka(results: dict[str, dict], out_png: Path | str, *, title: str = "") -> Path:
    """Heat maps (rows: forward layers a_l, columns: feedback layers b_m), one panel per checkpoint."""
    from matplotlib.figure import Figure  # object API: no pyplot state, no backend switch

    n = len(results)
    fig = Figure(figsize=(4.0 * n + 1.2, 4.2), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)
    im = None
    for k, (ax, (label, r)) in enumerate(zip(axes[0], results.items())):
        m = np.asarray(r["matrix"])
        im = ax.imshow(m, vmin=0, vmax=1, cmap="magma", origin="lower")
        ax.set_xticks(range(m.shape[1]), r["feedback_layers"], rotation=60, fontsize=7)
        ax.set_yticks(range(m.shape[0]), r["forward_layers"], fontsize=7)
        ax.set_xlabel("feedback network G (b_m)")
        if k == 0:
            ax.set_ylabel("forward network F (a_l)")
        ax.set_title(label, fontsize=9)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                    color="black" if v > 0.6 else "white")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="linear CKA")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out_png)


def save_figure(fig, out_png: Path | str) -> Path:
    """PNG of a matplotlib ``Figure`` written atomically (temporary file + rename). The figure is
    not registered with pyplot, so nothing needs closing."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    ckpt.atomic_write_bytes(Path(out_png), buf.getvalue())
    return Path(out_png)


def run_cka(models: dict[str, DualNetwork], x: Tensor, y: Tensor | None, out_dir: Path | str, *,
            max_samples: int = MAX_SAMPLES, name: str = "cka") -> dict:
    """Compute, plot (``{name}.png``) and save (``{name}.json``); returns the JSON record."""
    t0 = time.perf_counter()
    with torch.no_grad():
        results = cka_across(models, x, y, max_samples=max_samples)
    out_dir = Path(out_dir)
    png = plot_cka(results, out_dir / f"{name}.png", title="linear CKA, forward vs feedback layers")
    record = {"checkpoints": results, "png": png.name, "seconds": time.perf_counter() - t0,
              "protocol": {"name": "linear_cka", "max_samples": max_samples, "dtype": "float64",
                           "feedback_input": "one-hot label per sample (classifier) or the image (AE)"}}
    ckpt.write_json(out_dir / f"{name}.json", record)
    return record
