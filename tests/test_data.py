"""Data sources through the real loaders: digits, MNIST from ../shared/datasets, MNIST-format
files written here (FashionMNIST layout), and an ImageFolder tree of PNGs."""
import struct

import numpy as np
import pytest
import torch

from ccl_repr.config import DataConfig
from ccl_repr.data import augment, batches, load_data
from ccl_repr.errors import DataError


def write_idx(path, array: np.ndarray) -> None:
    """torchvision's IDX format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_digits_splits_and_normalisation():
    b = load_data(DataConfig(name="digits", val_fraction=0.1), seed=0)
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10
    assert len(b.train) + len(b.val) == 1437 and len(b.test) == 360
    assert abs(float(b.train.x.mean())) < 1e-4 and abs(float(b.train.x.std()) - 1) < 1e-2
    # the test split is fixed; the validation split follows the seed
    b2 = load_data(DataConfig(name="digits", val_fraction=0.1), seed=1)
    assert torch.equal(b.test.y, b2.test.y) and not torch.equal(b.val.y, b2.val.y)


def test_mnist_from_shared_datasets(mnist_root):
    b = load_data(DataConfig(name="mnist", root=str(mnist_root), train_subset=1000, test_subset=200), seed=0)
    assert b.input_shape == (1, 28, 28) and len(b.train) == 900 and len(b.test) == 200
    assert b.train.y.dtype == torch.long and int(b.train.y.max()) <= 9
    padded = load_data(DataConfig(name="mnist", root=str(mnist_root), train_subset=100, test_subset=10,
                                  pad_to=32), seed=0)
    assert padded.input_shape == (1, 32, 32)


def test_fashionmnist_written_in_the_real_idx_format(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "FashionMNIST" / "raw"
    for split, n in (("train", 50), ("t10k", 20)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    b = load_data(DataConfig(name="fashionmnist", root=str(tmp_path), normalize=False, val_fraction=0.2))
    assert len(b.train) == 40 and len(b.val) == 10 and len(b.test) == 20
    assert 0.0 <= float(b.train.x.min()) and float(b.train.x.max()) <= 1.0


def test_imagefolder_tree(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog", "eel"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    b = load_data(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.25))
    assert b.input_shape == (3, 8, 8) and b.num_classes == 3 and len(b.test) == 12


def test_missing_dataset_names_expected_path(tmp_path):
    with pytest.raises(DataError, match=r"MNIST/raw.*--data-root.*data\.download=true"):
        load_data(DataConfig(name="mnist", root=str(tmp_path)))


def test_augment_keeps_shape_and_content_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = augment(x, g, pad=0)  # no padding: only flips, so the pixel multiset is unchanged
    assert out.shape == x.shape and torch.equal(out.sort().values, x.sort().values)
    shifted = augment(torch.ones(4, 1, 8, 8), g, pad=4)
    assert shifted.shape == (4, 1, 8, 8) and float(shifted.sum()) <= 4 * 64


def test_batches_cover_every_sample_once():
    b = load_data(DataConfig(name="digits"), seed=0)
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([y for _, y in batches(b.train, 100, generator=g)])
    assert len(seen) == len(b.train) and torch.equal(seen.sort().values, b.train.y.sort().values)
