"""The optimiser step every learning rule shares.

:class:`Optimizers` owns one SGD per trained network (forward, feedback), warm-up (of the
learning rate, or of the loss as in the published code) and cosine schedules, gradient
centralisation and per-network or per-layer grad-norm clipping.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import NetOptimConfig, OptimConfig
from .network import DualNetwork


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
    """One SGD per trained network with its own lr, momentum, weight decay and clipping (the
    paper's training settings; docs/fidelity.md). ``networks`` are the ones the learning rule
    trains (its ``trains``): the others get no optimiser, so nothing steps them."""

    def __init__(self, model: DualNetwork, cfg: OptimConfig, *, total_steps: int,
                 networks: tuple[str, ...] = ("forward", "feedback")) -> None:
        self.model, self.cfg = model, cfg
        self.nets: dict[str, tuple[NetOptimConfig, torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]] = {}
        self.groups: dict[str, list[tuple[str, list[torch.nn.Parameter]]]] = {}
        self.params: dict[str, list[torch.nn.Parameter]] = {}
        for net in networks:
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
        for net in self.nets:  # every network's gradients ready before any clip (each net's are its own)
            self.condition(net)
        for net, (ncfg, opt, sched) in self.nets.items():
            if ncfg.clip > 0:
                self.clip(net, ncfg)
            opt.step()
            sched.step()

    def condition(self, net: str) -> None:
        """Loss-mode warm-up scale and gradient centralisation of one network's gradients."""
        # The scheduler's count of steps taken: it resumes with the checkpoint.
        scale = self.gradient_scale(self.nets[net][2].last_epoch)
        if scale != 1.0:
            for p in self.params[net]:
                if p.grad is not None:
                    p.grad.mul_(scale)
        if self.cfg.centralize:
            centralize_gradients(self.params[net])

    def clip(self, net: str, ncfg: NetOptimConfig) -> None:
        """Grad-norm clipping of one network: one norm per layer, or one over the whole network."""
        if ncfg.clip_mode == "layer":
            for _, ps in self.groups[net]:
                torch.nn.utils.clip_grad_norm_(ps, ncfg.clip)
        else:
            torch.nn.utils.clip_grad_norm_(self.params[net], ncfg.clip)

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
