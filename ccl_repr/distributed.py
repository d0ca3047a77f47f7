"""Data-parallel training through ``torchrun``: real torch.distributed, one process per device.

Run ``torchrun --nproc_per_node=K -m ccl_repr.cli train RECIPE ...``; torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and without it everything here is a
no-op (world size 1).

How a step stays equal to the single-process step at the same global batch:

- every rank draws the same shuffled global batch (same seed, same generator, same
  augmentation stream) and keeps one contiguous shard of it;
- each rank backpropagates its shard's losses, then one all-reduce over a flat buffer of all
  gradients (both networks: F's and G's) sums them weighted by each shard's share of the global
  batch, so the result is the global-batch gradient for losses that are means over samples
  (cross-entropy, the prototype pair loss, the AE MSE). Terms that couple samples are
  computed per shard, as in any data-parallel run: the anti-collapse term on Â Â^T, flooding's
  normaliser and batch-norm statistics;
- clipping and the optimiser step then run on identical gradients on every rank, so the
  parameters stay identical without further communication;
- only rank 0 writes the run folder; the other ranks write into a scratch folder;
- a stop request (Ctrl-C, SIGTERM) on any rank stops every rank after the same step
  (:meth:`DataParallel.stop_agreed`), so the checkpoint rank 0 writes is the group's state.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError


class _Method(Protocol):
    def backward(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]: ...


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_dir(out: Path, *, resume: bool) -> Path:
    """The folder this rank writes: ``out`` on rank 0, a scratch folder (removed at exit) elsewhere.
    A resuming non-zero rank gets a copy of the run folder so that it reads the same checkpoint."""
    if env_rank() == 0:
        return out
    scratch = Path(tempfile.mkdtemp(prefix=f"ccl-rank{env_rank()}-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    if resume and out.is_dir():
        shutil.copytree(out, scratch / out.name)
    return scratch / out.name


AGREE_EVERY = 10  # steps between stop-request agreements across ranks (one tiny all-reduce each)


class DataParallel:
    """This process's place in the group; ``world_size == 1`` means plain single-process training."""

    def __init__(self, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
        """This rank's contiguous slice of the global batch and its share of it. A rank whose slice
        would be empty (global batch smaller than the world) takes one sample with share 0, so that
        every rank produces the same set of gradients for the all-reduce."""
        n = len(y)
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        if hi == lo:
            return x[:1], y[:1], 0.0
        return x[lo:hi], y[lo:hi], (hi - lo) / n

    def backward(self, method: _Method, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The method's backward on this rank's shard, then the gradient all-reduce."""
        if self.world_size == 1:
            return method.backward(model, x, y)
        xs, ys, share = self.shard(x, y)
        losses = method.backward(model, xs, ys)
        self.reduce_gradients(model, share)
        return losses

    def reduce_gradients(self, model: nn.Module, share: float) -> None:
        """grad <- sum over ranks of share_r * grad_r, in one all-reduce of a flat buffer."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params]).mul_(share)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def average(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mean over ranks of per-epoch loss sums (for logging; once per epoch)."""
        if self.world_size == 1 or not sums:
            return sums
        keys = sorted(sums)
        stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in keys])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return {k: v / self.world_size for k, v in zip(keys, stacked)}

    def stop_agreed(self, requested: bool, step: int, *, boundary: bool = False) -> bool:
        """Whether to stop after this step. One process: as soon as a stop was requested. Under
        torchrun every rank must stop after the *same* step, or the ranks still stepping wait
        forever in the next gradient all-reduce (a signal can reach one rank only, e.g. one
        node's preemption, or reach them on either side of a step). So the ranks agree - one
        all-reduce (MAX) of a flag, a host sync - at epoch ends (``boundary``) and every
        ``AGREE_EVERY`` steps, and all stop there if any rank was asked to."""
        if self.world_size == 1:
            return requested
        if not boundary and step % AGREE_EVERY:
            return False
        flag = torch.tensor([1.0 if requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def sync_model(self, model: nn.Module) -> None:
        """Make this rank's copy of the whole model current (model parallelism: each rank steps
        its own layers, :mod:`ccl_repr.parallel`). Data-parallel ranks step identical copies: nothing to do."""

    def broadcast_parameters(self, model: nn.Module) -> None:
        """Start every rank from rank 0's weights and buffers (they are seeded alike anyway)."""
        if self.world_size == 1:
            return
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


def setup(device: torch.device) -> DataParallel:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU) and pin this
    rank's GPU, so that every later ``"cuda"`` tensor lands on it. Call before any data loads."""
    world = env_world_size()
    if world <= 1:
        return DataParallel()
    rank, local = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices; "
                              f"lower torchrun --nproc_per_node or use --device cpu")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_close)
    return DataParallel(rank=rank, world_size=world, device=device)


def _close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
