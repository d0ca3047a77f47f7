"""How long `ccl-repr eval` takes on a trained run, split by protocol, and whether a faster
version still gives the same numbers.

Each variant runs in a fresh process (so numba's UMAP compilation and the data loading are paid
as a user pays them), with every layer, every protocol and the three baselines:

- ``old``: the evals package of a given source tree (``--old-src``, e.g. the last commit's,
  ``git archive HEAD evals | tar -x -C /tmp/old``), which refits every baseline and cold-starts
  each probe refit;
- ``new_cold``: this tree's evals with an empty baseline cache (the first evaluation of a dataset);
- ``new_warm``: the same again, the baselines now read from the cache (every later evaluation).

Usage::

    python benchmarks/evals_speed.py --run benchmarks/out/mlp_mnist-ccl-s0 --data-root ../shared/datasets \\
        --old-src /tmp/old [--repeats 1] [--protocols linear,knn,umap,cka,align]

Writes benchmarks/results/evals_speed.json: per variant and repeat the wall seconds, the split
by protocol, the 1-minute load average before and after (the machine may be shared), medians
over repeats, and per layer the largest |old - new| difference of every accuracy in points.
Threads: torch 2 (the machine's cores), BLAS 1 (the evals default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent

CHILD = """
import json, sys, torch
torch.set_num_threads({threads})
from evals.evaluate import EvalConfig, evaluate_run
kw = {extra}
cfg = EvalConfig(protocols={protocols!r}, device="cpu", **kw)
res = evaluate_run({run!r}, out_dir={out!r}, data_root={data_root!r}, config=cfg, log=lambda m: None)
print("EVAL_SECONDS", res["seconds"])
"""


def run_variant(name: str, args, out: Path, cache: Path | None) -> dict:
    """One evaluation in a fresh process; returns wall time, load averages and the eval.json."""
    extra = {"baseline_cache": str(cache), "progress": False} if cache is not None else {}
    code = CHILD.format(threads=args.threads, extra=repr(extra), protocols=tuple(args.protocols.split(",")),
                        run=str(Path(args.run).resolve()), out=str(out), data_root=str(Path(args.data_root).resolve()))
    env = dict(os.environ)
    src = args.old_src if name == "old" else str(REPO)
    env["PYTHONPATH"] = os.pathsep.join([src, str(REPO), env.get("PYTHONPATH", "")])
    load_before, t0, cpu0 = os.getloadavg()[0], time.perf_counter(), _child_cpu()
    # cwd outside the repository: sys.path[0] is the cwd, which would shadow --old-src's evals
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(out.parent))
    wall, cpu = time.perf_counter() - t0, _child_cpu() - cpu0
    result = json.loads((out / "eval.json").read_text())
    return {"wall_seconds": wall, "cpu_seconds": cpu, "eval_seconds": result["seconds"],
            "load_average_1min_before": load_before,
            "load_average_1min_after": os.getloadavg()[0], "split_seconds": split_by_protocol(result),
            "baseline_cache": result.get("baseline_cache"), "result": result}


def _child_cpu() -> float:
    """User + system CPU seconds of finished child processes (all their threads): the work done,
    which a shared machine's load stretches less than the wall time."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def split_by_protocol(result: dict) -> dict:
    """Seconds per protocol: the new eval.json's ``timings``; for the old one, summed from the
    per-record seconds (probe and kNN of layers and baselines, UMAP, CKA; the rest is "other")."""
    if "timings" in result:
        return dict(result["timings"])
    split = {"linear": 0.0, "knn": 0.0}
    recs = [*result.get("layers", {}).values(), *result.get("baselines", {}).values()]
    for r in recs:
        split["linear"] += r.get("linear_probe", {}).get("seconds", 0.0)
        split["knn"] += r.get("knn", {}).get("seconds", 0.0)
    split["umap"] = sum(u.get("seconds", 0.0) for u in result.get("umap", []))
    split["cka"] = result.get("cka", {}).get("seconds", 0.0)
    split["other"] = result["seconds"] - sum(split.values())
    return split


def agreement(old: dict, new: dict) -> dict:
    """Per layer: the largest |old - new| over the layer's accuracies and its baselines', in points."""
    keys = ("linear_probe_accuracy", "knn_accuracy", "knn_top5")
    out = {}
    for name, a in old["layers"].items():
        b = new["layers"][name]
        pairs = [(a.get(k), b.get(k)) for k in keys]
        for base in a.get("baselines", {}):
            pairs += [(a["baselines"][base].get(k), b["baselines"][base].get(k)) for k in keys]
        diffs = [abs(x - y) * 100 for x, y in pairs if x is not None and y is not None]
        out[name] = {"max_abs_diff_points": max(diffs), "linear_probe": [a["linear_probe_accuracy"], b["linear_probe_accuracy"]],
                     "knn": [a["knn_accuracy"], b["knn_accuracy"]]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder of a trained run (e.g. 100-epoch mlp_mnist CCL)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--old-src", help="folder holding the evals package to compare against (skipped if absent)")
    p.add_argument("--protocols", default="linear,knn,umap,cka,align")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results" / "evals_speed.json"))
    args = p.parse_args(argv)
    variants = (["old"] if args.old_src else []) + ["new_cold", "new_warm"]
    record: dict = {"command": " ".join(["python", "benchmarks/evals_speed.py", *(argv or sys.argv[1:])]),
                    "cpus": os.cpu_count(), "torch_threads": args.threads, "protocols": args.protocols,
                    "note": "wall seconds on a machine shared with other jobs: see the load averages", "runs": {}}
    last: dict = {}
    with tempfile.TemporaryDirectory(prefix="evals_speed_") as tmp:
        for rep in range(args.repeats):
            cache = Path(tmp) / f"cache{rep}"  # new_cold starts empty, new_warm reuses it
            for name in variants:
                r = run_variant(name, args, Path(tmp) / f"{name}{rep}", None if name == "old" else cache)
                last[name] = r.pop("result")
                record["runs"].setdefault(name, []).append(r)
                print(f"{name} repeat {rep}: {r['wall_seconds']:.1f} s wall, {r['cpu_seconds']:.1f} CPU-s (load {r['load_average_1min_before']:.1f}"
                      f" -> {r['load_average_1min_after']:.1f}) {json.dumps({k: round(v, 1) for k, v in r['split_seconds'].items()})}",
                      file=sys.stderr)
                for stat in ("wall_seconds", "cpu_seconds"):
                    record[f"median_{stat}"] = {k: statistics.median(x[stat] for x in v) for k, v in record["runs"].items()}
                Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    if "old" in last:
        record["agreement_old_vs_new_cold"] = agreement(last["old"], last["new_cold"])
        record["agreement_old_vs_new_warm"] = agreement(last["old"], last["new_warm"])
    record["agreement_new_cold_vs_warm"] = agreement(last["new_cold"], last["new_warm"])
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"median_wall_seconds": record["median_wall_seconds"], "median_cpu_seconds": record["median_cpu_seconds"],
                      **{k: {n: round(v["max_abs_diff_points"], 3) for n, v in record[k].items()}
                         for k in record if k.startswith("agreement")}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
