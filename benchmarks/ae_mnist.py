"""Autoencoder benchmark: an autoencoder recipe (default ``ae_mnist``) trained with CCL and with
backprop, same epochs, several seeds.

Each (variant, seed) is one ``ccl-repr train`` through the real CLI, in sequence (one thread
each, so wall times are comparable), into ``benchmarks/out/TAG-VARIANT-sSEED``. The script
collects every run's summary.json, writes ``benchmarks/results/TAG.json`` and regenerates the
TAG section of ``docs/results_ae.md`` between its markers, next to the paper's STL-10 numbers.

    nice -n 10 python benchmarks/ae_mnist.py --data-root ../shared/datasets --seeds 0 1 2

With ``--probe`` each run's bottleneck (F's code; for CCL also G's middle layer) is scored by
the evals protocols (linear probe and kNN, their defaults) beside PCA of the pixels to the same
width and the raw pixels, and the first CCL run's code is drawn by UMAP (F and G, class names)
into ``benchmarks/results/TAG_umap.png`` (:mod:`evals.codes`). The converged comparison is one
command beside the short one:

    nice -n 10 python benchmarks/ae_mnist.py --data-root ../shared/datasets --seeds 0 \
        --variants ccl bp_tuned --probe --tag ae_mnist_converged

Any other autoencoder recipe runs the same way, e.g. the CPU-sized conv autoencoder on a
CIFAR-10 image folder (``--reuse`` collects runs already trained, so the variants can be
trained by separate invocations on separate cores and gathered by a last one):

    nice -n 10 python benchmarks/ae_mnist.py --recipe ae_cifar10_small --tag ae_cifar10_small_jpeg \
        --seeds 0 --variants ccl bp bp_tuned --set data.name=imagefolder --set data.root=data/cifar10 \
        --probe --reuse

Every row also carries the run's validation MSE per epoch (``val_mse``). Test MSE is on the
[0, 1] pixel scale (the recipes set data.normalize: false). Targets: mean CCL / mean BP <= 1.5
(paper, STL-10: 0.0086 / 0.0059 = 1.46), stretch <= 1.2; converged, against the tuned BP: <= 1.1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks.reuse, when run as a script

from benchmarks.reuse import same_settings  # noqa: E402

PAPER_STL10 = {"ccl": (0.0086, 0.0001), "bp": (0.0059, 0.0001)}
# variant -> (method, extra --set overrides); "bp_tuned" is the same backprop with a larger lr and a
# grad-norm clip, to show how far the paper's BP settings are from the best BP on this budget.
VARIANTS = {"ccl": ("ccl", []), "bp": ("bp", []),
            "bp_tuned": ("bp", ["optim.forward.lr=0.1", "optim.forward.clip=1.0"])}


def markers(tag: str) -> tuple[str, str]:
    return f"<!-- {tag}:begin (written by benchmarks/ae_mnist.py) -->", f"<!-- {tag}:end -->"


def run_one(variant: str, seed: int, args: argparse.Namespace) -> dict:
    method, sets = VARIANTS[variant]
    out = Path(args.runs) / f"{args.tag}-{variant}-s{seed}"
    cli = ["train", args.recipe, "--method", method, "--seed", str(seed), "--data-root", args.data_root,
           "--out", str(out), "--overwrite", "--no-progress", "--set", "train.num_threads=1"]
    cli += [f"--set={s}" for s in sets + args.sets] + (["--epochs", str(args.epochs)] if args.epochs else [])
    summary = ROOT / out / "summary.json"
    # --reuse collects a finished run with this command's settings; its wall time is then its train_seconds
    t0, reused = time.perf_counter(), args.reuse and same_settings(ROOT / out, args.recipe, method=method, seed=seed,
                                                                   sets=sets + args.sets, epochs=args.epochs)
    if not reused:
        proc = subprocess.run([sys.executable, "-m", "ccl_repr.cli", *cli], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"run failed: ccl-repr {' '.join(cli)}\n{proc.stderr[-2000:]}")
    s = json.loads(summary.read_text())
    wall = s["train_seconds"] if reused else time.perf_counter() - t0
    metrics = [json.loads(line) for line in (ROOT / out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    row = {"variant": variant, "method": method, "seed": seed, "run": str(out), "reused": reused,
           "wall_seconds": round(wall, 1),
           "command": "ccl-repr " + " ".join(cli),
           **{k: s[k] for k in ("test_mse", "best_val_mse", "best_epoch", "epochs", "train_seconds", "num_train")},
           "val_mse": [m["val/mse"] for m in metrics]}
    if args.probe:
        from evals.features import open_run

        run = open_run(ROOT / out)  # once per row: the probes and the grid read the same model and data
        row["probes"] = probe_codes(run, method, reuse=reused)
        row["reconstructions"] = reconstruction_grid(run, method, args, variant)
    print(json.dumps({k: v for k, v in row.items() if k != "val_mse"}), flush=True)
    return row


def probe_codes(run, method: str, *, reuse: bool = False) -> dict:
    """Linear probe and kNN (evals defaults) of F's bottleneck and, for CCL, G's middle layer,
    kept in the run folder (code_probes.json) and read back when the run itself is reused."""
    from evals.codes import code_rows

    cache = run.run_dir / "code_probes.json"
    if reuse and cache.exists():
        return json.loads(cache.read_text())
    out = {r["network"]: {"layer": r["layer"], "dim": r["dim"], "linear_probe": r["linear_probe"], "knn": r["knn"],
                          "seconds": r["seconds"]}
           for r in code_rows(run, method)}
    cache.write_text(json.dumps(out, indent=2) + "\n")
    return out


def reconstruction_grid(run, method: str, args: argparse.Namespace, variant: str) -> str:
    """The run's reconstruction grid (test images spread over the classes, F's x̂ and for CCL G's
    b_0) written beside the JSON as TAG-VARIANT-reconstructions.png."""
    from ccl_repr.plots import save_ae_grid

    png = json_path(args).parent / f"{args.tag}-{variant}-reconstructions.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    save_ae_grid(run.model, run.data, png, method=method, title=f"{args.recipe}, {variant}: test images (best epoch)")
    return str(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)


def json_path(args: argparse.Namespace) -> Path:
    return ROOT / (args.json or f"benchmarks/results/{args.tag}.json")


def references(rows: list[dict], args: argparse.Namespace, folder: Path) -> dict:
    """PCA of the pixels to the code's width and the raw pixels, probed on the same splits, and
    the UMAP of the first CCL run's code (F and G) in FOLDER/TAG_umap.png (beside the JSON)."""
    from evals.codes import reference_rows, umap_codes
    from evals.features import open_run

    first = open_run(ROOT / rows[0]["run"])
    dim = next(iter(rows[0]["probes"].values()))["dim"]
    cache = ROOT / rows[0]["run"] / f"reference_probes_{dim}.json"  # the run's data, PCA to the code's width
    if args.reuse and rows[0]["reused"] and cache.exists():
        out = json.loads(cache.read_text())
    else:
        out = {r["representation"]: {k: r[k] for k in ("dim", "linear_probe", "knn", "seconds")}
               for r in reference_rows(first, dim=dim)}
        cache.write_text(json.dumps(out, indent=2) + "\n")
    ccl = [r for r in rows if r["method"] == "ccl"]
    if ccl:
        png = folder / f"{args.tag}_umap.png"
        umap = umap_codes(open_run(ROOT / ccl[0]["run"]), png)
        out["umap"] = {**{k: v for k, v in umap.items() if isinstance(v, (int, float, str))},
                       "png": str(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png), "run": ccl[0]["run"]}
    return out


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict]) -> dict:
    per = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
        mean, std = _stats([r["test_mse"] for r in rs])
        per[variant] = {"test_mse": [r["test_mse"] for r in rs], "mean": mean, "std": std,
                        "seeds": [r["seed"] for r in rs], "wall_seconds": sum(r["wall_seconds"] for r in rs)}
    ratios = {f"ccl/{v}": per["ccl"]["mean"] / per[v]["mean"] for v in per if v != "ccl" and "ccl" in per}
    return {"variants": per, "ratios": ratios}


def markdown(result: dict) -> str:
    per, seeds = result["summary"]["variants"], result["seeds"]
    epochs = result["rows"][0]["epochs"]
    begin, end = markers(result["tag"])
    lines = [begin, "", f"`{result['recipe']}`, {epochs} epochs, seeds {', '.join(map(str, seeds))}; test MSE on "
             f"[0, 1] pixels over the whole test split ({result['rows'][0]['num_train']} training images).", "",
             "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | wall s (all seeds) "
             "| paper, STL-10 (conv AE) |", "|---" * (len(seeds) + 4) + "|"]
    for name, v in per.items():
        paper = PAPER_STL10.get(name)
        lines.append(f"| {name} | " + " | ".join(f"{m:.4f}" for m in v["test_mse"])
                     + f" | **{v['mean']:.4f} ± {v['std']:.4f}** | {v['wall_seconds']:.0f} | "
                     + (f"{paper[0]:.4f} ± {paper[1]:.4f}" if paper else "-") + " |")
    lines += ["", "| ratio | measured | paper, STL-10 |", "|---|---|---|"]
    for key, value in result["summary"]["ratios"].items():
        lines.append(f"| {key.replace('ccl/', 'CCL / ')} | **{value:.2f}** | "
                     + ("1.46 (0.0086 / 0.0059)" if key == "ccl/bp" else "-") + " |")
    lines += probe_table(result["rows"], result.get("references", {})) + curve_table(result["rows"])
    lines += ["", f"One command: `{result['command']}`; runs, in this order:", "", "```"]
    lines += [r["command"] for r in result["rows"]] + ["```", "", end]
    return "\n".join(lines)


def probe_table(rows: list[dict], refs: dict) -> list[str]:
    probed = [r for r in rows if "probes" in r]
    if not probed:
        return []
    lines = ["", "| variant | seed | code | dim | linear probe | kNN (k=20) |", "|---|---|---|---|---|---|"]
    for r in probed:
        for network, p in r["probes"].items():
            code = f"{'F' if network == 'forward' else 'G'} {p['layer']}"
            lines.append(f"| {r['variant']} | {r['seed']} | {code} | {p['dim']} | {p['linear_probe']:.2%} | {p['knn']:.2%} |")
    for name, p in refs.items():
        if name != "umap":
            lines.append(f"| {name} | - | - | {p['dim']} | {p['linear_probe']:.2%} | {p['knn']:.2%} |")
    if "umap" in refs:
        lines += ["", f"UMAP of the CCL code (F and G, test images): `{refs['umap']['png']}`."]
    return lines


def curve_table(rows: list[dict]) -> list[str]:
    """Validation MSE per epoch, one column per run."""
    n = max(len(r["val_mse"]) for r in rows)
    lines = ["", "Validation MSE per epoch:", "", "| epoch | " + " | ".join(f"{r['variant']} s{r['seed']}" for r in rows) + " |",
             "|---" * (len(rows) + 1) + "|"]
    for e in range(n):
        lines.append(f"| {e + 1} | " + " | ".join(f"{r['val_mse'][e]:.4f}" if e < len(r["val_mse"]) else "-" for r in rows) + " |")
    return lines


def write_doc(path: Path, section: str, tag: str) -> None:
    begin, end = markers(tag)
    text = path.read_text() if path.exists() else f"# Autoencoder results\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text = text.rstrip() + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    path.write_text(head + section + rest.split(end, 1)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--recipe", default="ae_mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["ccl", "bp", "bp_tuned"], choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (same for every variant)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra --set for every run")
    p.add_argument("--runs", default="benchmarks/out", help="parent folder of the run folders")
    p.add_argument("--probe", action="store_true", help="linear probe + kNN of each run's bottleneck beside PCA of "
                   "the same width and raw pixels, and the UMAP of the CCL code (evals.codes)")
    p.add_argument("--reuse", action="store_true", help="collect a finished run of the same recipe, method, seed "
                   "and epochs instead of training it again")
    p.add_argument("--tag", default="ae_mnist", help="names the JSON (benchmarks/results/TAG.json) and the doc section")
    p.add_argument("--json", help="default: benchmarks/results/TAG.json")
    p.add_argument("--doc", default="docs/results_ae.md")
    args = p.parse_args()
    started = time.perf_counter()
    rows = [run_one(v, s, args) for s in args.seeds for v in args.variants]
    result = {"recipe": args.recipe, "tag": args.tag, "seeds": args.seeds, "rows": rows, "summary": summarise(rows),
              "total_wall_seconds": round(time.perf_counter() - started, 1),
              "command": "nice -n 10 python benchmarks/ae_mnist.py " + " ".join(sys.argv[1:])}
    out = json_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.probe:
        result["references"] = references(rows, args, out.parent)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_doc(ROOT / args.doc, markdown(result), args.tag)
    print(json.dumps(result["summary"]["ratios"]), f"total {result['total_wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
