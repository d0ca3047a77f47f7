"""Data sources through the real loaders: digits, MNIST from ../shared/datasets, MNIST-format
files written here (FashionMNIST layout); class names; stratified subsets and degenerate splits.
Image folders: tests/test_imagefolder.py."""
import struct

import numpy as np
import pytest
import torch

from ccl_repr.cli import main
from ccl_repr.config import DataConfig
from ccl_repr.data import Split, augment, batches, load_data, make_bundle
from ccl_repr.errors import DataError
from ccl_repr.splits import class_quota, stratified_sample


def write_idx(path, array: np.ndarray) -> None:
    """torchvision's IDX format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_digits_splits_and_normalisation():
    b = load_data(DataConfig(name="digits", val_fraction=0.1), seed=0)
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10 and b.classes == list("0123456789")
    assert len(b.train) + len(b.val) == 1437 and len(b.test) == 360
    assert abs(float(b.train.x.mean())) < 1e-4 and abs(float(b.train.x.std()) - 1) < 1e-2
    # the test split is fixed; the validation split follows the seed
    b2 = load_data(DataConfig(name="digits", val_fraction=0.1), seed=1)
    assert torch.equal(b.test.y, b2.test.y) and not torch.equal(b.val.y, b2.val.y)


def test_mnist_from_shared_datasets(mnist_root):
    b = load_data(DataConfig(name="mnist", root=str(mnist_root), train_subset=1000, test_subset=200), seed=0)
    assert b.input_shape == (1, 28, 28) and len(b.train) == 900 and len(b.test) == 200
    assert b.train.y.dtype == torch.long and int(b.train.y.max()) <= 9
    assert b.classes[:2] == ["0 - zero", "1 - one"]  # torchvision's own names
    assert torch.cat([b.train.y, b.val.y]).bincount().min() >= 90  # stratified: ~100 per class
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


def test_missing_dataset_names_expected_path(tmp_path):
    with pytest.raises(DataError, match=r"MNIST/raw.*--data-root.*data\.download=true"):
        load_data(DataConfig(name="mnist", root=str(tmp_path)))


def test_torchvision_name_on_an_image_folder_points_to_imagefolder(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"--set data\.name=imagefolder to read .* as an image folder"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path)))


def _crops_and_flips(image: torch.Tensor, pad: int) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every output augment may give for one image, computed here on its own: each crop of the
    image zero-padded by ``pad`` (offset (oy, ox), 0..2*pad each), plain and mirrored left-right."""
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad)
    padded[:, pad:pad + h, pad:pad + w] = image
    crops = {(oy, ox): padded[:, oy:oy + h, ox:ox + w] for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)}
    return {(oy, ox, flip): crop.flip(-1) if flip else crop for (oy, ox), crop in crops.items() for flip in (False, True)}


def _how_augmented(x: torch.Tensor, out: torch.Tensor, pad: int) -> list[tuple[int, int, bool]]:
    """(oy, ox, flipped) of each output; fails unless it is exactly one crop/flip of its own input."""
    found = []
    for i, (image, result) in enumerate(zip(x, out)):
        matches = [key for key, crop in _crops_and_flips(image, pad).items() if torch.equal(crop, result)]
        assert len(matches) == 1, f"sample {i} is no crop (pad {pad}) + horizontal flip of its own image"
        found.append(matches[0])
    return found


def test_augment_crops_and_flips_each_image_at_random():
    """Every pixel is distinct and non-zero, so each output identifies its crop offset and flip."""
    x = torch.arange(1, 1 + 48 * 2 * 6 * 6, dtype=torch.float32).reshape(48, 2, 6, 6)
    out = augment(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    found = _how_augmented(x, out, pad=2)
    flipped = sum(flip for _, _, flip in found)
    assert 8 <= flipped <= 40, f"{flipped} of 48 flipped; expected about half"
    assert sum((oy, ox) != (2, 2) for oy, ox, _ in found) >= 30, "most samples are shifted (p = 24/25 each)"
    assert len({(oy, ox) for oy, ox, _ in found}) >= 12, "each sample draws its own offset"
    assert {oy for oy, _, _ in found} == {0, 1, 2, 3, 4} == {ox for _, ox, _ in found}, "every offset in 0..2*pad"
    again = augment(x, torch.Generator().manual_seed(0), pad=2)
    other = augment(x, torch.Generator().manual_seed(1), pad=2)
    assert torch.equal(out, again) and not torch.equal(out, other)  # the generator alone decides
    flips_only = augment(x, torch.Generator().manual_seed(0), pad=0)
    assert {(oy, ox) for oy, ox, _ in _how_augmented(x, flips_only, pad=0)} == {(0, 0)}
    assert 0 < sum(not torch.equal(a, b) for a, b in zip(flips_only, x)) < 48


def _indexed_split(n: int = 103) -> Split:
    """Image i is the constant i + 1 (so it names its index even when cropped); labels random."""
    x = torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    return Split(x=x, y=torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0)))


def test_batches_cover_every_sample_once_with_its_own_label():
    split = _indexed_split()
    g = torch.Generator().manual_seed(0)
    for kwargs in (dict(generator=g), dict(generator=g, augment_with=torch.Generator().manual_seed(1)),
                   dict(), dict(order=torch.randperm(len(split), generator=g))):
        idx = []
        for x, y in batches(split, 10, **kwargs):
            i = x.amax(dim=(1, 2, 3)).long() - 1  # a crop at pad 4 of an 8x8 image keeps some of it
            assert torch.equal(y, split.y[i]), f"{kwargs}: images and labels mis-paired"
            idx.append(i)
        assert torch.equal(torch.cat(idx).sort().values, torch.arange(len(split))), kwargs
    skipped = torch.cat([x.amax(dim=(1, 2, 3)) for x, _ in batches(split, 10, start=3)]).long() - 1
    assert torch.equal(skipped, torch.arange(30, len(split)))


def test_every_split_keeps_each_image_with_its_label():
    """Subsets, padding, the seeded validation split and standardisation move x and y together:
    image i is the constant byte i, so (denormalised) it names its index in the source."""
    gen = torch.Generator().manual_seed(0)

    def source(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 6, 6).contiguous()
        return x, torch.randint(0, 5, (n,), generator=gen)

    train, test = source(250), source(120)
    cfg = DataConfig(train_subset=200, test_subset=80, val_fraction=0.25, pad_to=8)
    b = make_bundle("toy", train, test, 5, cfg, seed=3)
    for name, split, (_, y) in (("train", b.train, train), ("val", b.val, train), ("test", b.test, test)):
        i = (b.denormalize(split.x).amax(dim=(1, 2, 3)) * 255).round().long()
        assert len(i.unique()) == len(split), f"{name}: an image appears twice"
        assert torch.equal(split.y, y[i]), f"{name}: images and labels mis-paired"
    assert (len(b.train), len(b.val), len(b.test)) == (150, 50, 80)


def _rows(*splits) -> list[bytes]:
    """The images of splits as a sorted list of byte strings (a multiset, order-free)."""
    return sorted(bytes(row.numpy().tobytes()) for split in splits for row in split.x.flatten(1))


def test_subsets_are_stratified_and_the_same_for_every_seed():
    cfg = DataConfig(name="digits", train_subset=100, test_subset=50, normalize=False)
    a, b = load_data(cfg, seed=0), load_data(cfg, seed=3)
    assert torch.cat([a.train.y, a.val.y]).bincount().tolist() == [10] * 10
    assert a.test.y.bincount().tolist() == [5] * 10
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)  # same test images, any seed
    assert _rows(a.train, a.val) == _rows(b.train, b.val)  # same training pool; only the val split moves
    assert not torch.equal(a.val.y, b.val.y)


def test_class_quota_and_stratified_sample():
    counts = np.array([50, 30, 15, 5])
    for n in (4, 10, 37, 99):
        q = class_quota(counts, n)
        assert q.sum() == n and (q >= 1).all() and (q <= counts).all()
        assert np.abs(q - counts * n / counts.sum()).max() <= 1 + 1e-9 or n < 10  # proportional within one
    assert class_quota(counts, 2).tolist() == [1, 1, 0, 0] and class_quota(counts, 500).tolist() == counts.tolist()
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)
    idx = stratified_sample(y, 20)
    assert y[idx].bincount().tolist() == [10, 6, 3, 1] and not torch.equal(idx, torch.arange(20))
    assert torch.equal(idx, stratified_sample(y, 20)) and torch.equal(idx, idx.sort().values)
    lone = torch.tensor([0] * 5 + [1])  # the validation draw never takes a class's last sample
    assert y[stratified_sample(y, 4, seed=1, reserve=1)].bincount().tolist() == [1, 1, 1, 1]
    assert lone[stratified_sample(lone, 2, reserve=1)].tolist() == [0, 0]


def test_validation_split_is_stratified():
    b = load_data(DataConfig(name="digits", train_subset=200, val_fraction=0.1), seed=7)
    assert b.val.y.bincount().tolist() == [2] * 10 and b.train.y.bincount().tolist() == [18] * 10


@pytest.mark.parametrize("settings,message", [
    (dict(test_subset=1), r"the test split holds 1 sample\(s\), all of class .*raise data\.test_subset"),
    (dict(train_subset=6, val_fraction=0.1), r"training split has no samples of class .*raise data\.train_subset"),
    (dict(train_subset=20, val_fraction=0.05), r"validation split holds 1 sample.*raise data\.val_fraction"),
])
def test_degenerate_splits_are_refused(settings, message):
    with pytest.raises(DataError, match=message):
        load_data(DataConfig(name="digits", **settings), seed=0)


def test_degenerate_split_at_the_cli_is_one_line_exit_2(tmp_path, capsys):
    assert main(["train", "mlp_digits", "--set", "data.test_subset=1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.test_subset" in err[0] and not (tmp_path / "run").exists()
