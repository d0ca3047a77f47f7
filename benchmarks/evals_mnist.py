"""Benchmark of the evals on MNIST runs: per-layer linear probe and kNN next to the baselines,
and the speed of kNN (10k test vs 60k bank, width 256) and UMAP (10k points).

Usage (train the runs first, e.g.
``ccl-repr train mlp_mnist --data-root ../shared/datasets --epochs 10 --out RUN --no-progress``)::

    python benchmarks/evals_mnist.py --mlp-run RUN [--ae-run AE_RUN] --data-root ../shared/datasets

Writes benchmarks/results/evals_mnist.json (and eval folders under benchmarks/out/). Threads:
torch 2 (``--threads``), numpy/scikit-learn BLAS 1 (the evals default).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ccl_repr import checkpoint as ckpt
from evals.evaluate import EvalConfig, evaluate_run
from evals.features import extract, open_run
from evals.knn import knn_accuracy
from evals.umap_plot import UMAPConfig, umap_plot

ROOT = Path(__file__).resolve().parent


def layer_table(result: dict) -> dict:
    """{network/layer: probe, kNN and baselines} in percent-ready fractions."""
    rows = {}
    for key, net in (("layers", "forward"), ("feedback_layers", "feedback")):
        for name, r in result.get(key, {}).items():
            rows[f"{net}/{name}"] = {"dim": r["dim"], "linear_probe_accuracy": r["linear_probe_accuracy"],
                                     "knn_accuracy": r["knn_accuracy"], "knn_top5": r["knn_top5"],
                                     "baselines": r["baselines"]}
    return rows


def speed(run_dir: str, data_root: str, layer: str, out: Path) -> dict:
    """kNN: 10k test vs the 60k training images (train + validation split) at a width-256 layer;
    UMAP: 10k test points of the same layer, after a 5000-point warm-up that pays numba's JIT
    (a first call in a fresh process costs warm-up + fit)."""
    run = open_run(run_dir, data_root=data_root)
    d = run.data
    i = run.model.layer_names.index(layer)
    bank = torch.cat([extract(run.model, s.x, layers=[i])[i] for s in (d.train, d.val)])
    bank_y = torch.cat([d.train.y, d.val.y])
    test = extract(run.model, d.test.x, layers=[i])[i]
    clock = Clock()
    knn = knn_accuracy(bank, bank_y, test, d.test.y)
    knn_time = clock.lap()
    # >4096 points, so umap-learn takes its nearest-neighbour-descent path, whose numba JIT is paid here
    umap_plot(test[:5000], d.test.y[:5000], out / "umap_warmup.png", config=UMAPConfig(n_epochs=10))
    warmup = clock.lap()
    rec = umap_plot(test, d.test.y, out / f"umap_{layer}_10k.png", config=UMAPConfig(max_points=10000))
    umap_time = clock.lap()
    return {"layer": layer, "bank": list(bank.shape), "test": list(test.shape),
            "knn": knn_time, "knn_top1": knn["top1"], "knn_top5": knn["top5"], "knn_protocol": knn["protocol"],
            "umap_points": rec["num_points"], "umap": umap_time, "umap_jit_warmup": warmup,
            "umap_params": rec["params"], "targets_wall_seconds": {"knn": 10, "umap": 60}}


class Clock:
    """Wall seconds, this process's CPU seconds (all threads) and the 1-minute load average per lap:
    on a shared machine the CPU seconds show the work, the load what else was running."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        out = {"wall_seconds": wall - self.wall, "cpu_seconds": cpu - self.cpu, "load_average_1min": os.getloadavg()[0]}
        self.wall, self.cpu = wall, cpu
        return out


def markdown(record: dict) -> str:
    """The tables of docs/results_evals.md from the JSON record."""
    pct = lambda v: "–" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = []
    for kind in ("mlp_mnist", "ae_mnist"):
        if kind not in record:
            continue
        r = record[kind]
        s = r.get("run_summary") or {}
        head = f"test accuracy {pct(s['test_accuracy'])} %" if "test_accuracy" in s else \
            f"test MSE {s.get('test_mse', float('nan')):.4f}"
        lines += [f"### {kind} (CCL, {s.get('epochs')} epochs, {head}; evaluation {r['seconds']:.0f} s)", "",
                  "| network/layer | dim | linear probe % | kNN top-1 % | kNN top-5 % | PCA same dim: probe / kNN "
                  "| random init: probe / kNN |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, row in r["layers"].items():
            b = row["baselines"]
            two = lambda k: f"{pct(b[k]['linear_probe_accuracy'])} / {pct(b[k]['knn_accuracy'])}" if k in b else "–"  # noqa: E731
            lines.append(f"| {name} | {row['dim']} | {pct(row['linear_probe_accuracy'])} | {pct(row['knn_accuracy'])} "
                         f"| {pct(row['knn_top5'])} | {two('pca')} | {two('random_init')} |")
        px = r["baselines"].get("pixels", {})
        lines += ["", f"Raw pixels ({px.get('dim')} dims): linear probe {pct(px.get('linear_probe_accuracy'))} %, "
                      f"kNN {pct(px.get('knn_accuracy'))} %.", ""]
        al = r.get("alignment")
        if al:
            lines += ["| layer | cos(U, V^T) | at init | angle rule vs BP ° | at init ° |", "|---|---:|---:|---:|---:|"]
            num = lambda v, d: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
            align, align0 = al.get("weight_alignment") or {}, al.get("weight_alignment_random_init") or {}
            for name in al["update_angle_degrees"]:
                lines.append(f"| {name} | {num(align.get(name), 3)} | {num(align0.get(name), 3)} | "
                             f"{num(al['update_angle_degrees'][name], 1)} | "
                             f"{num(al['update_angle_degrees_random_init'][name], 1)} |")
            lines.append("")
    sp = record.get("speed")
    if sp:
        k, u, w = sp["knn"], sp["umap"], sp["umap_jit_warmup"]
        lines += ["| measurement | wall s | process CPU s | 1-min load average | target (wall) |", "|---|---:|---:|---:|---:|",
                  f"| kNN {sp['test'][0]} x {sp['bank'][0]}, width {sp['bank'][1]}, k={sp['knn_protocol']['k']} | "
                  f"{k['wall_seconds']:.1f} | {k['cpu_seconds']:.1f} | {k['load_average_1min']:.1f} | 10 |",
                  f"| UMAP {sp['umap_points']} points (after JIT warm-up) | {u['wall_seconds']:.1f} | "
                  f"{u['cpu_seconds']:.1f} | {u['load_average_1min']:.1f} | 60 |",
                  f"| UMAP JIT warm-up (5000 points, 10 epochs; first call in a process) | {w['wall_seconds']:.1f} | "
                  f"{w['cpu_seconds']:.1f} | {w['load_average_1min']:.1f} | – |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mlp-run", help="run folder of a CCL mlp_mnist run")
    p.add_argument("--ae-run", help="run folder of a CCL ae_mnist run")
    p.add_argument("--data-root", default=str(ROOT.parent.parent / "shared" / "datasets"))
    p.add_argument("--out", default=str(ROOT / "results" / "evals_mnist.json"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--markdown", action="store_true", help="only print the Markdown tables of --out")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(ckpt.read_json(Path(args.out))))
        return 0
    torch.set_num_threads(args.threads)
    out_json = Path(args.out)
    record: dict = ckpt.read_json(out_json) if out_json.exists() else {}
    record["machine"] = {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                         "python": sys.version.split()[0], "versions": ckpt.versions()}
    command = " ".join(["python", "benchmarks/evals_mnist.py", *(argv or sys.argv[1:])])
    record["commands"] = [c for c in record.get("commands", [record.get("command")]) if c] + [command]
    record.pop("command", None)
    work = ROOT / "out"
    if not args.speed_only:
        for kind, run in (("mlp_mnist", args.mlp_run), ("ae_mnist", args.ae_run)):
            if not run:
                continue
            t0 = time.perf_counter()
            res = evaluate_run(run, out_dir=work / f"evals_{kind}", data_root=args.data_root,
                               config=EvalConfig(protocols=("linear", "knn", "cka", "align")),
                               log=lambda m: print(m, file=sys.stderr))
            record[kind] = {"run_dir": run, "run_summary": res.get("run_summary"), "layers": layer_table(res),
                            "baselines": {k: {m: v.get(m) for m in ("dim", "linear_probe_accuracy", "knn_accuracy")}
                                          for k, v in res["baselines"].items()},
                            "alignment": res.get("alignment"), "seconds": time.perf_counter() - t0}
            ckpt.write_json(out_json, record)
    if not args.skip_speed and args.mlp_run:
        record["speed"] = speed(args.mlp_run, args.data_root, "linear5", work / "evals_speed")
        ckpt.write_json(out_json, record)
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
