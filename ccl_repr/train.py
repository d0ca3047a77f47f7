"""The explicit training loop: epochs, validation, best epoch, JSON-lines metrics, checkpoints.

One function, :func:`train`, drives any learning rule in :mod:`methods` over any model of the
registry. Losses stay on the device during an epoch and are read once per epoch (no host
synchronisation per step). The weights of the best validation epoch are tested at the end
(the paper's protocol: test the best-validation epoch; docs/fidelity.md).
"""

from __future__ import annotations

import dataclasses
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
from . import distributed, fastpath, tblog
from .fastpath import resolve_device
from .config import Config
from .data import DataBundle, Split, batches, load_data, shuffle_order
from .errors import CheckpointError, DivergenceError
from .guard import CHECK_EVERY, DivergenceGuard, Interrupted, StopRequest
from .methods import Optimizers, make_method
from .models import DualNetwork, build_model
from .preprocess import Preprocess
from .progress import Progress
from .resources import peak_memory

StepHook = Callable[..., "dict[str, Any] | None"]
DIAGNOSTICS = ckpt.DIAGNOSTICS


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


def _rng_state(device: torch.device, shuffle: torch.Generator, aug: torch.Generator | None) -> dict:
    """Every random stream a resumed run must continue (numpy's as a tensor: weights_only loads)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"shuffle": shuffle.get_state(), "augment": aug.get_state() if aug is not None else None,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def _restore(state: dict, model: DualNetwork, optim: Optimizers, shuffle: torch.Generator,
             aug: torch.Generator | None, path: Path) -> None:
    try:
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        rng = state["rng"]
        # Generator states are CPU byte tensors whatever the generator's device.
        shuffle.set_state(rng["shuffle"].cpu())
        if aug is not None:
            aug.set_state(rng["augment"].cpu())
        torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") is not None:
            torch.cuda.set_rng_state_all([t.cpu() for t in rng["cuda"]])
        random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in rng["python"]))
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path} does not fit this run ({type(e).__name__}: {first}); restore the run "
                              f"folder's original files or start a new run with --out") from None


def selection_metric(task: str, select: str) -> str:
    """The validation metric that picks the tested epoch: ``val_accuracy`` (highest) or
    ``val_loss`` (lowest cross-entropy, as the published code) for classifiers; ``val_mse``
    (lowest) for autoencoders whatever ``train.select`` says."""
    return select if task == "classify" else "val_mse"


def _better(metric: str, new: dict, best: dict | None) -> bool:
    if best is None:
        return True
    if metric == "val_accuracy":
        return new["accuracy"] > best["accuracy"]
    key = {"val_loss": "loss", "val_mse": "mse"}[metric]
    return new[key] < best[key]


def train(cfg: Config, out_dir: Path | str, *, overwrite: bool = False, resume: bool = False,
          log: Callable[[str], None] = print, hooks: Sequence[StepHook] = (),
          model: DualNetwork | None = None, data: DataBundle | None = None) -> dict:
    """Train ``cfg`` into ``out_dir`` and return the summary (also written as summary.json).

    ``hooks`` are called after every optimiser step as ``hook(step=, epoch=, model=, x=, y=,
    method=)``; a hook decides itself when to act (e.g. every N steps), must leave the model's
    train/eval mode as it found it, and may return a dict that is appended, with the step, to
    ``diagnostics.jsonl`` in the run folder. This is how evaluations (which the core does not
    import) are logged during training.

    ``model`` (a freshly built DualNetwork, e.g. of the user's own DualLayers) and ``data`` (a
    DataBundle, e.g. from :func:`ccl_repr.data.make_bundle` on the user's tensors) replace the
    ones ``cfg.model`` and ``cfg.data`` would build; :mod:`ccl_repr.api` passes them.

    ``resume=True`` continues ``out_dir`` from its checkpoint and ends as the uninterrupted run
    would (bit-for-bit on CPU; metrics rows and diagnostics written after the checkpoint are
    dropped). The first SIGINT/SIGTERM stops at the next step boundary, writes a checkpoint (mid-
    epoch if need be) and a summary with status "interrupted", and raises guard.Interrupted. A
    non-finite loss or parameter writes a summary with status "diverged", keeps the last good
    checkpoint and raises DivergenceError."""
    out = distributed.run_dir(Path(out_dir), resume=resume)  # only rank 0 writes the run folder
    if resume:
        if not out.is_dir():
            raise CheckpointError(f"run folder {out} does not exist; pass the --out folder of an earlier run to --resume")
        state = ckpt.load_resume_state(out, cfg.to_dict())
    else:
        ckpt.check_run_dir(out, overwrite=overwrite)  # refuse before any time is spent on data
        state = None
    if cfg.train.tensorboard:
        tblog.require()  # a missing package is named before any time is spent on data
    device = resolve_device(cfg.device)
    ddp = distributed.setup(device)  # under torchrun: join the group, pin this rank's GPU
    if state is not None and state["device"] != device.type:
        raise CheckpointError(f"{out} was trained on {state['device']} but would resume on {device.type}; the random "
                              f"streams differ per device, so resume it where a {state['device']} device is available")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.seed)

    bundle, model, method, optim, steps_per_epoch = _build(cfg, device, ddp, model=model, data=data)
    shuffle = torch.Generator(device=device).manual_seed(cfg.seed)
    aug = torch.Generator(device=device).manual_seed(cfg.seed + 1) if cfg.data.augment else None
    meta = {"input_shape": list(bundle.input_shape), "num_classes": bundle.num_classes, "classes": bundle.classes,
            "task": model.task,
            "preprocess": Preprocess.from_bundle(bundle, pad=cfg.data.pad_to).to_dict()}

    start_epoch, step, best, best_epoch, best_state, elapsed = 0, 0, None, -1, None, 0.0
    rows: list[dict] = []  # metrics rows so far; the checkpoint holds them
    partial = None  # position inside an epoch, when the checkpoint was written mid-epoch
    if state is not None:
        _restore(state, model, optim, shuffle, aug, out / ckpt.CHECKPOINT)
        start_epoch, step, elapsed = state["epoch"], state["step"], state["train_seconds"]
        best, best_epoch, best_state = state["best"], state["best_epoch"], state["best_model"]
        rows, partial = list(state["metrics"]), state.get("partial")
        _trim_to_checkpoint(out, rows, step)
        log(f"resuming {out} from epoch {start_epoch}, step {step}")
    else:
        _open_run_dir(out, cfg, meta, overwrite=overwrite)
    saved = (start_epoch, step) if state is not None else None  # what checkpoint.pt holds now

    def save_state(epoch: int, partial: dict | None = None) -> None:
        nonlocal saved
        ckpt.save_checkpoint(out / ckpt.CHECKPOINT, {
            "model": model.state_dict(), "model_meta": meta, "optim": optim.state_dict(),
            "epoch": epoch, "step": step, "train_seconds": elapsed, "config": cfg.to_dict(),
            "best": best, "best_epoch": best_epoch, "best_model": best_state, "metrics": rows,
            "device": device.type, "partial": partial, "rng": _rng_state(device, shuffle, aug)})
        saved = (epoch, step)

    def last_good() -> str:
        if saved is None:
            return "no checkpoint had been written yet; start again with --overwrite"
        return f"the last good checkpoint (epoch {saved[0]}, step {saved[1]}) is kept in {out / ckpt.CHECKPOINT}"

    def write_status(status: str, **extra: Any) -> None:
        ckpt.write_json(out / ckpt.SUMMARY, {
            "status": status, "method": cfg.method, "model": cfg.model.name, "dataset": bundle.name,
            "recipe": cfg.recipe, "epochs": cfg.train.epochs, "seed": cfg.seed, "device": str(device),
            "checkpoint_epoch": saved[0] if saved else None, "checkpoint_step": saved[1] if saved else None,
            "train_seconds": elapsed, **extra,
            "resume": f"ccl-repr train --resume {out}" if saved else None, "versions": ckpt.versions()})

    stop, watch = StopRequest(), DivergenceGuard(model, device)
    progress = Progress(epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch, start_epoch=start_epoch,
                        start_step=step, desc=f"{cfg.method} {cfg.model.name}", device=device,
                        enabled=cfg.train.progress and ddp.is_main)  # one voice: rank 0's under torchrun
    board = tblog.TensorBoardLog(out, resume_epoch=start_epoch if state is not None else None) \
        if cfg.train.tensorboard and ddp.is_main else None
    model.train()
    try:
        with stop:
            for epoch in range(start_epoch, cfg.train.epochs):
                progress.set_epoch(epoch + 1)
                t0 = time.perf_counter()
                if partial is not None:  # resumed mid-epoch: continue the saved permutation
                    order, done, carried = partial["order"].to(device), partial["batches"], partial["seconds"]
                    sums: dict[str, Tensor] = {k: v.to(device) for k, v in partial["sums"].items()}
                    partial = None
                else:
                    order, done, carried, sums = shuffle_order(bundle.train, shuffle), 0, 0.0, {}
                n_batches = done
                for x, y in batches(bundle.train, cfg.train.batch_size, order=order, start=done, augment_with=aug):
                    optim.zero_grad()
                    losses = ddp.backward(method, model, x, y)  # this rank's shard, gradients all-reduced
                    total = sum(losses.values())
                    optim.clip_and_step()
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0) + v.detach()
                    n_batches += 1
                    step += 1
                    watch.observe(total, step)  # device-side; read below, where a sync happens anyway
                    progress.step(step, sums, n_batches)  # its running loss is read without a host sync
                    for hook in hooks:
                        record = hook(step=step, epoch=epoch + 1, model=model, x=x, y=y, method=method)
                        if record:
                            ckpt.append_jsonl(out / DIAGNOSTICS, {"step": step, "epoch": epoch + 1, **record})
                    if step % CHECK_EVERY == 0:
                        watch.check(step=step, epoch=epoch + 1, loss_sums=sums, last_good=last_good())
                    if n_batches < steps_per_epoch and ddp.stop_agreed(stop.requested, step):
                        # Stop between two optimiser steps: the state is consistent and resumable.
                        watch.check(step=step, epoch=epoch + 1, loss_sums=sums, last_good=last_good())
                        save_state(epoch, partial={"order": order, "batches": n_batches, "sums": sums,
                                                   "seconds": carried + time.perf_counter() - t0})
                        raise Interrupted(f"interrupted in epoch {epoch + 1} at step {step}; checkpoint written, "
                                          f"continue with: ccl-repr train --resume {out}", stop.signum or 2)
                train_losses = {k: v.item() / n_batches for k, v in ddp.average(sums).items()}  # one sync per epoch
                step_seconds = carried + time.perf_counter() - t0
                elapsed += step_seconds
                watch.check(step=step, epoch=epoch + 1, loss_sums=sums, last_good=last_good())
                val = evaluate(model, bundle.val, batch_size=cfg.train.eval_batch_size, bundle=bundle) if len(bundle.val) else \
                    evaluate(model, bundle.train, batch_size=cfg.train.eval_batch_size, bundle=bundle)
                if _better(selection_metric(model.task, cfg.train.select), val, best):
                    best, best_epoch = val, epoch + 1
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                row = {"epoch": epoch + 1, "step": step, **{f"train/{k}": v for k, v in train_losses.items()},
                       **{f"val/{k}": v for k, v in val.items()}, **{f"lr/{k}": v for k, v in optim.lrs().items()},
                       "epoch_seconds": step_seconds, "samples_per_second": len(bundle.train) / step_seconds}
                rows.append(row)
                ckpt.append_jsonl(out / ckpt.METRICS, row)
                progress.epoch_end(epoch + 1, train_losses, val, step_seconds)
                if board is not None:
                    board.write(row)
                every = cfg.train.checkpoint_every
                halt = ddp.stop_agreed(stop.requested, step, boundary=True)  # same answer on every rank
                if epoch + 1 < cfg.train.epochs and (halt or (every and (epoch + 1) % every == 0)):
                    save_state(epoch + 1)
                if halt and epoch + 1 < cfg.train.epochs:
                    raise Interrupted(f"interrupted after epoch {epoch + 1} at step {step}; checkpoint written, "
                                      f"continue with: ccl-repr train --resume {out}", stop.signum or 2)
            save_state(cfg.train.epochs)
    except DivergenceError as e:
        write_status("diverged", error=str(e))
        raise
    except KeyboardInterrupt as e:  # Interrupted (checkpoint just written) or a second Ctrl-C
        write_status("interrupted", error=str(e) or "interrupted")
        raise
    finally:
        progress.close()
        if board is not None:
            board.close()

    model.load_state_dict(best_state)
    return _finish(out, cfg, model, bundle, device, meta, best=best, best_epoch=best_epoch,
                   best_state=best_state, elapsed=elapsed)


def _on_device(bundle: DataBundle, device: torch.device) -> DataBundle:
    """A caller's bundle on the training device (tensors already there are not copied)."""
    splits = {k: Split(s.x.to(device), s.y.to(device)) for k, s in
              (("train", bundle.train), ("val", bundle.val), ("test", bundle.test))}
    return dataclasses.replace(bundle, **splits)

def _build(cfg: Config, device: torch.device, ddp: Any, *, model: DualNetwork | None,
           data: DataBundle | None) -> tuple[DataBundle, DualNetwork, Any, Optimizers, int]:
    """Data, model (given or from the registry), learning rule and optimisers, in the order the
    seeded random streams expect (data split, then weight init)."""
    bundle = (load_data(cfg.data, device=device, seed=cfg.seed, progress=cfg.train.progress and ddp.is_main)
              if data is None else _on_device(data, device))
    if model is None:
        model = build_model(cfg.model, input_shape=bundle.input_shape, num_classes=bundle.num_classes)
    model = model.to(device)
    method = make_method(cfg)
    method.prepare(model)
    fastpath.apply(model, method, cfg.train, device, bundle)
    ddp.broadcast_parameters(model)
    steps_per_epoch = math.ceil(len(bundle.train) / cfg.train.batch_size)
    optim = Optimizers(model, cfg.optim, total_steps=cfg.train.epochs * steps_per_epoch)
    return bundle, model, method, optim, steps_per_epoch


def _open_run_dir(out: Path, cfg: Config, meta: dict, *, overwrite: bool) -> None:
    """A fresh run folder with the files that describe the run before it trains."""
    ckpt.prepare_run_dir(out, overwrite=overwrite)
    ckpt.write_json(out / ckpt.CONFIG, cfg.to_dict())
    ckpt.write_json(out / ckpt.VERSIONS, ckpt.versions())
    ckpt.write_json(out / ckpt.PREPROCESS, meta["preprocess"])


def _trim_to_checkpoint(out: Path, rows: list[dict], step: int) -> None:
    """Rows and diagnostics written after the checkpoint describe lost work: drop them so the
    files end up exactly as in an uninterrupted run; the run is live again (no summary)."""
    ckpt.write_jsonl(out / ckpt.METRICS, rows)
    if (out / DIAGNOSTICS).exists():
        ckpt.write_jsonl(out / DIAGNOSTICS, [r for r in ckpt.read_jsonl(out / DIAGNOSTICS)
                                             if r.get("step", 0) <= step])
    (out / ckpt.SUMMARY).unlink(missing_ok=True)


def _finish(out: Path, cfg: Config, model: DualNetwork, bundle: DataBundle, device: torch.device, meta: dict,
            *, best: dict, best_epoch: int, best_state: dict, elapsed: float) -> dict:
    """Save the tested weights (the best validation epoch's, already loaded), test them, draw the
    figures and write summary.json."""
    ckpt.save_checkpoint(out / ckpt.MODEL, {"model": best_state, "model_meta": meta, "epoch": best_epoch,
                                            "config": cfg.to_dict()})
    ckpt.save_safetensors(out / ckpt.SAFETENSORS, best_state, config=cfg.to_dict(), meta=meta)
    test = evaluate(model, bundle.test, batch_size=cfg.train.eval_batch_size, bundle=bundle)
    summary = {
        "method": cfg.method, "model": cfg.model.name, "dataset": bundle.name, "recipe": cfg.recipe,
        "epochs": cfg.train.epochs, "seed": cfg.seed, "device": str(device),
        **({"test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "best_val_accuracy": best["accuracy"], "best_val_loss": best["loss"]} if model.task == "classify" else
           {"test_mse": test["mse"], "best_val_mse": best["mse"]}),
        "selected_by": selection_metric(model.task, cfg.train.select),
        "best_epoch": best_epoch, "train_seconds": elapsed,
        "samples_per_second": len(bundle.train) * cfg.train.epochs / max(elapsed, 1e-9),
        "num_train": len(bundle.train), "num_val": len(bundle.val), "num_test": len(bundle.test),
        "classes": bundle.classes,
        "params_forward": sum(p.numel() for p in model.network_parameters("forward")),
        "params_feedback": sum(p.numel() for p in model.network_parameters("feedback")),
        **peak_memory(device), "status": "completed", "versions": ckpt.versions(),
    }
    from .plots import write_ae_figures, write_training_curves  # matplotlib only when drawing
    figures = write_ae_figures(out, model, bundle, method=cfg.method) if model.task == "reconstruct" else []
    curves = write_training_curves(out, title=f"{cfg.method} {cfg.model.name} on {bundle.name}")
    summary["figures"] = figures + ([curves] if curves else [])
    ckpt.write_json(out / ckpt.SUMMARY, summary)
    return summary
