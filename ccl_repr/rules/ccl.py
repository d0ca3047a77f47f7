"""Counter-current learning: layer-pair losses between the forward network F and the feedback network G.

Every layer's input is detached, so each gradient is local (the paper's method, Eq. 2): one
``backward()`` over the sum of the pair losses updates all layers at once. With
``layerwise=True`` each pair loss is backpropagated as soon as the pair exists, so F's
activations are freed layer by layer and peak memory stays flat in depth.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import Config, LossConfig
from ..errors import CheckpointError, ConfigError, ShapeError
from ..layers import DualLayer
from ..losses import ae_pair_loss, classification_pair_loss, flooding_mask, match_matrix
from ..network import DualNetwork
from ..registry import RULES
from .base import LearningRule


@RULES.register("ccl", "counter-current learning (the paper): layer-pair losses between F and G, every input detached")
class CCL(LearningRule):
    """Counter-current learning (the paper's method, Eq. 2).

    Signals: layer l of F (U_l) and layer l+1 of G (V_{l+1}) are trained by the pair loss between
    a_l = F's activation and b_l = G's activation at that boundary, both computed from detached
    inputs; F's output layer U_L by the task loss on a_L (classifier) or every boundary by an MSE
    pair loss (autoencoder). No error signal crosses a layer. Trains both networks.

    Delayed feedback (``feedback_delay=1``, ``train.feedback_delay``): every feedback layer with a
    stop-gradient reads its input from the previous optimiser step. At step t, G's layer l+1
    computes b_l^(t) = V_{l+1}(sg(b_{l+1}^(t-1))) with its current weights, where b_{l+1}^(t-1) is
    the value computed at step t-1 (itself from step t-2's, and so on); G's top input b_L (the
    class prototypes) is fixed, so b_{L-1} is always fresh. The very first step, with no earlier
    values, uses the fresh ones. The pair losses are the paper's method (Eq. 2) on these values.
    This is what a pipeline over the layers sees when G's signal travels down one hop per step
    (the paper names training F and G in parallel as future work): since the delay is per layer,
    not per block, single-process training and any split of the layers over K ranks
    (:mod:`ccl_repr.parallel`) compute the same thing. The previous step's b values are the rule's
    state (``state_dict``: saved in checkpoints, so resume is exact); they advance in
    :meth:`end_step`, after the optimiser step, so diagnostics that call ``backward`` on a probe
    batch leave them alone. Parameter-free layers (flatten) have no stop-gradient and no delay.
    Defined for classifiers with prototype targets (b is C x d, independent of the batch);
    per-sample targets, autoencoders and ``layerwise`` are refused.
    """

    name = "ccl"
    tasks = ("classify", "reconstruct")
    trains = ("forward", "feedback")
    detach_inputs = True

    @classmethod
    def from_config(cls, cfg: Config) -> "CCL":
        return cls(cfg.loss, layerwise=cfg.train.layerwise, feedback_delay=cfg.train.feedback_delay)

    def __init__(self, cfg: LossConfig, *, layerwise: bool = False, feedback_delay: int = 0) -> None:
        self.cfg, self.layerwise, self.feedback_delay = cfg, layerwise, feedback_delay
        if feedback_delay and (cfg.targets != "prototypes" or layerwise):
            raise ConfigError("train.feedback_delay=1 is implemented for CCL classifiers with prototype targets and "
                              "the summed step; set loss.targets=prototypes and train.layerwise=false, or delay 0")
        self.delayed: dict[int, str] = {}  # boundary j -> state key of b_j, for the delayed values
        self.prev: dict[int, Tensor] | None = None  # b_j of the previous optimiser step
        self.pending: dict[int, Tensor] | None = None  # b_j of this step, kept by end_step()

    def setup(self, model: DualNetwork) -> None:
        self.prev = self.pending = None
        self.delayed, self.device = {}, next(model.parameters()).device
        if not self.feedback_delay:
            return
        if model.task != "classify":
            raise ConfigError(f"train.feedback_delay=1 is implemented for classifiers (b is C x d prototypes), not "
                              f"the {model.task} model {model.name or ''}; set train.feedback_delay=0")
        self.delayed = {j: f"b/{model.layer_names[j]}" for j in delayed_boundaries(model)}

    def feedback_values(self, model: DualNetwork, x: Tensor, y: Tensor) -> list[Tensor]:
        """[b_0, ..., b_L]: G's fresh values, or with ``feedback_delay`` each stop-gradient
        layer's input taken from the previous step (kept as pending until :meth:`end_step`)."""
        target = model.feedback_input(x, y, targets=self.cfg.targets)
        if not self.feedback_delay:
            return model.feedback_intermediates(target)
        n = len(model.layers)
        b = delayed_feedback(model, 0, n, target, self.prev)
        self.pending = {j: b[j].detach() for j in self.delayed}
        return [b[j] for j in range(n + 1)]

    def end_step(self) -> None:
        if self.pending is not None:
            self.prev, self.pending = self.pending, None

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.prev is None else {self.delayed[j]: v for j, v in self.prev.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not self.feedback_delay or not state:
            return super().load_state_dict(state)
        keys = {k: j for j, k in self.delayed.items()}
        if set(state) != set(keys):
            raise CheckpointError(f"the checkpoint holds state {sorted(state)} for method ccl, which keeps "
                                  f"{sorted(keys)} with train.feedback_delay=1; resume with the run's own config")
        self.prev, self.pending = {keys[k]: v.to(self.device, copy=True) for k, v in state.items()}, None

    def losses(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return self.terms(model, model.forward_intermediates(x), self.feedback_values(model, x, y), y)

    def terms(self, model: DualNetwork, a: list[Tensor], b: list[Tensor], y: Tensor, *,
              recon: bool = True) -> dict[str, Tensor]:
        """The step's loss terms from F's values a_0..a_L and G's b_0..b_L. Each pair term's
        gradient with respect to a is the same whether b carries a graph or not (and the other way
        round), so F and G may be given their own copies with the other side detached
        (:mod:`ccl_repr.parallel_networks`). ``recon=False`` leaves out the local reconstruction
        terms, which apply one network's layer to the other's values (the F/G split computes them
        on the rank that holds that layer)."""
        cfg = self.cfg
        out: dict[str, Tensor] = {}
        if model.task == "reconstruct":
            last = len(model.layers)
            for l in model.pair_indices(include_output=True):
                out[f"pair/{model.layer_names[l]}"] = ae_pair_loss(a[l], b[l], form=cfg.ae_form,
                                                                   inner=0 < l < last,
                                                                   anti_collapse=cfg.ae_anti_collapse)
            if recon:
                for i in self.reconstruction_layers(model, "forward"):
                    out.update(self.reconstruction_terms(model, i, a[i], a[i + 1]))
                for i in self.reconstruction_layers(model, "feedback"):
                    out.update(self.reconstruction_terms(model, i, b[i + 1], b[i], "feedback"))
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

    def reconstruction_terms(self, model: DualNetwork, i: int, x_in: Tensor, x_out: Tensor,
                             network: str = "forward") -> dict[str, Tensor]:
        """Layer i's local reconstruction term (``loss.ae_layer_recon``): ``recon/NAME`` on F's
        values a_i -> a_{i+1}, or ``recon_g/NAME`` on G's values b_{i+1} -> b_i, for a layer of
        :meth:`reconstruction_layers`. ``x_out`` carries the layer's graph."""
        cfg, layer = self.cfg, model.layers[i]
        key = f"{'recon' if network == 'forward' else 'recon_g'}/{model.layer_names[i + 1]}"
        outer = i == (0 if network == "forward" else len(model.layers) - 1)  # the image side
        return {key: cfg.ae_layer_recon * layer_reconstruction(layer, x_in, x_out, form=cfg.ae_form, outer=outer,
                                                               network=network)}

    def reconstruction_layers(self, model: DualNetwork, network: str) -> list[int]:
        """The layers i whose reconstruction term on ``network``'s values the config asks for."""
        cfg = self.cfg
        if model.task != "reconstruct" or cfg.ae_layer_recon <= 0 or cfg.ae_layer_recon_sides not in (network, "both"):
            return []
        return [i for i, layer in enumerate(model.layers) if layer.has_params]

    def _class_pair(self, a: Tensor, b: Tensor, y_match: Tensor, mask: Tensor | None) -> Tensor:
        cfg = self.cfg
        a = a if mask is None else a * mask.view(-1, *([1] * (a.dim() - 1)))
        return classification_pair_loss(a, b, y_match, form=cfg.form, scale=cfg.scale,
                                        anti_collapse=cfg.anti_collapse)

    def feedback_weights(self, model: DualNetwork) -> dict[str, Tensor]:
        """V_l^T in U_l's layout for every layer with weights: the paper's analysis of U_l vs V_l^T
        (G's layer carries b_l down where backprop would use U_l^T)."""
        out = {}
        for i, layer in enumerate(model.layers):
            if layer.has_params:
                u, v = layer.projections()
                out[model.layer_names[i + 1]] = transposed_feedback_weight(u.weight, v.weight)
        return out

    def backward(self, model: DualNetwork, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Losses and their gradients (accumulated into ``.grad``); returns the losses detached."""
        if self.layerwise:
            return self._layerwise_backward(model, x, y)
        return super().backward(model, x, y)

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
        f_recon, g_recon = (set(self.reconstruction_layers(model, net)) for net in ("forward", "feedback"))
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

        def apply(terms: dict[str, Tensor]) -> None:
            # one backward per boundary: its pair term and the layer's reconstruction term share a's graph
            total = sum(t for t in terms.values() if t.requires_grad)
            if isinstance(total, Tensor):
                total.backward()
            out.update({k: t.detach() for k, t in terms.items()})

        a = x
        for l in range(n + 1):
            terms: dict[str, Tensor] = {}
            with self.autocast():
                if l > 0:
                    a_in, a = a, model.layers[l - 1](a)
                    if l - 1 in f_recon:  # layer l-1's term on F's values, if asked
                        terms.update(self.reconstruction_terms(model, l - 1, a_in, a))
                g_term = l in g_recon
                if l in pairs or g_term:
                    bl = _feedback_with_graph(model, b, l)
                if g_term:  # layer l's term on G's values
                    terms.update(self.reconstruction_terms(model, l, b[l + 1], bl, "feedback"))
                if l in pairs:
                    terms[f"pair/{model.layer_names[l]}"] = (
                        ae_pair_loss(a, bl, form=cfg.ae_form, inner=0 < l < n, anti_collapse=cfg.ae_anti_collapse)
                        if reconstruct else self._class_pair(a, bl, y_match, mask))
            apply(terms)
        if not reconstruct:
            with self.autocast():
                loss = F.cross_entropy(a, y)
            apply({"ce": loss})
        return out


def layer_reconstruction(layer: DualLayer, a_in: Tensor, a_out: Tensor, *, form: str, outer: bool,
                         network: str = "forward") -> Tensor:
    """Layer l's local reconstruction term: V_l(U_l(sg(a_l))) against sg(a_l) (``loss.ae_layer_recon``);
    with ``network="feedback"`` the mirror, U_l(V_l(sg(b_{l+1}))) against sg(b_{l+1}) on G's values.

    ``a_out`` = U_l(sg(a_l)) with its graph, so the term trains U_l (through V_l) and V_l, and
    nothing else: it is a one-layer autoencoder on a detached input, as local as a pair loss. Why:
    in a CCL autoencoder only the outermost pairs have the image as a target; the inner pairs ask
    F's and G's codes to agree, which a code holding little of the image satisfies as well
    (docs/results_ae.md). This term asks every U_l to keep what V_l can map back, so each layer
    is a local autoencoder of the one below, and V_l, which carries G's signal down, is trained
    on F's own activations as its inverse too. Not in the paper. The other network's batch norms
    see these values without updating their running statistics (those describe its own pass)."""
    back = layer.feedback if network == "forward" else layer.forward
    with frozen_batch_stats(layer.fbk if network == "forward" else layer.fwd):
        rebuilt = back(a_out, keep_graph=True)
    return ae_pair_loss(rebuilt, a_in.detach(), form=form, inner=not outer)


@contextmanager
def frozen_batch_stats(module: nn.Module):
    """Batch norms in ``module`` normalise with the batch's statistics but leave their running
    estimates alone (momentum 0 keeps them as they are)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def transposed_feedback_weight(u: Tensor, v: Tensor) -> Tensor:
    """V^T in U's layout: the plain transpose for linear weights (U: out x in, V: in x out); for
    conv weights (U: c_out x c_in x k x k, V: c_in x c_out x k x k) the kernel of V's adjoint (the
    transposed convolution): channels swapped, kernel flipped in both spatial directions. Exact for
    a stride-1 'same' conv; resampling around the conv (stride, pooling, upsampling) is ignored,
    so comparisons with it compare kernels only."""
    if v.dim() == 2:
        return v.T
    if v.dim() == 4:
        return rearrange(v, "ci co kh kw -> co ci kh kw").flip(-2, -1)
    raise ShapeError(f"V^T is defined for linear and 2-D conv weights, got a weight of shape {tuple(v.shape)}; "
                     f"weight alignment applies to those layers only")


def delayed_boundaries(model: DualNetwork) -> list[int]:
    """Boundaries j whose b_j feeds a stop-gradient feedback layer (layers[j-1]) and so is read
    one step late under delayed feedback; b_L (the fixed target) is never stored."""
    return [j for j in range(1, len(model.layers)) if model.layers[j - 1].detach]


def delayed_feedback(model: DualNetwork, lo: int, hi: int, top: Tensor,
                     prev: dict[int, Tensor] | None) -> dict[int, Tensor]:
    """{j: b_j} for lo <= j <= hi through G's layers lo..hi-1, b_hi = ``top``: a stop-gradient
    layer reads its input b_{j+1} from ``prev`` (the previous step's values) where it holds
    one, else this step's (the first step; the fixed target; parameter-free layers)."""
    b = {hi: top}
    for j in range(hi - 1, lo - 1, -1):
        layer = model.layers[j]
        src = prev.get(j + 1) if prev is not None and layer.detach else None
        b[j] = layer.feedback(b[j + 1] if src is None else src)
    return b


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
