"""Optional TensorBoard mirror of ``metrics.jsonl`` (``ccl-repr train --tensorboard``).

``metrics.jsonl`` stays the record of a run; this writes the same per-epoch numbers as event
files under ``RUN_DIR/tensorboard`` for ``tensorboard --logdir runs``. ``tensorboard`` is an
optional package, imported only when asked for; :func:`require` checks it before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import DependencyError

FOLDER = "tensorboard"
INSTALL = "pip install tensorboard"


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # tensorboard missing (or too old for torch)
        raise DependencyError(f"--tensorboard needs the tensorboard package ({type(e).__name__}: {e}); "
                              f"install it with `{INSTALL}`, or train without --tensorboard") from None
    return SummaryWriter


def require() -> None:
    """Raise DependencyError naming the install command when TensorBoard cannot be used."""
    _summary_writer()


class TensorBoardLog:
    """Scalars of each metrics row, at x = epoch; on resume, events from ``resume_epoch`` on
    (work the checkpoint does not hold) are purged, as metrics.jsonl drops those rows."""

    def __init__(self, run_dir: Path | str, *, resume_epoch: int | None = None) -> None:
        writer = _summary_writer()
        purge = resume_epoch + 1 if resume_epoch is not None else None
        self.writer = writer(log_dir=str(Path(run_dir) / FOLDER), purge_step=purge)

    def write(self, row: dict) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
