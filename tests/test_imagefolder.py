"""Image folders through the real decoder and cache: tiny trees of real PNG and JPEG files
written here with PIL, decoded, cached, invalidated, refused when broken, trained on."""
import dataclasses
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ccl_repr import imagefolder
from ccl_repr.cli import main
from ccl_repr.config import DataConfig, make_config
from ccl_repr.data import load_data
from ccl_repr.errors import DataError
from ccl_repr.imagefolder import load_folder, load_imagefolder

CLASSES = ("cat", "dog", "eel")


def pattern(label: int, i: int, size: int = 12) -> np.ndarray:
    """A distinct RGB image per (class, index): exact in PNG, recognisable through JPEG."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[..., label % 3] = (40 + 60 * label + 10 * i) % 256
    img[: size // 2, :, (label + 1) % 3] = 200
    return img


def write_tree(root, *, per_class=4, size=12, classes=CLASSES, splits=("train", "test")):
    """Even indices as PNG (lossless), odd as JPEG (quality 95, no chroma subsampling)."""
    for split in splits:
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.fromarray(pattern(label, i, size))
                if i % 2 == 0:
                    img.save(root / split / cls / f"{i}.png")
                else:
                    img.save(root / split / cls / f"{i}.jpg", quality=95, subsampling=0)
    return root


def cache_files(cache):
    return sorted(cache.glob("*.pt")) if cache.exists() else []


def test_decodes_values_shapes_labels_and_class_names(tmp_path):
    root = write_tree(tmp_path / "data")
    xtr, ytr, xte, yte, classes = load_imagefolder(root, cache_dir=tmp_path / "cache", progress=False)
    assert classes == list(CLASSES)
    assert xtr.dtype == torch.uint8 and xtr.shape == (12, 3, 12, 12) and xte.shape == (12, 3, 12, 12)
    assert ytr.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and torch.equal(ytr, yte)
    for k in range(len(ytr)):
        label, i = int(ytr[k]), k % 4
        want = torch.from_numpy(pattern(label, i)).permute(2, 0, 1).int()
        err = (xtr[k].int() - want).abs().max()
        assert err == 0 if i % 2 == 0 else err <= 4  # PNG exact, JPEG close


def test_grayscale_and_palette_images_become_rgb_and_resize(tmp_path):
    root = tmp_path / "data"
    for label, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.full((20, 16), 100 + label, dtype=np.uint8)).save(root / cls / "gray.png")
        Image.fromarray(pattern(label, 0, 16)).convert("P").save(root / cls / "palette.png")
        Image.fromarray(pattern(label, 1, 16)).save(root / cls / "rgb.bmp")
    x, y, classes = load_folder(root, image_size=8, progress=False)
    assert x.shape == (6, 3, 8, 8) and classes == ["a", "b"]
    assert torch.all(x[0] == 100) and torch.all(x[3] == 101)  # gray -> three equal channels


def test_load_data_keeps_class_names_and_fixed_stratified_split(tmp_path):
    root = tmp_path / "flat"
    for label, cls in enumerate(CLASSES):  # no train/test: a fixed stratified 80/20 split
        (root / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(pattern(label, i)).save(root / cls / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"), val_fraction=0.2,
                     normalize=False)  # standardisation follows the seeded validation split
    a, b = load_data(cfg, seed=0, progress=False), load_data(cfg, seed=5, progress=False)
    assert a.classes == list(CLASSES) and a.input_shape == (3, 12, 12)
    assert a.test.y.bincount().tolist() == [2, 2, 2]
    assert torch.equal(a.test.x, b.test.x)  # the test images do not depend on the run seed


def test_second_load_reuses_the_cache_without_decoding(tmp_path, monkeypatch):
    root, cache = write_tree(tmp_path / "data"), tmp_path / "cache"
    first = load_imagefolder(root, cache_dir=cache, progress=False)
    files = cache_files(cache)
    assert len(files) == 2  # one per split folder
    stamps = [f.stat().st_mtime_ns for f in files]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")
    monkeypatch.setattr(imagefolder, "decode_all", no_decoding)
    second = load_imagefolder(root, cache_dir=cache, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(first[:4], second[:4])) and second[4] == first[4]
    assert [f.stat().st_mtime_ns for f in cache_files(cache)] == stamps


@pytest.mark.parametrize("change", ["replace", "touch", "add", "remove"])
def test_a_changed_folder_is_decoded_again(tmp_path, change, monkeypatch):
    root, cache = write_tree(tmp_path / "data", splits=("train",)), tmp_path / "cache"
    x0, y0, _ = load_folder(root / "train", cache_dir=cache, progress=False)
    target = root / "train" / "dog" / "0.png"
    if change == "replace":
        Image.fromarray(np.full((12, 12, 3), 7, dtype=np.uint8)).save(target)
    elif change == "touch":
        os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    elif change == "add":
        Image.fromarray(pattern(2, 9)).save(root / "train" / "eel" / "9.png")
    else:
        target.unlink()
    calls, real = [], imagefolder.decode_all
    monkeypatch.setattr(imagefolder, "decode_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    x1, y1, _ = load_folder(root / "train", cache_dir=cache, progress=False)
    assert calls == [1] and len(cache_files(cache)) == 1  # re-decoded; the slot was replaced, not added to
    if change == "replace":
        assert torch.all(x1[4] == 7) and not torch.equal(x0, x1)
    if change == "add":
        assert len(y1) == len(y0) + 1 and y1[-1] == 2
    if change == "remove":
        assert len(y1) == len(y0) - 1
    assert torch.equal(load_folder(root / "train", cache_dir=cache, progress=False)[0], x1)


def test_image_size_and_damaged_cache_files(tmp_path):
    root, cache = write_tree(tmp_path / "data", splits=("train",)), tmp_path / "cache"
    assert load_folder(root / "train", cache_dir=cache, image_size=6, progress=False)[0].shape[-2:] == (6, 6)
    assert load_folder(root / "train", cache_dir=cache, progress=False)[0].shape[-2:] == (12, 12)
    for f in cache_files(cache):
        f.write_bytes(b"not a cache")  # damaged: a miss, rebuilt, never an error
    assert load_folder(root / "train", cache_dir=cache, progress=False)[0].shape == (12, 3, 12, 12)
    assert not any(p.name.endswith(".tmp") for p in cache.iterdir())


def test_nothing_is_written_inside_the_data_root(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "data")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = DataConfig(name="imagefolder", root=str(root), val_fraction=0.25)
    load_data(cfg, progress=False)  # cache_dir=auto
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert len(cache_files(tmp_path / "xdg" / "ccl_repr")) == 2
    load_data(dataclasses.replace(cfg, cache_dir="off"), progress=False)
    assert make_config(sets=["data.cache_dir=off"]).data.cache_dir == "off"  # bare YAML word, not a boolean


@pytest.mark.parametrize("bad,content", [("cat/broken.jpg", b"this is text, not a JPEG"),
                                         ("dog/cut.png", None), ("eel/notes.txt", b"a note")])
def test_unreadable_or_non_image_file_is_named(tmp_path, bad, content):
    root, cache = write_tree(tmp_path / "data", splits=("train",)), tmp_path / "cache"
    path = root / "train" / bad
    path.write_bytes(content if content is not None else (root / "train" / "dog" / "0.png").read_bytes()[:60])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}.*(replace or remove it|move it out)"):
        load_folder(root / "train", cache_dir=cache, progress=False)
    assert cache_files(cache) == [] and not (cache.exists() and any(cache.iterdir()))


def test_mixed_sizes_and_empty_class_are_refused(tmp_path):
    root = write_tree(tmp_path / "data", splits=("train",))
    Image.fromarray(pattern(0, 0, 9)).save(root / "train" / "cat" / "small.png")
    with pytest.raises(DataError, match=r"small\.png is 9x9.*set data\.image_size=N"):
        load_folder(root / "train", progress=False)
    (root / "train" / "fox").mkdir()
    with pytest.raises(DataError, match=r"fox holds no images"):
        load_folder(root / "train", image_size=8, progress=False)


def test_cli_bad_image_exits_2_with_one_line_and_leaves_nothing(tmp_path, capsys):
    root, cache, out = write_tree(tmp_path / "data"), tmp_path / "cache", tmp_path / "run"
    bad = root / "train" / "dog" / "3.jpg"
    good = bad.read_bytes()
    bad.write_bytes(b"\xff\xd8 truncated")
    argv = ["train", "mlp_digits", "--set", "data.name=imagefolder", "--data-root", str(root), "--epochs", "1",
            "--set", f"data.cache_dir={cache}", "--set", "data.val_fraction=0.25", "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in err[0]
    assert not out.exists() and cache_files(cache) == []
    bad.write_bytes(good)  # fixed: the same command now runs into the same --out
    assert main(argv) == 0
    from ccl_repr.checkpoint import load_checkpoint
    assert json.loads((out / "summary.json").read_text())["classes"] == list(CLASSES)
    assert load_checkpoint(out / "model.pt")["model_meta"]["classes"] == list(CLASSES)


def test_cifar10_recipe_on_an_image_folder(tmp_path):
    """`ccl-repr train cnn_cifar10 --set data.name=imagefolder --set data.root=DIR` builds 3x32x32
    inputs for the recipe's CNN (the training loop itself is tested on the run above)."""
    from ccl_repr.models import build_model
    names = [f"c{i}" for i in range(10)]
    root = write_tree(tmp_path / "cifar", per_class=3, size=32, classes=names)
    cfg = make_config("cnn_cifar10", sets=["data.name=imagefolder", f"data.root={root}",
                                           f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.34"])
    bundle = load_data(cfg.data, seed=cfg.seed, progress=False)
    assert bundle.input_shape == (3, 32, 32) and bundle.classes == names and len(bundle.test) == 30
    model = build_model(cfg.model, input_shape=bundle.input_shape, num_classes=bundle.num_classes)
    assert model(bundle.train.x[:2]).shape == (2, 10)
