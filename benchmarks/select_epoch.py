"""Which epoch to test: best validation accuracy (train.select=val_accuracy) or lowest validation
loss (val_loss, the published code's rule), measured on one training run.

The selection rule does not change training, so one run answers for both: a step hook scores the
test split at the end of every epoch, and the two rules are applied to the logged validation
metrics afterwards.

    python benchmarks/select_epoch.py mlp_mnist --method ccl --seed 0 --data-root ../shared/datasets

writes ``benchmarks/results/select_<recipe>_<method>_s<seed>.json`` (run folder under
``benchmarks/out/``). Classifier recipes only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ccl_repr import checkpoint as ckpt  # noqa: E402
from ccl_repr.config import make_config  # noqa: E402
from ccl_repr.data import load_data  # noqa: E402
from ccl_repr.fastpath import resolve_device  # noqa: E402
from ccl_repr.train import epoch_steps, evaluate, train  # noqa: E402


def test_every_epoch(test_split, steps_per_epoch: int, batch_size: int):
    """A train() hook: test accuracy after the last step of every epoch."""
    def hook(*, step, epoch, model, **_):
        if step % steps_per_epoch == 0:
            return {"test_accuracy": evaluate(model, test_split, batch_size=batch_size)["accuracy"]}
        return None
    return hook


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--method", default="ccl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=0, help="0 = the recipe's")
    p.add_argument("--data-root", default="data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    args = p.parse_args()
    over = {"seed": args.seed, "data": {"root": args.data_root},
            "train": {"num_threads": args.threads, "progress": False, **({"epochs": args.epochs} if args.epochs else {})}}
    cfg = make_config(args.recipe, method=args.method, overrides=over)
    run = Path(args.out) / f"select-{args.recipe}-{args.method}-s{args.seed}"
    test = load_data(cfg.data, device=resolve_device(cfg.device), seed=cfg.seed)
    steps = epoch_steps(len(test.train), cfg.train)  # as train() counts them (train.batches_per_epoch)
    summary = train(cfg, run, overwrite=True, log=lambda m: None,
                    hooks=[test_every_epoch(test.test, steps, cfg.train.eval_batch_size)])
    rows = ckpt.read_jsonl(run / ckpt.METRICS)
    tests = {r["epoch"]: r["test_accuracy"] for r in ckpt.read_jsonl(run / ckpt.DIAGNOSTICS)}
    by_acc = max(rows, key=lambda r: (r["val/accuracy"], -r["epoch"]))  # first best, as train() keeps it
    by_loss = min(rows, key=lambda r: (r["val/loss"], r["epoch"]))
    result = {
        "command": f"python benchmarks/select_epoch.py {args.recipe} --method {args.method} --seed {args.seed}"
                   f"{f' --epochs {args.epochs}' if args.epochs else ''} --data-root {args.data_root}",
        "recipe": args.recipe, "method": args.method, "seed": args.seed, "epochs": cfg.train.epochs,
        "recipe_select": cfg.train.select, "summary_test_accuracy": summary["test_accuracy"],
        **{name: {"epoch": r["epoch"], "val_accuracy": r["val/accuracy"], "val_loss": r["val/loss"],
                  "test_accuracy": tests[r["epoch"]]}
           for name, r in (("val_accuracy", by_acc), ("val_loss", by_loss))},
        "last_epoch_test_accuracy": tests[rows[-1]["epoch"]],
        "per_epoch": [{"epoch": r["epoch"], "val_accuracy": r["val/accuracy"], "val_loss": r["val/loss"],
                       "test_accuracy": tests[r["epoch"]]} for r in rows],
    }
    out = REPO / "benchmarks" / "results" / f"select_{args.recipe}_{args.method}_s{args.seed}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("val_accuracy", "val_loss", "last_epoch_test_accuracy")}))


if __name__ == "__main__":
    main()
