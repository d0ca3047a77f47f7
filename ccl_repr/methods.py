"""Learning rules over the same dual network, and the optimiser step they share.

- :class:`CCL`: every layer's input detached; layer-pair losses between F and G plus
  cross-entropy on F's output (classifier) or MSE at every pair (autoencoder). One
  ``backward()`` over the sum updates all layers, yet each gradient is local (the paper's method, Eq. 2: every layer's input detached).
- :class:`Backprop`: detaches off; the task loss on F's output only; G is unused.

``method.backward(model, x, y)`` computes the losses *and* their gradients and returns the
losses detached; the train loop then reduces gradients across ranks (DDP) and steps. With
``layerwise=True`` CCL backpropagates each pair loss as soon as the pair exists, so the forward
network's activations are freed layer by layer and peak memory stays flat in depth.

:class:`Optimizers` owns one SGD per network (forward, feedback), warm-up (of the learning
rate, or of the loss as in the published code) and cosine schedules, gradient centralisation
and per-network or per-layer grad-norm clipping.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import Config, LossConfig, NetOptimConfig, OptimConfig
from .errors import ConfigError
from .losses import (ae_pair_loss, classification_pair_loss, flooding_mask, match_matrix)
from .models import DualNetwork


class CCL:
    name = "ccl"

    def __init__(self, cfg: LossConfig, *, layerwise: bool = False) -> None:
        self.cfg, self.layerwise = cfg, layerwise
        # Set by the fast path (ccl_repr.fastpath) to bf16 autocast on CUDA; wraps forward work only.
        self.autocast: Callable[[], ContextManager] = contextlib.nullcontext

    def prepare(self, model: DualNetwork) -> None:
        model.set_detach(True)

    def losses(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        cfg = self.cfg
        a = model.forward_intermediates(x)
        b = model.feedback_intermediates(model.feedback_input(x, y, targets=cfg.targets))
        out: dict[str, Tensor] = {}
        if model.task == "reconstruct":
            last = len(model.layers)
            for l in model.pair_indices(include_output=True):
                out[f"pair/{model.layer_names[l]}"] = ae_pair_loss(a[l], b[l], form=cfg.ae_form,
                                                                   inner=0 < l < last,
                                                                   anti_collapse=cfg.ae_anti_collapse)
            return out
        assert model.num_classes is not None
        logits = a[-1]
        y_match = match_matrix(y, model.num_classes, y if cfg.targets == "samples" else None)
        mask = flooding_mask(logits, y, cfg.flooding) if cfg.flooding > 0 else None
        for l in model.pair_indices(include_output=False):
            out[f"pair/{model.layer_names[l]}"] = self._class_pair(a[l], b[l], y_match, mask)
        # The output layer U_L is trained by the task loss on a_L; its input is detached too.
        out["ce"] = F.cross_entropy(logits, y)
        return out

    def _class_pair(self, a: Tensor, b: Tensor, y_match: Tensor, mask: Tensor | None) -> Tensor:
        cfg = self.cfg
        a = a if mask is None else a * mask.view(-1, *([1] * (a.dim() - 1)))
        return classification_pair_loss(a, b, y_match, form=cfg.form, scale=cfg.scale,
                                        anti_collapse=cfg.anti_collapse)

    def backward(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Losses and their gradients (accumulated into ``.grad``); returns the losses detached."""
        if self.layerwise:
            return self._layerwise_backward(model, x, y)
        return summed_backward(self, model, x, y)

    def _layerwise_backward(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The summed step's gradients with memory flat in depth.

        F runs bottom-up and G top-down, so one network's values must wait for the other: G's
        are kept, as values without graphs (with prototype targets each b_l is only C x d). F is
        walked bottom-up; at each pair, b_l's one feedback layer is rebuilt with its graph and the
        pair loss is backpropagated at once, which frees a_l's and b_l's graphs before a_{l+1}
        is built. Every parameter receives gradient from exactly one loss term (all inputs are
        detached: the paper's method), so the accumulated gradients equal those of ``sum(losses).backward()``.
        Costs: G's forward twice (C x d rows with prototypes: negligible; a second G pass for
        per-sample targets and autoencoders), and with flooding one gradient-free forward of F
        for the mask, which needs the final logits before the first pair."""
        cfg, n = self.cfg, len(model.layers)
        reconstruct = model.task == "reconstruct"
        pairs = set(model.pair_indices(include_output=reconstruct))
        with torch.no_grad(), self.autocast():
            b = model.feedback_intermediates(model.feedback_input(x, y, targets=cfg.targets))
        model.check_input(x)
        y_match = mask = None
        if not reconstruct:
            assert model.num_classes is not None
            y_match = match_matrix(y, model.num_classes, y if cfg.targets == "samples" else None)
            if cfg.flooding > 0:
                with torch.no_grad(), self.autocast():
                    mask = flooding_mask(model(x), y, cfg.flooding)
        out: dict[str, Tensor] = {}

        def apply(key: str, loss: Tensor) -> None:
            if loss.requires_grad:
                loss.backward()
            out[key] = loss.detach()

        a = x
        for l in range(n + 1):
            if l > 0:
                with self.autocast():
                    a = model.layers[l - 1](a)
            if l not in pairs:
                continue
            with self.autocast():
                bl = _feedback_with_graph(model, b, l)
                loss = (ae_pair_loss(a, bl, form=cfg.ae_form, inner=0 < l < n,
                                     anti_collapse=cfg.ae_anti_collapse) if reconstruct
                        else self._class_pair(a, bl, y_match, mask))
            apply(f"pair/{model.layer_names[l]}", loss)
        if not reconstruct:
            with self.autocast():
                loss = F.cross_entropy(a, y)
            apply("ce", loss)
        return out


def _feedback_with_graph(model: DualNetwork, b: list[Tensor], l: int) -> Tensor:
    """b_l rebuilt with the graph that its pair loss trains, from the stored value above it.
    Parameter-free layers (flatten) do not detach, so the rebuild starts above them."""
    n = len(model.layers)
    if l == n:
        return b[n]  # the target: no parameters above it
    k = l + 1
    while k < n and not model.layers[k - 1].detach:
        k += 1
    t = b[k]
    for j in range(k - 1, l - 1, -1):
        t = model.layers[j].feedback(t)
    return t


class Backprop:
    name = "bp"

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg

    def prepare(self, model: DualNetwork) -> None:
        model.set_detach(False)

    autocast: Callable[[], ContextManager] = contextlib.nullcontext

    def backward(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return summed_backward(self, model, x, y)

    def losses(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        out = model(x)
        if model.task == "reconstruct":
            return {"mse": F.mse_loss(out, x)}
        return {"ce": F.cross_entropy(out, y)}


METHODS = {"ccl": CCL, "bp": Backprop}


def summed_backward(method: CCL | Backprop, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """One backward pass from all the losses at once (forward work under the method's autocast):
    the gradients of sum(losses).backward(), without building the graph of the sum."""
    with method.autocast():
        losses = method.losses(model, x, y)
    torch.autograd.backward([v for v in losses.values() if v.requires_grad])
    return {k: v.detach() for k, v in losses.items()}


def make_method(cfg: Config) -> CCL | Backprop:
    layerwise = getattr(cfg.train, "layerwise", False)
    if cfg.method == "ccl":
        return CCL(cfg.loss, layerwise=layerwise)
    if layerwise:
        raise ConfigError("train.layerwise applies to CCL only (backprop has one global backward pass); "
                          "set it under the recipe's ccl: section or drop it for --method bp")
    return METHODS[cfg.method](cfg.loss)


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to ``min_ratio``."""
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        progress = min(1.0, max(0, step - warmup) / max(1, total - warmup))
        f *= min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def centralize_gradients(params: list[torch.nn.Parameter]) -> None:
    """Gradient centralisation: subtract from each weight gradient its mean over all but the
    first (output) dimension. Biases and norm parameters (1-D) are left alone."""
    for p in params:
        if p.grad is not None and p.grad.dim() > 1:
            p.grad.sub_(p.grad.mean(dim=tuple(range(1, p.grad.dim())), keepdim=True))


def make_sgd(params: list[torch.nn.Parameter], **hyper: float) -> torch.optim.SGD:
    """SGD with its fused kernel where this torch and device have one (one pass over parameter,
    gradient and momentum buffer instead of one per operation; CPU needs torch >= 2.4), else the
    multi-tensor (foreach) implementation. Same update either way."""
    try:
        return torch.optim.SGD(params, fused=True, **hyper)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(params, foreach=True, **hyper)


class Optimizers:
    """One SGD per network with its own lr, momentum, weight decay and clipping (the paper's training settings; docs/fidelity.md)."""

    def __init__(self, model: DualNetwork, cfg: OptimConfig, *, total_steps: int) -> None:
        self.model, self.cfg = model, cfg
        self.nets: dict[str, tuple[NetOptimConfig, torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]] = {}
        self.groups: dict[str, list[tuple[str, list[torch.nn.Parameter]]]] = {}
        self.params: dict[str, list[torch.nn.Parameter]] = {}
        for net in ("forward", "feedback"):
            ncfg: NetOptimConfig = getattr(cfg, net)
            self.groups[net] = model.parameter_groups(net)
            params = self.params[net] = [p for _, ps in self.groups[net] for p in ps]
            if not params:
                continue
            opt = make_sgd(params, lr=ncfg.lr, momentum=ncfg.momentum, weight_decay=ncfg.weight_decay)
            ratio = cfg.min_lr / ncfg.lr if ncfg.lr > 0 else 0.0
            # Loss-mode warm-up leaves the learning rate alone: the cosine then spans every step
            # from the first, as the published per-epoch cosine does.
            lr_warmup = cfg.warmup_steps if cfg.warmup_mode == "lr" else 0
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, r=ratio: lr_factor(
                s, total=total_steps, warmup=lr_warmup, schedule=cfg.schedule, min_ratio=min(1.0, r)))
            self.nets[net] = (ncfg, opt, sched)

    def zero_grad(self) -> None:
        for _, opt, _ in self.nets.values():
            opt.zero_grad(set_to_none=True)

    def gradient_scale(self, step: int) -> float:
        """Loss-mode warm-up (published code): the loss of step ``step`` (0-based) is multiplied by
        (step+1)/warmup_steps, so its gradients are, before centralisation and clipping. A clip that
        binds undoes it; the momentum buffer takes the scaled gradient, weight decay is not scaled.
        1.0 in lr mode."""
        warmup = self.cfg.warmup_steps
        if self.cfg.warmup_mode != "loss" or warmup <= 0:
            return 1.0
        return min(1.0, (step + 1) / warmup)

    def clip_and_step(self) -> None:
        for net, (ncfg, opt, sched) in self.nets.items():
            scale = self.gradient_scale(sched.last_epoch)  # the scheduler's count of steps taken: resumes with it
            if scale != 1.0:
                for p in self.params[net]:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            if self.cfg.centralize:
                centralize_gradients(self.params[net])
            if ncfg.clip > 0:
                if ncfg.clip_mode == "layer":
                    for _, ps in self.groups[net]:
                        torch.nn.utils.clip_grad_norm_(ps, ncfg.clip)
                else:
                    torch.nn.utils.clip_grad_norm_(self.params[net], ncfg.clip)
            opt.step()
            sched.step()

    def step(self, loss: Tensor) -> None:
        self.zero_grad()
        loss.backward()
        self.clip_and_step()

    def lrs(self) -> dict[str, float]:
        return {net: opt.param_groups[0]["lr"] for net, (_, opt, _) in self.nets.items()}

    def state_dict(self) -> dict:
        return {net: {"opt": opt.state_dict(), "sched": sched.state_dict()}
                for net, (_, opt, sched) in self.nets.items()}

    def load_state_dict(self, state: dict) -> None:
        for net, (_, opt, sched) in self.nets.items():
            opt.load_state_dict(state[net]["opt"])
            sched.load_state_dict(state[net]["sched"])
