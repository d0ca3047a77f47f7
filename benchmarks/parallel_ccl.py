"""Epoch wall time of a recipe (default mlp_mnist): backprop and CCL in one process vs model-parallel CCL on 2 ranks.

Three variants, each the real ``ccl-repr train`` in its own process(es), run in turns within every
repeat (so that whatever else loads the machine loads all of them alike):

- ``bp``: backprop, 1 process x ``--threads`` (default 2) torch threads;
- ``ccl``: CCL (the paper's fresh feedback), 1 process x ``--threads`` threads;
- ``parallel_ccl``: ``torchrun --nproc_per_node=2`` with ``train.parallel=layers`` and
  ``train.feedback_delay=1``, 2 ranks x 1 thread (ccl_repr.parallel; the same total cores); with
  ``--parallel networks`` the F/G split instead (``train.parallel=networks``, no delay:
  ccl_repr.parallel_networks), e.g. ``--recipe ae_mnist --parallel networks``.

The time of an epoch is ``epoch_seconds`` from the run's metrics.jsonl (the optimiser steps with
batching and bookkeeping; validation and checkpoints excluded; rank 0's clock for the pipeline).
The first epoch of every run is a warm-up and is dropped; the figure is the median over the later
epochs of all repeats. Target: parallel_ccl / bp < 1.0. ``--accuracy-epochs N`` also trains the
pipeline for N epochs once and records its test accuracy (target >= 98.0% at 100 epochs).
Measure on an otherwise idle machine: the variants use every core the comparison is about.

    python benchmarks/parallel_ccl.py [--recipe mlp_mnist] [--parallel layers|networks]
                                      [--epochs 3] [--repeats 3] [--threads 2] [--micro-batches 1]
                                      [--accuracy-epochs 0] [--set KEY=VALUE ...] [--tag _NAME]
writes benchmarks/results/parallel_ccl<TAG>.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from speed_common import REPO, SHARED_DATASETS, environment, median, write_json
from ccl_repr import checkpoint as ckpt

TARGET_RATIO, TARGET_ACCURACY = 1.0, 0.98
VARIANTS = ("bp", "ccl", "parallel_ccl")


def command(variant: str, out: Path, *, epochs: int, threads: int, sets: list[str],
            micro_batches: int = 1, device: str = "cpu", recipe: str = "mlp_mnist",
            parallel: str = "layers") -> tuple[list[str], dict]:
    """The command line and environment of one run of ``variant``."""
    common = ["train", recipe, "--epochs", str(epochs), "--device", device, "--out", str(out),
              "--set", f"data.root={SHARED_DATASETS}", "--set", "train.progress=false",
              "--set", "train.checkpoint_every=0", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if variant == "parallel_ccl":
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "-m", "ccl_repr.cli"]
        mode = (["--set", "train.parallel=layers", "--set", "train.feedback_delay=1",
                 "--set", f"train.micro_batches={micro_batches}"] if parallel == "layers"
                else ["--set", "train.parallel=networks"])
        return ([*launch, *common, "--method", "ccl", "--set", "train.num_threads=1", *mode],
                {**env, "OMP_NUM_THREADS": "1"})
    return ([sys.executable, "-m", "ccl_repr.cli", *common, "--method", variant,
             "--set", f"train.num_threads={threads}"], {**env, "OMP_NUM_THREADS": str(threads)})


def run(variant: str, *, epochs: int, threads: int, sets: list[str], micro_batches: int = 1,
        device: str = "cpu", recipe: str = "mlp_mnist", parallel: str = "layers") -> dict:
    """One run: every epoch's seconds, the wall time of the whole command and the test accuracy
    (autoencoders: test MSE)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd, env = command(variant, out, epochs=epochs, threads=threads, sets=sets, micro_batches=micro_batches,
                           device=device, recipe=recipe, parallel=parallel)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{variant} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        rows = ckpt.read_jsonl(out / ckpt.METRICS)
        summary = ckpt.read_json(out / ckpt.SUMMARY)
    return {"epoch_seconds": [r["epoch_seconds"] for r in rows], "wall_seconds": wall,
            "test_accuracy": summary.get("test_accuracy"), "test_mse": summary.get("test_mse"),
            "command": " ".join(cmd[1:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="mlp_mnist")
    p.add_argument("--parallel", choices=("layers", "networks"), default="layers",
                   help="the pipeline over the layers, or the F/G split (autoencoders)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is a warm-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the single-process runs")
    p.add_argument("--accuracy-epochs", type=int, default=0, help="also train the pipeline N epochs for its accuracy")
    p.add_argument("--micro-batches", type=int, default=1, help="train.micro_batches of the pipeline runs")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override for every run")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: one GPU per run, one per rank for the pipeline (benchmarks/gpu.sh)")
    p.add_argument("--tag", default="", help="suffix of the results file: parallel_ccl<TAG>.json")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be >= 2: the first epoch is a warm-up")
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for v in VARIANTS:
            runs[v].append(run(v, epochs=args.epochs, threads=args.threads, sets=args.sets,
                               micro_batches=args.micro_batches, device=args.device, recipe=args.recipe,
                               parallel=args.parallel))
            print(f"repeat {r} {v}: epochs {[round(s, 3) for s in runs[v][-1]['epoch_seconds']]}", flush=True)
    med = {v: median([s for rep in runs[v] for s in rep["epoch_seconds"][1:]]) for v in VARIANTS}
    ratios = {"parallel_ccl_over_bp": med["parallel_ccl"] / med["bp"],
              "parallel_ccl_over_ccl": med["parallel_ccl"] / med["ccl"], "ccl_over_bp": med["ccl"] / med["bp"]}
    accuracy = None
    if args.accuracy_epochs:
        acc = run("parallel_ccl", epochs=args.accuracy_epochs, threads=args.threads, sets=args.sets,
                  micro_batches=args.micro_batches, device=args.device, recipe=args.recipe, parallel=args.parallel)
        accuracy = {"epochs": args.accuracy_epochs, "test_accuracy": acc["test_accuracy"], "test_mse": acc["test_mse"],
                    "met": acc["test_accuracy"] is not None and acc["test_accuracy"] >= TARGET_ACCURACY}
    write_json(f"parallel_ccl{args.tag}.json", {
        "benchmark": "parallel_ccl", "recipe": args.recipe, "parallel": args.parallel, "env": environment(__import__("torch").device(args.device), args.threads),
        "epochs_per_run": args.epochs, "repeats": args.repeats, "sets": args.sets, "micro_batches": args.micro_batches,
        "median_epoch_seconds": med, "ratios": ratios, "target_parallel_over_bp_max": TARGET_RATIO,
        "met": ratios["parallel_ccl_over_bp"] < TARGET_RATIO, "accuracy": accuracy, "runs": runs})
    print(json.dumps({"median_epoch_seconds": {k: round(v, 3) for k, v in med.items()},
                      **{k: round(v, 3) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
