"""Pictures written into a run folder: reconstruction grids and training curves.

matplotlib is imported only when a picture is drawn, and only its object-oriented API with the
Agg canvas is used (no pyplot state, no display needed). Pixel values are shown on the [0, 1]
scale: standardised inputs are mapped back with the data bundle's statistics before drawing.
"""

from __future__ import annotations

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


def _curve_panels(metrics: list[dict]) -> dict[str, list[str]]:
    """Which metrics go in which panel: losses (every layer pair's or the task's, train mean
    and validation), the task's quality (accuracy, train if logged and validation; or
    reconstruction MSE), and the learning rate of each network."""
    keys = list(dict.fromkeys(k for row in metrics for k in row))
    quality = [k for k in keys if k.endswith(("/accuracy", "/mse")) and k.startswith(("train/", "val/", "test/"))]
    losses = [k for k in keys if k.startswith(("train/", "val/", "test/")) and k not in quality]
    return {"loss": losses, "quality": quality, "learning rate": [k for k in keys if k.startswith("lr/")]}


def _plot_panel(ax, metrics: list[dict], keys: list[str], *, ylabel: str, log: bool) -> None:
    epochs = [row["epoch"] for row in metrics]
    for key in keys:
        values = [row.get(key, float("nan")) for row in metrics]
        ax.plot(epochs, values, label=key.replace("pair/", "pair "), marker="." if len(epochs) < 30 else None,
                linestyle={"val/": "--", "test/": ":"}.get(key[:key.find("/") + 1], "-"))
    values = [row[k] for row in metrics for k in keys if isinstance(row.get(k), (int, float))]
    if log and values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
    ax.set_ylabel(ylabel)
    if keys:
        ax.legend(fontsize=7, ncol=1 + len(keys) // 6)
    ax.grid(alpha=0.3)


def save_training_curves(metrics: list[dict], path: Path, *, title: str = "") -> Path:
    """Three panels per epoch: every loss (train: mean over the epoch, solid; validation:
    dashed; test, where train.test_each_epoch logged it: dotted; log scale), accuracy (train if
    logged, validation, test) or reconstruction MSE, and each network's learning rate."""
    panels = _curve_panels(metrics)
    quality = panels["quality"]
    fig = _figure(13.0, 4.0)
    axes = fig.subplots(1, 3)
    _plot_panel(axes[0], metrics, panels["loss"], ylabel="loss", log=True)
    _plot_panel(axes[1], metrics, quality, log=not any(k.endswith("accuracy") for k in quality),
                ylabel="accuracy" if any(k.endswith("accuracy") for k in quality) else "MSE ([0, 1] pixels)")
    _plot_panel(axes[2], metrics, panels["learning rate"], ylabel="learning rate", log=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_training_curves(out_dir: Path | str, *, title: str = "") -> str | None:
    """``training_curves.png`` of a run folder from its ``metrics.jsonl``; returns the file name
    (None when no epoch has been logged)."""
    from .checkpoint import METRICS, read_jsonl

    out = Path(out_dir)
    rows = read_jsonl(out / METRICS)
    if not rows:
        return None
    return save_training_curves(rows, out / CURVES, title=title).name


def write_ae_figures(out_dir: Path | str, model: DualNetwork, bundle: DataBundle, *, method: str,
                     n_images: int = 16) -> list[str]:
    """The autoencoder picture of a run folder: test targets with their reconstructions (the
    training curves of every run: :func:`write_training_curves`). Returns the written file names."""
    label = f"{method} {model.name} on {bundle.name}"
    path = save_ae_grid(model, bundle, Path(out_dir) / RECONSTRUCTIONS, method=method,
                        title=f"{label}: test images", n_images=n_images)
    return [path.name]


def spread_indices(n: int, k: int) -> Tensor:
    """At most k of n row indices, evenly spaced: a split sorted by class (an image folder) keeps
    every class, where its first k rows might all be one class."""
    return torch.arange(n) if n <= k else torch.linspace(0, n - 1, k).round().long()


def save_ae_grid(model: DualNetwork, bundle: DataBundle, path: Path | str, *, method: str, title: str,
                 n_images: int = 16) -> Path:
    """Test images with F's reconstructions (and, for CCL, G's b_0), the images spread evenly over
    the test split: an image folder's test split is sorted by class, so its first images would
    all be one class."""
    picks = spread_indices(len(bundle.test.x), n_images)
    rows = reconstruction_rows(model, bundle.test.x[picks], denormalize=bundle.denormalize,
                               with_feedback=method == "ccl")
    return save_reconstruction_grid(rows, path, title=title)
