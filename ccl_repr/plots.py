"""Pictures written into a run folder: reconstruction grids and per-pair training curves.

matplotlib is imported only when a picture is drawn, and only its object-oriented API with the
Agg canvas is used (no pyplot state, no display needed). Pixel values are shown on the [0, 1]
scale: standardised inputs are mapped back with the data bundle's statistics before drawing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from einops import rearrange
from torch import Tensor

from .data import DataBundle
from .models import DualNetwork

RECONSTRUCTIONS = "reconstructions.png"
CURVES = "training_curves.png"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # lazy: the core must import without matplotlib loaded
    return Figure(figsize=(width, height), dpi=100)


def image_mosaic(rows: list[Tensor], *, pad: int = 1) -> Tensor:
    """Rows of (N, C, H, W) images in [0, 1] -> one (H', W', C) mosaic with ``pad`` white pixels
    between images."""
    stack = torch.stack([r.detach().float().cpu().clamp(0, 1) for r in rows])  # (R, N, C, H, W)
    stack = torch.nn.functional.pad(stack, (pad, pad, pad, pad), value=1.0)
    return rearrange(stack, "r n c h w -> (r h) (n w) c")


@torch.no_grad()
def reconstruction_rows(model: DualNetwork, x: Tensor, *, denormalize: Callable[[Tensor], Tensor],
                        with_feedback: bool) -> dict[str, Tensor]:
    """Targets, F's reconstructions x̂ and (for CCL) G's bottom output b_0, on the [0, 1] scale."""
    was_training = model.training
    model.eval()
    rows = {"target": denormalize(x), "forward x̂": denormalize(model(x))}
    if with_feedback:
        rows["feedback b0"] = denormalize(model.feedback_intermediates(model.feedback_input(x))[0])
    model.train(was_training)
    return rows


def save_reconstruction_grid(rows: dict[str, Tensor], path: Path, *, title: str = "") -> Path:
    mosaic = image_mosaic(list(rows.values()))
    h, w, c = mosaic.shape
    n_rows = len(rows)
    width = min(12.0, max(6.0, w / 20))
    fig = _figure(width, width * h / w + 0.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(mosaic.squeeze(-1).numpy() if c == 1 else mosaic.numpy(), cmap="gray" if c == 1 else None,
              vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(i + 0.5) * h / n_rows for i in range(n_rows)], labels=list(rows))
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def save_training_curves(metrics: list[dict], path: Path, *, title: str = "") -> Path:
    """Training loss of every layer pair (``train/pair/*``, or the task loss) and the validation
    metric, per epoch, on a log scale."""
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    epochs = [row["epoch"] for row in metrics]
    keys = [k for k in (metrics[0] if metrics else {}) if k.startswith(("train/", "val/"))]
    for key in keys:
        values = [row.get(key, float("nan")) for row in metrics]
        ax.plot(epochs, values, label=key.replace("train/", "").replace("pair/", "pair "),
                linestyle="--" if key.startswith("val/") else "-", marker="." if len(epochs) < 30 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("train: mean loss over the epoch; val: MSE")
    if keys and all(row.get(k, 1.0) > 0 for row in metrics for k in keys):
        ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_ae_figures(out_dir: Path | str, model: DualNetwork, bundle: DataBundle, *, method: str,
                     n_images: int = 16, metrics_file: str = "metrics.jsonl") -> list[str]:
    """The autoencoder pictures of a run folder (issue 3): test targets with their reconstructions,
    and the per-pair training curves from ``metrics.jsonl``. Returns the written file names."""
    out = Path(out_dir)
    label = f"{method} {model.name} on {bundle.name}"
    rows = reconstruction_rows(model, bundle.test.x[:n_images], denormalize=bundle.denormalize,
                               with_feedback=method == "ccl")
    written = [save_reconstruction_grid(rows, out / RECONSTRUCTIONS, title=f"{label}: test images")]
    if (out / metrics_file).exists():
        written.append(save_training_curves(read_metrics(out / metrics_file), out / CURVES, title=label))
    return [p.name for p in written]
