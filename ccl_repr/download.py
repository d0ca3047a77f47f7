"""Downloading torchvision datasets (``ccl-repr train --download``): a failure keeps its cause.

torchvision creates the dataset folders before it fetches anything and, when every mirror
fails, raises one multi-line error listing each URL's failure. :func:`fetching` turns that into
one line that keeps the causes (e.g. "Temporary failure in name resolution") and removes what
the failed attempt created, so an offline try leaves the data root as it was.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

from .errors import DataError

MAX_CAUSE = 400  # characters of torchvision's error kept in the one-line message


def _topmost_missing(path: Path) -> Path | None:
    """The highest ancestor of ``path`` (itself included) that does not exist yet."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _entries(root: Path, folder: Path) -> set[Path]:
    """What a download may touch: ``root``'s direct entries and everything under ``folder``."""
    found = set(root.iterdir()) if root.is_dir() else set()
    if folder.is_dir():
        found |= set(folder.rglob("*"))
    return found


def _remove_new(root: Path, folder: Path, before: set[Path], created: Path | None) -> None:
    if created is not None:  # the data root itself is new: all of it is the failed attempt's
        shutil.rmtree(created, ignore_errors=True)
        return
    for path in sorted(_entries(root, folder) - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def fetching(name: str, root: Path, folder: str, *, enabled: bool = True) -> Iterator[None]:
    """Around torchvision's ``download=True`` construction of dataset ``name`` under ``root``
    (``folder``: the dataset's own folder there): on failure, remove the files and folders the
    attempt created and raise DataError with torchvision's causes on one line."""
    if not enabled:
        yield
        return
    root = Path(root).expanduser()
    top = root / Path(folder).parts[0]
    created, before = _topmost_missing(root), _entries(root, top)
    try:
        yield
    except (RuntimeError, OSError) as e:
        _remove_new(root, top, before, created)
        cause = " ".join(str(e).split())
        cause = cause if len(cause) <= MAX_CAUSE else cause[:MAX_CAUSE] + " ..."
        raise DataError(f"downloading {name} into {root} failed ({type(e).__name__}: {cause}); check the "
                        f"internet connection, or put torchvision's files under {root / folder} and train "
                        f"without --download") from None
