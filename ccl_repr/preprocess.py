"""Raw images -> model inputs, exactly as in training: scale to [0, 1], zero-pad, standardise.

Training turns every dataset into float images in [0, 1], zero-pads them to ``data.pad_to`` and
standardises each channel with the training split's mean and std (:func:`ccl_repr.data.make_bundle`).
A run records those numbers (``model_meta["preprocess"]`` in its checkpoints, ``preprocess.json``
in its folder), so features and predictions of raw images never depend on re-reading the data.

Raw images are uint8 (0..255) or floats in [0, 1], shaped (N, H, W) for one channel or
(N, C, H, W), with the size they had before padding (ImageFolder runs: after ``data.image_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .data import DataBundle, pad_to
from .errors import ShapeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Preprocess:
    raw_shape: tuple[int, ...]  # (C, H, W) of one raw image
    pad_to: int                 # 0 = no padding
    mean: tuple[float, ...]     # per channel, on the [0, 1] scale of the padded images
    std: tuple[float, ...]

    @classmethod
    def from_bundle(cls, bundle: DataBundle, *, pad: int) -> "Preprocess":
        raw = bundle.raw_shape or bundle.input_shape
        return cls(raw_shape=tuple(raw), pad_to=int(pad), mean=tuple(bundle.mean.tolist()),
                   std=tuple(bundle.std.tolist()))

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(raw_shape=tuple(d["raw_shape"]), pad_to=int(d["pad_to"]),
                   mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]))

    def to_dict(self) -> dict:
        return {"raw_shape": list(self.raw_shape), "pad_to": self.pad_to,
                "mean": list(self.mean), "std": list(self.std),
                "scale": "uint8 / 255, or floats already in [0, 1]"}

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1, 1, 1)
        return (torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape),
                torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape))

    def to_unit(self, raw: np.ndarray | Tensor) -> Tensor:
        """Check dtype, range and shape; return (N, C, H, W) float32 in [0, 1] (not yet padded)."""
        return to_unit(raw, self.raw_shape)

    def __call__(self, raw: np.ndarray | Tensor) -> Tensor:
        """Raw images -> standardised model inputs, (N, C, H', W') float32."""
        x = self.to_unit(raw)
        if self.pad_to:
            x = pad_to(x, self.pad_to)
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Model-space images (e.g. an autoencoder's reconstructions) back to [0, 1] pixels,
        with the padding cropped off."""
        mean, std = self._stats(x)
        x = x * std + mean
        h, w = self.raw_shape[1:]
        top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
        return x[..., top:top + h, left:left + w]


def to_unit(raw: np.ndarray | Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """Raw images (uint8 0..255 or floats in [0, 1]; (N, H, W) or (N, C, H, W)) as (N, C, H, W)
    float32 in [0, 1]; ``shape``, when given, is the (C, H, W) they must have."""
    x = torch.as_tensor(np.asarray(raw)) if not isinstance(raw, Tensor) else raw.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)  # as torchvision's ToTensor and ccl_repr.data do
    elif x.dtype in FLOAT_DTYPES:
        x = x.float()
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ShapeError("the images hold NaN or infinite values; pass uint8 0..255 or floats in [0, 1]")
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ShapeError(f"float images must lie in [0, 1], these range over [{float(x.min()):.4g}, "
                             f"{float(x.max()):.4g}]; divide 0..255 pixels by 255 or pass them as uint8")
    else:
        raise ShapeError(f"images of dtype {str(x.dtype).replace('torch.', '')} are not supported; pass uint8 "
                         f"0..255 or floats in [0, 1] (e.g. x.astype('uint8'))")
    if x.dim() == 3 and (shape is None or shape[0] == 1):
        x = x[:, None]
    if shape is None and x.dim() != 4:
        raise ShapeError(f"images of shape {tuple(x.shape)} are neither N x H x W nor N x C x H x W; "
                         f"stack them channels first")
    if shape is not None and (x.dim() != 4 or tuple(x.shape[1:]) != tuple(shape)):
        want = "x".join(map(str, shape))
        layouts = f"N x {want}" + (f" or N x {'x'.join(map(str, shape[1:]))}" if shape[0] == 1 else "")
        raise ShapeError(f"images of shape {tuple(x.shape)} do not fit this model, which was trained on "
                         f"{layouts} images (channels first, before padding); resize or transpose them")
    return x
