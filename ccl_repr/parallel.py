"""Model-parallel CCL: each rank trains a contiguous block of layers, with no backward locking.

Launch with torchrun, one process per worker (gloo on CPU, NCCL on GPUs)::

    torchrun --nproc_per_node=2 -m ccl_repr.cli train mlp_mnist \\
        --set train.parallel=layers --set train.feedback_delay=1

Why it works: every CCL layer's input is detached (the paper's method, Eq. 2), so layer l's
update needs only its own input a_{l-1} and the feedback value b_l at its boundary, never a
gradient from above. The paper names training F and G in parallel as future work; this is one
way. Rank k owns layers lo..hi-1 (F's U_l and G's V_l of those layers), their optimiser state
and their pair losses. Per step t:

1. G, top-down through the block, with delayed feedback (:class:`ccl_repr.rules.ccl.CCL`,
   ``train.feedback_delay=1``): each layer reads b_{j+1} of step t-1 (the top rank starts from
   the class prototypes), so rank k needs nothing from above to start; it sends b_lo^(t)
   (C x d with prototypes: tiny) down to rank k-1;
2. F, bottom-up: rank k receives a_lo^(t) (detached, N x d) from rank k-1 (rank 0 reads x),
   runs its layers and sends a_hi^(t) up;
3. losses: the pair losses of the boundaries lo..hi. A boundary between two ranks is computed on
   both: the upper rank trains V_{lo+1} with the received a_lo, the lower trains U_hi with the
   received b_hi^(t); each parameter still gets its gradient from exactly one loss term, so the
   gradients equal those of the single-process step. The top rank adds the cross-entropy;
4. gradient clipping and the optimiser step on the rank's own parameters. A network-wide clip
   (``optim.*.clip_mode=network``, the default) needs the norm over every rank: one all-reduce
   of the per-parameter norms (both networks at once) per step. It is a synchronisation point:
   no rank can step before the slowest has its gradients, so the ranks run in lockstep and
   overlap only within a step (rank k's backward with rank k+1's work); ``clip_mode=layer``
   (or no clip) keeps every step local, and rank k can run ahead on step t+1's forward.

Because the delay is per layer, not per block, a K-rank run computes what a single-process run
with ``train.feedback_delay=1`` computes, for any split (bit-for-bit on CPU:
tests/test_parallel.py). Only the very first step waits for the fresh feedback from above.

The split: the first layer index of ranks 1..K-1 (``train.parallel_split``), by default the one
with the smallest counted cost per step (:func:`balanced_split`: the FLOPs of each rank's step
and of each neighbour pair's forward-then-step chain, which the delay puts in series). A split
point must follow a layer with parameters (a flatten passes G's gradient through to the layer
above it, so it cannot end a block).

Files: every rank keeps a whole copy of the model; it steps its own block, and the blocks are
broadcast from their owners at epoch ends and before any checkpoint (``sync_model``), so
validation, the best-epoch weights, model.pt and checkpoint.pt are the whole model, written by
rank 0 as in single-process training. The optimisers' and the rule's state of every rank are
gathered into rank 0's checkpoint ({"layer_parallel": {"blocks", "ranks"}}; the rule's
delayed values in the single-process layout). Resume with the same number of ranks.

Stops and the divergence guard: a stop request (Ctrl-C, SIGTERM on any rank) is agreed as in
data parallelism, so every rank stops after the same step. The guard reads every rank's losses
(gathered) and, at epoch ends, the whole model; with the default network-wide clip a non-finite
gradient on any rank reaches every rank's parameters through the clip norm in the same step, so
every rank stops alike. With per-layer clipping one rank may see it a step before the others
(torchrun then ends the group, and rank 0's summary may not say "diverged").

Tested on CPU with gloo only. With NCCL the point-to-point order may need
``dist.batch_isend_irecv`` (NCCL matches sends and receives per peer in issue order, and each
rank here sends before it receives); no multi-GPU machine was available.

Nesting with data parallelism (not built yet): a 2-D grid of K stages x D replicas. Each stage
has a data-parallel group of its D replicas (gradient all-reduce of its block, as
:mod:`ccl_repr.distributed`), each replica a pipeline group of its K stages (these
point-to-point messages); ``dist.new_group`` builds both from the world ranks.

Micro-batches (``train.micro_batches=m``): each batch is cut into m chunks that go up the
pipeline one after the other, so rank k+1 starts on chunk 0 while rank k computes chunk 1. The
step's loss is the chunks' mean losses weighted by their sizes: the batch's loss, so the same
update up to float rounding (not bit-exact: the sums run in another order; the anti-collapse
term, which couples samples, is refused). With m=1 (the default) nothing changes.

Not supported yet: autoencoders (per-sample feedback), per-sample targets, flooding (its mask
needs the top rank's logits on every rank), the layer-wise step, diagnostics hooks. Autoencoders
(and any CCL model) have the F/G split instead: ``train.parallel=networks``
(:mod:`ccl_repr.parallel_networks`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config, NetOptimConfig, OptimConfig
from .distributed import DataParallel, env_rank, env_world_size
from .errors import CheckpointError, ConfigError
from .losses import match_matrix
from .network import DualNetwork
from .optim import Optimizers
from .rules import LearningRule
from .rules.ccl import CCL, delayed_feedback

UP, DOWN = 0, 1  # message tags: feedback values b down; activations a up (micro-batch i: UP + 2i)


def check_config(cfg: Config, *, hooks: Sequence = ()) -> None:
    """Refuse what model-parallel CCL does not run, before any data loads: the layer pipeline
    (``train.parallel=layers``) or the F/G split (``networks``, :mod:`ccl_repr.parallel_networks`)."""
    t = cfg.train
    if t.parallel == "none":
        if t.micro_batches > 1:
            raise ConfigError("train.micro_batches applies to train.parallel=layers; set it to 1 or run the pipeline")
        return
    layers = t.parallel == "layers"
    launch = ("it needs torchrun with 2 or more processes (torchrun --nproc_per_node=2 -m ccl_repr.cli train ...)"
              if layers and env_world_size() < 2 else
              "it needs torchrun with 2 processes, F's and G's (torchrun --nproc_per_node=2 -m ccl_repr.cli train ...)"
              if not layers and env_world_size() != 2 else None)
    common = (
        f"it trains CCL only, not {cfg.method}; use --method ccl" if cfg.method != "ccl" else
        "diagnostics hooks would call the rule outside the parallel step: drop the diagnostics options" if hooks else
        "the layer-wise step is single-process: set train.layerwise=false" if t.layerwise else
        "the compiled step is single-process: set train.compile=false" if t.compile else None)
    own = (
        "the local reconstruction term trains U_l through V_l, which the pipeline does not exchange: set "
        "loss.ae_layer_recon=0 (the F/G split, train.parallel=networks, runs it)" if cfg.loss.ae_layer_recon > 0 else
        "micro-batches split the anti-collapse term, which couples the batch's samples: set train.micro_batches=1"
        if t.micro_batches > 1 and cfg.loss.form == "normalized" and cfg.loss.anti_collapse > 0 else
        "G's signal arrives one hop per step: add --set train.feedback_delay=1" if t.feedback_delay != 1 else
        "flooding needs the top rank's logits on every rank: set loss.flooding=0" if cfg.loss.flooding > 0 else None
    ) if layers else (
        "F and G exchange this step's values, no delay: set train.feedback_delay=0" if t.feedback_delay else
        "micro-batches apply to train.parallel=layers: set train.micro_batches=1" if t.micro_batches > 1 else None)
    problem = launch or common or own
    if problem:
        raise ConfigError(f"train.parallel={t.parallel}: {problem}")


def split_points(model: DualNetwork) -> list[int]:
    """Layer indices s (1..L-1) where a block may start: layer s-1 has parameters."""
    return [s for s in range(1, len(model.layers)) if model.layers[s - 1].has_params]


def layer_flops(model: DualNetwork, batch: int) -> list[tuple[int, int]]:
    """(F's forward FLOPs on ``batch`` samples, G's on the C class prototypes) of every layer, as
    torch's FlopCounterMode counts them (matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.zeros(batch, *model.input_shape, device=p.device, dtype=p.dtype)
    bs = model.feedback_intermediates(model.feedback_input(x))
    out = []
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            with FlopCounterMode(display=False) as fc:
                x = layer(x)
            with FlopCounterMode(display=False) as gc:
                layer.feedback(bs[i + 1])
            out.append((fc.get_total_flops(), gc.get_total_flops()))
    return out


def pipeline_period(flops: list[tuple[int, int]], blocks: list[tuple[int, int]]) -> int:
    """The steady-state FLOPs per step of the slowest link of the pipeline over ``blocks``: each
    rank's own step (2 (f + g) per layer: a forward and a weight gradient; every input is
    detached, so no input gradient) and, for each pair of neighbours, the lower rank's forward
    followed by the upper rank's whole step. In series because rank k's step t needs a^(t) from
    rank k-1's forward, and b^(t) from rank k+1, which rank k+1 computes only after its update of
    step t-1 (``train.feedback_delay=1``). Messages and per-layer overheads are left out
    (``benchmarks/parallel_model.py`` models them)."""
    own = [sum(2 * (f + g) for f, g in flops[lo:hi]) for lo, hi in blocks]
    fwd = [sum(f for f, _ in flops[lo:hi]) for lo, hi in blocks]
    return max(own + [fwd[k] + own[k + 1] for k in range(len(blocks) - 1)])


def balanced_split(model: DualNetwork, world: int, *, batch: int) -> list[int]:
    """The start of ranks 1..K-1 with the smallest :func:`pipeline_period`; ties go to the split
    whose largest block has the fewest parameters (F's and G's)."""
    flops, n = layer_flops(model, batch), len(model.layers)
    counts = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]

    def key(starts: tuple[int, ...]) -> tuple[int, int]:
        edges = [0, *starts, n]
        blocks = list(zip(edges[:-1], edges[1:]))
        return pipeline_period(flops, blocks), max(sum(counts[lo:hi]) for lo, hi in blocks)

    return list(min(itertools.combinations(split_points(model), world - 1), key=key))


def make_blocks(model: DualNetwork, world: int, split: list[int], *, batch: int = 256) -> list[tuple[int, int]]:
    """[(lo, hi)] of every rank from the split (``train.parallel_split``; [] = :func:`balanced_split`
    for batches of ``batch`` samples)."""
    points = split_points(model)
    if len(points) < world - 1:
        raise ConfigError(f"train.parallel=layers: {model.name or 'the model'} has {len(points) + 1} blocks at most, "
                          f"fewer than the {world} ranks; lower torchrun --nproc_per_node")
    starts = list(split) or balanced_split(model, world, batch=batch)
    if len(starts) != world - 1 or starts != sorted(set(starts)) or not set(starts) <= set(points):
        raise ConfigError(f"train.parallel_split={list(split)}: give {world - 1} increasing layer indices from "
                          f"{points} (a block starts after a layer with parameters), or [] for a balanced split")
    edges = [0, *starts, len(model.layers)]
    return list(zip(edges[:-1], edges[1:]))


class LayerParallel(DataParallel):
    """The group of a model-parallel run: every rank sees the whole batch; its stage (the rule)
    does the messages. ``average`` gathers every rank's own losses into one dict."""

    def __init__(self, *, rank: int, world_size: int, device: torch.device, blocks: list[tuple[int, int]]) -> None:
        super().__init__(rank=rank, world_size=world_size, device=device)
        self.blocks = blocks

    def backward(self, method, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return method.backward(model, x, y)

    def average(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every rank's loss sums in one dict (a boundary's pair loss, computed on both of its
        ranks, has the same value on both). A host sync: per epoch and per guard check."""
        parts: list[dict | None] = [None] * self.world_size
        dist.all_gather_object(parts, {k: torch.as_tensor(v).detach().cpu() for k, v in sums.items()})
        merged: dict[str, Tensor] = {}
        for part in parts:
            for k, v in (part or {}).items():
                merged.setdefault(k, v.to(self.device))
        return merged

    @torch.no_grad()
    def sync_model(self, model: nn.Module) -> None:
        """Every block's parameters and buffers broadcast from the rank that steps them."""
        for r, (lo, hi) in enumerate(self.blocks):
            for layer in model.layers[lo:hi]:
                for t in layer.state_dict().values():
                    dist.broadcast(t, src=r)


class _Block:
    """The parameter groups of layers lo..hi-1 only: what this rank's optimisers see."""

    def __init__(self, model: DualNetwork, lo: int, hi: int) -> None:
        self.model, self.names = model, set(model.layer_names[lo + 1:hi + 1])

    def parameter_groups(self, network: str) -> list[tuple[str, list[nn.Parameter]]]:
        return [(n, ps) for n, ps in self.model.parameter_groups(network) if n in self.names]


class BlockOptimizers(Optimizers):
    """:class:`ccl_repr.optim.Optimizers` over one rank's layers. A network-wide clip uses the
    norm over every rank's parameters, computed as ``clip_grad_norm_`` does (per-parameter
    norms, then the norm of that vector, in the model's parameter order), so it is bit-exact."""

    def __init__(self, model: DualNetwork, cfg: OptimConfig, *, total_steps: int, networks: tuple[str, ...],
                 blocks: list[tuple[int, int]], rank: int) -> None:
        self.blocks, self.rank = blocks, rank
        block = _Block(model, *blocks[rank])  # duck-types DualNetwork.parameter_groups
        super().__init__(block, cfg, total_steps=total_steps, networks=networks)  # type: ignore[arg-type]
        self.model = model
        self.slots: dict[str, tuple[int, list[int]]] = {}  # net -> (its parameter count, our positions)
        for net in networks:
            full = model.network_parameters(net)
            own = {id(p) for p in self.params[net]}
            self.slots[net] = (len(full), [i for i, p in enumerate(full) if id(p) in own])

    def clip(self, net: str, ncfg: NetOptimConfig) -> None:
        if ncfg.clip_mode == "layer":
            return super().clip(net, ncfg)
        if net == self.first_global:  # every network's gradients are conditioned: one all-reduce for all
            self.norms = self._global_norms()
        total = torch.linalg.vector_norm(self.norms[net], 2.0)
        torch.nn.utils.clip_grads_with_norm_(self.params[net], ncfg.clip, total)

    @property
    def global_nets(self) -> list[str]:
        """The networks clipped by one norm over the whole network."""
        return [net for net, (ncfg, _, _) in self.nets.items() if ncfg.clip > 0 and ncfg.clip_mode != "layer"]

    @property
    def first_global(self) -> str | None:
        return next(iter(self.global_nets), None)

    def _global_norms(self) -> dict[str, Tensor]:
        """{network: the norm of each of its parameters' gradients, over every rank, in the model's order}."""
        nets = self.global_nets
        sizes = [self.slots[net][0] for net in nets]
        flat = torch.zeros(sum(sizes), device=self.params[nets[0]][0].device)
        offset = 0
        for net, size in zip(nets, sizes):
            own = [(offset + i, p.grad) for i, p in zip(self.slots[net][1], self.params[net]) if p.grad is not None]
            if own:  # one tensor at a time: on CPU exactly the norms clip_grad_norm_'s foreach path takes
                flat[[i for i, _ in own]] = torch.stack([torch.nn.utils.get_total_norm([g]) for _, g in own])
            offset += size
        dist.all_reduce(flat)  # each slot is filled by one rank: sums with zeros are exact
        return dict(zip(nets, flat.split(sizes)))

    def state_dict(self) -> dict:
        ranks: list[dict | None] = [None] * len(self.blocks)
        dist.all_gather_object(ranks, super().state_dict())
        return {"layer_parallel": {"blocks": [list(b) for b in self.blocks], "ranks": ranks}}

    def load_state_dict(self, state: dict) -> None:
        lp = state.get("layer_parallel")
        if lp is None or [tuple(b) for b in lp["blocks"]] != list(self.blocks):
            raise CheckpointError(f"the checkpoint's optimiser state was saved by another layout "
                                  f"({lp['blocks'] if lp else 'one process'}), not the blocks {self.blocks}; "
                                  f"resume with the run's own number of ranks and train.parallel_split")
        super().load_state_dict(lp["ranks"][self.rank])


@dataclass
class _Comm:
    rank: int
    world: int
    device: torch.device

    def send(self, t: Tensor, dst: int, tag: int) -> dist.Work:
        return dist.isend(t.detach().float().contiguous(), dst=dst, tag=tag)

    def recv(self, shape: tuple[int, ...], src: int, tag: int) -> Tensor:
        buf = torch.empty(shape, device=self.device)
        dist.recv(buf, src=src, tag=tag)
        return buf


class PipelineStage(LearningRule):
    """Rank k's share of one CCL step (delayed feedback) over layers lo..hi-1; see the module docstring."""

    name, tasks, trains, detach_inputs = "ccl", ("classify",), ("forward", "feedback"), True

    def __init__(self, rule: CCL, model: DualNetwork, *, blocks: list[tuple[int, int]], comm: _Comm,
                 micro_batches: int = 1) -> None:
        self.rule, self.cfg, self.comm, self.blocks = rule, rule.cfg, comm, blocks
        self.lo, self.hi = blocks[comm.rank]
        self.top = comm.rank == comm.world - 1
        self.keys = {j: k for j, k in rule.delayed.items() if self.lo < j <= self.hi}
        self.pairs = [l for l in model.pair_indices(include_output=False) if self.lo <= l <= self.hi]
        self.prev: dict[int, Tensor] | None = None
        self.pending: dict[int, Tensor] | None = None
        self.sent: list[dist.Work] = []
        self.autocast = rule.autocast
        self.micro = micro_batches

    def losses(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        raise ConfigError("train.parallel=layers: a pipeline stage's losses exist only inside its training step")

    def backward(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        hi, rank = self.hi, self.comm.rank
        b = self._feedback(model, x, y)
        if rank > 0:
            self.sent.append(self.comm.send(b[self.lo], rank - 1, DOWN))
        chunks = [(xs, ys) for xs, ys in zip(x.tensor_split(self.micro), y.tensor_split(self.micro)) if len(ys)]
        acts = [self._forward(model, xs, len(ys), i) for i, (xs, ys) in enumerate(chunks)]
        if not self.top and self.prev is not None:  # this step's b_hi, for the boundary pair (U_hi's gradient)
            b[hi] = self.comm.recv((model.num_classes, *model.shapes[hi]), rank + 1, DOWN)
        out: dict[str, Tensor] = {}
        for a, (_, ys) in zip(acts, chunks):
            share = len(ys) / len(y)  # a chunk's mean loss, weighted by its share: the batch's mean
            for k, v in self._losses(model, a, b, ys, last=len(model.layers)).items():
                v = v if share == 1.0 else v * share
                out[k] = out[k] + v if k in out else v
        torch.autograd.backward([v for v in out.values() if v.requires_grad])
        self.pending = {j: b[j].detach() for j in self.keys}
        return {k: v.detach() for k, v in out.items()}

    def _forward(self, model: DualNetwork, x: Tensor, n: int, chunk: int) -> dict[int, Tensor]:
        """a_lo..a_hi of one chunk: a_lo received from below (rank 0: x), a_hi sent up at once."""
        lo, hi, rank = self.lo, self.hi, self.comm.rank
        a = {lo: x if rank == 0 else self.comm.recv((n, *model.shapes[lo]), rank - 1, UP + 2 * chunk)}
        with self.autocast():
            for j in range(lo, hi):
                a[j + 1] = model.layers[j](a[j])
        if not self.top:
            self.sent.append(self.comm.send(a[hi], rank + 1, UP + 2 * chunk))
        return a

    def _feedback(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[int, Tensor]:
        """b_lo..b_hi of this step: from the previous step's values; the top rank starts from
        the prototypes; the first step of a lower rank waits for the fresh b_hi from above."""
        hi, rank = self.hi, self.comm.rank
        if self.top:
            start = model.feedback_input(x, y, targets="prototypes")
        elif self.prev is not None:
            start = self.prev[hi]
        else:
            start = self.comm.recv((model.num_classes, *model.shapes[hi]), rank + 1, DOWN)
        with self.autocast():
            return delayed_feedback(model, self.lo, hi, start, self.prev)

    def _losses(self, model: DualNetwork, a: dict[int, Tensor], b: dict[int, Tensor], y: Tensor,
                *, last: int) -> dict[str, Tensor]:
        assert model.num_classes is not None
        y_match = match_matrix(y, model.num_classes)
        out: dict[str, Tensor] = {}
        with self.autocast():
            for l in self.pairs:
                out[f"pair/{model.layer_names[l]}"] = self.rule._class_pair(a[l], b[l], y_match, None)
            if self.top:
                out["ce"] = F.cross_entropy(a[last], y)
        return out

    def end_step(self) -> None:
        for work in self.sent:
            work.wait()
        self.sent = []
        if self.pending is not None:
            self.prev, self.pending = self.pending, None

    def state_dict(self) -> dict[str, Tensor]:
        """The delayed values of every rank (a collective), in the single-process rule's layout."""
        parts: list[dict | None] = [None] * self.comm.world
        own = {} if self.prev is None else {self.keys[j]: v.detach().cpu() for j, v in self.prev.items()}
        dist.all_gather_object(parts, own)
        return {k: v for part in parts for k, v in (part or {}).items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not state:
            self.prev = None
            return
        missing = [k for k in self.keys.values() if k not in state]
        if missing:
            raise CheckpointError(f"the checkpoint's CCL state lacks {missing}; resume with the run's own config")
        self.prev = {j: state[k].to(self.comm.device, copy=True) for j, k in self.keys.items()}
        self.pending = None


def layer_parallel(cfg: Config, model: DualNetwork, rule: LearningRule, device: torch.device, *,
                   total_steps: int) -> tuple[LayerParallel, PipelineStage, BlockOptimizers]:
    """This rank's group, stage and optimisers for ``cfg.train.parallel=layers`` (after the
    process group is up and the model and the CCL rule are built)."""
    assert isinstance(rule, CCL) and rule.feedback_delay == 1
    rank, world = env_rank(), env_world_size()
    blocks = make_blocks(model, world, cfg.train.parallel_split, batch=cfg.train.batch_size)
    group = LayerParallel(rank=rank, world_size=world, device=device, blocks=blocks)
    stage = PipelineStage(rule, model, blocks=blocks, comm=_Comm(rank, world, device),
                          micro_batches=cfg.train.micro_batches)
    optim = BlockOptimizers(model, cfg.optim, total_steps=total_steps, networks=rule.trains, blocks=blocks, rank=rank)
    return group, stage, optim
