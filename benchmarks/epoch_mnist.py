"""Wall time of a full mlp_mnist epoch through the real train loop, split into data and compute.

For CCL and backprop, each repeat runs, in turns:
- ``train()`` itself (the real loop: device-resident MNIST from ../shared/datasets, shuffling on
  the device, one loss read per epoch, validation and checkpoint each epoch) for 2 epochs; the
  second epoch is timed. ``loop``: its ``epoch_seconds`` from metrics.jsonl (the optimiser steps
  with batching and bookkeeping); ``full``: from the last step of epoch 1 to the last step of
  epoch 2 (also validation and the checkpoint), taken with a step hook.
- ``compute``: the same seed, init and steps, on the same epoch's batches gathered beforehand
  (no indexing, no shuffling, no bookkeeping during the timed epoch) - its pure compute.
- ``data``: gathering that epoch's batches by the same code (shuffle + index), with no step.
Target: loop / compute <= 1.1 (data and bookkeeping <= 10% of the epoch), medians over repeats.

With ``--run-epochs N`` it also times one whole ``train()`` run of N epochs for CCL (the GPU
target: 100 epochs in <= 30 s).

    python benchmarks/epoch_mnist.py [--threads 2] [--repeats 3] [--run-epochs 0]
writes benchmarks/results/epoch_mnist_{cpu,cuda}.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from speed_common import SHARED_DATASETS, environment, median, setup, sync, write_json
from ccl_repr import checkpoint as ckpt
from ccl_repr.config import make_config
from ccl_repr.data import batches, load_data, shuffle_order
from ccl_repr.fastpath import apply as apply_fast_path
from ccl_repr.builder import build_trainable
from ccl_repr.train import seed_everything, train

TARGET = 1.1


def config(method: str, epochs: int, threads: int, sets: list[str]):
    return make_config("mlp_mnist", method=method, sets=[
        f"data.root={SHARED_DATASETS}", f"train.epochs={epochs}", "train.progress=false",
        f"train.num_threads={threads}", *sets])


def timed_train(cfg, device: torch.device) -> dict:
    """train() for cfg.train.epochs; the last epoch's loop and full times."""
    marks: dict[int, float] = {}

    def hook(*, step: int, epoch: int, **_) -> None:
        marks[epoch] = time.perf_counter()  # the last call of an epoch is its last step
        return None

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = train(cfg, Path(tmp) / "run", log=lambda m: None, hooks=[hook])
        wall = time.perf_counter() - t0
        rows = ckpt.read_jsonl(Path(tmp) / "run" / ckpt.METRICS)
    last = cfg.train.epochs
    sync(device)
    return {"loop": rows[-1]["epoch_seconds"], "full": marks[last] - marks[last - 1] if last > 1 else None,
            "run_wall": wall, "train_seconds": summary["train_seconds"],
            "test_accuracy": summary.get("test_accuracy")}


def compute_and_data(cfg, device: torch.device) -> dict:
    """``data``: gathering one epoch's batches (shuffle + index) with no step. ``compute``: the
    steps of the second of two epochs over those pre-gathered batches, from the same seed and
    init as train() - the same work as the loop's timed epoch, minus data and bookkeeping. (Real
    batches matter: on CPUs whose expm1 is slow, ELU's cost depends on the sign of its inputs.)"""
    seed_everything(cfg.seed)
    bundle = load_data(cfg.data, device=device, seed=cfg.seed)
    steps = math.ceil(len(bundle.train) / cfg.train.batch_size)
    model, method, optim = build_trainable(cfg, input_shape=bundle.input_shape, num_classes=bundle.num_classes,
                                           total_steps=cfg.train.epochs * steps, device=device)
    apply_fast_path(model, method, cfg.train, device, bundle)  # as train() does (bf16 autocast on CUDA)
    shuffle = torch.Generator(device=device).manual_seed(cfg.seed)

    def gather() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(batches(bundle.train, cfg.train.batch_size, order=shuffle_order(bundle.train, shuffle)))

    def epoch_compute(epoch: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for x, y in epoch:
            optim.zero_grad()
            method.backward(model, x, y)
            optim.clip_and_step()

    epoch_compute(gather())  # epoch 1 (warm-up), as in the loop
    sync(device)
    t = time.perf_counter()
    second = gather()
    sync(device)
    data = time.perf_counter() - t
    t = time.perf_counter()
    epoch_compute(second)
    sync(device)
    return {"compute": time.perf_counter() - t, "data": data, "steps": len(second), "num_train": len(bundle.train)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the JSON's name, e.g. _t1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--run-epochs", type=int, default=0, help="also time one full CCL train() run of N epochs")
    p.add_argument("--run-compiled", action="store_true",
                   help="also time the N-epoch run with train.compile (inductor, reduce-overhead: CUDA graphs)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override")
    args = p.parse_args()
    device = setup(args.threads)
    results: dict = {}

    def save() -> None:  # after every phase, so that a timeout keeps what was measured
        write_json(f"epoch_mnist_{device.type}{args.tag}.json", {
            "benchmark": "epoch_mnist", "env": environment(device, args.threads), "sets": args.sets,
            "results": results, "target_loop_over_compute_max": TARGET,
            "met": all(results[m]["loop_over_compute"] <= TARGET for m in ("ccl", "bp"))})

    for method in ("ccl", "bp"):
        reps = []
        for r in range(args.repeats):
            cfg = config(method, 2, args.threads, args.sets)
            rep = {**timed_train(cfg, device), **compute_and_data(cfg, device)}
            reps.append(rep)
            print(f"{method} repeat {r}: loop {rep['loop']:.3f} s  full {rep['full']:.3f} s  compute "
                  f"{rep['compute']:.3f} s  data {rep['data']:.3f} s", flush=True)
        med = {k: median([x[k] for x in reps]) for k in ("loop", "full", "compute", "data")}
        results[method] = {"repeats": reps, "median": med, "steps": reps[0]["steps"],
                           "loop_over_compute": med["loop"] / med["compute"],
                           "full_over_compute": med["full"] / med["compute"],
                           "paired_loop_over_compute": median([x["loop"] / x["compute"] for x in reps]),
                           "data_share_of_loop": med["data"] / med["loop"]}
        print(f"{method}: epoch loop {med['loop']:.2f} s, full {med['full']:.2f} s, compute {med['compute']:.2f} s, "
              f"data {med['data']:.3f} s; loop/compute {results[method]['loop_over_compute']:.3f}, "
              f"full/compute {results[method]['full_over_compute']:.3f}", flush=True)
    save()
    print(json.dumps({m: round(results[m]["loop_over_compute"], 3) for m in ("ccl", "bp")}))
    if args.run_epochs:
        run = timed_train(config("ccl", args.run_epochs, args.threads, args.sets), device)
        results["ccl_full_run"] = {"epochs": args.run_epochs, **run}
        print(f"CCL {args.run_epochs}-epoch run: train_seconds {run['train_seconds']:.1f} s, whole train() "
              f"{run['run_wall']:.1f} s, test accuracy {run['test_accuracy']}", flush=True)
        save()
    if args.run_epochs and args.run_compiled:
        sets = [*args.sets, "train.compile=true", "train.compile_mode=reduce-overhead"]
        run = timed_train(config("ccl", args.run_epochs, args.threads, sets), device)
        results["ccl_full_run_compiled"] = {"epochs": args.run_epochs, "sets": sets, **run}
        print(f"CCL {args.run_epochs}-epoch run, compiled: train_seconds {run['train_seconds']:.1f} s (compilation "
              f"included), whole train() {run['run_wall']:.1f} s, test accuracy {run['test_accuracy']}")
        save()


if __name__ == "__main__":
    main()
