"""Autoencoder codes: how well each trained autoencoder's bottleneck serves as a representation.

For each run, F's bottleneck (``model.feature_index``; for a CCL run also G's layer of the same
index, the feedback network's code of the same images) is scored with the linear probe and kNN at
their defaults (:mod:`evals.linear_probe`, :mod:`evals.knn`), beside two references of the same
images: PCA of the pixels to the code's width (fitted on the training split) and the raw pixels.
:func:`umap_codes` draws F's and G's codes of the test images in one map.

Used by ``ccl-repr demo`` and ``benchmarks/ae_mnist.py`` (the paper's autoencoder experiment
reads its codes the same way).
"""

from __future__ import annotations

import time
from pathlib import Path

from .baselines import pca, pixels
from .evaluate import EvalConfig, score
from .features import extract

PROTOCOLS = ("linear", "knn")


def _row(label: str, feats, splits, config: EvalConfig, **extra) -> dict:
    t0 = time.perf_counter()
    r = score(feats, [s.y for s in splits], PROTOCOLS, config)
    return {"representation": label, "dim": r["dim"], "linear_probe": r["linear_probe_accuracy"],
            "knn": r["knn_accuracy"], "seconds": round(time.perf_counter() - t0, 1), **extra}


def code_rows(run, method: str, *, config: EvalConfig | None = None, test_mse: float | None = None) -> list[dict]:
    """F's code and, for CCL, G's code of one run, each scored by the probe and kNN."""
    config = config or EvalConfig()
    splits, k = (run.data.train, run.data.val, run.data.test), run.model.feature_index
    rows = []
    for network in ("forward", "feedback") if method == "ccl" else ("forward",):
        feats = [extract(run.model, s.x, layers=[k], network=network)[k] for s in splits]
        side = "F" if network == "forward" else "G"
        rows.append(_row(f"{method.upper()} code, {side}", feats, splits, config, method=method, network=network,
                         layer=run.model.layer_names[k], test_mse=test_mse if network == "forward" else None))
    return rows


def reference_rows(run, *, dim: int, config: EvalConfig | None = None) -> list[dict]:
    """PCA of the pixels to ``dim`` components, and the raw pixels, on the run's splits."""
    config = config or EvalConfig()
    splits = (run.data.train, run.data.val, run.data.test)
    xs = [s.x for s in splits]
    return [_row("PCA of pixels", pca(*xs, dim=dim)[0], splits, config, test_mse=None),
            _row("raw pixels", pixels(*xs), splits, config, test_mse=None)]


def probe_codes(runs: dict, test_mse: dict[str, float], *, config: EvalConfig | None = None) -> list[dict]:
    """Every run's code rows (runs: method -> opened run, same data), then the two references
    at the width of the first run's code."""
    rows = [r for method, run in runs.items()
            for r in code_rows(run, method, config=config, test_mse=test_mse.get(method))]
    return rows + reference_rows(next(iter(runs.values())), dim=rows[0]["dim"], config=config)


def umap_codes(run, png: Path, *, what: str = "test images") -> dict:
    """UMAP of the CCL code of the test images: F's bottleneck and G's layer in one map, with the
    run's class names in the legend."""
    from .umap_plot import umap_plot

    k, test = run.model.feature_index, run.data.test
    f, g = (extract(run.model, test.x, layers=[k], network=n)[k] for n in ("forward", "feedback"))
    return umap_plot(f, test.y, png, feedback_feats=g, feedback_labels=test.y, feedback_kind="samples",
                     class_names=run.data.classes,
                     title=f"CCL autoencoder code ({f.shape[1]}-d) of {len(f)} {what}: F and G")
