"""The explicit training loop: epochs, validation, best epoch, JSON-lines metrics, checkpoints.

One function, :func:`train`, drives any learning rule in :mod:`methods` over any model of the
registry. Losses stay on the device during an epoch and are read once per epoch (no host
synchronisation per step). The weights of the best validation epoch are tested at the end
(spec §4: "test the best-validation epoch").
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import checkpoint as ckpt
from .config import Config
from .data import DataBundle, Split, batches, load_data
from .errors import ConfigError, DivergenceError
from .methods import Optimizers, make_method
from .models import DualNetwork, build_model

StepHook = Callable[..., "dict[str, Any] | None"]
DIAGNOSTICS = "diagnostics.jsonl"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available; use --device auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@torch.no_grad()
def evaluate(model: DualNetwork, split: Split, *, batch_size: int, bundle: DataBundle | None = None) -> dict[str, float]:
    """Accuracy and cross-entropy (classifiers) or reconstruction MSE (autoencoders).

    Autoencoder MSE is reported on the [0, 1] pixel scale (inputs and outputs de-standardised),
    the scale of the paper's STL-10 numbers."""
    was_training = model.training
    model.eval()
    total, correct, loss_sum = 0, torch.zeros((), device=split.x.device), torch.zeros((), device=split.x.device)
    for x, y in batches(split, batch_size):
        out = model(x)
        if model.task == "classify":
            loss_sum += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
        else:
            if bundle is not None:
                out, x = bundle.denormalize(out), bundle.denormalize(x)
            loss_sum += F.mse_loss(out, x, reduction="sum") / x[0].numel()
        total += len(y)
    model.train(was_training)
    if model.task == "classify":
        return {"accuracy": correct.item() / max(total, 1), "loss": loss_sum.item() / max(total, 1)}
    return {"mse": loss_sum.item() / max(total, 1)}


def _first_nonfinite(model: DualNetwork) -> str | None:
    for net in ("forward", "feedback"):
        for name, params in model.parameter_groups(net):
            if any(not torch.isfinite(p).all() for p in params):
                return f"{net} network, layer {name}"
    return None


def _better(task: str, new: dict, best: dict | None) -> bool:
    if best is None:
        return True
    return new["accuracy"] > best["accuracy"] if task == "classify" else new["mse"] < best["mse"]


def train(cfg: Config, out_dir: Path | str, *, overwrite: bool = False, resume: bool = False,
          log: Callable[[str], None] = print, hooks: Sequence[StepHook] = ()) -> dict:
    """Train ``cfg`` into ``out_dir`` and return the summary (also written as summary.json).

    ``hooks`` are called after every optimiser step as ``hook(step=, epoch=, model=, x=, y=,
    method=)``; a hook decides itself when to act (e.g. every N steps), must leave the model's
    train/eval mode as it found it, and may return a dict that is appended, with the step, to
    ``diagnostics.jsonl`` in the run folder. This is how evaluations (which the core does not
    import) are logged during training."""
    out = Path(out_dir)
    if resume:
        state = ckpt.load_checkpoint(out / ckpt.CHECKPOINT)
    else:
        ckpt.prepare_run_dir(out, overwrite=overwrite)
        state = None
    device = resolve_device(cfg.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.seed)

    bundle = load_data(cfg.data, device=device, seed=cfg.seed)
    model = build_model(cfg.model, input_shape=bundle.input_shape, num_classes=bundle.num_classes).to(device)
    method = make_method(cfg)
    method.prepare(model)
    steps_per_epoch = math.ceil(len(bundle.train) / cfg.train.batch_size)
    optim = Optimizers(model, cfg.optim, total_steps=cfg.train.epochs * steps_per_epoch)
    shuffle = torch.Generator(device=device).manual_seed(cfg.seed)
    aug = torch.Generator(device=device).manual_seed(cfg.seed + 1) if cfg.data.augment else None
    meta = {"input_shape": list(bundle.input_shape), "num_classes": bundle.num_classes, "task": model.task}

    start_epoch, step, best, best_epoch, best_state, elapsed = 0, 0, None, -1, None, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        shuffle.set_state(state["rng"]["shuffle"].to("cpu"))
        if aug is not None:
            aug.set_state(state["rng"]["augment"].to("cpu"))
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch, step, elapsed = state["epoch"], state["step"], state["train_seconds"]
        best, best_epoch, best_state = state["best"], state["best_epoch"], state["best_model"]
        log(f"resuming {out} from epoch {start_epoch}")
    else:
        ckpt.write_json(out / ckpt.CONFIG, cfg.to_dict())
        ckpt.write_json(out / ckpt.VERSIONS, ckpt.versions())

    def save_state(epoch: int) -> None:
        ckpt.save_checkpoint(out / ckpt.CHECKPOINT, {
            "model": model.state_dict(), "model_meta": meta, "optim": optim.state_dict(),
            "epoch": epoch, "step": step, "train_seconds": elapsed, "config": cfg.to_dict(),
            "best": best, "best_epoch": best_epoch, "best_model": best_state,
            "rng": {"shuffle": shuffle.get_state(), "augment": aug.get_state() if aug is not None else None,
                    "torch": torch.get_rng_state()}})

    progress = _progress(range(start_epoch, cfg.train.epochs), cfg, start_epoch)
    model.train()
    for epoch in progress:
        t0 = time.perf_counter()
        sums: dict[str, Tensor] = {}
        n_batches = 0
        for x, y in batches(bundle.train, cfg.train.batch_size, generator=shuffle, augment_with=aug):
            losses = method.losses(model, x, y)
            optim.step(sum(losses.values()))
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach()
            n_batches += 1
            step += 1
            for hook in hooks:
                record = hook(step=step, epoch=epoch + 1, model=model, x=x, y=y, method=method)
                if record:
                    ckpt.append_jsonl(out / DIAGNOSTICS, {"step": step, "epoch": epoch + 1, **record})
        train_losses = {k: v.item() / n_batches for k, v in sums.items()}  # one sync per epoch
        step_seconds = time.perf_counter() - t0
        elapsed += step_seconds
        bad = [k for k, v in train_losses.items() if not math.isfinite(v)]
        where = _first_nonfinite(model)
        if bad or where:
            raise DivergenceError(f"training diverged at epoch {epoch + 1}, step {step}: non-finite "
                                  f"{'loss ' + bad[0] if bad else 'parameters'}"
                                  f"{' in the ' + where if where else ''}; lower the learning rate or "
                                  f"clip (optim.forward.clip); last good checkpoint kept in {out}")
        val = evaluate(model, bundle.val, batch_size=cfg.train.eval_batch_size, bundle=bundle) if len(bundle.val) else \
            evaluate(model, bundle.train, batch_size=cfg.train.eval_batch_size, bundle=bundle)
        if _better(model.task, val, best):
            best, best_epoch = val, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        row = {"epoch": epoch + 1, "step": step, **{f"train/{k}": v for k, v in train_losses.items()},
               **{f"val/{k}": v for k, v in val.items()}, **{f"lr/{k}": v for k, v in optim.lrs().items()},
               "epoch_seconds": step_seconds, "samples_per_second": len(bundle.train) / step_seconds}
        ckpt.append_jsonl(out / ckpt.METRICS, row)
        if hasattr(progress, "set_postfix"):
            progress.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in row.items() if k.startswith("val/")})
        if cfg.train.checkpoint_every and (epoch + 1) % cfg.train.checkpoint_every == 0:
            save_state(epoch + 1)

    save_state(cfg.train.epochs)
    model.load_state_dict(best_state)
    ckpt.save_checkpoint(out / ckpt.MODEL, {"model": best_state, "model_meta": meta, "epoch": best_epoch,
                                            "config": cfg.to_dict()})
    test = evaluate(model, bundle.test, batch_size=cfg.train.eval_batch_size, bundle=bundle)
    summary = {
        "method": cfg.method, "model": cfg.model.name, "dataset": bundle.name, "recipe": cfg.recipe,
        "epochs": cfg.train.epochs, "seed": cfg.seed, "device": str(device),
        **({"test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "best_val_accuracy": best["accuracy"]} if model.task == "classify" else
           {"test_mse": test["mse"], "best_val_mse": best["mse"]}),
        "best_epoch": best_epoch, "train_seconds": elapsed,
        "samples_per_second": len(bundle.train) * cfg.train.epochs / max(elapsed, 1e-9),
        "num_train": len(bundle.train), "num_val": len(bundle.val), "num_test": len(bundle.test),
        "params_forward": sum(p.numel() for p in model.network_parameters("forward")),
        "params_feedback": sum(p.numel() for p in model.network_parameters("feedback")),
        "status": "completed", "versions": ckpt.versions(),
    }
    ckpt.write_json(out / ckpt.SUMMARY, summary)
    return summary


def _progress(it, cfg: Config, start: int):
    if not cfg.train.progress:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, total=cfg.train.epochs, initial=start, desc=f"{cfg.method} {cfg.model.name}",
                unit="epoch", leave=False, dynamic_ncols=True, disable=None)
