"""How far below the divergence guard's limits the healthy runs of the bundled recipes stay.

For every completed run folder given (default: benchmarks/out/*/ with a completed summary.json),
reads the per-epoch training losses of metrics.jsonl and reports, per loss term, the largest
ratio the guard's two rules (ccl_repr/guard.py) would have seen on them:

- ``absolute``: epoch mean / its uninformed reference (log C for ``ce``; for autoencoders the MSE
  of a blank output, mean(x^2) over the training split loaded from the run's own data config). The
  guard stops at ``train.diverge_factor`` times the reference.
- ``growth``: epoch mean (epochs 2..) / the first epoch's mean, for terms with a positive first
  epoch mean. The guard stops at ``train.diverge_growth``.

Those are epoch means; the absolute rule also reads the mean of every 200-step window inside an
epoch. ``--train RECIPE:METHOD:EPOCHS`` (repeatable) also trains those short runs (1 thread,
seed 0, under /tmp) and records every ratio the guard itself computed at its reads, windows
included (``windows`` in the JSON; the first windows of a run are the noisiest).

    python benchmarks/guard_margins.py [--data-root ../shared/datasets] [--train ae_mnist:ccl:2 ...] [RUN_DIR ...]
writes benchmarks/results/guard_margins.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from ccl_repr import checkpoint as ckpt  # noqa: E402
from ccl_repr.config import TrainConfig, make_config  # noqa: E402
from ccl_repr.data import load_data  # noqa: E402
from ccl_repr.guard import DivergenceGuard, loss_references  # noqa: E402
from ccl_repr.train import train  # noqa: E402


def references(run: Path, data_root: str | None) -> tuple[dict[str, float], float | None]:
    """The guard's references for ``run``, and for autoencoders the MSE of the training mean image
    (the blank output's, the reference, is larger by the mean image's mean square)."""
    raw, summary = json.loads((run / "config.json").read_text()), json.loads((run / "summary.json").read_text())
    if "test_accuracy" in summary:  # a classifier: log C needs only the class count
        classes = ckpt.load_checkpoint(run / ckpt.MODEL)["model_meta"]["num_classes"]
        return loss_references("classify", classes, None), None  # type: ignore[arg-type]
    cfg = make_config(raw, method=raw["method"], sets=[f"data.root={data_root}"] if data_root else [])
    bundle = load_data(cfg.data, seed=cfg.seed, progress=False)
    mean_image = float(bundle.train.x.var(0, correction=0).mean())
    return loss_references("reconstruct", None, bundle.train.x, ae_form=cfg.loss.ae_form), mean_image


def margins(run: Path, data_root: str | None) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    refs, mean_image = references(run, data_root)
    terms = [k[len("train/"):] for k in rows[0] if k.startswith("train/")]
    absolute, growth = {}, {}
    for t in terms:
        values = [r[f"train/{t}"] for r in rows]
        if t in refs:
            absolute[t] = round(max(values) / refs[t], 4)
        if values[0] > 0 and len(values) > 1:
            growth[t] = round(max(values[1:]) / values[0], 4)
    return {"run": run.name, "epochs": len(rows), "references": {k: round(v, 6) for k, v in refs.items()},
            "absolute": absolute, "growth": growth,
            **({"mean_image_mse": round(mean_image, 6)} if mean_image is not None else {})}


def guard_reads(spec: str, data_root: str | None) -> dict:
    """Train RECIPE:METHOD:EPOCHS and keep the largest ratio the guard saw per rule and term."""
    recipe, method, epochs = spec.split(":")
    peaks: dict[str, float] = {}
    exploded = DivergenceGuard._exploded

    def spy(self: DivergenceGuard, values: dict[str, float], *, epoch_end: bool) -> list:
        for k, v in values.items():
            if k in self.references:
                peaks[f"absolute:{k}"] = max(peaks.get(f"absolute:{k}", 0.0), v / self.references[k])
            if epoch_end and self.early and self.early.get(k, 0) > 0:
                peaks[f"growth:{k}"] = max(peaks.get(f"growth:{k}", 0.0), v / self.early[k])
        return exploded(self, values, epoch_end=epoch_end)

    sets = ["train.num_threads=1", "train.progress=false", f"train.epochs={epochs}"]
    cfg = make_config(recipe, method=method, sets=sets + ([f"data.root={data_root}"] if data_root else []))
    DivergenceGuard._exploded = spy  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train(cfg, Path(tmp) / "run", log=lambda m: None)
    finally:
        DivergenceGuard._exploded = exploded  # type: ignore[method-assign]
    return {"run": spec, "max_ratio": {k: round(v, 4) for k, v in sorted(peaks.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--train", action="append", default=[], metavar="RECIPE:METHOD:EPOCHS")
    args = ap.parse_args()
    runs = args.runs or [p for p in sorted((ROOT / "out").glob("*/"))
                         if (p / "summary.json").exists() and (p / "metrics.jsonl").exists()
                         and json.loads((p / "summary.json").read_text()).get("status") == "completed"]
    results = [margins(r, args.data_root) for r in runs]
    defaults = TrainConfig()
    out = {"diverge_factor": defaults.diverge_factor, "diverge_growth": defaults.diverge_growth,
           "max_absolute": max((v for r in results for v in r["absolute"].values()), default=None),
           "max_growth": max((v for r in results for v in r["growth"].values()), default=None),
           "runs": results, "windows": [guard_reads(spec, args.data_root) for spec in args.train]}
    reads = [(k.split(":")[0], v) for r in out["windows"] for k, v in r["max_ratio"].items()]
    out["max_absolute_windows"] = max((v for rule, v in reads if rule == "absolute"), default=None)
    out["max_growth_windows"] = max((v for rule, v in reads if rule == "growth"), default=None)
    for r in results:
        print(f"{Path(r['run']).name:40s} absolute {r['absolute']}  growth {r['growth']}")
    for r in out["windows"]:
        print(f"{r['run']:40s} guard reads {r['max_ratio']}")
    print(f"max absolute {out['max_absolute']} (guard reads: {out['max_absolute_windows']}; limit "
          f"{defaults.diverge_factor:g}), max growth {out['max_growth']} (guard reads: {out['max_growth_windows']}; "
          f"limit {defaults.diverge_growth:g})")
    (ROOT / "results" / "guard_margins.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
