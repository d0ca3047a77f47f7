"""Layer-wise features of either network of a dual network (forward F or feedback G).

Defaults: batch size 1024, no gradients, eval mode (batch-norm statistics frozen; the model's
train/eval mode is restored afterwards), features flattened to (N, d) float32 on the CPU.

What each network is fed (the paper's method):
- forward: the images x; layer l gives a_l (index 0 is the input itself);
- feedback, classifier: one one-hot label per sample (``targets="samples"``, so b_l lines up
  with a_l sample by sample, as CKA needs), or the C x C identity (``prototypes``: C rows);
- feedback, autoencoder: the images x (G is an autoencoder running the other way).

A layer is named by its index into ``model.layer_names`` (negative counts from the output), by
its name (``"linear2"``), or ``"features"`` for ``model.feature_index`` (penultimate layer of a
classifier, bottleneck of an autoencoder). An optional on-disk cache keys features by a hash of
the weights, the inputs and the request, so a changed model never returns stale features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from torch import Tensor

from ccl_repr import checkpoint as ckpt
from ccl_repr.data import DataBundle, load_data
from ccl_repr.models import DualNetwork
from ccl_repr.preprocess import Preprocess

from . import EvalError

BATCH_SIZE = 1024
NETWORKS = ("forward", "feedback")
LayerSpec = int | str


def resolve_layer(model: DualNetwork, layer: LayerSpec) -> int:
    names = model.layer_names
    if isinstance(layer, str) and layer in ("features", "feature"):
        return model.feature_index
    if isinstance(layer, str) and layer.lstrip("-").isdigit():
        layer = int(layer)
    if isinstance(layer, int) and -len(names) <= layer < len(names):
        return layer % len(names)
    if layer in names:
        return names.index(layer)
    raise EvalError(f"unknown layer {layer!r}; choose an index 0..{len(names) - 1}, 'features', "
                    f"or one of {', '.join(names)}")


def resolve_layers(model: DualNetwork, layers: Sequence[LayerSpec] | LayerSpec | None) -> list[int]:
    """Layer indices, de-duplicated in order. ``None``: every layer above the input."""
    if layers is None:
        return list(range(1, len(model.layer_names)))
    if isinstance(layers, (int, str)):
        layers = [layers]
    out: list[int] = []
    for spec in layers:
        i = resolve_layer(model, spec)
        if i not in out:
            out.append(i)
    return out


def _device(model: DualNetwork) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _digest(*parts: object) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, Tensor):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(part, DualNetwork):
            for name, t in part.state_dict().items():
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def _cache_load(path: Path) -> Tensor | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # absent, truncated or foreign: recompute
        return None


def _cache_save(path: Path, feats: Tensor) -> None:
    buf = io.BytesIO()
    torch.save(feats, buf)
    ckpt.atomic_write_bytes(path, buf.getvalue())


@torch.no_grad()
def extract(model: DualNetwork, x: Tensor, *, layers: Sequence[LayerSpec] | LayerSpec | None = None,
            network: str = "forward", y: Tensor | None = None, targets: str = "samples",
            batch_size: int = BATCH_SIZE, cache_dir: Path | str | None = None) -> dict[int, Tensor]:
    """Features {layer index: (N, d) float32 CPU tensor} of ``network`` for the samples ``x``.

    ``targets="prototypes"`` (classifiers, feedback only) returns the C class prototypes b_l
    instead, one row per class in class order."""
    if network not in NETWORKS:
        raise EvalError(f"network must be 'forward' or 'feedback', got {network!r}")
    if targets not in ("samples", "prototypes"):
        raise EvalError(f"targets must be 'samples' or 'prototypes', got {targets!r}")
    idx = resolve_layers(model, layers)
    per_sample_labels = network == "feedback" and model.task == "classify"
    if per_sample_labels and targets == "samples" and y is None:
        raise EvalError("feedback features of a classifier need the labels y (G is fed one-hot labels); "
                        "pass y=..., or targets='prototypes' for the C class prototypes")
    if per_sample_labels and targets == "prototypes":
        x = x[:1]  # G ignores the images; one row carries dtype and device
    paths: dict[int, Path] = {}
    if cache_dir is not None:
        key = _digest(model, x, y if per_sample_labels else None, network, targets)
        paths = {i: Path(cache_dir) / f"{network}-{model.layer_names[i]}-{key}.pt" for i in idx}
        cached = {i: _cache_load(p) for i, p in paths.items()}
        if all(v is not None for v in cached.values()):
            return cached  # type: ignore[return-value]
    device = _device(model)
    was_training = model.training
    model.eval()
    chunks: dict[int, list[Tensor]] = {i: [] for i in idx}
    try:
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device)
            if network == "forward":
                inter = model.forward_intermediates(xb)
            else:
                yb = y[start:start + batch_size].to(device) if y is not None else None
                inter = model.feedback_intermediates(model.feedback_input(xb, yb, targets=targets))
            for i in idx:
                chunks[i].append(inter[i].flatten(1).float().cpu())
    finally:
        model.train(was_training)
    feats = {i: torch.cat(c) for i, c in chunks.items()}
    for i, p in paths.items():
        _cache_save(p, feats[i])
    return feats


def prototypes(model: DualNetwork, *, layers: Sequence[LayerSpec] | LayerSpec | None = None) -> dict[int, Tensor]:
    """The feedback network's C class prototypes b_l (G fed the C x C identity), classifiers only."""
    if model.task != "classify":
        raise EvalError("class prototypes exist only for classifiers; an autoencoder's feedback "
                        "network is fed images (use extract(..., network='feedback'))")
    x = torch.zeros(1, *model.input_shape, device=_device(model))
    return extract(model, x, layers=layers, network="feedback", targets="prototypes")


# --------------------------------------------------------------------------- run folders

@dataclass
class RunWithData:
    """A trained run (for evaluations; the user-facing handle is :class:`ccl_repr.api.Run`), rebuilt
    through ``ccl_repr.checkpoint``, with the data it was trained on
    (same seed, so the same validation split)."""
    run_dir: Path
    cfg: object
    model: DualNetwork
    data: DataBundle


def open_run(run_dir: Path | str, *, weights: str = "tested", data_root: str | None = None,
             device: str | torch.device = "cpu") -> RunWithData:
    cfg, model = ckpt.load_run(Path(run_dir), weights=weights)
    data_cfg = dataclasses.replace(cfg.data, root=data_root) if data_root else cfg.data
    data = load_data(data_cfg, device="cpu", seed=cfg.seed)
    return RunWithData(Path(run_dir), cfg, model.to(device).eval(), data)


# --------------------------------------------------------------------------- scikit-learn

class DualFeatures(BaseEstimator, TransformerMixin):
    """scikit-learn transformer: rows of X (flat or image-shaped) -> features of one layer.

    Give either ``model`` (a DualNetwork) or ``run_dir`` (loaded in ``fit``). Stateless apart
    from loading, so it drops into a ``Pipeline`` before e.g. a LogisticRegression::

        Pipeline([("f", DualFeatures(model=m, layer="linear2")), ("clf", LogisticRegression())])

    The feedback network of an autoencoder is fed the images too; a classifier's feedback
    network needs labels, which ``transform`` does not receive, so it is refused here.

    ``raw=True`` (with ``run_dir``): X holds raw images, uint8 0..255 or floats in [0, 1], which
    are preprocessed as in training (the run's recorded scale, padding and per-channel mean/std);
    otherwise X holds model inputs, already standardised."""

    def __init__(self, *, model: DualNetwork | None = None, run_dir: str | None = None,
                 layer: LayerSpec = "features", network: str = "forward", batch_size: int = BATCH_SIZE,
                 weights: str = "tested", raw: bool = False) -> None:
        self.model, self.run_dir, self.layer, self.network = model, run_dir, layer, network
        self.batch_size, self.weights, self.raw = batch_size, weights, raw

    def fit(self, X, y=None) -> "DualFeatures":
        if (self.model is None) == (self.run_dir is None):
            raise EvalError("DualFeatures needs exactly one of model=DualNetwork or run_dir=PATH")
        self.model_ = self.model if self.model is not None else ckpt.load_run(Path(self.run_dir),
                                                                              weights=self.weights)[1]
        if self.network == "feedback" and self.model_.task == "classify":
            raise EvalError("a classifier's feedback network is fed labels, not images; use "
                            "evals.features.extract(..., network='feedback', y=labels) instead")
        if self.raw and self.run_dir is None:
            raise EvalError("raw=True needs run_dir=PATH: the run records how raw images were preprocessed")
        self.preprocess_ = Preprocess.from_dict(ckpt.read_preprocess(Path(self.run_dir))) if self.raw else None
        self.layer_index_ = resolve_layer(self.model_, self.layer)
        self.n_features_in_ = int(np.prod(np.shape(X)[1:]))
        self.n_features_out_ = self.model_.feature_dims[self.layer_index_]
        return self

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """``{network}_{layer name}_{i}``, e.g. forward_linear2_0 ... forward_linear2_255."""
        stem = f"{self.network}_{self.model_.layer_names[self.layer_index_]}"
        return np.asarray([f"{stem}_{i}" for i in range(self.n_features_out_)], dtype=object)

    def transform(self, X) -> np.ndarray:
        model = self.model_
        if self.preprocess_ is not None:
            raw, shape = np.asarray(X), self.preprocess_.raw_shape
            flat = raw.ndim == 2 and raw.shape[1] == int(np.prod(shape))  # rows of flattened images
            X = self.preprocess_(raw.reshape(len(raw), *shape) if flat else raw)
        x = torch.as_tensor(np.asarray(X), dtype=torch.float32)
        try:
            x = x.reshape(len(x), *model.input_shape)
        except RuntimeError:
            raise EvalError(f"rows of X have {x[0].numel()} values but the model expects "
                            f"{tuple(model.input_shape)}; pass images of that shape (flat or not)") from None
        feats = extract(model, x, layers=[self.layer_index_], network=self.network, batch_size=self.batch_size)
        return feats[self.layer_index_].numpy()
