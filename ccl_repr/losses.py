"""Layer-pair losses of CCL (the paper's Eq. 2 and its published code; docs/fidelity.md). Pure functions of tensors: no layers, no training.

Classification pairs compare the forward activations A = a_l (N x d) with the feedback
activations B = b_l (C x d prototypes, or N x d per-sample) through the similarity S = A B^T,
regressed onto the label-match matrix Y. Autoencoder pairs are plain (optionally weighted) MSE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor


def match_matrix(labels: Tensor, num_classes: int, feedback_labels: Tensor | None = None) -> Tensor:
    """Y: Y[i, j] = 1 if sample i's label equals column j's label (columns = prototypes by default)."""
    cols = torch.arange(num_classes, device=labels.device) if feedback_labels is None else feedback_labels
    return (labels[:, None] == cols[None, :]).float()


def prototype_pair_loss(a: Tensor, b: Tensor, y: Tensor, *, scale: float) -> Tensor:
    """Published MLP form: mean((A B^T - Y)^2) / d * scale, unnormalised (scale = 0.5 * 256)."""
    a, b = a.flatten(1), b.flatten(1)
    s = a @ b.T
    return F.mse_loss(s, y) / a.shape[1] * scale


def normalized_pair_loss(a: Tensor, b: Tensor, y: Tensor, *, scale: float, anti_collapse: float) -> Tensor:
    """Paper Eq. 2 (rows of A and B at unit L2 norm) plus the published CNN anti-collapse terms
    anti_collapse * [mean((Â Â^T - I)^2) + mean((B̂ B̂^T - I)^2)]."""
    a_hat = F.normalize(a.flatten(1), dim=1, eps=1e-8)
    b_hat = F.normalize(b.flatten(1), dim=1, eps=1e-8)
    loss = F.mse_loss(a_hat @ b_hat.T, y) * scale
    if anti_collapse > 0:
        loss = loss + anti_collapse * (gram_to_identity(a_hat) + gram_to_identity(b_hat))
    return loss


def gram_to_identity(rows: Tensor) -> Tensor:
    """mean((R R^T - I)^2) for rows already at unit norm: the published anti-collapse term."""
    eye = torch.eye(rows.shape[0], device=rows.device, dtype=rows.dtype)
    return F.mse_loss(rows @ rows.T, eye)


def classification_pair_loss(a: Tensor, b: Tensor, y: Tensor, *, form: str, scale: float,
                             anti_collapse: float) -> Tensor:
    if form == "prototype":
        return prototype_pair_loss(a, b, y, scale=scale)
    if form == "normalized":
        return normalized_pair_loss(a, b, y, scale=scale, anti_collapse=anti_collapse)
    raise ValueError(f"unknown loss form {form!r}")


def flooding_mask(logits: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """1 for samples still to learn, 0 for those whose true-class probability is within
    ``threshold`` of 1, i.e. 1 - p < threshold (the paper's 'flooding'; the published code masks
    with a hard-coded margin of 0.1: p > 0.9). Computed without gradient."""
    with torch.no_grad():
        p_true = logits.float().softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
        return (1.0 - p_true >= threshold).to(logits.dtype)


def masked_cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    if mask is None:
        return F.cross_entropy(logits, labels)
    per = F.cross_entropy(logits, labels, reduction="none")
    return (per * mask).sum() / mask.sum().clamp_min(1.0)


def ae_pair_loss(a: Tensor, b: Tensor, *, form: str = "mse", inner: bool = False,
                 anti_collapse: float = 0.0) -> Tensor:
    """Autoencoder pair loss. ``mse``: plain MSE. ``weighted`` (published conv-AE code): MSE times
    the feature map's height H, plus for inner pairs an MSE between the maps after centring each
    channel over space and L2-normalising over space, also times H.

    ``anti_collapse`` > 0 adds, on inner pairs, the published CNN's anti-collapse term to each
    side (the paper's / its code: mean((Â Â^T - I)^2)), on codes centred over the batch first (ReLU
    codes are non-negative: uncentred, orthogonal rows would need disjoint supports). Without
    it, an MSE between two batch-normed codes is smallest when every unit of both codes follows
    the same few directions that F and G agree on most easily, and the codes lose the image
    (docs/results_ae.md). Each term depends on one side's code only, so it trains that side's
    layer alone: the update stays local."""
    loss = _ae_pair_mse(a, b, form=form, inner=inner)
    if inner and anti_collapse > 0:
        def spread(t: Tensor) -> Tensor:
            flat = t.flatten(1)
            return gram_to_identity(F.normalize(flat - flat.mean(0, keepdim=True), dim=1, eps=1e-8))
        loss = loss + anti_collapse * (spread(a) + spread(b))
    return loss


def _ae_pair_mse(a: Tensor, b: Tensor, *, form: str, inner: bool) -> Tensor:
    if form == "mse":
        return F.mse_loss(a, b)
    if form != "weighted":
        raise ValueError(f"unknown AE loss form {form!r}")
    h = a.shape[2] if a.dim() == 4 else 1
    loss = F.mse_loss(a, b) * h
    if inner and a.dim() == 4:
        def spatial_norm(t: Tensor) -> Tensor:
            t = t - reduce(t, "b c h w -> b c 1 1", "mean")
            flat = rearrange(t, "b c h w -> b c (h w)")
            return F.normalize(flat, dim=2, eps=1e-8)
        loss = loss + F.mse_loss(spatial_norm(a), spatial_norm(b)) * h
    return loss
