"""Settings search for a learning rule on one recipe, chosen on validation data.

Trains ``ccl-repr train RECIPE --method RULE`` through the real CLI for every point of the rule's
search space (the paper's App. 6.1 grids, below; ``--grid KEY=V1,V2`` replaces or adds an axis),
``--jobs`` runs at a time, for ``--epochs`` epochs each, and writes
``benchmarks/results/<tag>.json`` (every point's command, status, per-epoch validation accuracy)
and ``<tag>.md`` (points ranked). The choice is the point with the best *last-epoch* validation
accuracy among the runs that did not diverge, so a setting that peaks and then falls apart is not
chosen; the test split is never read.

    python benchmarks/search.py --recipe mlp_mnist --rule drtp --epochs 5 --data-root ../shared/datasets
    python benchmarks/search.py --recipe mlp_mnist --rule fa --epochs 5 --data-root ../shared/datasets \\
        --grid optim.forward.momentum=0,0.9

A short search favours settings that learn fast; its epochs are in the JSON and the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("CCL_REPR_BENCH_RESULTS") or REPO / "benchmarks" / "results")

# The paper's search spaces (App. 6.1), as config keys.
SPACES = {
    "bp": {"optim.forward.lr": [0.4, 0.2, 0.1, 0.05, 0.02, 0.01], "optim.forward.clip": [0.5, 1.0]},
    "fa": {"optim.forward.lr": [0.4, 0.2, 0.1, 0.05, 0.02, 0.01], "optim.forward.clip": [0.5, 1.0]},
    "dfa": {"optim.forward.lr": [0.4, 0.2, 0.1, 0.05, 0.02, 0.01], "optim.forward.clip": [0.5, 1.0]},
    "drtp": {"optim.forward.lr": [0.01, 0.03, 0.1, 0.3], "rule.proj_mean": [0.0, 0.05],
             "rule.proj_std": [0.01, 0.03, 0.1, 0.3]},
    "ccl": {"optim.forward.lr": [0.2, 0.5, 1.0, 1.5, 2.0], "optim.forward.clip": [0.5, 1.0]},
    # FW-DTP is not in the paper's table: BP's upper learning rates, and output steps around the
    # FW-DTP authors' MNIST example (0.04)
    "fwdtp": {"optim.forward.lr": [0.4, 0.2, 0.1, 0.05], "rule.target_step": [0.01, 0.04, 0.2]},
}
TIED = {"ccl": {"optim.forward.lr": "optim.feedback.lr", "optim.forward.clip": "optim.feedback.clip",
                "optim.forward.momentum": "optim.feedback.momentum"}}


def grid(rule: str, extra: list[str]) -> list[dict[str, str]]:
    """Every point of the rule's space with ``--grid`` axes replaced or added (values as strings)."""
    space = {k: [str(v) for v in vs] for k, vs in SPACES.get(rule, {}).items()}
    for item in extra:
        key, _, values = item.partition("=")
        space[key] = values.split(",")
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]


def point_sets(rule: str, point: dict[str, str]) -> list[str]:
    """--set strings of a point; CCL's forward and feedback networks share lr and clip (App. 6.1), and
    momentum where a grid sets it."""
    sets = [f"{k}={v}" for k, v in point.items()]
    sets += [f"{TIED[rule][k]}={v}" for k, v in point.items() if k in TIED.get(rule, {})]
    return sets


def run_point(i: int, point: dict[str, str], args: argparse.Namespace) -> dict:
    out = Path(args.out) / f"{args.tag}-{i:03d}"
    cmd = [sys.executable, "-m", "ccl_repr.cli", "train", args.recipe, "--method", args.rule, "--seed", str(args.seed),
           "--epochs", str(args.epochs), "--out", str(out), "--overwrite", "--no-progress",
           "--set", f"train.num_threads={args.threads}"]
    cmd += ["--data-root", args.data_root] if args.data_root else []
    for s in args.set + point_sets(args.rule, point):
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    metrics = out / "metrics.jsonl"
    val = [json.loads(line)["val/accuracy"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    status = summary.get("status") or ("failed" if proc.returncode else "completed")
    error = (proc.stderr.strip().splitlines() or [""])[-1] if proc.returncode else ""
    print(f"{args.rule} {point}: {status} {val[-1] if val else ''}", file=sys.stderr, flush=True)
    return {"point": point, "command": shlex.join(["ccl-repr"] + cmd[3:]), "status": status, "error": error,
            "val_accuracy": val, "last_val_accuracy": val[-1] if val and status == "completed" else None}


def render(rows: list[dict], args: argparse.Namespace) -> str:
    ranked = sorted(rows, key=lambda r: -(r["last_val_accuracy"] or -1))
    keys = list(rows[0]["point"]) if rows else []
    lines = [f"### `{args.recipe}` with `{args.rule}`: search on validation, {args.epochs} epochs, seed {args.seed}", "",
             "| " + " | ".join(keys) + " | status | val % per epoch | last val % |",
             "|" + "---|" * (len(keys) + 3)]
    for r in ranked:
        curve = ", ".join(f"{100 * v:.1f}" for v in r["val_accuracy"])
        last = f"{100 * r['last_val_accuracy']:.2f}" if r["last_val_accuracy"] is not None else "–"
        lines.append("| " + " | ".join(r["point"][k] for k in keys) + f" | {r['status']} | {curve} | {last} |")
    best = ranked[0] if ranked and ranked[0]["last_val_accuracy"] is not None else None
    lines += ["", f"Chosen: {best['point'] if best else 'none (every point diverged or failed)'}.",
              f"Diverged or failed: {sum(r['status'] != 'completed' for r in rows)} of {len(rows)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--rule", required=True)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="replace or add a search axis")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every run")
    p.add_argument("--data-root", default="")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="benchmarks/out/search")
    args = p.parse_args()
    args.tag = args.tag or f"search_{args.recipe}_{args.rule}"
    points = grid(args.rule, args.grid)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda ip: run_point(ip[0], ip[1], args), enumerate(points)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"recipe": args.recipe, "rule": args.rule, "epochs": args.epochs, "seed": args.seed,
              "sets": args.set, "grid": args.grid, "points": rows}
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / f"{args.tag}.md").write_text(render(rows, args))
    print(render(rows, args))


if __name__ == "__main__":
    main()
