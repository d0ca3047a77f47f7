"""Shared pieces of the speed benchmarks: device and thread setup, one training step per method,
interleaved timing with medians, FLOP counting, the device's matmul rate, peak step memory.

Every benchmark measures CCL and backprop *in the same run*, interleaving their steps, so that
whatever else loads the machine loads both sides of a ratio alike.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from itertools import accumulate
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ccl_repr.config import LossConfig, ModelConfig, OptimConfig  # noqa: E402
from ccl_repr.optim import Optimizers
from ccl_repr.rules import CCL, Backprop# noqa: E402
from ccl_repr.models import DualNetwork, build_model  # noqa: E402

# Where every benchmark writes its JSON; CCL_REPR_BENCH_RESULTS redirects it (the smoke tests do).
RESULTS = Path(os.environ.get("CCL_REPR_BENCH_RESULTS") or REPO / "benchmarks" / "results")
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

# Natural input shape per registry model and batch per device (CPU batches of the conv models
# are small so that a CPU run finishes in minutes; the paper's batch on GPU).
MODELS: dict[str, tuple[tuple[int, ...], int, int]] = {
    # name: (input shape, CPU batch, GPU batch)
    "mlp_small": ((1, 8, 8), 64, 64),
    "mlp_mnist": ((1, 28, 28), 256, 256),
    "mlp_cifar": ((3, 32, 32), 256, 256),
    "cnn": ((3, 32, 32), 32, 128),
    "cnn_strided": ((1, 32, 32), 32, 128),
    "ae_mlp": ((1, 28, 28), 256, 256),
    "ae_conv": ((3, 96, 96), 2, 32),
}
# The paper's loss settings per model family (docs/fidelity.md): prototype form for MLPs, normalised +
# anti-collapse + flooding for the CNNs, plain MSE pairs for autoencoders.
LOSSES = {
    "mlp": LossConfig(form="prototype", scale=128.0),
    "cnn": LossConfig(form="normalized", scale=1.0, anti_collapse=0.5, flooding=0.2),
    "ae": LossConfig(ae_form="mse"),
}


def setup(threads: int) -> torch.device:
    """CUDA when present, else CPU with ``threads`` intra-op threads (stated in every JSON)."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def environment(device: torch.device, threads: int) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "threads": threads, "cpu_count": os.cpu_count(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_config(name: str) -> LossConfig:
    return LOSSES["ae" if name.startswith("ae_") else "cnn" if name.startswith("cnn") else "mlp"]


def make_model(name: str, device: torch.device, *, widths: list[int] | None = None,
               input_shape: tuple[int, ...] | None = None) -> DualNetwork:
    shape = input_shape or MODELS[name][0]
    return build_model(ModelConfig(name=name, widths=widths or []), input_shape=shape, num_classes=10).to(device)


class Stepper:
    """One method's model, optimisers and a fixed synthetic batch: ``step()`` is one training step
    exactly as the train loop runs it (zero_grad, backward, clip + SGD step for F and G)."""

    def __init__(self, name: str, method: str, device: torch.device, *, batch: int, layerwise: bool = False,
                 widths: list[int] | None = None, input_shape: tuple[int, ...] | None = None,
                 amp: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = make_model(name, device, widths=widths, input_shape=input_shape)
        cfg = loss_config(name)
        self.method = CCL(cfg, layerwise=layerwise) if method == "ccl" else Backprop(cfg)
        self.method.prepare(self.model)
        if amp:
            import functools
            self.method.autocast = functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
        self.optim = Optimizers(self.model, OptimConfig(), total_steps=10 ** 6)
        self.x = torch.randn(batch, *self.model.input_shape, device=device)
        self.y = torch.randint(0, 10, (batch,), device=device)
        self.batch, self.device = batch, device

    def compile(self, mode: str = "default") -> None:
        """``torch.compile`` the loss computation exactly as ``train.compile=true`` does (the
        optimiser step stays eager); the first step after this compiles."""
        from ccl_repr.config import TrainConfig
        from ccl_repr.fastpath import apply
        apply(self.model, self.method, TrainConfig(compile=True, compile_mode=mode, amp="off", channels_last="off"),
              self.device)

    def step(self, *, keep_grads: bool = False) -> None:
        if keep_grads:  # gradient buffers stay allocated (memory benchmark: they are model state)
            self.model.zero_grad(set_to_none=False)
        else:
            self.optim.zero_grad()
        self.method.backward(self.model, self.x, self.y)
        self.optim.clip_and_step()

    def flops(self) -> int:
        """FLOPs of one step as torch's FlopCounterMode counts them (matmuls and convolutions)."""
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            self.step()
        return counter.get_total_flops()


def interleaved_times(steppers: dict[str, Callable[[], None]], device: torch.device, *,
                      warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taking turns (a, b, a, b, ...)."""
    for fn in steppers.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(repeats):
        for k, fn in steppers.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_rate(device: torch.device, *, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """The device's achieved FLOP/s on a large square matmul (the MFU denominator), median of repeats."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = interleaved_times({"mm": lambda: torch.mm(a, b)}, device, warmup=2, repeats=repeats)["mm"]
    return 2 * n ** 3 / median(times)


def peak_step_memory(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during ``fn()`` above what was allocated when it started.

    CUDA: torch.cuda.max_memory_allocated. CPU: every allocation and free that the PyTorch CPU
    allocator reports to the profiler (profile_memory=True), replayed in time order; the peak of
    the running sum is the step's peak."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    return max([0, *accumulate(size for _, size in events)])


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v)) + "\n")
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path


def tensor_bytes(tensors: list[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
