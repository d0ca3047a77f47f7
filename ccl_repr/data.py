"""Datasets as device-resident tensors.

Sources: scikit-learn's bundled digits (the embedded default, no download), torchvision's
MNIST, FashionMNIST, CIFAR10, CIFAR100 and STL10 (real torchvision classes; ``download`` for
users with internet), and any ImageFolder tree (:mod:`ccl_repr.imagefolder`: decoded in
parallel, cached on disk). Every split is decoded once into a float tensor (N, C, H, W) in
[0, 1], optionally subset (class-stratified, :mod:`ccl_repr.splits`) and zero-padded,
standardised with per-channel statistics of the training split, and kept on the training
device; batches are index slices and augmentation (random crop + flip) runs on tensors, so
there is no per-sample Python work. ``DataBundle.classes`` names the classes in label order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .config import DataConfig
from .download import fetching
from .errors import ConfigError, DataError
from .imagefolder import load_imagefolder, resolve_cache_dir
from .splits import check_splits, stratified_sample

# name -> (torchvision class name, folder under root that torchvision expects, num classes)
TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw", 10),
    "fashionmnist": ("FashionMNIST", "FashionMNIST/raw", 10),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", 100),
    "stl10": ("STL10", "stl10_binary", 10),
}
DATASETS = ("digits", *TORCHVISION, "imagefolder")


@dataclass
class Split:
    x: Tensor  # (N, C, H, W) float
    y: Tensor  # (N,) long

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataBundle:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: Tensor  # per-channel statistics used to standardise (zeros/ones when off)
    std: Tensor
    raw_shape: tuple[int, ...] = ()  # (C, H, W) of one image before padding (see ccl_repr.preprocess)
    classes: list[str] = field(default_factory=list)  # class names in label order ("0".."C-1" when unnamed)

    def __post_init__(self) -> None:
        if not self.classes:
            self.classes = [str(i) for i in range(self.num_classes)]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.std.view(1, -1, 1, 1).to(x.device) + self.mean.view(1, -1, 1, 1).to(x.device)


# --------------------------------------------------------------------------- raw sources

def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    # A fixed, stratified 80/20 test split so every run and seed is scored on the same 360 images.
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    return x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)]


def _nchw(images: np.ndarray | Tensor, layout: str) -> Tensor:
    """uint8 images as (N, C, H, W); they become floats only after subsetting and splitting."""
    t = torch.as_tensor(np.asarray(images))
    return rearrange(t, f"{layout} -> n c h w") if layout != "n c h w" else t


def _unit_float(x: Tensor) -> Tensor:
    """A new float32 tensor in [0, 1] (uint8 scaled by 1/255); never the caller's tensor."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32, copy=True)


def _torchvision(name: str, root: str, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    import torchvision.datasets as tvd

    cls_name, folder, num_classes = TORCHVISION[name]
    cls = getattr(tvd, cls_name)
    try:
        with fetching(cls_name, Path(root), folder, enabled=download):  # a failed download: its cause, no leftovers
            if name == "stl10":
                train, test = cls(root, split="train", download=download), cls(root, split="test", download=download)
            else:
                train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        images = (Path(root) / "train").is_dir()  # e.g. CIFAR-10 as JPEGs: read it as an image folder
        raise DataError(f"{cls_name} not found: expected torchvision's files under {Path(root) / folder} "
                        f"({str(e).splitlines()[0]}); pass --data-root DIR for the folder holding "
                        f"{folder.split('/')[0]}/, or --set data.download=true to fetch it (needs internet)"
                        + (f", or --set data.name=imagefolder to read {root} as an image folder" if images else "")
                        ) from None

    def split(ds) -> tuple[Tensor, Tensor]:
        if name in ("mnist", "fashionmnist"):
            return _nchw(ds.data[:, None], "n c h w"), torch.as_tensor(ds.targets).long()
        if name == "stl10":
            return _nchw(ds.data, "n c h w"), torch.as_tensor(ds.labels).long()
        return _nchw(ds.data, "n h w c"), torch.as_tensor(ds.targets).long()

    classes = [str(c) for c in getattr(train, "classes", None) or range(num_classes)]
    return (*split(train), *split(test), classes)


def _imagefolder(cfg: DataConfig, progress: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    return load_imagefolder(cfg.root, image_size=cfg.image_size, progress=progress,
                            cache_dir=resolve_cache_dir(cfg.cache_dir))


# --------------------------------------------------------------------------- assembly

def load_data(cfg: DataConfig, *, device: torch.device | str = "cpu", seed: int = 0,
              progress: bool = True) -> DataBundle:
    """The dataset ``cfg`` names as a DataBundle; ``progress``: the image-folder decoding bar
    (shown on a terminal only)."""
    name = cfg.name.lower()
    if name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {cfg.name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        xtr, ytr, xte, yte, classes = _digits()
    elif name == "imagefolder":
        xtr, ytr, xte, yte, classes = _imagefolder(cfg, progress)
    else:
        xtr, ytr, xte, yte, classes = _torchvision(name, cfg.root, cfg.download)
    check_labels(name, len(classes), train=ytr, test=yte)
    return make_bundle(name, (xtr, ytr), (xte, yte), len(classes), cfg, device=device, seed=seed, classes=classes)


def make_bundle(name: str, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], num_classes: int,
                cfg: DataConfig, *, device: torch.device | str = "cpu", seed: int = 0,
                classes: Sequence[str] | None = None) -> DataBundle:
    """Subset, pad, seeded validation split and per-channel standardisation of (N, C, H, W) images,
    uint8 (0..255) or floats in [0, 1]: the one assembly behind every source, the bundled ones and a
    user's own tensors. Indexing runs on the raw images, so uint8 sources are copied as bytes.
    ``classes`` names the classes in label order (default "0".."C-1"). Subsets are class-stratified
    and fixed across run seeds (:mod:`ccl_repr.splits`); degenerate splits are refused."""
    (xtr, ytr), (xte, yte), c = train, test, num_classes
    classes = [str(n) for n in classes] if classes else [str(i) for i in range(c)]
    if len(classes) != c:
        raise DataError(f"{name}: {len(classes)} class names for {c} classes; give one name per class")
    raw_shape = tuple(xtr.shape[1:])
    if cfg.train_subset:
        keep = stratified_sample(ytr, cfg.train_subset)
        xtr, ytr = xtr[keep], ytr[keep]
    if cfg.test_subset:
        keep = stratified_sample(yte, cfg.test_subset)
        xte, yte = xte[keep], yte[keep]
    if cfg.pad_to:
        xtr, xte = pad_to(xtr, cfg.pad_to), pad_to(xte, cfg.pad_to)

    # Validation split: class-stratified, drawn with the run's seed (recorded in the run folder),
    # never taking a class's last training sample.
    n_val = int(round(cfg.val_fraction * len(ytr)))
    if len(ytr) - n_val < 1:
        raise DataError(f"only {len(ytr)} training samples; lower data.val_fraction or raise data.train_subset")
    in_val = torch.zeros(len(ytr), dtype=torch.bool)
    in_val[stratified_sample(ytr, n_val, seed=seed, reserve=1)] = True
    xval, yval, xtr, ytr = xtr[in_val], ytr[in_val], xtr[~in_val], ytr[~in_val]
    check_splits(classes, train=ytr, val=yval, test=yte)

    xtr, xval, xte = _unit_float(xtr), _unit_float(xval), _unit_float(xte)
    channels = xtr.shape[1]
    if cfg.normalize:
        std, mean = torch.std_mean(xtr, dim=(0, 2, 3))  # one pass over the training images
        std = std.clamp_min(1e-6)
    else:
        mean, std = torch.zeros(channels), torch.ones(channels)

    def prep(x: Tensor, y: Tensor) -> Split:  # in place: x is already this function's own copy
        x = x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
        return Split(x.to(device).contiguous(), y.to(device))

    return DataBundle(name=name, train=prep(xtr, ytr), val=prep(xval, yval), test=prep(xte, yte),
                      num_classes=c, mean=mean, std=std, raw_shape=raw_shape, classes=classes)


def check_labels(name: str, num_classes: int, **splits: Tensor) -> None:
    """Labels must index the classes: a label outside 0..C-1 would crash deep in the loss."""
    for split_name, y in splits.items():
        if y.dtype.is_floating_point or y.dim() != 1:
            raise DataError(f"{split_name} labels of {name} must be a 1-D integer tensor, got {y.dtype} of shape "
                            f"{tuple(y.shape)}; fix the dataset's labels")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(f"{split_name} labels of {name} range over [{int(y.min())}, {int(y.max())}], "
                            f"outside 0..{num_classes - 1}; fix the dataset's labels")


def pad_to(x: Tensor, size: int) -> Tensor:
    h, w = x.shape[-2:]
    if size < max(h, w):
        raise ConfigError(f"data.pad_to={size} is smaller than the images ({h}x{w}); use 0 or >= {max(h, w)}")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top))


def augment(x: Tensor, generator: torch.Generator, *, pad: int = 4) -> Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip for a whole batch, on x's device."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[bi, ci, rows, cols]
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def shuffle_order(split: Split, generator: torch.Generator) -> Tensor:
    """One epoch's permutation, drawn on the data's device."""
    return torch.randperm(len(split), generator=generator, device=split.x.device)


def batches(split: Split, batch_size: int, *, generator: torch.Generator | None = None,
            augment_with: torch.Generator | None = None, order: Tensor | None = None,
            start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x, y) slices; shuffled by a permutation drawn on the data's device when a generator
    is given (no host round-trip per step), or by ``order``. ``start`` skips that many batches
    (a run resumed mid-epoch continues its saved permutation)."""
    n = len(split)
    if generator is not None and order is None:
        order = shuffle_order(split, generator)
    if order is not None:
        for i in range(start * batch_size, n, batch_size):
            idx = order[i:i + batch_size]
            x = split.x[idx]
            yield (augment(x, augment_with) if augment_with is not None else x), split.y[idx]
    else:
        for i in range(start * batch_size, n, batch_size):
            yield split.x[i:i + batch_size], split.y[i:i + batch_size]
