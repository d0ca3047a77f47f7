"""The notebook API: train any dual network on your own data, and use any trained run on raw images.

    import ccl_repr
    run = ccl_repr.fit(model, train=(x, y), test=(x_test, y_test), method="ccl", epochs=5, out="runs/mine")
    run.summary["test_accuracy"], run.model      # the trained DualNetwork (best validation epoch)
    run = ccl_repr.load("runs/mine")             # any run folder, or its model.safetensors
    run.predict(raw_images); run.features(raw_images, layer="linear2", network="forward")

``model`` is a registry name (``ccl-repr models``), a :class:`~ccl_repr.models.DualNetwork`, or a
list of dual layers (the library's or your own :class:`~ccl_repr.layers.DualLayer` subclasses),
stacked into a classifier. ``train``/``test`` are ``(images, labels)`` pairs of tensors or arrays,
or torch Datasets of ``(image, label)`` items; images are uint8 0..255 or floats in [0, 1],
(N, H, W) or (N, C, H, W). They go through the same assembly as the bundled datasets (validation
split, padding, standardisation), and :func:`fit` writes the same run folder as ``ccl-repr
train``: config.json, metrics.jsonl, summary.json, checkpoints, model.safetensors, preprocess.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from . import checkpoint as ckpt
from .config import Config, config_from_dict, deep_merge, make_config
from .data import check_labels, make_bundle
from .errors import ConfigError, DataError
from .layers import DualLayer
from .models import DualNetwork, build_model, list_models
from .preprocess import Preprocess, to_unit
from .train import train as train_loop  # fit() takes the training data as `train`

TEST_FRACTION = 0.2  # held out, with a fixed seed, when fit() gets no test set (as for ImageFolder trees)


@dataclass
class Run:
    """A trained model with the preprocessing it was trained with; what :func:`fit` and
    :func:`load` return."""
    model: DualNetwork
    preprocess: Preprocess
    cfg: Config
    path: Path | None = None
    summary: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)

    def inputs(self, raw: np.ndarray | Tensor) -> Tensor:
        """Raw images -> model inputs, exactly as in training (scale, pad, standardise)."""
        return self.preprocess(raw)

    def features(self, raw: np.ndarray | Tensor, *, layer: int | str = "features", network: str = "forward",
                 labels: np.ndarray | Tensor | None = None, batch_size: int = 1024) -> np.ndarray:
        """(N, d) float32 features of one layer (index, name or 'features') of either network.
        A classifier's feedback network is fed one-hot ``labels``; an autoencoder's the images."""
        from evals.features import extract, resolve_layer  # the one implementation of layers and batching

        index, x = resolve_layer(self.model, layer), self.inputs(raw)
        y = None if labels is None else torch.as_tensor(np.asarray(labels))
        if y is not None and self.model.num_classes:
            check_labels("this model", self.model.num_classes, given=y)
            if len(y) != len(x):
                raise DataError(f"{len(y)} labels for {len(x)} images; give one label per image")
        feats = extract(self.model, x, layers=[index], network=network, y=y, batch_size=batch_size)
        return feats[index].numpy()

    @torch.no_grad()
    def predict(self, raw: np.ndarray | Tensor, *, batch_size: int = 1024) -> np.ndarray:
        """Classifiers: the predicted class per image. Autoencoders: reconstructions on [0, 1]
        pixels, padding cropped, (N, C, H, W)."""
        x, device = self.inputs(raw), next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            outs = [self.model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
        finally:
            self.model.train(was_training)
        out = torch.cat(outs) if outs else torch.zeros(0, *self.model.shapes[-1])
        if self.model.task == "classify":
            return out.argmax(1).numpy()
        return self.preprocess.denormalize(out).clamp_(0, 1).numpy()


def load(source: Path | str, *, model: DualNetwork | None = None, weights: str = "tested",
         device: str | torch.device = "cpu") -> Run:
    """A run folder (or its ``model.safetensors``) as a :class:`Run`. Pass ``model`` for runs of
    a network built in Python: it is rebuilt by you and receives the weights."""
    source = Path(source)
    config, state, meta, path = ckpt.load_weights(source, weights=weights)
    cfg = config_from_dict(config)
    if model is None:
        if cfg.model.name not in list_models():
            raise ConfigError(f"{path} holds a model built in Python ({cfg.model.name!r}); build it again and "
                              f"pass it: ccl_repr.load({str(source)!r}, model=...)")
        model = build_model(cfg.model, input_shape=tuple(meta["input_shape"]), num_classes=meta["num_classes"])
    ckpt.load_state(model, state, path, cfg.model.name)
    run_dir = source if source.is_dir() else None
    summary = ckpt.read_json(source / ckpt.SUMMARY) if run_dir and (source / ckpt.SUMMARY).exists() else {}
    metrics = ckpt.read_jsonl(source / ckpt.METRICS) if run_dir else []
    preprocess = Preprocess.from_dict(ckpt.read_preprocess(source, meta))
    return Run(model.to(device).eval(), preprocess, cfg, run_dir, summary, metrics)


def fit(model: str | DualNetwork | Sequence[DualLayer], train: Any, *, test: Any = None, method: str = "ccl",
        epochs: int | None = None, seed: int = 0, out: Path | str | None = None, recipe: str | None = None,
        config: dict | None = None, sets: Sequence[str] = (), num_classes: int | None = None,
        overwrite: bool = False, log: Callable[[str], None] = print) -> Run:
    """Train ``model`` with ``method`` ('ccl' or 'bp') on ``train`` and score it on ``test``.

    Settings, each over the one before: the dataclass defaults, ``recipe`` (a bundled recipe's
    optimiser, loss and training settings), ``config`` (a nested dict, e.g. ``{"optim": {"forward":
    {"lr": 0.1}}}``), ``epochs`` and ``seed``, ``sets`` (``"train.batch_size=32"`` strings). Without
    ``test``, a fixed fifth of ``train`` is held out. ``out`` defaults to ``runs/NAME-METHOD-sSEED-TIME``."""
    (xtr, ytr), (xte, yte) = _split(_tensors(train, "train"), None if test is None else _tensors(test, "test"))
    c = num_classes or int(torch.cat([ytr, yte]).max()) + 1
    check_labels("your data", c, train=ytr, test=yte)
    name = model if isinstance(model, str) else getattr(model, "name", "") or "custom"
    over: dict = {"seed": seed, "model": {"name": name}, "data": {"name": "tensors"}}
    if epochs is not None:
        over["train"] = {"epochs": epochs}
    cfg = make_config(recipe, method=method, overrides=deep_merge(config or {}, over), sets=sets)
    bundle = make_bundle("tensors", (xtr, ytr), (xte, yte), c, cfg.data, seed=cfg.seed)
    net = _network(model, c, bundle.input_shape)
    out = Path(out) if out is not None else Path("runs") / f"{name}-{cfg.method}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = train_loop(cfg, out, overwrite=overwrite, log=log, model=net, data=bundle)
    run = load(out, model=net)
    run.summary = summary
    return run


# --------------------------------------------------------------------------- parts of fit

def _tensors(data: Any, what: str) -> tuple[Tensor, Tensor]:
    """(images in [0, 1] as (N, C, H, W) float32, labels as int64) from a pair or a Dataset."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]
        if not items:
            raise DataError(f"the {what} dataset is empty; give it at least one (image, label) item")
        x = np.stack([_image_array(item[0]) for item in items])
        y = np.array([int(item[1]) for item in items])
    else:
        raise DataError(f"{what} must be an (images, labels) pair or a torch Dataset of (image, label) items, "
                        f"got {type(data).__name__}")
    images, labels = to_unit(x), torch.as_tensor(np.asarray(y))
    if labels.dtype.is_floating_point or labels.dim() != 1 or len(labels) != len(images):
        raise DataError(f"{what} labels must be {len(images)} integers (one per image), got "
                        f"{labels.dtype} of shape {tuple(labels.shape)}")
    if not len(images):
        raise DataError(f"{what} holds no images; give it at least one")
    return images, labels.long()


def _image_array(image: Any) -> np.ndarray:
    """One Dataset image as an array, channels first (PIL images arrive channels last)."""
    if isinstance(image, Tensor):
        return image.detach().cpu().numpy()
    array = np.asarray(image)
    return np.moveaxis(array, -1, 0) if array.ndim == 3 and not isinstance(image, np.ndarray) else array


def _split(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor] | None):
    if test is not None:
        return train, test
    x, y = train
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = max(1, int(len(y) * TEST_FRACTION))
    return (x[perm[n_test:]], y[perm[n_test:]]), (x[perm[:n_test]], y[perm[:n_test]])


def _network(model: Any, num_classes: int, input_shape: tuple[int, ...]) -> DualNetwork | None:
    """The caller's network (None: build the registry model ``model`` names for this data)."""
    if isinstance(model, str):
        return None
    if isinstance(model, DualNetwork):
        net = model
    elif isinstance(model, (list, tuple)) and model and all(isinstance(l, DualLayer) for l in model):
        net = DualNetwork(layers=list(model), input_shape=model[0].in_shape, task="classify", num_classes=num_classes)
    else:
        raise ConfigError(f"model must be a registry name ({', '.join(list_models())}), a DualNetwork or a list of "
                          f"DualLayers, got {type(model).__name__}")
    if tuple(net.input_shape) != input_shape:
        raise DataError(f"the model takes {net.input_shape} inputs but the images are {input_shape} (after "
                        f"data.pad_to); build it for that shape")
    return net
