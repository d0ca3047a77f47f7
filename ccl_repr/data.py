"""Datasets as device-resident tensors.

Sources: scikit-learn's bundled digits (the embedded default, no download), torchvision's
MNIST, FashionMNIST, CIFAR10, CIFAR100 and STL10 (real torchvision classes; ``download`` for
users with internet), and any ImageFolder tree. Every split is decoded once into a float
tensor (N, C, H, W) in [0, 1], optionally zero-padded, standardised with per-channel statistics
of the training split, and kept on the training device; batches are index slices and
augmentation (random crop + flip) runs on tensors, so there is no per-sample Python work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .config import DataConfig
from .errors import ConfigError, DataError

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

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.std.view(1, -1, 1, 1).to(x.device) + self.mean.view(1, -1, 1, 1).to(x.device)


# --------------------------------------------------------------------------- raw sources

def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    # A fixed, stratified 80/20 test split so every run and seed is scored on the same 360 images.
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
    return x[tr], y[tr], x[te], y[te], 10


def _to_float(images: np.ndarray | Tensor, layout: str) -> Tensor:
    t = torch.as_tensor(np.asarray(images))
    t = rearrange(t, f"{layout} -> n c h w") if layout != "n c h w" else t
    return t.float().div_(255.0)


def _torchvision(name: str, root: str, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    import torchvision.datasets as tvd

    cls_name, folder, num_classes = TORCHVISION[name]
    cls = getattr(tvd, cls_name)
    try:
        if name == "stl10":
            train, test = cls(root, split="train", download=download), cls(root, split="test", download=download)
        else:
            train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise DataError(f"{cls_name} not found: expected torchvision's files under {Path(root) / folder} "
                        f"({str(e).splitlines()[0]}); pass --data-root DIR for the folder holding "
                        f"{folder.split('/')[0]}/, or --set data.download=true to fetch it (needs internet)") from None

    def split(ds) -> tuple[Tensor, Tensor]:
        if name in ("mnist", "fashionmnist"):
            return _to_float(ds.data[:, None], "n c h w"), torch.as_tensor(ds.targets).long()
        if name == "stl10":
            return _to_float(ds.data, "n c h w"), torch.as_tensor(ds.labels).long()
        return _to_float(ds.data, "n h w c"), torch.as_tensor(ds.targets).long()

    return (*split(train), *split(test), num_classes)


def _imagefolder(root: str, image_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    base = Path(root)
    tf = [T.Resize((image_size, image_size))] if image_size else []
    tf = T.Compose(tf + [T.ToTensor()])

    def load(path: Path) -> tuple[Tensor, Tensor, list[str]]:
        try:
            ds = tvd.ImageFolder(str(path), transform=tf)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"no ImageFolder tree at {path} ({e}); expected {path}/<class>/<image> files; "
                            f"set --data-root to that folder") from None
        try:
            xs, ys = zip(*(ds[i] for i in range(len(ds))))
            return torch.stack(xs), torch.tensor(ys), ds.classes
        except RuntimeError as e:
            raise DataError(f"images under {path} differ in size ({e}); set data.image_size=N to resize") from None

    if (base / "train").is_dir():
        xtr, ytr, classes = load(base / "train")
        test_dir = base / "test" if (base / "test").is_dir() else base / "val"
        xte, yte, classes_te = load(test_dir)
        if classes_te != classes:
            raise DataError(f"class folders of {base / 'train'} and {test_dir} differ; make them the same")
        return xtr, ytr, xte, yte, len(classes)
    x, y, classes = load(base)
    gen = torch.Generator().manual_seed(0)  # fixed 80/20 test split, as for digits
    perm = torch.randperm(len(y), generator=gen)
    n_test = max(1, len(y) // 5)
    return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]], len(classes)


# --------------------------------------------------------------------------- assembly

def load_data(cfg: DataConfig, *, device: torch.device | str = "cpu", seed: int = 0) -> DataBundle:
    name = cfg.name.lower()
    if name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {cfg.name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        xtr, ytr, xte, yte, c = _digits()
    elif name == "imagefolder":
        xtr, ytr, xte, yte, c = _imagefolder(cfg.root, cfg.image_size)
    else:
        xtr, ytr, xte, yte, c = _torchvision(name, cfg.root, cfg.download)
    check_labels(name, c, train=ytr, test=yte)
    if cfg.train_subset:
        xtr, ytr = xtr[: cfg.train_subset], ytr[: cfg.train_subset]
    if cfg.test_subset:
        xte, yte = xte[: cfg.test_subset], yte[: cfg.test_subset]
    if cfg.pad_to:
        xtr, xte = pad_to(xtr, cfg.pad_to), pad_to(xte, cfg.pad_to)

    # Validation split drawn with the run's seed (recorded in the run folder).
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(cfg.val_fraction * len(ytr)))
    if len(ytr) - n_val < 1:
        raise DataError(f"only {len(ytr)} training samples; lower data.val_fraction or raise data.train_subset")
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    xval, yval, xtr, ytr = xtr[val_idx], ytr[val_idx], xtr[tr_idx], ytr[tr_idx]

    channels = xtr.shape[1]
    if cfg.normalize:
        mean = xtr.mean(dim=(0, 2, 3))
        std = xtr.std(dim=(0, 2, 3)).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(channels), torch.ones(channels)

    def prep(x: Tensor, y: Tensor) -> Split:
        x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        return Split(x.to(device).contiguous(), y.to(device))

    return DataBundle(name=name, train=prep(xtr, ytr), val=prep(xval, yval), test=prep(xte, yte),
                      num_classes=c, mean=mean, std=std)


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
