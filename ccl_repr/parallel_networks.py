"""The F/G split: the forward network F trains on rank 0 while the feedback network G trains on rank 1.

Launch with torchrun, two processes (gloo on CPU, NCCL on GPUs)::

    torchrun --nproc_per_node=2 -m ccl_repr.cli train ae_mnist --set train.parallel=networks

Why it works: the paper names training F and G in parallel as future work. Every CCL layer's input
is detached (Eq. 2), so the step has two independent halves that meet only in the pair losses:
F's pass a_0..a_L needs nothing from G, and G's pass b_L..b_0 nothing from F. Per step:

1. rank 0 runs F on the batch and rank 1 runs G on its targets (the images, for an autoencoder),
   at the same time;
2. each sends its values, detached, to the other (one message each way: every boundary's tensor
   packed into one buffer);
3. each computes the step's loss terms (:meth:`ccl_repr.rules.ccl.CCL.terms`) with the other
   side's values as constants and backpropagates them. A term's gradient with respect to a does
   not depend on whether b carries a graph, and every parameter belongs to one network, so each
   rank gets exactly the gradients of its network in the single-process step;
4. the autoencoders' local reconstruction terms (``loss.ae_layer_recon``) apply one network's
   layer to the other's values: V_l(a_{l+1}) against a_l, the mirror U_l(b_l) against b_{l+1}.
   Each is computed on the rank that holds that layer, with the received value as a leaf, and
   its gradient with respect to that value goes back to the rank that computed the value: one
   more message each way, so with these terms each rank waits for the other's before stepping.
   The gradient reaches U_l through a_{l+1} (and V_l through b_l) as in one process;
5. each clips and steps its own network. The clip norm is per network, so there is no
   collective in the step, and no delay either. Both ranks run the same schedule (rank 0 keeps
   G's learning rate in step for the metrics rows).

So a 2-rank run computes what single-process CCL computes, with G's fresh values
(``train.feedback_delay=0``, the paper's method), bit for bit on CPU (tests/test_parallel.py).
It suits the autoencoders, whose F and G cost the same: a classifier's G runs on the C class
prototypes, so its rank would sit idle (split the layers instead, ``train.parallel=layers``).
Per-sample targets and flooding need no special case: rank 1 receives F's logits with the rest.

Files, stops and the guard as in :mod:`ccl_repr.parallel`: every rank holds the whole model; at
epoch ends and before checkpoints F's half is broadcast from rank 0 and G's from rank 1; rank 0
writes the run folder, with both ranks' optimiser state in its checkpoint
({"network_parallel": {"ranks"}}); stop requests are agreed, so both ranks stop after the same step.
Resume with the same split. Tested on CPU with gloo only (the exchange is batched, as NCCL needs).

Combined with the layer pipeline or data parallelism: not built. The 2-D grid would nest as in
:mod:`ccl_repr.parallel`: an F group and a G group per data-parallel replica.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import Config, OptimConfig
from .distributed import env_rank
from .errors import CheckpointError, ConfigError
from .network import DualNetwork
from .optim import Optimizers
from .parallel import LayerParallel
from .rules import LearningRule
from .rules.ccl import CCL

NETWORKS = ("forward", "feedback")  # rank 0 trains F, rank 1 trains G


class NetworkParallel(LayerParallel):
    """The group of an F/G split: the losses are gathered as for a layer pipeline; the model is
    whole again after F's half comes from rank 0 and G's from rank 1."""

    def __init__(self, *, rank: int, world_size: int, device: torch.device) -> None:
        super().__init__(rank=rank, world_size=world_size, device=device, blocks=[])

    @torch.no_grad()
    def sync_model(self, model: nn.Module) -> None:
        for layer in model.layers:
            for src, side in enumerate((layer.fwd, layer.fbk)):
                for t in side.state_dict().values():
                    dist.broadcast(t, src=src)


class NetworkOptimizers(Optimizers):
    """Both networks' schedules, but only this rank's network is conditioned, clipped and stepped."""

    def __init__(self, model: DualNetwork, cfg: OptimConfig, *, total_steps: int, rank: int) -> None:
        super().__init__(model, cfg, total_steps=total_steps, networks=NETWORKS)
        self.own, self.rank = NETWORKS[rank], rank

    def clip_and_step(self) -> None:
        ncfg = self.nets[self.own][0]
        self.condition(self.own)
        if ncfg.clip > 0:
            self.clip(self.own, ncfg)
        for _, opt, sched in self.nets.values():
            opt.step()  # the other network has no gradients on this rank: SGD skips it, its schedule keeps pace
            sched.step()

    def state_dict(self) -> dict:
        ranks: list[dict | None] = [None] * len(NETWORKS)
        dist.all_gather_object(ranks, super().state_dict())
        return {"network_parallel": {"ranks": ranks}}

    def load_state_dict(self, state: dict) -> None:
        split = state.get("network_parallel")
        if split is None:
            raise CheckpointError("the checkpoint's optimiser state was saved by another layout, not the F/G split; "
                                  "resume with the run's own train.parallel")
        super().load_state_dict(split["ranks"][self.rank])


class NetworkStage(LearningRule):
    """One rank's half of a CCL step: F's (rank 0) or G's (rank 1); see the module docstring."""

    name, tasks, trains, detach_inputs = "ccl", ("classify", "reconstruct"), NETWORKS, True

    def __init__(self, rule: CCL, *, rank: int, device: torch.device) -> None:
        self.rule, self.rank, self.device = rule, rank, device
        self.autocast = rule.autocast
        self.sent: list[dist.Work] = []

    def losses(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        raise ConfigError("train.parallel=networks: a rank's losses exist only inside its training step")

    def backward(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        target = model.feedback_input(x, y, targets=self.rule.cfg.targets)
        n = len(model.layers)
        rows = {"a": x.shape[0], "b": target.shape[0]}
        with self.autocast():
            if self.rank == 0:
                a = model.forward_intermediates(x)
                b = [*self._exchange(model, a[1:], rows["b"], range(n)), target]
            else:
                b = self.rule.feedback_values(model, x, y)
                a = [x, *self._exchange(model, b[:-1], rows["a"], range(1, n + 1))]
            out = self.rule.terms(model, a, b, y, recon=False)
            cross, leaves = self._cross_terms(model, a, b)
        if cross:
            torch.autograd.backward(list(cross.values()))
        own = self._own_reconstructed(model, a, b)
        grads = self._exchange_grads([leaf.grad for leaf in leaves], [v.shape for v in own])
        roots = [v for v in out.values() if v.requires_grad]
        torch.autograd.backward([*roots, *own], [None] * len(roots) + [g.to(v.dtype) for g, v in zip(grads, own)])
        return {k: v.detach() for k, v in {**out, **cross}.items()}

    def _cross_terms(self, model: DualNetwork, a: list[Tensor], b: list[Tensor]) -> tuple[dict[str, Tensor], list[Tensor]]:
        """The local reconstruction terms (``loss.ae_layer_recon``) that apply this rank's layers to
        the other network's values: on rank 1, V_i(a_{i+1}) against a_i (``recon/NAME``); on rank 0,
        U_i(b_i) against b_{i+1} (``recon_g/NAME``). Each received value enters as a leaf, whose
        gradient goes back to the rank that computed it (:meth:`_exchange_grads`)."""
        rule, terms, leaves = self.rule, {}, []
        for i in rule.reconstruction_layers(model, NETWORKS[1 - self.rank]):
            leaf = (a[i + 1] if self.rank else b[i]).detach().requires_grad_()
            x_in = a[i] if self.rank else b[i + 1]
            terms.update(rule.reconstruction_terms(model, i, x_in, leaf, NETWORKS[1 - self.rank]))
            leaves.append(leaf)
        return terms, leaves

    def _own_reconstructed(self, model: DualNetwork, a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
        """This rank's values (with their graphs) that the other rank's reconstruction terms read."""
        layers = self.rule.reconstruction_layers(model, NETWORKS[self.rank])
        return [a[i + 1] for i in layers] if self.rank == 0 else [b[i] for i in layers]

    def _exchange_grads(self, mine: list[Tensor], shapes: list[torch.Size]) -> list[Tensor]:
        """Send the gradients of the terms computed here with respect to the other rank's values,
        and receive those of the other rank's terms with respect to this rank's: the one message
        each way the reconstruction terms add to a step (none without them)."""
        peer, ops = 1 - self.rank, []
        buf = torch.empty(sum(math.prod(s) for s in shapes), device=self.device)
        if mine:
            ops.append(dist.P2POp(dist.isend, _pack(mine), peer))
        if shapes:
            ops.append(dist.P2POp(dist.irecv, buf, peer))
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()
        return [part.view(s) for part, s in zip(buf.split([math.prod(s) for s in shapes]), shapes)]

    def _exchange(self, model: DualNetwork, mine: list[Tensor], rows: int, indices: range) -> list[Tensor]:
        """Send this rank's values and receive the other's (boundaries ``indices``, ``rows`` each),
        as one batched pair of point-to-point operations: NCCL would deadlock on two blocking
        sends that wait for each other's receives."""
        shapes = [(rows, *model.shapes[j]) for j in indices]
        buf = torch.empty(sum(math.prod(s) for s in shapes), device=self.device)
        peer = 1 - self.rank
        send, recv = dist.batch_isend_irecv([dist.P2POp(dist.isend, _pack(mine), peer),
                                             dist.P2POp(dist.irecv, buf, peer)])
        recv.wait()
        self.sent.append(send)
        return [part.view(s) for part, s in zip(buf.split([math.prod(s) for s in shapes]), shapes)]

    def end_step(self) -> None:
        for work in self.sent:
            work.wait()
        self.sent = []

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise CheckpointError(f"the checkpoint holds CCL state {sorted(state)}; the F/G split keeps none: "
                                  "resume with the run's own config")


def _pack(values: list[Tensor]) -> Tensor:
    """Every value, detached, in one float32 buffer: one message per step and direction."""
    return torch.cat([v.detach().float().reshape(-1) for v in values])


def network_parallel(cfg: Config, model: DualNetwork, rule: LearningRule, device: torch.device, *,
                     total_steps: int) -> tuple[NetworkParallel, NetworkStage, NetworkOptimizers]:
    """This rank's group, half-step and optimisers for ``cfg.train.parallel=networks``."""
    assert isinstance(rule, CCL) and rule.feedback_delay == 0
    rank = env_rank()
    group = NetworkParallel(rank=rank, world_size=len(NETWORKS), device=device)
    return group, NetworkStage(rule, rank=rank, device=device), NetworkOptimizers(
        model, cfg.optim, total_steps=total_steps, rank=rank)
