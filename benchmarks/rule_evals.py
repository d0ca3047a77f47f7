"""How each learning rule's representations differ: probes and update angles per layer, side by side.

Runs ``ccl-repr eval RUN --protocols linear,align`` on every run folder given (folders or globs,
e.g. the seed-0 runs of a ``benchmarks/sweep.py`` sweep), then writes
``benchmarks/results/<tag>.json`` (each run's rule, seed, test accuracy, per-layer linear-probe
accuracy of F's activations, and the angle between the rule's own update and backprop's on the
same batch, trained and at initialisation) and ``<tag>.md``: one row per run.

    python benchmarks/rule_evals.py --tag table1_mlp_mnist_evals 'benchmarks/out/table1_mlp_mnist-*-s0'
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("CCL_REPR_BENCH_RESULTS") or REPO / "benchmarks" / "results")


def evaluate(run: Path, args: argparse.Namespace) -> dict:
    out = run / "eval_rules"
    cmd = [sys.executable, "-m", "ccl_repr.cli", "eval", str(run), "--protocols", args.protocols, "--baselines", "",
           "--out", str(out), "--no-progress"] + (["--data-root", args.data_root] if args.data_root else [])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"rule_evals: eval of {run} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    ev = json.loads((out / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    align = ev.get("alignment") or {}
    return {"run_dir": str(run), "command": "ccl-repr " + " ".join(cmd[3:]), "rule": summary["method"],
            "seed": summary["seed"], "epochs": summary["epochs"], "test_accuracy": summary.get("test_accuracy"),
            "probe": {k: v.get("linear_probe_accuracy") for k, v in ev.get("layers", {}).items()},
            "angle": align.get("update_angle_degrees"), "angle_at_init": align.get("update_angle_degrees_random_init"),
            "weight_alignment": align.get("weight_alignment")}


def render(rows: list[dict], tag: str) -> str:
    layers = list(rows[0]["probe"] or rows[0]["angle"] or {}) if rows else []
    fmt = lambda v, f: "–" if v is None else f.format(v)  # noqa: E731
    lines = [f"### {tag}: linear probe of F's layers (test %) and the rule's update vs backprop (degrees)", "",
             "| rule | seed | test % | " + " | ".join(f"probe {n}" for n in layers) + " | "
             + " | ".join(f"angle {n} (init)" for n in layers) + " |",
             "|" + "---|" * (3 + 2 * len(layers))]
    for r in rows:
        probes = [fmt((r["probe"] or {}).get(n), "{:.2%}").replace("%", "") for n in layers]
        angles = [f"{fmt((r['angle'] or {}).get(n), '{:.1f}')} ({fmt((r['angle_at_init'] or {}).get(n), '{:.1f}')})"
                  for n in layers]
        lines.append(f"| {r['rule']} | {r['seed']} | {fmt(r['test_accuracy'], '{:.2%}').replace('%', '')} | "
                     + " | ".join(probes) + " | " + " | ".join(angles) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders or quoted globs")
    p.add_argument("--tag", required=True)
    p.add_argument("--protocols", default="linear,align")
    p.add_argument("--data-root", default="")
    args = p.parse_args()
    runs = sorted({Path(m) for pattern in args.runs for m in (glob.glob(pattern) or [pattern])})
    rows = [evaluate(run, args) for run in runs if (run / "summary.json").exists()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    (RESULTS / f"{args.tag}.md").write_text(render(rows, args.tag))
    print(render(rows, args.tag))


if __name__ == "__main__":
    main()
