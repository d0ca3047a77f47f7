"""The kernel floor of the CCL/BP step-time ratio on the MLPs: both steps issued by hand.

The library's steps go through modules, autograd and torch.optim. Here the same computation -
forward, the gradients of every parameter, per-network grad-norm clipping and SGD - is written
out as plain tensor operations under ``torch.no_grad()``, with the kernels autograd itself uses
(``mm``, ``elu``, ``elu_backward``, softmax). No framework overhead is left, so

    floor ratio = hand-written CCL step / hand-written BP step

is what this machine's kernels cost CCL relative to backprop, and the library's ratio minus the
floor ratio is what the framework adds. ``tests/test_benchmarks.py`` checks that the hand-written
gradients equal autograd's on the library's models. MLP registry models only (linear layers, no
bias, no norm, ELU), with the published prototype pair loss.

    python benchmarks/speed_floor.py [--threads 2] [--repeats 60] [--models mlp_small,mlp_mnist,mlp_cifar]
writes benchmarks/results/speed_floor_{cpu,cuda}.json
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor

from speed_common import MODELS, Stepper, environment, interleaved_times, median, setup, write_json
from ccl_repr.layers import DualLinear
from ccl_repr.models import DualNetwork

CLIP, LR = 1.0, 1.0  # Stepper's OptimConfig(): clip 1.0 per network, SGD lr 1.0, momentum 0


def weights(model: DualNetwork) -> tuple[list[Tensor], list[Tensor]]:
    """(U_l, V_l) weights of an MLP dual network; refuses anything the floor does not model."""
    n = len(model.layers)
    for i, layer in enumerate(model.layers):
        ok = (isinstance(layer, DualLinear) and layer.fwd.proj.bias is None and layer.fbk.proj.bias is None
              # the registry's pattern: ELU everywhere except F's output layer and G's bottom layer
              and isinstance(layer.fwd.act, torch.nn.ELU if i < n - 1 else torch.nn.Identity)
              and isinstance(layer.fbk.act, torch.nn.ELU if i > 0 else torch.nn.Identity)
              and all(isinstance(m, torch.nn.Identity) for side in (layer.fwd, layer.fbk)
                      for m in (side.before, side.pre_norm, side.post_norm, side.after)))
        if not ok:
            raise ValueError(f"{model.name}: the kernel floor covers bias-free ELU MLPs only")
    return [l.fwd.proj.weight for l in model.layers], [l.fbk.proj.weight for l in model.layers]


def _act(z: Tensor, on: bool) -> Tensor:
    return F.elu(z) if on else z


def _act_grad(g: Tensor, out: Tensor, on: bool) -> Tensor:
    """dL/dz from dL/d(out), out = elu(z): the fused kernel autograd's EluBackward calls."""
    return torch.ops.aten.elu_backward(g, 1.0, 1.0, 1.0, True, out) if on else g


def _ce_grad(logits: Tensor, y: Tensor) -> Tensor:
    g = logits.softmax(1)
    g[torch.arange(len(y), device=y.device), y] -= 1
    return g.div_(len(y))


def ccl_grads(U: list[Tensor], V: list[Tensor], x: Tensor, y: Tensor, *, scale: float) -> tuple[list, list]:
    """Gradients of CCL's summed loss (prototype pairs 0..L-1 + cross-entropy on a_L), by hand.
    G: b_L = I_C, b_{l-1} = act(b_l V_l^T) (no act below layer 1); F: a_l = act(a_{l-1} U_l^T)."""
    n, c = len(U), U[-1].shape[0]
    b: list[Tensor] = [torch.empty(0)] * (n + 1)
    b[n] = torch.eye(c, device=x.device, dtype=x.dtype)
    for l in range(n, 0, -1):
        b[l - 1] = _act(b[l] @ V[l - 1].t(), l > 1)
    a = [x.flatten(1)]
    for l in range(1, n + 1):
        a.append(_act(a[-1] @ U[l - 1].t(), l < n))
    gU: list[Tensor] = [torch.empty(0)] * n
    gV: list[Tensor] = [torch.empty(0)] * n
    gU[n - 1] = _ce_grad(a[n], y).t() @ a[n - 1]
    y_match = F.one_hot(y, c).to(x.dtype)
    for l in reversed(range(n)):  # pair l: k * sum((A B^T - Y)^2), k = scale / (N C d); top-down, as autograd
        A, B = a[l], b[l]
        r = (A @ B.t()).sub_(y_match).mul_(2 * scale / (A.shape[0] * c * A.shape[1]))
        gV[l] = _act_grad(r.t() @ A, B, l > 0).t() @ b[l + 1]  # V_{l+1} produced b_l
        if l > 0:  # a_0 = x has no parameters below it
            gU[l - 1] = _act_grad(r @ B, A, True).t() @ a[l - 1]
    return gU, gV


def bp_grads(U: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    """Gradients of cross-entropy on a_L through all of F, by hand."""
    n = len(U)
    a = [x.flatten(1)]
    for l in range(1, n + 1):
        a.append(_act(a[-1] @ U[l - 1].t(), l < n))
    gU: list[Tensor] = [torch.empty(0)] * n
    gz = _ce_grad(a[n], y)
    for l in range(n, 0, -1):
        gU[l - 1] = gz.t() @ a[l - 1]
        if l > 1:
            gz = _act_grad(gz @ U[l - 1], a[l - 1], True)
    return gU


def clip_sgd_(params: list[Tensor], grads: list[Tensor]) -> None:
    """clip_grad_norm_(max_norm=CLIP) over one network, then p -= LR * g."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (CLIP / (norm + 1e-6)).clamp_(max=1.0))
    torch._foreach_add_(params, grads, alpha=-LR)


class FloorStep:
    """One hand-written training step of CCL or BP on its own copy of a library model."""

    def __init__(self, stepper: Stepper) -> None:
        self.model, self.x, self.y = stepper.model, stepper.x, stepper.y
        self.ccl = stepper.method.name == "ccl"
        self.scale = stepper.method.cfg.scale
        self.U, self.V = weights(self.model)

    @torch.no_grad()
    def step(self) -> None:
        if self.ccl:
            gU, gV = ccl_grads(self.U, self.V, self.x, self.y, scale=self.scale)
            clip_sgd_(self.U, gU)
            clip_sgd_(self.V, gV)
        else:
            clip_sgd_(self.U, bp_grads(self.U, self.x, self.y))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="")
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--models", default="mlp_small,mlp_mnist,mlp_cifar")
    args = p.parse_args()
    device = setup(args.threads)
    results: dict = {}
    for name in args.models.split(","):
        shape, cpu_batch, gpu_batch = MODELS[name]
        batch = gpu_batch if device.type == "cuda" else cpu_batch
        lib = {m: Stepper(name, m, device, batch=batch) for m in ("ccl", "bp")}
        floor = {m: FloorStep(Stepper(name, m, device, batch=batch)) for m in ("ccl", "bp")}
        steps = {**{f"library_{m}": s.step for m, s in lib.items()}, **{f"floor_{m}": s.step for m, s in floor.items()}}
        times = interleaved_times(steps, device, warmup=args.warmup, repeats=args.repeats)
        ms = {k: 1e3 * median(v) for k, v in times.items()}
        r = {"batch": batch, "repeats": args.repeats, "step_ms_median": ms,
             "step_ms_all": {k: [round(1e3 * t, 3) for t in v] for k, v in times.items()},
             "ratio_library": ms["library_ccl"] / ms["library_bp"], "ratio_floor": ms["floor_ccl"] / ms["floor_bp"],
             "framework_share": {m: 1 - ms[f"floor_{m}"] / ms[f"library_{m}"] for m in ("ccl", "bp")}}
        results[name] = r
        print(f"{name:10s} batch {batch:4d}  library CCL {ms['library_ccl']:7.2f} BP {ms['library_bp']:7.2f} ms "
              f"(ratio {r['ratio_library']:.3f})  floor CCL {ms['floor_ccl']:7.2f} BP {ms['floor_bp']:7.2f} ms "
              f"(ratio {r['ratio_floor']:.3f})", flush=True)
    write_json(f"speed_floor_{device.type}{args.tag}.json", {
        "benchmark": "speed_floor", "env": environment(device, args.threads), "clip": CLIP, "lr": LR,
        "models": results})


if __name__ == "__main__":
    main()
