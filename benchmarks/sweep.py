"""Accuracy sweep: one classifier recipe, any learning rules, several seeds, per-epoch curves.

Runs ``ccl-repr train RECIPE --method M --seed S`` through the real CLI (``python -m
ccl_repr.cli``) for every (rule, seed), ``--jobs`` runs at a time, collects each run's
summary.json and metrics.jsonl, and writes ``benchmarks/results/<tag>.json`` (each run's command,
summary, per-epoch validation accuracy / cross-entropy / epoch time, wall time) and
``<tag>.md``: a table with one row per rule (every seed, mean ± std, best epochs, median s/epoch,
and the paper's Table 1 number where it has one for this recipe and rule), notes on what differs
from the paper's setting, and the per-epoch validation curves.

    python benchmarks/sweep.py --recipe mlp_mnist --tag mlp_mnist_accuracy --data-root ../shared/datasets \\
        --methods ccl bp --seeds 0 1 2 --epochs 100 --jobs 2
    python benchmarks/sweep.py --recipe cnn_mnist --data-root ../shared/datasets --epochs 10
    python benchmarks/sweep.py --recipe cnn_cifar10_small --tag cnn_cifar10_small_jpeg --epochs 15 \\
        --set data.name=imagefolder --set data.root=data/cifar10

Paths (``--out``, ``--data-root``, ``data.root``) are relative to the repository root: the runs
start there. ``--methods`` takes any rule name; ``ccl-repr train`` refuses unknown ones (the sweep
then stops with its message and exit code 2). ``--reuse`` collects a run whose folder already holds
a completed summary.json of the same settings (its resolved config: rule, seed, epochs, recipe and
``--set`` values; ``benchmarks/reuse.py``), so an interrupted sweep continues where it stopped; ``--resume`` continues runs that were
interrupted with a checkpoint (``ccl-repr train --resume``).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks.reuse, when run as a script

from benchmarks.reuse import same_settings  # noqa: E402

RESULTS = Path(os.environ.get("CCL_REPR_BENCH_RESULTS") or REPO / "benchmarks" / "results")
CURVE_KEYS = ("val/accuracy", "val/loss", "train/ce", "epoch_seconds", "test/accuracy")  # test/*: train.test_each_epoch

# Test accuracy (%, mean ± std over 5 seeds, 100 epochs) from Table 1 of Kao & Hariharan,
# "Counter-Current Learning", NeurIPS 2024, keyed by (this repository's recipe, learning rule).
PAPER = {
    ("mlp_mnist", "bp"): (98.19, 0.10), ("mlp_mnist", "fa"): (96.96, 0.05), ("mlp_mnist", "dfa"): (97.27, 0.06),
    ("mlp_mnist", "drtp"): (92.16, 0.18), ("mlp_mnist", "ccl"): (98.13, 0.10),
    ("mlp_cifar10", "bp"): (50.03, 0.31), ("mlp_cifar10", "fa"): (45.76, 0.38), ("mlp_cifar10", "dfa"): (42.86, 1.94),
    ("mlp_cifar10", "drtp"): (33.85, 0.43), ("mlp_cifar10", "ccl"): (52.73, 0.59),
    ("cnn_cifar10", "ccl"): (82.94, 0.53), ("cnn_cifar10", "bp"): (87.12, 1.76),
}
PAPER_EPOCHS = 100


class RunFailed(Exception):
    """A ``ccl-repr train`` run exited non-zero; carries its exit code and message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def train_command(method: str, seed: int, args: argparse.Namespace) -> tuple[list[str], Path]:
    """The CLI arguments of one run (after ``ccl-repr``) and its run folder."""
    out = Path(args.out) / f"{args.tag}-{method}-s{seed}"
    cmd = ["train", args.recipe, "--method", method, "--seed", str(seed)]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    cmd += ["--out", str(out), "--no-progress", "--set", f"train.num_threads={args.threads}"]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    for s in args.set:
        cmd += ["--set", s]
    return cmd + ["--overwrite"], out


def read_run(out: Path) -> dict | None:
    """A completed run's summary and per-epoch curves, or None."""
    summary = REPO / out / "summary.json"
    if not summary.exists():
        return None
    s = json.loads(summary.read_text())
    if s.get("status") != "completed":
        return None
    lines = (REPO / out / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, filter(str.strip, lines)) if "epoch" in r]  # one line per epoch
    return {"summary": s, "curve": {k: [r.get(k) for r in rows] for k in ("epoch", *CURVE_KEYS)}}


def launch(argv: list[str], args: argparse.Namespace) -> float:
    """Run ``ccl-repr ARGV`` from the repository root; its wall time, or RunFailed."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ccl_repr.cli", *argv], capture_output=True, text=True,
                          check=False, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        message = tail[-1] if proc.returncode == 2 else "\n".join(tail[-30:])
        raise RunFailed(proc.returncode, f"ccl-repr {shlex.join(argv)}: {message}")
    return time.perf_counter() - t0


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict | None:
    """Train (or collect) one run; its row for the results JSON (None: --collect and not completed)."""
    cmd, out = train_command(method, seed, args)
    done = read_run(out) if args.reuse or args.resume or args.collect else None
    # a completed run with this sweep's settings: its resolved config, not just rule, seed and epochs
    reusable = done is not None and same_settings(REPO / out, args.recipe, method=method, seed=seed,
                                                  sets=list(args.set), epochs=args.epochs)
    if args.collect and not reusable:
        return None
    wall, resumed = None, False
    if not reusable:  # --resume and --reuse both keep a completed run of these settings
        resumed = args.resume and done is None and (REPO / out / "checkpoint.pt").exists()
        wall = launch(["train", "--resume", str(out), "--no-progress"] if resumed else cmd, args)
        print(f"{method} seed {seed}: {wall:.0f} s{' (resumed)' if resumed else ''}", file=sys.stderr)
        done = read_run(out)
        if done is None:
            raise RunFailed(1, f"{out}: the run ended without a completed summary.json")
    s = done["summary"]
    return {"method": method, "seed": seed, "command": "ccl-repr " + shlex.join(cmd), "run_dir": str(out),
            "resumed": resumed, "reused": wall is None, "wall_seconds": wall,
            **{k: s.get(k) for k in ("test_accuracy", "best_val_accuracy", "best_epoch", "train_seconds",
                                      "samples_per_second", "epochs", "dataset", "num_train")},
            "summary": s, "curve": done["curve"]}


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def seconds(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.0f}"


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean = f"{statistics.mean(values):.2f}"
    return f"{mean} ± {statistics.stdev(values):.2f}" if len(values) > 1 else mean


def method_rows(rows: list[dict], method: str) -> list[dict]:
    return sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])


def summary_table(rows: list[dict], methods: list[str], recipe: str) -> list[str]:
    """One row per rule: test % per seed, mean ± std, the paper's number (if any), best epochs, speed."""
    seeds = sorted({r["seed"] for r in rows})
    with_paper = any((recipe, m) in PAPER for m in methods)
    head = ["rule", *(f"seed {s}" for s in seeds), "mean ± std", *(["paper (Table 1)"] if with_paper else []),
            "best val %", "best epochs", "val % after epoch 1", "s/epoch (median)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method in methods:
        rs = method_rows(rows, method)
        by_seed = {r["seed"]: 100 * r["test_accuracy"] for r in rs}
        paper = PAPER.get((recipe, method))
        epoch_s = [t for r in rs for t in r["curve"]["epoch_seconds"] if t is not None]
        cells = [method.upper(), *(f"{by_seed[s]:.2f}" if s in by_seed else "-" for s in seeds),
                 f"**{mean_std(list(by_seed.values()))}**",
                 *([f"{paper[0]:.2f} ± {paper[1]:.2f}" if paper else "-"] if with_paper else []),
                 ", ".join(pct(r["best_val_accuracy"]) for r in rs), ", ".join(str(r["best_epoch"]) for r in rs),
                 ", ".join(pct(r["curve"]["val/accuracy"][0] if r["curve"]["val/accuracy"] else None) for r in rs),
                 seconds(statistics.median(epoch_s)) if epoch_s else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def notes(rows: list[dict], methods: list[str], recipe: str, sets: list[str]) -> list[str]:
    """What separates these runs from the paper's Table 1 setting."""
    epochs = sorted({r["epochs"] for r in rows if r["epochs"] is not None})
    out = []
    if any((recipe, m) in PAPER for m in methods):
        out.append(f"Paper: Table 1 of Kao & Hariharan (NeurIPS 2024), test %, mean ± std over 5 seeds, "
                   f"{PAPER_EPOCHS} epochs. Where this repository's recipe departs from the published settings: "
                   "docs/fidelity.md.")
        if epochs != [PAPER_EPOCHS]:
            out.append(f"**These runs train {', '.join(map(str, epochs))} epochs, not the paper's {PAPER_EPOCHS}**: "
                       "the paper column is not a like-for-like comparison.")
    else:
        covered = sorted({m for r, m in PAPER if r == recipe})
        has = (f"it has {', '.join(covered)}, {PAPER_EPOCHS} epochs" if covered
               else f"it has recipes {', '.join(sorted({r for r, _ in PAPER}))}")
        out.append(f"The paper's Table 1 has no number for {', '.join(methods)} on recipe `{recipe}` ({has}).")
    if sets:
        out.append("Every run changes the recipe with " + " ".join(f"`--set {s}`" for s in sets) + ".")
    if "cifar10" in recipe and any(r.get("dataset") == "imagefolder" for r in rows):
        out.append("**CIFAR-10 here is the JPEG image-folder copy** (the images after a JPEG round trip, "
                   "not the binary set the paper used): its accuracies are on JPEG-compressed images.")
    return out


def curve_table(rows: list[dict], key: str = "val/accuracy") -> list[str]:
    """Accuracy (%) after every epoch (validation, or test where the runs logged it), one row per run."""
    n = max(len(r["curve"].get(key) or []) for r in rows)
    lines = ["| run | " + " | ".join(str(e + 1) for e in range(n)) + " |", "|---" * (n + 1) + "|"]
    for r in rows:
        accs = r["curve"].get(key) or []
        lines.append(f"| {r['method'].upper()} s{r['seed']} | " + " | ".join(pct(a) for a in accs) + " |")
    return lines


def test_curves(rows: list[dict]) -> list[str]:
    """The per-epoch test accuracy of the runs that logged it (train.test_each_epoch), if any."""
    logged = [r for r in rows if any(a is not None for a in r["curve"].get("test/accuracy") or [])]
    if not logged:
        return []
    return ["Test accuracy (%) per epoch (`train.test_each_epoch`: logged for the curve only; the tested "
            "epoch above is still the best validation epoch's):", "", *curve_table(logged, "test/accuracy"), ""]


def render(rows: list[dict], args: argparse.Namespace) -> str:
    """The Markdown report of a sweep."""
    epochs = args.epochs if args.epochs is not None else "the recipe's"
    lines = [f"### `{args.tag}`: recipe `{args.recipe}`, {epochs} epochs, seeds {' '.join(map(str, args.seeds))}",
             "", "Test accuracy (%) with the weights of the selected (best validation) epoch:", "",
             *summary_table(rows, args.methods, args.recipe), "",
             *(f"- {n}" for n in notes(rows, args.methods, args.recipe, args.set)),
             *([f"- Not run yet (no completed run folder): {', '.join(args.missing)}."] if getattr(args, "missing", None)
               else []), "",
             "Validation accuracy (%) per epoch:", "", *curve_table(rows), "", *test_curves(rows),
             "Commands:", "", *(f"    {r['command']}" for r in rows)]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="mlp_mnist", help="a classifier recipe (see `ccl-repr recipes`)")
    p.add_argument("--methods", nargs="+", default=["ccl", "bp"], metavar="RULE",
                   help="learning rules, passed to ccl-repr train --method")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=None, help="passed to ccl-repr train (default: the recipe's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each with --threads threads)")
    p.add_argument("--data-root", default="", help="passed to ccl-repr train --data-root")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to every run")
    p.add_argument("--tag", default="", help="results name: benchmarks/results/<tag>.{json,md} (default: the recipe)")
    p.add_argument("--out", default="benchmarks/out", help="where the run folders <tag>-<rule>-s<seed> go")
    p.add_argument("--reuse", action="store_true", help="collect completed runs instead of training them again")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from their checkpoint")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: tabulate the completed runs, list the others as not run")
    args = p.parse_args(argv)
    args.reuse = args.reuse or args.collect
    args.tag = args.tag or args.recipe
    if min(args.jobs, args.threads, args.epochs or 1) < 1:
        p.error("--jobs, --threads and --epochs must be at least 1")
    if len(set(args.methods)) < len(args.methods) or len(set(args.seeds)) < len(args.seeds):
        p.error("--methods and --seeds must not repeat a value")
    if Path(args.tag).name != args.tag:
        p.error(f"--tag {args.tag!r} names a file in benchmarks/results: use a plain name without '/'")
    return args


def main() -> None:
    args = parse_args()
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            done = list(pool.map(lambda job: run_one(*job, args), jobs))
    except RunFailed as e:
        print(f"sweep.py: {e} (finished runs stay in {args.out}; rerun with --reuse to keep them)", file=sys.stderr)
        raise SystemExit(2 if e.code == 2 else 1) from None
    rows = [r for r in done if r is not None]
    args.missing = [f"{m} seed {s}" for (m, s), r in zip(jobs, done) if r is None]
    md = render(rows, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"recipe": args.recipe, "epochs": args.epochs, "methods": args.methods, "seeds": args.seeds,
              "sets": args.set, "threads": args.threads, "jobs": args.jobs,
              "paper": {m: PAPER[(args.recipe, m)] for m in args.methods if (args.recipe, m) in PAPER},
              "rows": rows, "not_run": args.missing, "table": md}
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=2))
    (RESULTS / f"{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
