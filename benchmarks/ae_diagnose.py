"""Why does a CCL autoencoder stop improving? Per-epoch measurements of every layer of both networks.

Trains one recipe with CCL (the library's own method and optimisers, the train loop's order of
operations) and after every epoch writes one JSON line with, per layer and network:

- ``grad``: mean pre-clip gradient norm of the layer's weight over the epoch's steps, and
  ``clip_factor``: the mean factor the network's grad-norm clip multiplied its gradients by;
- ``update_ratio``: ||W_end - W_start|| / ||W_start|| over the epoch;
- ``bn_gamma`` / ``bn_beta``: mean |scale| and mean shift of the layer's batch norm;
- on the validation images: every pair loss, the reconstruction MSE of x̂ (F) and b_0 (G), the MSE
  of F's decoder fed G's codes b_l instead of its own a_l (do G's targets reconstruct?), the
  MSE of the best *linear* decoder of each code (ridge, closed form: how much of the image the
  code still holds), the mean per-unit std and the participation-ratio rank of every code.

    nice -n 10 python benchmarks/ae_diagnose.py --data-root ../shared/datasets --epochs 6 \
        --out benchmarks/results/ae_diagnose-published_init.jsonl \
        --set model.init=orthogonal --set loss.ae_anti_collapse=0 [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ccl_repr.config import make_config
from ccl_repr.data import batches, load_data, shuffle_order
from ccl_repr.builder import build_trainable
from ccl_repr.optim import Optimizers
from ccl_repr.train import seed_everything


NETS = ("forward", "feedback")


def layer_weights(model, net: str) -> dict[str, torch.Tensor]:
    side = "fwd" if net == "forward" else "fbk"
    return {model.layer_names[i + 1]: getattr(layer, side).proj.weight for i, layer in enumerate(model.layers)}


def batch_norms(model, net: str) -> dict[str, dict[str, float]]:
    side = "fwd" if net == "forward" else "fbk"
    out = {}
    for i, layer in enumerate(model.layers):
        bn = getattr(layer, side).post_norm
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) and bn.affine:
            out[model.layer_names[i + 1]] = {"bn_gamma": bn.weight.abs().mean().item(), "bn_beta": bn.bias.mean().item()}
    return out


def ridge_mse(z_tr: torch.Tensor, x_tr: torch.Tensor, z_te: torch.Tensor, x_te: torch.Tensor, lam: float = 1e-3) -> float:
    """MSE of the best affine map code -> image (ridge, fitted on one half, scored on the other)."""
    mu = z_tr.mean(0)
    zt, ze = z_tr - mu, z_te - mu
    w = torch.linalg.solve(zt.T @ zt + lam * len(zt) * torch.eye(zt.shape[1], dtype=zt.dtype), zt.T @ (x_tr - x_tr.mean(0)))
    return F.mse_loss(ze @ w + x_tr.mean(0), x_te).item()


def participation_rank(z: torch.Tensor) -> float:
    ev = torch.linalg.eigvalsh(torch.cov(z.T.double())).clamp_min(0)
    return (ev.sum() ** 2 / (ev ** 2).sum().clamp_min(1e-30)).item()


@torch.no_grad()
def probe_codes(model, x: torch.Tensor, ae_form: str) -> dict:
    from ccl_repr.losses import ae_pair_loss
    model.eval()
    a = model.forward_intermediates(x)
    b = model.feedback_intermediates(model.feedback_input(x))
    n, k = len(model.layers), model.feature_index
    rec = {"mse_xhat": F.mse_loss(a[-1], x).item(), "mse_b0": F.mse_loss(b[0], x).item(), "pairs": {}, "decode_b": {},
           "ridge_a": {}, "ridge_b": {}, "std_a": {}, "std_b": {}, "rank_a": {}, "rank_b": {}, "cos_ab": {}}
    flat = x.flatten(1).double()
    half = len(x) // 2
    for l in range(n + 1):
        name = model.layer_names[l]
        rec["pairs"][name] = ae_pair_loss(a[l], b[l], form=ae_form, inner=0 < l < n).item()
        if l >= k and l < n:  # F's decoder fed G's code b_l
            t = b[l]
            for layer in model.layers[l:]:
                t = layer(t)
            rec["decode_b"][name] = F.mse_loss(t, x).item()
        if 0 < l < n:
            for key, z in (("a", a[l]), ("b", b[l])):
                z = z.flatten(1).double()
                rec[f"ridge_{key}"][name] = ridge_mse(z[:half], flat[:half], z[half:], flat[half:])
                rec[f"std_{key}"][name] = z.std(0).mean().item()
                rec[f"rank_{key}"][name] = participation_rank(z)
            rec["cos_ab"][name] = F.cosine_similarity(a[l].flatten(1), b[l].flatten(1), dim=1).mean().item()
    model.train()
    return rec


class EpochMeter:
    """Per-layer pre-clip gradient norms, clip factors and losses, sampled every ``every`` steps,
    and each layer's update/weight ratio over the epoch."""

    def __init__(self, model, cfg, optim: Optimizers, every: int) -> None:
        self.model, self.cfg, self.optim, self.every = model, cfg, optim, every
        self.start = {net: {k: w.detach().clone() for k, w in layer_weights(model, net).items()} for net in NETS}
        self.grads: dict[str, dict[str, float]] = {net: {} for net in NETS}
        self.clip = {net: 0.0 for net in NETS}
        self.losses: dict[str, float] = {}
        self.steps = self.samples = 0

    def observe(self, losses: dict[str, torch.Tensor]) -> None:
        """Call between backward and clip_and_step."""
        if self.steps % self.every == 0:
            self.samples += 1
            for net in NETS:
                for name, w in layer_weights(self.model, net).items():
                    g = w.grad.norm().item() if w.grad is not None else 0.0
                    self.grads[net][name] = self.grads[net].get(name, 0.0) + g
                total = torch.nn.utils.get_total_norm([p.grad for p in self.optim.params[net] if p.grad is not None]).item()
                clip = getattr(self.cfg.optim, net).clip
                self.clip[net] += min(1.0, clip / (total + 1e-6)) if clip > 0 else 1.0
            for k, v in losses.items():
                self.losses[k] = self.losses.get(k, 0.0) + v.item()
        self.steps += 1

    def row(self) -> dict:
        m = max(1, self.samples)
        row = {"lr": self.optim.lrs(), "train_losses": {k: v / m for k, v in self.losses.items()},
               "clip_factor": {net: v / m for net, v in self.clip.items()}}
        for net in NETS:
            row[net] = {}
            for name, w in layer_weights(self.model, net).items():
                w0 = self.start[net][name]
                row[net][name] = {"grad": self.grads[net][name] / m, "weight_norm": w.norm().item(),
                                  "update_ratio": ((w.detach() - w0).norm() / w0.norm().clamp_min(1e-12)).item()}
            for name, bn in batch_norms(self.model, net).items():
                row[net][name].update(bn)
        return row


def run(args: argparse.Namespace) -> None:
    cfg = make_config(args.recipe, method="ccl", overrides={"data": {"root": args.data_root},
                                                            "train": {"epochs": args.epochs}}, sets=args.sets)
    torch.set_num_threads(1)
    seed_everything(cfg.seed)
    bundle = load_data(cfg.data, device="cpu", seed=cfg.seed)
    steps_per_epoch = math.ceil(len(bundle.train) / cfg.train.batch_size)
    model, method, optim = build_trainable(cfg, input_shape=bundle.input_shape, num_classes=bundle.num_classes,
                                           total_steps=cfg.train.epochs * steps_per_epoch)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    xval = bundle.val.x[: args.val_points]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"epoch": 0, **probe_codes(model, xval, cfg.loss.ae_form), "config": cfg.to_dict()}) + "\n")
    model.train()
    for epoch in range(1, cfg.train.epochs + 1):
        t0, meter = time.perf_counter(), EpochMeter(model, cfg, optim, args.every)
        for x, y in batches(bundle.train, cfg.train.batch_size, order=shuffle_order(bundle.train, shuffle)):
            optim.zero_grad()
            meter.observe(method.backward(model, x, y))
            optim.clip_and_step()
        row = {"epoch": epoch, "seconds": time.perf_counter() - t0, **meter.row(), **probe_codes(model, xval, cfg.loss.ae_form)}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        short = {k: {n: round(v, 4) for n, v in row[k].items()} for k in ("decode_b", "ridge_a", "rank_a", "clip_factor")}
        print(f"epoch {epoch} {row['seconds']:.0f}s x̂ {row['mse_xhat']:.4f} b0 {row['mse_b0']:.4f} {json.dumps(short)}", flush=True)


def measure_run(run_dir: str, out: Path, val_points: int) -> None:
    """The same code measurements, the weight norms and the batch norms' scales of a run folder's
    latest checkpoint (e.g. of a ``ccl-repr train`` run still in progress)."""
    from ccl_repr import checkpoint as ckpt

    torch.set_num_threads(1)
    cfg, model = ckpt.load_run(Path(run_dir), weights="last")
    epoch = ckpt.load_checkpoint(Path(run_dir) / ckpt.CHECKPOINT)["epoch"]
    bundle = load_data(cfg.data, device="cpu", seed=cfg.seed)
    row = {"run": run_dir, "epoch": epoch, **probe_codes(model, bundle.val.x[:val_points], cfg.loss.ae_form)}
    for net in NETS:
        row[net] = {name: {"weight_norm": w.norm().item()} for name, w in layer_weights(model, net).items()}
        for name, bn in batch_norms(model, net).items():
            row[net][name].update(bn)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("epoch", "mse_xhat", "rank_a", "forward")}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="ae_mnist")
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--every", type=int, default=20, help="measure gradients every N steps")
    p.add_argument("--val-points", type=int, default=4000)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--out", default="benchmarks/out/ae_diagnose.jsonl")
    p.add_argument("--measure-run", metavar="RUN_DIR", help="only measure RUN_DIR's latest checkpoint (no training)")
    args = p.parse_args()
    if args.measure_run:
        measure_run(args.measure_run, Path(args.out), args.val_points)
    else:
        run(args)


if __name__ == "__main__":
    main()
