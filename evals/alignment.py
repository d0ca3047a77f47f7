"""CCL diagnostics per layer: weight alignment and the angle between the CCL update and backprop.

Weight alignment (the paper's analysis of U_l vs V_l^T over training): cosine between the forward weight U_l and the transposed feedback
weight V_l^T, cos = <U_l, V_l^T>_F / (||U_l|| ||V_l||).
- Linear layers: U_l is (out, in), V_l is (in, out); V_l^T is the plain transpose.
- Conv layers: U_l is (c_out, c_in, k, k), V_l is (c_in, c_out, k, k). V_l^T is taken as the
  kernel of V_l's adjoint (transposed convolution): channels swapped and the kernel flipped in
  both spatial directions. For a stride-1 'same' conv that is exact; the resampling around the
  conv (stride 2, max-pool, nearest upsampling) is ignored, so the number compares kernels only.

Update-vs-backprop angle: on one batch, the gradient of the CCL loss (every input detached,
layer-pair losses + task loss, exactly as the run's method computes it) and the gradient of the
task loss with detaches off (true backprop: cross-entropy, or MSE of the reconstruction) w.r.t.
each layer's forward parameters; the angle in degrees between the two. Raw gradients: no
clipping (it rescales but does not turn a layer's gradient), no centralisation, no momentum.
The output layer's angle is 0 by construction (both are the task-loss gradient there).

:class:`DiagnosticsHook` returns both every N steps from ``ccl_repr.train.train(hooks=...)``,
so they land in ``diagnostics.jsonl``; default every 100 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from ccl_repr.config import LossConfig
from ccl_repr.methods import CCL, Backprop
from ccl_repr.models import DualNetwork

from . import EvalError
from .cka import linear_cka
from .features import extract

EVERY = 100


def _projection_layers(model: DualNetwork) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(layer name, U_l, V_l) for every dual layer that has projections (flatten has none)."""
    out = []
    for i, layer in enumerate(model.layers):
        if layer.has_params:
            u, v = layer.projections()
            out.append((model.layer_names[i + 1], u, v))
    return out


def transposed_feedback_weight(u: Tensor, v: Tensor) -> Tensor:
    """V^T in U's layout: plain transpose for linear, adjoint kernel (swap + flip) for conv."""
    if v.dim() == 2:
        return v.T
    if v.dim() == 4:
        return rearrange(v, "ci co kh kw -> co ci kh kw").flip(-2, -1)
    raise EvalError(f"weight alignment supports linear and 2-D conv weights, got shape {tuple(v.shape)}")


@torch.no_grad()
def weight_alignment(model: DualNetwork) -> dict[str, float]:
    """{layer name: cos(U_l, V_l^T)} for every layer with weights."""
    out = {}
    for name, u, v in _projection_layers(model):
        vt = transposed_feedback_weight(u.weight, v.weight)
        if vt.shape != u.weight.shape:
            raise EvalError(f"layer {name}: U {tuple(u.weight.shape)} and V^T {tuple(vt.shape)} differ in shape")
        a, b = u.weight.flatten().double(), vt.flatten().double()
        denom = a.norm() * b.norm()
        out[name] = float(a @ b / denom) if denom > 0 else 0.0
    return out


def _forward_grads(model: DualNetwork, loss: Tensor) -> dict[str, Tensor]:
    groups = model.parameter_groups("forward")
    params = [p for _, ps in groups for p in ps]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    out, k = {}, 0
    for name, ps in groups:
        gs = [g if g is not None else torch.zeros_like(p) for p, g in zip(ps, grads[k:k + len(ps)])]
        out[name] = torch.cat([g.flatten() for g in gs])
        k += len(ps)
    return out


def update_angles(model: DualNetwork, x: Tensor, y: Tensor, *,
                  method: CCL | Backprop | None = None) -> dict[str, float | None]:
    """{layer name: angle in degrees between the CCL gradient and the backprop gradient}.

    Leaves the model as it found it: detach switches, train/eval mode and batch-norm running
    statistics are restored; parameter ``.grad`` fields are not touched (autograd.grad)."""
    loss_cfg = method.cfg if method is not None else LossConfig()
    ccl = method if isinstance(method, CCL) else CCL(loss_cfg)
    detach = {m: m.detach for m in model.layers}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    try:
        ccl.prepare(model)
        g_ccl = _forward_grads(model, sum(ccl.losses(model, x, y).values()))
        Backprop(loss_cfg).prepare(model)
        g_bp = _forward_grads(model, sum(Backprop(loss_cfg).losses(model, x, y).values()))
    finally:
        for m, flag in detach.items():
            m.detach = flag
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    out: dict[str, float | None] = {}
    for name, a in g_ccl.items():
        a, b = a.double(), g_bp[name].double()
        na, nb = a.norm(), b.norm()
        # No angle when one gradient is zero (e.g. backprop through the published AE init, whose
        # outermost decoder weights are zero): None, so eval.json stays strict JSON.
        if na == 0 or nb == 0:
            out[name] = None
            continue
        # 2·atan2(|â - b̂|, |â + b̂|) in float64: acos of a cosine near 1 loses the small angles.
        ua, ub = a / na, b / nb
        out[name] = math.degrees(2 * math.atan2((ua - ub).norm().item(), (ua + ub).norm().item()))
    return out


@dataclass
class DiagnosticsHook:
    """Training hook (``hook(step=, epoch=, model=, x=, y=, method=)``): every ``every`` steps
    returns ``{"align/<layer>": cos(U_l, V_l^T), "angle/<layer>": degrees, "cka/<layer>":
    CKA(a_l, b_l)}`` for diagnostics.jsonl (CKA in eval mode on the step's batch)."""
    every: int = EVERY
    alignment: bool = True
    angles: bool = True
    cka: bool = True  # linear CKA(a_l, b_l) of each layer pair on the step's batch (evals.cka)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise EvalError(f"diagnostics every {self.every} steps: use a positive number of steps")

    def __call__(self, *, step: int, epoch: int, model: DualNetwork, x: Tensor, y: Tensor,
                 method: CCL | Backprop | None = None) -> dict | None:
        if step % self.every:
            return None
        record: dict[str, float] = {}
        if self.alignment:
            record.update({f"align/{k}": v for k, v in weight_alignment(model).items()})
        if self.angles:
            record.update({f"angle/{k}": v for k, v in update_angles(model, x, y, method=method).items()})
        if self.cka:
            layers = list(range(1, len(model.layer_names)))
            a = extract(model, x, layers=layers)
            b = extract(model, x, y=y, layers=layers, network="feedback")
            record.update({f"cka/{model.layer_names[i]}": linear_cka(a[i], b[i]) for i in layers})
        return record
