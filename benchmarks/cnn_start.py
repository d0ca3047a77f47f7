"""How fast CCL starts on a CNN: test accuracy every few steps, for setting variants side by side.

Trains each variant (a label and ``--set``-style overrides of a recipe) for a few steps on a
class-stratified MNIST subset, in-process with the library's own step (the same ``method.backward``
+ ``Optimizers.clip_and_step`` as ``ccl-repr train``), and reads the test accuracy every
``--every`` steps. Writes ``benchmarks/results/<tag>.json`` and prints a table.

    python benchmarks/cnn_start.py --data-root ../shared/datasets --steps 80 --every 20
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from ccl_repr.config import make_config  # noqa: E402
from ccl_repr.data import batches, load_data  # noqa: E402
from ccl_repr.builder import build_trainable
from ccl_repr.train import evaluate, seed_everything  # noqa: E402

RESULTS = Path(os.environ.get("CCL_REPR_BENCH_RESULTS") or REPO / "benchmarks" / "results")
# label, method, overrides on top of --base; the published CIFAR CNN's CCL settings are the base.
VARIANTS = [
    ("published CCL settings (scale 1)", "ccl", []),
    ("published + 100-step warm-up", "ccl", ["optim.warmup_steps=100"]),
    ("anti-collapse 0", "ccl", ["loss.anti_collapse=0"]),
    ("per-layer clipping", "ccl", ["optim.forward.clip_mode=layer", "optim.feedback.clip_mode=layer"]),
    ("scale 10 (cnn_mnist)", "ccl", ["loss.scale=10"]),
    ("backprop, same network", "bp", []),
]
BASE = ["data.name=mnist", "data.pad_to=32", "data.val_fraction=0", "data.train_subset=6000", "data.test_subset=2000",
        "model.name=cnn", "model.widths=[32,32,64,64,128]", "model.bias=false", "train.batch_size=128",
        "loss.form=normalized", "loss.targets=prototypes", "loss.scale=1", "loss.anti_collapse=0.5",
        "optim.forward.lr=1", "optim.forward.momentum=0.8", "optim.forward.clip=0.3", "optim.forward.weight_decay=1e-6",
        "optim.feedback.lr=1", "optim.feedback.momentum=0.8", "optim.feedback.clip=0.3",
        "optim.feedback.weight_decay=1e-6", "optim.centralize=true"]
BP = ["optim.forward.lr=0.03", "optim.forward.momentum=0.9", "optim.forward.clip=0", "optim.feedback.lr=0"]


def curve(method: str, sets: list[str], args: argparse.Namespace) -> list[tuple[int, float]]:
    cfg = make_config({}, method=method, sets=[f"data.root={args.data_root}", *BASE, *(BP if method == "bp" else []),
                                               *sets, *args.set])
    seed_everything(cfg.seed)
    data = load_data(cfg.data, seed=cfg.seed)
    model, rule, optim = build_trainable(cfg, input_shape=data.input_shape, num_classes=data.num_classes,
                                         total_steps=args.steps)
    order = torch.Generator().manual_seed(cfg.seed)
    points, step = [], 0
    while step < args.steps:
        for x, y in batches(data.train, cfg.train.batch_size, generator=order):
            optim.zero_grad()
            rule.backward(model, x, y)
            optim.clip_and_step()
            step += 1
            if step % args.every == 0:
                points.append((step, evaluate(model, data.test, batch_size=2000)["accuracy"]))
            if step == args.steps:
                break
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=[], help="run only variants whose label contains one of these")
    p.add_argument("--set", action="append", default=[], help="extra override for every variant")
    p.add_argument("--tag", default="cnn_start_mnist")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for label, method, sets in VARIANTS:
        if args.only and not any(o in label for o in args.only):
            continue
        t0 = time.perf_counter()
        pts = curve(method, sets, args)
        rows.append({"variant": label, "method": method, "sets": sets, "steps": [s for s, _ in pts],
                     "test_accuracy": [a for _, a in pts], "seconds": time.perf_counter() - t0})
        print(f"{label:36s} " + " ".join(f"{s}:{100 * a:.1f}" for s, a in pts), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({"base": BASE, "bp": BP, "set": args.set,
                                                          "command": "python " + shlex.join(sys.argv), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
