"""What a user sees while a run trains: a per-step bar on a terminal, one line per epoch.

On a terminal, a tqdm bar counts optimiser steps over the whole run (so its ETA covers every
remaining epoch) and shows the running mean loss of the epoch and the last validation metric;
each finished epoch also leaves one line above the bar. When stderr is not a terminal (a log
file, a pipe, a notebook) there is no bar, only the epoch lines. ``enabled=False`` silences both.

The running loss must not cost a host synchronisation per step (the training loop reads losses
once per epoch): it is refreshed every ``POSTFIX_EVERY`` steps, and on CUDA it is copied into
pinned host memory without waiting and shown once the copy has landed (a few steps late).
"""

from __future__ import annotations

import sys
from typing import TextIO

import torch
from torch import Tensor

POSTFIX_EVERY = 25  # steps between refreshes of the bar's running loss


class HostScalar:
    """The latest value of a device scalar that has reached the host, read without waiting.

    CPU tensors are read directly (CPU work is already finished when Python sees the tensor).
    CUDA tensors are copied asynchronously into pinned memory; a new copy starts only once the
    previous one has landed, and :meth:`read` returns the newest landed value (None before)."""

    def __init__(self, device: torch.device) -> None:
        self.kind = device.type
        self.value: float | None = None
        self._event = None
        if self.kind == "cuda":
            self._host = torch.zeros((), pin_memory=True)

    def push(self, t: Tensor) -> None:
        if self.kind == "cpu":
            self.value = float(t)
            return
        if self.kind != "cuda" or (self._event is not None and not self._event.query()):
            return  # other accelerators: epoch values only; CUDA: the previous copy is in flight
        self.read()  # keep the landed value before the buffer is reused
        self._host.copy_(t.detach(), non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def read(self) -> float | None:
        if self._event is not None and self._event.query():
            self.value, self._event = float(self._host), None
        return self.value


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or wrapped streams
        return False


class Progress:
    """The bar and epoch lines of one run; call :meth:`step` after every optimiser step,
    :meth:`epoch_end` with the epoch's host-side numbers, and :meth:`close` at the end."""

    def __init__(self, *, epochs: int, steps_per_epoch: int, start_epoch: int = 0, start_step: int = 0,
                 desc: str = "", device: torch.device | str = "cpu", enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.epochs, self.desc, self.enabled = epochs, desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.shown: dict[str, str] = {}
        self.bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm
            self.running = HostScalar(torch.device(device))
            self.bar = tqdm(total=epochs * steps_per_epoch, initial=start_step, desc=desc, unit="step",
                            file=self.stream, dynamic_ncols=True, leave=False)
            self.set_epoch(start_epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        if self.bar is not None:
            self.bar.set_description(f"{self.desc} epoch {epoch}/{self.epochs}".strip(), refresh=False)

    def step(self, step: int, loss_sums: dict[str, Tensor], batches: int) -> None:
        """Advance the bar by one step; every POSTFIX_EVERY steps start a non-blocking read of
        the epoch's running mean loss (the sum over layer pairs) and show the newest landed one."""
        if self.bar is None:
            return
        if step % POSTFIX_EVERY == 0 and loss_sums:
            self.running.push(sum(loss_sums.values()) / batches)
            value = self.running.read()
            if value is not None:
                self.shown["loss"] = f"{value:.4g}"
                self.bar.set_postfix(self.shown, refresh=False)
        self.bar.update(1)

    def epoch_end(self, epoch: int, train_losses: dict[str, float], val: dict[str, float], seconds: float) -> None:
        """One line per epoch (above the bar on a terminal): epoch, train loss (summed over layer
        pairs), validation metrics, seconds."""
        if not self.enabled:
            return
        loss = sum(train_losses.values())
        line = (f"{self.desc + ' ' if self.desc else ''}epoch {epoch}/{self.epochs}  train loss {loss:.4g}  "
                + "  ".join(f"val {k} {v:.4g}" for k, v in val.items()) + f"  {seconds:.1f} s")
        if self.bar is None:
            print(line, file=self.stream, flush=True)
            return
        self.shown = {"loss": f"{loss:.4g}", **{f"val_{k}": f"{v:.4g}" for k, v in val.items()}}
        self.bar.set_postfix(self.shown, refresh=False)
        self.bar.write(line, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
