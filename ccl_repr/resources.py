"""Peak memory of a run, for summary.json: CUDA's peak allocation or the process's peak RSS."""

from __future__ import annotations

import sys

import torch


def peak_memory(device: torch.device) -> dict[str, float | str | None]:
    """``{"peak_memory_mib": MiB, "peak_memory_source": ...}``. On CUDA: the caching allocator's
    peak of allocated tensor memory on ``device`` since the process started (or since the
    caller last reset the peak stats). Otherwise the process's peak resident set size
    (``getrusage``), which includes Python, torch and the dataset, and is the peak of the whole
    process, not only of training."""
    if device.type == "cuda":
        return {"peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_memory_source": "cuda_max_allocated"}
    try:
        import resource
    except ImportError:  # Windows
        return {"peak_memory_mib": None, "peak_memory_source": "unavailable"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_unit = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"peak_memory_mib": peak * per_unit / 2**20, "peak_memory_source": "process_max_rss"}
