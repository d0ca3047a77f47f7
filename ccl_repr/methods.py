"""Learning rules over the same dual network, and the optimiser step they share.

- :class:`CCL`: every layer's input detached; layer-pair losses between F and G plus
  cross-entropy on F's output (classifier) or MSE at every pair (autoencoder). One
  ``backward()`` over the sum updates all layers, yet each gradient is local (spec §3).
- :class:`Backprop`: detaches off; the task loss on F's output only; G is unused.

:class:`Optimizers` owns one SGD per network (forward, feedback), warm-up/cosine schedules,
gradient centralisation and per-network or per-layer grad-norm clipping.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import Config, LossConfig, NetOptimConfig, OptimConfig
from .losses import (ae_pair_loss, classification_pair_loss, flooding_mask, match_matrix)
from .models import DualNetwork


class CCL:
    name = "ccl"

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg

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
                                                                   inner=0 < l < last)
            return out
        assert model.num_classes is not None
        logits = a[-1]
        y_match = match_matrix(y, model.num_classes, y if cfg.targets == "samples" else None)
        mask = flooding_mask(logits, y, cfg.flooding) if cfg.flooding > 0 else None
        for l in model.pair_indices(include_output=False):
            al = a[l] if mask is None else a[l] * mask.view(-1, *([1] * (a[l].dim() - 1)))
            out[f"pair/{model.layer_names[l]}"] = classification_pair_loss(
                al, b[l], y_match, form=cfg.form, scale=cfg.scale, anti_collapse=cfg.anti_collapse)
        # The output layer U_L is trained by the task loss on a_L; its input is detached too.
        out["ce"] = F.cross_entropy(logits, y)
        return out


class Backprop:
    name = "bp"

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg

    def prepare(self, model: DualNetwork) -> None:
        model.set_detach(False)

    def losses(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        out = model(x)
        if model.task == "reconstruct":
            return {"mse": F.mse_loss(out, x)}
        return {"ce": F.cross_entropy(out, y)}


METHODS = {"ccl": CCL, "bp": Backprop}


def make_method(cfg: Config) -> CCL | Backprop:
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


class Optimizers:
    """One SGD per network with its own lr, momentum, weight decay and clipping (spec §4)."""

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
            opt = torch.optim.SGD(params, lr=ncfg.lr, momentum=ncfg.momentum, weight_decay=ncfg.weight_decay)
            ratio = cfg.min_lr / ncfg.lr if ncfg.lr > 0 else 0.0
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, r=ratio: lr_factor(
                s, total=total_steps, warmup=cfg.warmup_steps, schedule=cfg.schedule, min_ratio=min(1.0, r)))
            self.nets[net] = (ncfg, opt, sched)

    def zero_grad(self) -> None:
        for _, opt, _ in self.nets.values():
            opt.zero_grad(set_to_none=True)

    def clip_and_step(self) -> None:
        for net, (ncfg, opt, sched) in self.nets.items():
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
