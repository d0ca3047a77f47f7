"""The fast path's switches: bf16 autocast and channels-last on CUDA, optional torch.compile.

Already fast by construction elsewhere: data are device-resident tensors, batches are index
slices of a permutation drawn on the device, augmentation runs on tensors, and the train loop
reads losses once per epoch (no host synchronisation per step). What is left is per device:

- ``train.amp``: bf16 autocast around the forward work (losses stay float32 under autocast);
  ``auto`` turns it on for CUDA only, where bf16 tensor cores pay; on CPU it is opt-in.
- ``train.channels_last``: NHWC layout for conv models (cuDNN's fast path); ``auto`` = CUDA.
- ``train.compile``: ``torch.compile`` of the loss computation (forward + its backward through
  AOTAutograd); ``train.compile_mode=reduce-overhead`` replays it as CUDA graphs, for GPU runs
  whose small steps are bound by launch overhead. The layer-wise CCL step calls backward inside
  the step, so it is not compiled.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .config import TrainConfig
from .data import DataBundle
from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available; use --device auto or cpu")
    return torch.device(name)


def uses_amp(cfg: TrainConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.amp == "auto" else cfg.amp == "bf16"


def uses_channels_last(cfg: TrainConfig, device: torch.device, model: nn.Module) -> bool:
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    wanted = device.type == "cuda" if cfg.channels_last == "auto" else cfg.channels_last == "on"
    return wanted and has_conv


def apply(model: nn.Module, method, cfg: TrainConfig, device: torch.device,
          bundle: DataBundle | None = None) -> dict[str, object]:
    """Switch the model, the method and the data to the configured fast path; returns what is on."""
    amp = uses_amp(cfg, device)
    if amp:
        method.autocast = functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    channels_last = uses_channels_last(cfg, device, model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if bundle is not None:  # index slices of an NHWC tensor stay NHWC: convert once, not per step
            for split in (bundle.train, bundle.val, bundle.test):
                if split.x.dim() == 4:
                    split.x = split.x.contiguous(memory_format=torch.channels_last)
    if cfg.compile:
        if getattr(method, "layerwise", False):
            raise ConfigError("train.compile compiles the summed loss; the layer-wise step backpropagates "
                              "inside the step. Set train.layerwise=false or train.compile=false")
        mode = cfg.compile_mode if cfg.compile_backend == "inductor" and cfg.compile_mode != "default" else None
        method.losses = torch.compile(method.losses, backend=cfg.compile_backend, mode=mode)
    return {"amp": "bf16" if amp else "off", "channels_last": channels_last,
            "compile": f"{cfg.compile_backend}/{cfg.compile_mode}" if cfg.compile else "off"}
