"""Image folders (``ROOT/<class>/<image>``): decoded in parallel once, then read from a cache.

Layouts: ``ROOT/train/<class>/…`` with ``ROOT/test/<class>/…`` (or ``ROOT/val/``), or plain
``ROOT/<class>/…``, split 80/20 by a fixed class-stratified draw. Class names are the folder
names, sorted; labels index them. Every file inside a class folder must be an image (hidden
files are skipped); an unreadable one is refused by name.

Decoding uses PIL (the decoder behind torchvision's ImageFolder; torchvision's own decoders
are deprecated since torchvision 0.29) on a thread pool over every available core: PIL releases
the GIL while it decodes. Images become RGB uint8, resized to ``image_size`` squared when it is set.

The decoded uint8 images, labels and class names of each split folder are cached in
``cache_dir`` under a name derived from the folder's path, and reused while the folder's file
list, sizes, modification times and ``image_size`` are unchanged (a fingerprint stored with
them); any change re-decodes and replaces the file. The cache is written atomically after a
complete decode, and by default outside the data root (which may be read-only).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from .errors import DataError
from .splits import SUBSET_SEED, stratified_sample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CACHE_FORMAT = "ccl_repr.imagefolder/1"
CHUNK = 256  # images per thread-pool task: amortises the task overhead, keeps the bar moving
TEST_SHARE = 0.2  # share of a folder without train/ and test/ held out for testing


@dataclass
class Listing:
    """The files of one split folder, their labels, and what the cache fingerprint covers."""
    root: Path
    classes: list[str]
    names: list[str]  # paths relative to root
    labels: list[int]
    stats: list[tuple[int, int]]  # (size in bytes, modification time in ns) per file

    @property
    def files(self) -> list[Path]:
        return [self.root / n for n in self.names]

    def fingerprint(self, image_size: int) -> str:
        h = hashlib.sha256(f"{CACHE_FORMAT}\0{image_size}\0{self.classes}\n".encode())
        h.update("".join(f"{n}\0{label}\0{size}\0{mtime}\n" for n, label, (size, mtime)
                         in zip(self.names, self.labels, self.stats)).encode())
        return h.hexdigest()


# --------------------------------------------------------------------------- listing

def _walk(folder: str, prefix: str, root: Path) -> list[tuple[str, os.stat_result]]:
    """(path relative to root, stat) of every non-hidden file under ``folder`` (following links),
    sorted by name; a file that is not an image is refused."""
    found = []
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for e in entries:
        if e.is_dir():
            found += _walk(e.path, f"{prefix}{e.name}/", root)
        elif not e.name.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"{e.path} is not an image file (expected {', '.join(IMAGE_EXTENSIONS)}); "
                            f"move it out of the class folders of {root}")
        else:
            found.append((prefix + e.name, e.stat()))
    return found


def list_folder(root: Path) -> Listing:
    """The class folders of ``root`` (sorted names) and the images in each."""
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"no ImageFolder tree at {root} ({e.strerror or e}); expected {root}/<class>/<image> "
                        f"files; set --data-root to that folder") from None
    if not classes:
        raise DataError(f"no ImageFolder tree at {root} (no class folders); expected {root}/<class>/<image> "
                        f"files; set --data-root to that folder")
    names, labels, stats = [], [], []
    for label, name in enumerate(classes):
        try:
            found = _walk(str(root / name), f"{name}/", root)
        except OSError as e:
            raise DataError(f"cannot list {root / name} ({e.strerror or e}); make it readable") from None
        if not found:
            raise DataError(f"class folder {root / name} holds no images; add images or remove the folder")
        names += [n for n, _ in found]
        labels += [label] * len(found)
        stats += [(st.st_size, st.st_mtime_ns) for _, st in found]
    return Listing(root=root, classes=classes, names=names, labels=labels, stats=stats)


# --------------------------------------------------------------------------- decoding

def decode_file(path: Path, image_size: int = 0) -> np.ndarray:
    """One image as an RGB uint8 array (H, W, 3), resized (bilinear) to image_size squared if set."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im if im.mode == "RGB" else im.convert("RGB")
            if image_size and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(im)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path} is not a readable image ({reason}); replace or remove it") from None


def _decode_into(out: np.ndarray, start: int, files: list[Path], image_size: int, first: Path) -> None:
    for i, path in enumerate(files, start):
        img = decode_file(path, image_size)
        if img.shape != out.shape[1:]:
            raise DataError(f"images differ in size: {first} is {out.shape[2]}x{out.shape[1]}, {path} is "
                            f"{img.shape[1]}x{img.shape[0]}; set data.image_size=N to resize them all to NxN")
        out[i] = img


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def decode_all(files: list[Path], *, image_size: int = 0, progress: bool = True, desc: str = "") -> Tensor:
    """Decode ``files`` on a thread pool into one uint8 tensor (N, 3, H, W); the first failure (in
    file order) is raised. The bar shows on a terminal only (tqdm's ``disable=None``)."""
    from tqdm.auto import tqdm

    first = decode_file(files[0], image_size)
    out = np.empty((len(files), *first.shape), dtype=np.uint8)
    out[0] = first
    starts = range(1, len(files), CHUNK)
    with tqdm(total=len(files), initial=1, desc=desc, unit="img", leave=False, dynamic_ncols=True,
              disable=None if progress else True) as bar:
        pool = ThreadPoolExecutor(max_workers=_workers())
        try:
            jobs = [pool.submit(_decode_into, out, s, files[s:s + CHUNK], image_size, files[0]) for s in starts]
            for s, job in zip(starts, jobs):
                job.result()
                bar.update(min(CHUNK, len(files) - s))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return torch.from_numpy(rearrange(out, "n h w c -> n c h w").copy())


# --------------------------------------------------------------------------- cache

def resolve_cache_dir(setting: str) -> Path | None:
    """``data.cache_dir``: "auto" = $XDG_CACHE_HOME/ccl_repr or ~/.cache/ccl_repr; "" or "off" = no cache."""
    if setting.strip().lower() in ("", "off", "none"):
        return None
    if setting == "auto":
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ccl_repr"
    return Path(setting).expanduser()


def cache_file(cache_dir: Path, root: Path, image_size: int) -> Path:
    """One cache slot per folder and image size: a changed folder replaces its file, never adds one."""
    where = str(root.resolve())
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{root.resolve().parent.name}-{root.name}")[:60]
    digest = hashlib.sha256(f"{where}\0{image_size}".encode()).hexdigest()[:16]
    return cache_dir / f"imagefolder-{tag}-{digest}.pt"


def read_cache(path: Path, key: str) -> tuple[Tensor, Tensor] | None:
    """The cached (images, labels) if ``path`` holds this fingerprint, else None (missing, stale or
    unreadable files are a miss: the folder is decoded again and the file replaced)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != CACHE_FORMAT or payload.get("key") != key:
            return None
        x, y = payload["images"], payload["labels"]
        return (x, y) if x.dtype == torch.uint8 and len(x) == len(y) else None
    except Exception:  # noqa: BLE001 - any damaged or foreign file is just a cache miss
        return None


def write_cache(path: Path, key: str, root: Path, x: Tensor, y: Tensor, classes: list[str]) -> None:
    """Write atomically (temporary file, fsync, rename); a cache that cannot be written only warns."""
    from .checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"format": CACHE_FORMAT, "key": key, "root": str(root.resolve()), "classes": classes,
                "images": x, "labels": y}, buf)
    try:
        atomic_write_bytes(path, buf.getbuffer())
    except OSError as e:
        warnings.warn(f"could not write the image cache {path} ({e.strerror or e}); the folder will be decoded "
                      f"again next time; set data.cache_dir=DIR to a writable folder, or off", stacklevel=3)


# --------------------------------------------------------------------------- loading

def load_folder(root: Path, *, image_size: int = 0, cache_dir: Path | None = None,
                progress: bool = True) -> tuple[Tensor, Tensor, list[str]]:
    """(uint8 images (N, 3, H, W), labels (N,), class names) of one split folder, from the cache
    when its fingerprint matches, else decoded (and cached)."""
    listing = list_folder(root)
    key = listing.fingerprint(image_size)
    slot = cache_file(cache_dir, root, image_size) if cache_dir is not None else None
    cached = read_cache(slot, key) if slot is not None else None
    if cached is not None:
        return (*cached, listing.classes)
    x = decode_all(listing.files, image_size=image_size, progress=progress, desc=f"decoding {root}")
    y = torch.tensor(listing.labels, dtype=torch.long)
    if slot is not None:
        write_cache(slot, key, root, x, y, listing.classes)
    return x, y, listing.classes


def load_imagefolder(root: str | Path, *, image_size: int = 0, cache_dir: Path | None = None,
                     progress: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """(train images, train labels, test images, test labels, class names) of an image-folder tree."""
    base = Path(root)
    kw = dict(image_size=image_size, cache_dir=cache_dir, progress=progress)
    if (base / "train").is_dir():
        test_dir = next((base / d for d in ("test", "val") if (base / d).is_dir()), None)
        if test_dir is None:
            raise DataError(f"{base / 'train'} has no sibling test/ or val/ folder; add one, or point "
                            f"--data-root at a folder of class folders to split it 80/20")
        xtr, ytr, classes = load_folder(base / "train", **kw)
        xte, yte, classes_te = load_folder(test_dir, **kw)
        if classes_te != classes:
            raise DataError(f"class folders of {base / 'train'} and {test_dir} differ; make them the same")
        if xte.shape[1:] != xtr.shape[1:]:
            raise DataError(f"images of {base / 'train'} are {tuple(xtr.shape[1:])} but those of {test_dir} are "
                            f"{tuple(xte.shape[1:])}; set data.image_size=N to resize them all to NxN")
        return xtr, ytr, xte, yte, classes
    x, y, classes = load_folder(base, **kw)
    # A fixed, stratified test split, as for digits: every run and seed is scored on the same images.
    test = stratified_sample(y, max(1, round(TEST_SHARE * len(y))), seed=SUBSET_SEED)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[test] = False
    return x[keep], y[keep], x[test], y[test], classes
