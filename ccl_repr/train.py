"""The explicit training loop: epochs, validation, best epoch, JSON-lines metrics, checkpoints.

One function, :func:`train`, drives any learning rule of :data:`ccl_repr.registry.RULES` over any
model of the model registry. Losses stay on the device during an epoch and are read once per epoch (no host
synchronisation per step). The weights of the best validation epoch are tested at the end
(the paper's protocol: test the best-validation epoch; docs/fidelity.md).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
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
from . import distributed, fastpath, parallel, parallel_networks, tblog
from .fastpath import resolve_device
from .config import Config, TrainConfig
from .data import DataBundle, Split, batches, load_data, shuffle_order
from .errors import CheckpointError, DivergenceError
from .guard import CHECK_EVERY, DivergenceGuard, Interrupted, StopRequest
from .optim import Optimizers
from .rules import LearningRule
from .builder import build_trainable
from .state import TrainingState
from .models import DualNetwork
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
    non-finite loss or parameter, or a finite loss far above its reference (``train.diverge_factor``,
    ``train.diverge_growth``; :mod:`ccl_repr.guard`), writes a summary with status "diverged",
    keeps the last good checkpoint and raises DivergenceError."""
    parallel.check_config(cfg, hooks=hooks)  # model-parallel options refused before anything runs
    out, state, device, ddp = _start(cfg, Path(out_dir), overwrite=overwrite, resume=resume)
    bundle, model, rule, optim, steps_per_epoch = _build(cfg, device, ddp, model=model, data=data)
    if cfg.train.parallel != "none":  # this rank's block of layers or network: its group, stage and optimisers
        setup = parallel.layer_parallel if cfg.train.parallel == "layers" else parallel_networks.network_parallel
        ddp, rule, optim = setup(cfg, model, rule, device, total_steps=cfg.train.epochs * steps_per_epoch)
    st = TrainingState(model=model, rule=rule, optim=optim, device=device,
                       shuffle=torch.Generator(device=device).manual_seed(cfg.seed),
                       aug=torch.Generator(device=device).manual_seed(cfg.seed + 1) if cfg.data.augment else None)
    meta = {"input_shape": list(bundle.input_shape), "num_classes": bundle.num_classes, "classes": bundle.classes,
            "task": model.task, "preprocess": Preprocess.from_bundle(bundle, pad=cfg.data.pad_to).to_dict()}
    if state is not None:
        st.restore(state, out / ckpt.CHECKPOINT)
        _trim_to_checkpoint(out, st.rows, st.step)
        log(f"resuming {out} from epoch {st.epoch}, step {st.step}")
    else:
        _open_run_dir(out, cfg, meta, overwrite=overwrite)
    loop = _Loop(cfg=cfg, out=out, bundle=bundle, ddp=ddp, meta=meta, steps_per_epoch=steps_per_epoch,
                 hooks=hooks, stop=StopRequest(),
                 watch=DivergenceGuard.for_run(model, device, cfg, train_x=bundle.train.x, rows=st.rows),
                 progress=Progress(epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch, start_epoch=st.epoch,
                                   start_step=st.step, desc=f"{cfg.method} {cfg.model.name}", device=device,
                                   enabled=cfg.train.progress and ddp.is_main),  # one voice: rank 0's
                 board=tblog.TensorBoardLog(out, resume_epoch=st.epoch if state is not None else None)
                 if cfg.train.tensorboard and ddp.is_main else None)
    _run_epochs(loop, st)
    model.load_state_dict(st.best_state)
    return _finish(out, cfg, model, bundle, device, meta, best=st.best, best_epoch=st.best_epoch,
                   best_state=st.best_state, elapsed=st.elapsed, rule_state=rule.state_dict())


def _start(cfg: Config, out: Path, *, overwrite: bool, resume: bool) -> tuple[Path, dict | None, torch.device, Any]:
    """The run folder checked (or its checkpoint read), the device, the process group, threads
    and seeds: everything refused before any time is spent on data."""
    out = distributed.run_dir(out, resume=resume)  # only rank 0 writes the run folder
    if resume:
        if not out.is_dir():
            raise CheckpointError(f"run folder {out} does not exist; pass the --out folder of an earlier run to --resume")
        state = ckpt.load_resume_state(out, cfg.to_dict())
    else:
        ckpt.check_run_dir(out, overwrite=overwrite)
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
    return out, state, device, ddp


@dataclass
class _Loop:
    """The fixed parts of a run that every epoch uses (the changing parts are the TrainingState)."""
    cfg: Config
    out: Path
    bundle: DataBundle
    ddp: Any
    meta: dict
    steps_per_epoch: int
    hooks: Sequence[StepHook]
    stop: StopRequest
    watch: DivergenceGuard
    progress: Progress
    board: Any

    def save(self, st: TrainingState, epoch: int, partial: dict | None = None) -> None:
        st.save(self.out / ckpt.CHECKPOINT, epoch=epoch, meta=self.meta, config=self.cfg.to_dict(), partial=partial)

    def last_good(self, st: TrainingState) -> str:
        return st.last_good(self.out / ckpt.CHECKPOINT)

    def write_status(self, st: TrainingState, status: str, **extra: Any) -> None:
        cfg, saved = self.cfg, st.saved
        ckpt.write_json(self.out / ckpt.SUMMARY, {
            "status": status, "method": cfg.method, "model": cfg.model.name, "dataset": self.bundle.name,
            "recipe": cfg.recipe, "epochs": cfg.train.epochs, "seed": cfg.seed, "device": str(st.device),
            "checkpoint_epoch": saved[0] if saved else None, "checkpoint_step": saved[1] if saved else None,
            "train_seconds": st.elapsed, **extra,
            "resume": f"ccl-repr train --resume {self.out}" if saved else None, "versions": ckpt.versions()})


def _run_epochs(loop: _Loop, st: TrainingState) -> None:
    """Every remaining epoch, then the final checkpoint; a divergence or an interruption writes
    its status into summary.json before it propagates."""
    st.model.train()
    try:
        with loop.stop:
            for epoch in range(st.epoch, loop.cfg.train.epochs):
                loop.progress.set_epoch(epoch + 1)
                train_losses, seconds = _train_epoch(loop, st, epoch)
                _end_epoch(loop, st, epoch, train_losses, seconds)
            loop.save(st, loop.cfg.train.epochs)
    except DivergenceError as e:
        loop.write_status(st, "diverged", error=str(e))
        raise
    except KeyboardInterrupt as e:  # Interrupted (checkpoint just written) or a second Ctrl-C
        loop.write_status(st, "interrupted", error=str(e) or "interrupted")
        raise
    finally:
        loop.progress.close()
        if loop.board is not None:
            loop.board.close()


def _train_epoch(loop: _Loop, st: TrainingState, epoch: int) -> tuple[dict[str, float], float]:
    """One epoch of optimiser steps (or its rest, resumed mid-epoch): the mean training losses,
    read once, and the seconds it took. A stop request ends it between two steps with a checkpoint."""
    cfg, ddp, device = loop.cfg, loop.ddp, st.device
    t0 = time.perf_counter()
    if st.partial is not None:  # resumed mid-epoch: continue the saved permutation
        p, st.partial = st.partial, None
        order, done, carried = p["order"].to(device), p["batches"], p["seconds"]
        sums: dict[str, Tensor] = {k: v.to(device) for k, v in p["sums"].items()}
    else:
        order, done, carried, sums = shuffle_order(loop.bundle.train, st.shuffle), 0, 0.0, {}
    n_batches = done
    epoch_batches = batches(loop.bundle.train, cfg.train.batch_size, order=order, start=done, augment_with=st.aug)
    for x, y in itertools.islice(epoch_batches, loop.steps_per_epoch - done):
        st.optim.zero_grad()
        losses = ddp.backward(st.rule, st.model, x, y)  # this rank's shard, gradients all-reduced
        st.optim.clip_and_step()
        st.rule.end_step()  # e.g. CCL's delayed feedback values advance
        for k, v in losses.items():
            sums[k] = sums.get(k, 0) + v.detach()
        n_batches += 1
        st.step += 1
        loop.watch.observe(sum(losses.values()), st.step)  # device-side; read where a sync happens anyway
        loop.progress.step(st.step, sums, n_batches)  # its running loss is read without a host sync
        _call_hooks(loop, st, epoch, x, y)
        if st.step % CHECK_EVERY == 0:  # rank-averaged sums: every rank decides alike
            loop.watch.check(step=st.step, epoch=epoch + 1, loss_sums=ddp.average(sums),
                             last_good=loop.last_good(st), batches=n_batches)
        if n_batches < loop.steps_per_epoch and ddp.stop_agreed(loop.stop.requested, st.step):
            # Stop between two optimiser steps: the state is consistent and resumable.
            ddp.sync_model(st.model)  # model parallel: every rank's block into the saved model
            loop.watch.check(step=st.step, epoch=epoch + 1, loss_sums=ddp.average(sums),
                             last_good=loop.last_good(st), batches=n_batches)
            loop.save(st, epoch, partial={"order": order, "batches": n_batches, "sums": sums,
                                          "seconds": carried + time.perf_counter() - t0})
            raise Interrupted(f"interrupted in epoch {epoch + 1} at step {st.step}; checkpoint written, "
                              f"continue with: ccl-repr train --resume {loop.out}", loop.stop.signum or 2)
    ddp.sync_model(st.model)  # model parallel: the whole model for validation and checkpoints
    train_losses = {k: v.item() / n_batches for k, v in ddp.average(sums).items()}  # one sync per epoch
    seconds = carried + time.perf_counter() - t0
    loop.watch.check(step=st.step, epoch=epoch + 1, loss_sums=sums, last_good=loop.last_good(st),
                     means=train_losses)  # read above, averaged over ranks
    return train_losses, seconds


def _call_hooks(loop: _Loop, st: TrainingState, epoch: int, x: Tensor, y: Tensor) -> None:
    for hook in loop.hooks:
        record = hook(step=st.step, epoch=epoch + 1, model=st.model, x=x, y=y, method=st.rule)
        if record:
            ckpt.append_jsonl(loop.out / DIAGNOSTICS, {"step": st.step, "epoch": epoch + 1, **record})


def _end_epoch(loop: _Loop, st: TrainingState, epoch: int, train_losses: dict[str, float], seconds: float) -> None:
    """Validation, the best epoch, the metrics row, and the epoch's checkpoint (or the stop)."""
    cfg, bundle = loop.cfg, loop.bundle
    st.elapsed += seconds
    split = bundle.val if len(bundle.val) else bundle.train
    val = evaluate(st.model, split, batch_size=cfg.train.eval_batch_size, bundle=bundle)
    if _better(selection_metric(st.model.task, cfg.train.select), val, st.best):
        st.best, st.best_epoch = val, epoch + 1
        st.best_state = {k: v.detach().clone() for k, v in st.model.state_dict().items()}
    row = {"epoch": epoch + 1, "step": st.step, **{f"train/{k}": v for k, v in train_losses.items()},
           **{f"val/{k}": v for k, v in val.items()}, **_test_curve(loop, st),
           **{f"lr/{k}": v for k, v in st.optim.lrs().items()},
           "epoch_seconds": seconds, "samples_per_second": epoch_samples(len(bundle.train), cfg.train) / seconds}
    st.rows.append(row)
    ckpt.append_jsonl(loop.out / ckpt.METRICS, row)
    loop.progress.epoch_end(epoch + 1, train_losses, val, seconds)
    if loop.board is not None:
        loop.board.write(row)
    every, last = cfg.train.checkpoint_every, epoch + 1 >= cfg.train.epochs
    halt = loop.ddp.stop_agreed(loop.stop.requested, st.step, boundary=True)  # same answer on every rank
    if not last and (halt or (every and (epoch + 1) % every == 0)):
        loop.save(st, epoch + 1)
    if halt and not last:
        raise Interrupted(f"interrupted after epoch {epoch + 1} at step {st.step}; checkpoint written, "
                          f"continue with: ccl-repr train --resume {loop.out}", loop.stop.signum or 2)


def _test_curve(loop: _Loop, st: TrainingState) -> dict[str, float]:
    """With ``train.test_each_epoch``: this epoch's test metrics, for learning curves only (the tested
    epoch is still the best *validation* epoch's, tested once more at the end)."""
    if not loop.cfg.train.test_each_epoch:
        return {}
    test = evaluate(st.model, loop.bundle.test, batch_size=loop.cfg.train.eval_batch_size, bundle=loop.bundle)
    return {f"test/{k}": v for k, v in test.items()}


def _on_device(bundle: DataBundle, device: torch.device) -> DataBundle:
    """A caller's bundle on the training device (tensors already there are not copied)."""
    splits = {k: Split(s.x.to(device), s.y.to(device)) for k, s in
              (("train", bundle.train), ("val", bundle.val), ("test", bundle.test))}
    return dataclasses.replace(bundle, **splits)


def epoch_steps(num_train: int, train_cfg: TrainConfig) -> int:
    """Optimiser steps per epoch: every batch, or the first ``train.batches_per_epoch`` of them."""
    steps = math.ceil(num_train / train_cfg.batch_size)
    return min(steps, train_cfg.batches_per_epoch) if train_cfg.batches_per_epoch else steps


def epoch_samples(num_train: int, train_cfg: TrainConfig) -> int:
    """Training images one epoch sees (for samples per second)."""
    return min(num_train, epoch_steps(num_train, train_cfg) * train_cfg.batch_size)


def _build(cfg: Config, device: torch.device, ddp: Any, *, model: DualNetwork | None,
           data: DataBundle | None) -> tuple[DataBundle, DualNetwork, LearningRule, Optimizers, int]:
    """Data, model (given or from the registry), learning rule and optimisers, in the order the
    seeded random streams expect (data split, then weight init)."""
    bundle = (load_data(cfg.data, device=device, seed=cfg.seed, progress=cfg.train.progress and ddp.is_main)
              if data is None else _on_device(data, device))
    steps_per_epoch = epoch_steps(len(bundle.train), cfg.train)
    model, rule, optim = build_trainable(cfg, input_shape=bundle.input_shape, num_classes=bundle.num_classes,
                                         total_steps=cfg.train.epochs * steps_per_epoch, device=device, model=model)
    fastpath.apply(model, rule, cfg.train, device, bundle)
    ddp.broadcast_parameters(model)
    return bundle, model, rule, optim, steps_per_epoch


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
            *, best: dict, best_epoch: int, best_state: dict, elapsed: float, rule_state: dict) -> dict:
    """Save the tested weights (the best validation epoch's, already loaded), test them, draw the
    figures and write summary.json."""
    ckpt.save_checkpoint(out / ckpt.MODEL, {"model": best_state, "model_meta": meta, "epoch": best_epoch,
                                            "rule": rule_state, "config": cfg.to_dict()})
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
        "samples_per_second": epoch_samples(len(bundle.train), cfg.train) * cfg.train.epochs / max(elapsed, 1e-9),
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
