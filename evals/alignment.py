"""Learning-rule diagnostics per layer: weight alignment and the angle between the rule's own
update and backprop. Both read the rule given (the run's own, or the training loop's): never
another rule's update in its place.

Weight alignment: cosine between the forward weight U_l and the weight the rule sends the signal
down through in U_l's place, :meth:`LearningRule.feedback_weights` (in U_l's layout),
cos = <U_l, W_l>_F / (||U_l|| ||W_l||).
- CCL: W_l = V_l^T (the paper's analysis of U_l vs V_l^T over training). Linear layers: the plain
  transpose. Conv layers: the kernel of V_l's adjoint (channels swapped, kernel flipped); exact
  for a stride-1 'same' conv, while the resampling around the conv (stride 2, max-pool, nearest
  upsampling) is ignored, so the number compares kernels only
  (:func:`ccl_repr.rules.ccl.transposed_feedback_weight`).
- A rule whose feedback_weights() is None has no per-layer feedback weight of U_l's shape, and
  weight alignment is not applicable (None, never a stand-in): BP (it transports U_l itself),
  DFA and DRTP (a C x d_l projection straight from the output, no U_l to align with).

Update-vs-backprop angle: on one batch, the rule's own update -- the ``.grad`` its
``backward(model, x, y)`` accumulates on each layer's forward parameters, with its stop-gradients
and its own mechanism (e.g. feedback alignment's backward hooks, which its losses alone would not
reproduce through autograd) -- against the gradient of the task loss with detaches off (true
backprop: cross-entropy, or MSE of the reconstruction); the angle in degrees between the two.
Raw gradients: no clipping (it rescales but does not turn a layer's gradient), no
centralisation, no momentum. For CCL (and the direct-feedback rules) the output layer's angle is
0 by construction (both are the task-loss gradient there); for BP every angle is 0.

:class:`DiagnosticsHook` returns both every N steps from ``ccl_repr.train.train(hooks=...)``,
so they land in ``diagnostics.jsonl``; default every 100 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ccl_repr.config import LossConfig
from ccl_repr.models import DualNetwork
from ccl_repr.rules import Backprop, LearningRule
from ccl_repr.rules.ccl import transposed_feedback_weight  # noqa: F401  (re-exported: evals.alignment's name)

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


@torch.no_grad()
def weight_alignment(model: DualNetwork, *, rule: LearningRule) -> dict[str, float] | None:
    """{layer name: cos(U_l, W_l)} for every layer the rule gives a feedback weight W_l
    (:meth:`LearningRule.feedback_weights`: V_l^T for CCL); None when the rule has none
    (BP, DFA, DRTP: not applicable, see the module docstring)."""
    feedback = rule.feedback_weights(model)
    if feedback is None:
        return None
    out = {}
    for name, u, _ in _projection_layers(model):
        if name not in feedback:
            continue
        w = feedback[name]
        if w.shape != u.weight.shape:
            raise EvalError(f"layer {name}: U {tuple(u.weight.shape)} and the {rule.name} feedback weight "
                            f"{tuple(w.shape)} differ in shape; feedback_weights() must give U_l's layout")
        a = u.weight.flatten().double()
        b = w.flatten().double().to(a.device)
        denom = a.norm() * b.norm()
        out[name] = float(a @ b / denom) if denom > 0 else 0.0
    return out


def _flat_forward(model: DualNetwork, grads: dict[torch.nn.Parameter, Tensor | None]) -> dict[str, Tensor]:
    """{layer name: its forward parameters' gradients, flattened and concatenated} (None as zeros)."""
    out = {}
    for name, ps in model.parameter_groups("forward"):
        gs = [grads.get(p) for p in ps]
        out[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for p, g in zip(ps, gs)])
    return out


def rule_update(model: DualNetwork, x: Tensor, y: Tensor, *, rule: LearningRule) -> dict[str, Tensor]:
    """{layer name: the rule's own update on its forward parameters}: what ``rule.backward``
    accumulates into ``.grad`` on this batch, with the rule's stop-gradients switched on. Every
    parameter's ``.grad`` is set aside first and put back after, so a training step's gradients
    are untouched (the rule must already be prepared on ``model``: its own state is used as is)."""
    params = list(model.parameters())
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        model.set_detach(rule.detach_inputs)
        rule.backward(model, x, y)
        return _flat_forward(model, {p: p.grad for p in params})
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def backprop_update(model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """{layer name: the gradient of the task loss with every stop-gradient off} (true backprop);
    through autograd.grad, so no ``.grad`` is touched."""
    model.set_detach(False)
    params = model.network_parameters("forward")
    loss = sum(Backprop(LossConfig()).losses(model, x, y).values())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return _flat_forward(model, dict(zip(params, grads)))


def angle_degrees(a: Tensor, b: Tensor) -> float | None:
    """The angle between two vectors in degrees; None when one is zero (e.g. backprop through the
    published AE init, whose outermost decoder weights are zero), so eval.json stays strict JSON."""
    a, b = a.double(), b.double().to(a.device)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return None
    # 2·atan2(|â - b̂|, |â + b̂|) in float64: acos of a cosine near 1 loses the small angles.
    ua, ub = a / na, b / nb
    return math.degrees(2 * math.atan2((ua - ub).norm().item(), (ua + ub).norm().item()))


def update_angles(model: DualNetwork, x: Tensor, y: Tensor, *, rule: LearningRule) -> dict[str, float | None]:
    """{layer name: angle in degrees between the rule's own update (:func:`rule_update`) and
    the backprop gradient}. ``rule`` is required and prepared on ``model`` (its fixed state, e.g.
    random feedback matrices, is used as is); for BP itself every angle is 0.

    Leaves the model as it found it: detach switches, train/eval mode, batch-norm running
    statistics and every parameter's ``.grad`` are restored."""
    detach = {m: m.detach for m in model.layers}
    modes = {m: m.training for m in model.modules()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    try:
        g_rule = rule_update(model, x, y, rule=rule)
        g_bp = backprop_update(model, x, y)
    finally:
        for m, flag in detach.items():
            m.detach = flag
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    return {name: angle_degrees(g, g_bp[name]) for name, g in g_rule.items()}


@dataclass
class DiagnosticsHook:
    """Training hook (``hook(step=, epoch=, model=, x=, y=, method=)``, ``method`` the training
    rule): every ``every`` steps returns ``{"align/<layer>": cos(U_l, W_l) (only for a rule with
    feedback weights, e.g. W_l = V_l^T for CCL), "angle/<layer>": degrees between the rule's own
    update and backprop, "cka/<layer>": CKA(a_l, b_l)}`` for diagnostics.jsonl (CKA in eval mode
    on the step's batch)."""
    every: int = EVERY
    alignment: bool = True
    angles: bool = True
    cka: bool = True  # linear CKA(a_l, b_l) of each layer pair on the step's batch (evals.cka)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise EvalError(f"diagnostics every {self.every} steps: use a positive number of steps")

    def __call__(self, *, step: int, epoch: int, model: DualNetwork, x: Tensor, y: Tensor,
                 method: LearningRule) -> dict | None:
        if step % self.every:
            return None
        record: dict[str, float | None] = {}
        if self.alignment:
            record.update({f"align/{k}": v for k, v in (weight_alignment(model, rule=method) or {}).items()})
        if self.angles:
            record.update({f"angle/{k}": v for k, v in update_angles(model, x, y, rule=method).items()})
        if self.cka and "feedback" in method.trains:  # a_l vs b_l means something only when G learns
            layers = list(range(1, len(model.layer_names)))
            a = extract(model, x, layers=layers)
            b = extract(model, x, y=y, layers=layers, network="feedback")
            record.update({f"cka/{model.layer_names[i]}": linear_cka(a[i], b[i]) for i in layers})
        return record
