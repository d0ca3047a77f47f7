"""Collect the per-epoch validation curves of run folders, finished or not, into one JSON.

For runs that a benchmark cannot collect (stopped early on purpose, or trained by hand with
``ccl-repr train``): each folder's status, the config values that differ from its recipe, its
validation metrics per epoch (``val/*``) and its training seconds, so a curve quoted in docs/
keeps its source.

    python benchmarks/collect_curves.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/NAME.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ccl_repr import checkpoint as ckpt
from ccl_repr.config import make_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.reuse, when run as a script

from benchmarks.reuse import differences  # noqa: E402


def curve(run: Path) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    recipe = make_config(cfg["recipe"], method=cfg["method"])
    rows = ckpt.read_jsonl(run / ckpt.METRICS)
    summary = ckpt.read_json(run / ckpt.SUMMARY) if (run / ckpt.SUMMARY).exists() else {}
    return {"run": str(run), "recipe": cfg["recipe"], "method": cfg["method"], "seed": cfg["seed"],
            "status": summary.get("status", "no summary (running, or killed)"), "epochs_done": len(rows),
            "train_seconds": summary.get("train_seconds"),
            **{k: v for k, v in summary.items() if k.startswith("test_") or k == "best_epoch"},
            "overrides": differences(cfg, recipe.to_dict()),
            "val": {k: [r[k] for r in rows] for k in sorted({k for r in rows for k in r if k.startswith("val/")})}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    missing = [str(r) for r in args.runs if not (r / ckpt.METRICS).exists()]
    if missing:
        raise SystemExit(f"no metrics.jsonl in {', '.join(missing)}: give run folders")
    result = {"command": "python benchmarks/collect_curves.py " + " ".join(sys.argv[1:]),
              "runs": [curve(r) for r in args.runs]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["runs"]:
        test = {k: round(v, 5) for k, v in r.items() if k.startswith("test_")}
        print(r["run"], r["status"], r["overrides"], test, [round(v, 5) for v in r["val"].get("val/mse", [])])


if __name__ == "__main__":
    main()
