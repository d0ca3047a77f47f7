"""Command line: ``ccl-repr train | eval | demo | models | recipes``.

Every expected error (bad recipe, missing dataset, wrong shape, corrupt checkpoint, existing
run folder) ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .distributed import env_rank
from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage + message)
        sys.stderr.write(f"{self.prog}: error: {message}; see {self.prog} --help\n")
        raise SystemExit(2)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a recipe with CCL or backprop")
    p.add_argument("recipe", nargs="?", help="recipe name (see `ccl-repr recipes`) or YAML path")
    p.add_argument("--method", choices=("ccl", "bp"), help="learning rule (default: the recipe's)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override device")
    p.add_argument("--data-root", help="folder holding the datasets (override data.root)")
    p.add_argument("--out", help="run folder (default: runs/RECIPE-METHOD-sSEED-TIME)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set optim.forward.lr=0.5 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--diagnostics-every", type=int, metavar="N",
                   help="every N steps log weight alignment and CCL-vs-backprop update angles to diagnostics.jsonl")


def _diagnostics_hooks(args: argparse.Namespace) -> list:
    if not args.diagnostics_every:
        return []
    from evals.alignment import DiagnosticsHook
    return [DiagnosticsHook(every=args.diagnostics_every)]


def _log(message: str) -> None:
    if env_rank() == 0:  # under torchrun, one voice: rank 0's
        print(message, file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .config import config_from_dict, make_config
    from .errors import CheckpointError, ConfigError
    from .train import train

    if args.resume:
        # A resumed run must compute what the interrupted one would have: its settings are the
        # run folder's config.json, so flags that would change them are refused, not ignored.
        given = [flag for flag, value in (("RECIPE", args.recipe), ("--method", args.method), ("--epochs", args.epochs),
                                          ("--seed", args.seed), ("--device", args.device), ("--data-root", args.data_root),
                                          ("--out", args.out), ("--set", args.sets), ("--overwrite", args.overwrite))
                 if value not in (None, [], False)]
        if given:
            raise _usage(f"--resume continues {args.resume} with its saved config.json and cannot take "
                         f"{', '.join(given)}; drop them, or start a new run with --out to change settings")
        run = Path(args.resume)
        if not run.is_dir():
            raise _usage(f"--resume {run}: no such run folder; pass the --out folder of an earlier run")
        try:
            cfg = config_from_dict(ckpt.read_json(run / ckpt.CONFIG))
        except ConfigError as e:  # an edited config.json: say which file is wrong
            raise CheckpointError(f"{run / ckpt.CONFIG}: {e}; restore the run's original config.json") from None
        if args.no_progress:
            cfg.train.progress = False
        summary = train(cfg, run, resume=True, log=_log,
                        hooks=_diagnostics_hooks(args))
    else:
        if not args.recipe:
            raise _usage("train needs a RECIPE (see `ccl-repr recipes`) or --resume RUN_DIR")
        over: dict = {}
        if args.epochs is not None:
            over.setdefault("train", {})["epochs"] = args.epochs
        if args.seed is not None:
            over["seed"] = args.seed
        if args.device:
            over["device"] = args.device
        if args.data_root:
            over.setdefault("data", {})["root"] = args.data_root
        if args.no_progress:
            over.setdefault("train", {})["progress"] = False
        cfg = make_config(args.recipe, method=args.method, overrides=over, sets=args.sets)
        out = Path(args.out) if args.out else Path("runs") / (
            f"{cfg.recipe or 'run'}-{cfg.method}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
        summary = train(cfg, out, overwrite=args.overwrite, log=_log,
                        hooks=_diagnostics_hooks(args))
        run = out
    if env_rank() != 0:  # under torchrun only rank 0 reports (the other ranks wrote nothing)
        return 0
    keys = [k for k in ("method", "model", "dataset", "epochs", "seed", "test_accuracy", "best_val_accuracy",
                        "test_mse", "best_epoch", "train_seconds", "samples_per_second") if k in summary]
    print(json.dumps({k: summary[k] for k in keys}))
    print(f"run folder: {run}", file=sys.stderr)
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run: linear probe, kNN, UMAP, CKA, weight alignment")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `ccl-repr train`")
    p.add_argument("--layers", nargs="+", help="layer names or indices (default: every layer above the input)")
    p.add_argument("--protocols", default="linear,knn,umap,cka,align",
                   help="comma-separated subset of linear,knn,umap,cka,align (default: all)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/eval)")
    p.add_argument("--data-root", help="folder holding the datasets, if not the run's data.root")
    p.add_argument("--weights", choices=("tested", "last"), default="tested",
                   help="best-validation weights (default) or the last epoch's")
    p.add_argument("--networks", choices=("auto", "forward", "feedback", "both"), default="auto",
                   help="networks to probe (auto: forward; plus feedback for autoencoders)")
    p.add_argument("--baselines", default="pixels,pca,random_init", help="comma-separated; '' for none")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--cache", metavar="DIR", help="cache extracted features in DIR")


def cmd_eval(args: argparse.Namespace) -> int:
    from evals.evaluate import EvalConfig, evaluate_run

    config = EvalConfig(layers=args.layers, protocols=[p for p in args.protocols.split(",") if p],
                        networks=args.networks, baselines=[b for b in args.baselines.split(",") if b],
                        weights=args.weights, device=args.device, cache_dir=args.cache)
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
    result = evaluate_run(args.run_dir, out_dir=out, data_root=args.data_root, config=config,
                          log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({name: {k: r.get(k) for k in ("linear_probe_accuracy", "knn_accuracy")}
                      for name, r in result["layers"].items()}))
    print(f"eval folder: {out} (eval.json, report.md)", file=sys.stderr)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a CCL autoencoder on the bundled digits (no download) and report")
    p.add_argument("--out", help="output folder (default: runs/demo-TIME)")
    p.add_argument("--epochs", type=int, help="override the ae_digits recipe's epochs")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--bp", action="store_true", help="also train backprop on the same architecture")


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default (issue 3): recipe ae_digits, then reconstruction MSE and, through
    the evals protocols, linear-probe and kNN accuracy of the bottleneck against raw pixels."""
    from .config import make_config
    from .train import train

    started = time.perf_counter()
    out = Path(args.out) if args.out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    over = {"seed": args.seed, "train": {"progress": False, **({"epochs": args.epochs} if args.epochs else {})}}
    runs, mse = {}, {}
    for method in ("ccl", "bp") if args.bp else ("ccl",):
        cfg = make_config("ae_digits", method=method, overrides=over)
        print(f"training {method} {cfg.model.name} on the bundled digits, {cfg.train.epochs} epochs ...", file=sys.stderr)
        runs[method.upper()] = out / method
        mse[method.upper()] = train(cfg, out / method, log=lambda m: print(m, file=sys.stderr))["test_mse"]
    probes = _demo_probes(runs)
    print(f"{'representation':28s} {'test MSE [0,1] px':>18s} {'linear probe':>13s} {'kNN':>7s}")
    for label, row in probes.items():
        err = next((f"{v:.4f}" for k, v in mse.items() if label.startswith(k)), "-")
        print(f"{label:28s} {err:>18s} {row['linear probe']:>12.1%} {row['kNN']:>7.1%}")
    print(f"(reconstruction MSE on the 360 test digits; probes: test accuracy, evals defaults)\n"
          f"outputs in {out}/: {' and '.join(f'{p.name}/' for p in runs.values())} "
          f"{'each hold' if len(runs) > 1 else 'holds'} reconstructions.png, "
          f"training_curves.png, summary.json and the model; {time.perf_counter() - started:.0f} s in all")
    return 0


def _demo_probes(runs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Linear-probe and kNN test accuracy of each run's forward bottleneck and of raw pixels."""
    from evals.features import extract, open_run
    from evals.knn import knn_accuracy
    from evals.linear_probe import probe

    rows: dict[str, dict[str, float]] = {}
    for name, run_dir in runs.items():
        run = open_run(run_dir)
        k = run.model.feature_index
        splits = [(extract(run.model, s.x, layers=[k])[k], s.y) for s in (run.data.train, run.data.val, run.data.test)]
        rows[f"{name} bottleneck ({splits[0][0].shape[1]}-d)"] = _probe_row(splits, probe, knn_accuracy)
    pixels = [(s.x.flatten(1), s.y) for s in (run.data.train, run.data.val, run.data.test)]
    rows[f"raw pixels ({pixels[0][0].shape[1]}-d)"] = _probe_row(pixels, probe, knn_accuracy)
    return rows


def _probe_row(splits, probe, knn_accuracy) -> dict[str, float]:
    (xtr, ytr), (xva, yva), (xte, yte) = splits
    return {"linear probe": probe(xtr, ytr, xte, yte, val_feats=xva, val_y=yva)["test_accuracy"],
            "kNN": knn_accuracy(xtr, ytr, xte, yte)["top1"]}


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models
    for name, desc in list_models().items():
        print(f"{name:16s} {desc}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .config import RECIPES_DIR, list_recipes
    for name in list_recipes():
        first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:18s} {first}")
    return 0


class _usage(UserError):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ccl-repr", description="Counter-Current Learning toolkit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_eval(sub)
    _add_demo(sub)
    sub.add_parser("models", help="list the model registry")
    sub.add_parser("recipes", help="list the bundled recipes")
    return parser


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "models": cmd_models, "recipes": cmd_recipes}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"ccl-repr {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # train() has written its checkpoint and an "interrupted" summary
        why = str(e) or "interrupted; checkpoints already written are kept (continue with --resume RUN_DIR)"
        print(f"ccl-repr {args.command}: {why}", file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))  # 130 for Ctrl-C, 143 for SIGTERM


if __name__ == "__main__":
    raise SystemExit(main())
