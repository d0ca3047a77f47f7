"""Accuracy sweep: any classifier recipe, CCL and backprop side by side, per-epoch curves.

Runs ``ccl-repr train RECIPE`` through the real CLI for every (method, seed), one run after the
other, then writes ``benchmarks/results/<tag>.json`` (each run's command, summary and per-epoch
validation accuracy / cross-entropy / epoch time) and a Markdown table plus the curves beside it.

    python benchmarks/cnn.py --recipe cnn_mnist --data-root ../shared/datasets --epochs 10
    python benchmarks/cnn.py --recipe cnn_cifar10_small --tag cnn_cifar10_small_jpeg \\
        --set data.name=imagefolder --set data.root=data/cifar10

``--reuse`` collects a run whose folder already holds a completed summary.json with the same
number of epochs (so an interrupted sweep continues where it stopped). ``--resume`` continues runs that
were interrupted with a checkpoint (``ccl-repr train --resume``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("CCL_REPR_BENCH_RESULTS") or REPO / "benchmarks" / "results")
CURVE_KEYS = ("val/accuracy", "val/loss", "train/ce", "epoch_seconds")


def train_command(method: str, seed: int, args: argparse.Namespace) -> tuple[list[str], Path]:
    out = Path(args.out) / f"{args.tag}-{method}-s{seed}"
    cmd = ["train", args.recipe, "--method", method, "--seed", str(seed), "--epochs", str(args.epochs),
           "--out", str(out), "--no-progress", "--set", f"train.num_threads={args.threads}"]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    for s in args.set:
        cmd += ["--set", s]
    return cmd, out


def read_run(out: Path) -> dict | None:
    """A completed run's summary and per-epoch rows, or None."""
    summary = out / "summary.json"
    if not summary.exists():
        return None
    s = json.loads(summary.read_text())
    if s.get("status") != "completed":
        return None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = {k: [r.get(k) for r in rows] for k in CURVE_KEYS}
    return {"summary": s, "curve": curve}


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    cmd, out = train_command(method, seed, args)
    command = "ccl-repr " + shlex.join(cmd)
    done = read_run(out) if args.reuse else None
    if done is None or done["summary"].get("epochs") != args.epochs:
        resume = args.resume and (out / "checkpoint.pt").exists() and read_run(out) is None  # interrupted
        argv = ["train", "--resume", str(out)] if resume else [*cmd, "--overwrite"]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ccl_repr.cli", *argv], capture_output=True, text=True,
                              cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        print(f"{method} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({command}):\n{proc.stderr[-2000:]}")
        done = read_run(out)
        assert done is not None, f"{out} has no completed summary"
    s = done["summary"]
    return {"method": method, "seed": seed, "command": command, "run_dir": str(out),
            **{k: s.get(k) for k in ("test_accuracy", "best_val_accuracy", "best_epoch", "train_seconds",
                                      "samples_per_second", "epochs", "num_train", "params_forward")},
            "curve": done["curve"]}


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def tables(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"### `{args.tag}`: recipe `{args.recipe}`, {args.epochs} epochs, seeds {' '.join(map(str, args.seeds))}",
             "", "| method | test % per seed | mean | best val % | best epoch | val % after epoch 1 | s/epoch (median) |",
             "|---|---|---|---|---|---|---|"]
    for method in args.methods:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        accs = [100 * r["test_accuracy"] for r in rs]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        epoch_s = statistics.median(t for r in rs for t in r["curve"]["epoch_seconds"])
        lines.append(f"| {method.upper()} | {', '.join(f'{a:.2f}' for a in accs)} | **{statistics.mean(accs):.2f}{spread}** "
                     f"| {', '.join(pct(r['best_val_accuracy']) for r in rs)} | {', '.join(str(r['best_epoch']) for r in rs)} "
                     f"| {', '.join(pct(r['curve']['val/accuracy'][0]) for r in rs)} | {epoch_s:.0f} |")
    lines += ["", "Validation accuracy (%) per epoch:", "",
              "| run | " + " | ".join(str(e + 1) for e in range(args.epochs)) + " |",
              "|---" * (args.epochs + 1) + "|"]
    for r in rows:
        accs = r["curve"]["val/accuracy"]
        lines.append(f"| {r['method'].upper()} s{r['seed']} | " + " | ".join(pct(a) for a in accs) + " |")
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="cnn_mnist")
    p.add_argument("--tag", default="", help="results name (default: the recipe)")
    p.add_argument("--data-root", default="", help="passed to ccl-repr train --data-root")
    p.add_argument("--methods", nargs="+", default=["ccl", "bp"], choices=["ccl", "bp"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to every run")
    p.add_argument("--out", default="benchmarks/out", help="where the run folders go (relative to the repository)")
    p.add_argument("--reuse", action="store_true", help="collect completed runs of the same config")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoint")
    args = p.parse_args()
    args.tag = args.tag or args.recipe
    rows = [run_one(m, s, args) for s in args.seeds for m in args.methods]
    md = tables(rows, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"recipe": args.recipe, "epochs": args.epochs,
                                                          "sets": args.set, "rows": rows, "table": md}, indent=2))
    (RESULTS / f"{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
