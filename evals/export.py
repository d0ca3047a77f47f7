"""Extracted features written to disk as NumPy arrays, for analyses outside this toolkit.

Layout under the export folder (default ``EVAL_DIR/features``), one file per layer and split:
``{network}_{layer}_{split}.npy`` — (N, d) float32, rows in the split's sample order, exactly
what :func:`evals.features.extract` returns; ``labels_{split}.npy`` — (N,) int64 labels of the
same rows; ``index.json`` — every file with its shape, plus the class names in label order.
Splits: train, val (the run's own validation split), test. Files are written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from ccl_repr import checkpoint as ckpt

SPLITS = ("train", "val", "test")
INDEX = "index.json"


def _save(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    ckpt.atomic_write_bytes(path, buf.getvalue())


def export_features(out_dir: Path | str, feats: dict[int, Sequence[Tensor]], layer_names: Sequence[str],
                    network: str, labels: Sequence[Tensor], class_names: Sequence[str]) -> dict[str, list[int]]:
    """Write ``feats`` ({layer index: [train, val, test] features}) of ``network`` and the labels;
    returns {file name: shape} of what was written (also merged into ``index.json``)."""
    out = Path(out_dir)
    written: dict[str, list[int]] = {}
    for split, y in zip(SPLITS, labels):
        name = f"labels_{split}.npy"
        _save(out / name, y.cpu().numpy().astype(np.int64))
        written[name] = [len(y)]
    for i, per_split in feats.items():
        for split, f in zip(SPLITS, per_split):
            name = f"{network}_{layer_names[i]}_{split}.npy"
            _save(out / name, f.cpu().numpy().astype(np.float32, copy=False))
            written[name] = list(f.shape)
    index_path = out / INDEX
    index = ckpt.read_json(index_path) if index_path.exists() else {}
    index = {"class_names": list(class_names), "files": {**index.get("files", {}), **written}}
    ckpt.write_json(index_path, index)
    return written
