"""Command line: ``ccl-repr train | eval | demo | compare | features | models | recipes``.

Every expected error (bad recipe, missing dataset, wrong shape, corrupt checkpoint, existing
run folder, and any file that cannot be read, decoded or parsed or path that cannot be written)
ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from pathlib import Path

import yaml

from .distributed import env_rank
from .errors import UserError
from .registry import RULES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage + message)
        sys.stderr.write(f"{self.prog}: error: {message}; see {self.prog} --help\n")
        raise SystemExit(2)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a recipe with CCL, backprop or another learning rule")
    p.add_argument("recipe", nargs="?", help="recipe name (see `ccl-repr recipes`) or YAML path")
    p.add_argument("--method", choices=RULES, help="learning rule (default: the recipe's; see `ccl-repr rules`)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override device")
    p.add_argument("--data-root", help="folder holding the datasets (override data.root)")
    p.add_argument("--out", help="run folder (default: runs/RECIPE-METHOD-sSEED-TIME)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set optim.forward.lr=0.5 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--no-progress", action="store_true",
                   help="silent training: no per-step bar (terminal) and no per-epoch lines (otherwise)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files under RUN_DIR/tensorboard (needs: pip install tensorboard)")
    p.add_argument("--download", action="store_true",
                   help="download a torchvision dataset into --data-root if missing (= --set data.download=true)")
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
                                          ("--out", args.out), ("--set", args.sets), ("--overwrite", args.overwrite),
                                          ("--download", args.download))
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
        if args.tensorboard:
            cfg.train.tensorboard = True
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
        if args.tensorboard:
            over.setdefault("train", {})["tensorboard"] = True
        if args.download:
            over.setdefault("data", {})["download"] = True
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
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="device for feature extraction and kNN (default auto: CUDA when present)")
    p.add_argument("--cache", metavar="DIR", help="cache extracted features in DIR")
    p.add_argument("--baseline-cache", metavar="DIR", default=str(_default_baseline_cache()),
                   help="scored baselines cached per dataset + preprocessing + protocol settings "
                        "(default: %(default)s)")
    p.add_argument("--no-baseline-cache", action="store_true", help="refit the baselines, cache nothing")
    p.add_argument("--export-features", action="store_true",
                   help="write each evaluated layer's features and the labels as .npy under OUT/features")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_protocol_options(p)


def _add_protocol_options(p) -> None:
    """Overrides of the protocols' settings; each default is the one stated in its module."""
    from evals.knn import KNNConfig
    from evals.linear_probe import ProbeConfig
    from evals.umap_plot import UMAPConfig

    p.add_argument("--knn-k", type=int, metavar="K", help=f"kNN neighbours (default {KNNConfig.k})")
    p.add_argument("--knn-temperature", type=float, metavar="T",
                   help=f"kNN vote temperature, votes exp(sim/T) (default {KNNConfig.temperature})")
    p.add_argument("--probe-C", dest="probe_Cs", type=_float_list, metavar="C[,C...]",
                   help=f"linear-probe C grid, chosen on validation accuracy; one value is used as given "
                        f"(default {','.join(f'{c:g}' for c in ProbeConfig.Cs)})")
    p.add_argument("--umap-neighbors", type=int, metavar="N", help=f"UMAP n_neighbors (default {UMAPConfig.n_neighbors})")
    p.add_argument("--umap-min-dist", type=float, metavar="D", help=f"UMAP min_dist (default {UMAPConfig.min_dist})")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.01,0.1,1, got {text!r}") from None


def _default_baseline_cache() -> Path:
    import os
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ccl_repr" / "eval-baselines"


def _eval_config(args: argparse.Namespace):
    """EvalConfig from the flags: protocol overrides replace only the settings given."""
    import dataclasses

    from evals.evaluate import EvalConfig
    from evals.knn import KNNConfig
    from evals.linear_probe import ProbeConfig
    from evals.umap_plot import UMAPConfig

    def given(**kw) -> dict:
        return {k: v for k, v in kw.items() if v is not None}

    return EvalConfig(layers=args.layers, protocols=[p for p in args.protocols.split(",") if p],
                      networks=args.networks, baselines=[b for b in args.baselines.split(",") if b],
                      weights=args.weights, device=args.device, cache_dir=args.cache,
                      baseline_cache=None if args.no_baseline_cache else args.baseline_cache,
                      export_features=args.export_features, progress=not args.no_progress,
                      probe=dataclasses.replace(ProbeConfig(), **given(Cs=args.probe_Cs)),
                      knn=dataclasses.replace(KNNConfig(), **given(k=args.knn_k, temperature=args.knn_temperature)),
                      umap=dataclasses.replace(UMAPConfig(), **given(n_neighbors=args.umap_neighbors,
                                                                      min_dist=args.umap_min_dist)))


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from evals.evaluate import evaluate_run

    config = _eval_config(args)
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
    result = evaluate_run(args.run_dir, out_dir=out, data_root=args.data_root, config=config,
                          log=lambda m: tqdm.write(m, file=sys.stderr))  # lines above the bar, not through it
    print(json.dumps({name: {k: r.get(k) for k in ("linear_probe_accuracy", "knn_accuracy")}
                      for name, r in result["layers"].items()}))
    print(f"eval folder: {out} (eval.json, report.md)", file=sys.stderr)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="CCL and backprop autoencoders on the bundled digits (no download): "
                                    "reconstruction, probes of their codes, UMAP")
    p.add_argument("--out", help="output folder (default: runs/demo-TIME)")
    p.add_argument("--epochs", type=int, help="override the ae_digits recipe's epochs")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--no-bp", action="store_true", help="skip the backprop autoencoder on the same architecture")


DEMO_RECIPE, DEMO_UMAP = "ae_digits", "umap_ccl_code.png"


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default: recipe ae_digits trained with CCL and with backprop; then, through
    the evals protocols, linear-probe and kNN accuracy of each code beside PCA of the same width
    and raw pixels, and a UMAP of the CCL code with G's code of the same images. The table is
    printed and written to demo.json."""
    from evals.features import open_run

    from . import checkpoint as ckpt
    from .config import make_config
    from .train import train

    started = time.perf_counter()
    out = Path(args.out) if args.out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    over = {"seed": args.seed, "train": {"progress": False, **({"epochs": args.epochs} if args.epochs else {})}}
    mse = {}
    for method in ("ccl",) if args.no_bp else ("ccl", "bp"):
        cfg = make_config(DEMO_RECIPE, method=method, overrides=over)
        print(f"training {method} {cfg.model.name} on the bundled digits, {cfg.train.epochs} epochs ...", file=sys.stderr)
        mse[method] = train(cfg, out / method, log=lambda m: print(m, file=sys.stderr))["test_mse"]
    runs = {method: open_run(out / method) for method in mse}
    rows = _demo_probes(runs, mse)
    print("computing the UMAP of the CCL code ...", file=sys.stderr)
    umap = _demo_umap(runs["ccl"], out / DEMO_UMAP)
    seconds = time.perf_counter() - started
    ckpt.write_json(out / "demo.json", {"recipe": DEMO_RECIPE, "seed": args.seed, "rows": rows,
                                        "umap": umap, "seconds": seconds})
    _print_demo_table(rows, num_test=len(runs["ccl"].data.test))
    print(f"outputs in {out}/: demo.json (this table), {DEMO_UMAP}; {' and '.join(f'{m}/' for m in runs)} "
          f"{'each hold' if len(runs) > 1 else 'holds'} reconstructions.png, training_curves.png, summary.json "
          f"and the model; {seconds:.0f} s in all")
    return 0


def _demo_probes(runs: dict, mse: dict[str, float]) -> list[dict]:
    """Linear probe and kNN (evals defaults) of each run's code (F's bottleneck; for CCL also
    G's middle layer), of PCA of the pixels to the code's width, and of the raw pixels."""
    from evals.codes import probe_codes

    return [{k: r[k] for k in ("representation", "dim", "test_mse", "linear_probe", "knn")}
            for r in probe_codes(runs, mse)]


def _demo_umap(run, png: Path) -> dict:
    """UMAP of the CCL code of the test images: F's bottleneck and G's middle layer in one map."""
    from evals.codes import umap_codes

    return umap_codes(run, png, what="test digits")


def _print_demo_table(rows: list[dict], *, num_test: int) -> None:
    print(f"{'representation':16s} {'dim':>4s} {'test MSE':>9s} {'linear probe':>13s} {'kNN':>7s}")
    for r in rows:
        err = "-" if r["test_mse"] is None else f"{r['test_mse']:.4f}"
        print(f"{r['representation']:16s} {r['dim']:>4d} {err:>9s} {r['linear_probe']:>13.1%} {r['knn']:>7.1%}")
    print(f"(test MSE: reconstruction on [0, 1] pixels; probes: accuracy on the {num_test} test digits, "
          f"evals defaults; F: forward network, G: feedback network)")


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="one markdown table of run folders, with mean ± std over seeds")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders or glob patterns (e.g. 'runs/mnist-*')")
    p.add_argument("--out", metavar="FILE.md", help="also write the table to this file")


def cmd_compare(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt
    from .compare import compare

    text = compare(args.runs)
    if args.out:
        ckpt.atomic_write_bytes(Path(args.out), text.encode())
    print(text, end="")
    return 0


def _add_features(sub) -> None:
    p = sub.add_parser("features", help="features of raw images (.npy) at one layer of a trained run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `ccl-repr train` (or its model.safetensors)")
    p.add_argument("--input", required=True, metavar="FILE.npy",
                   help="raw images, uint8 0..255 or floats in [0, 1], N x H x W or N x C x H x W; preprocessed "
                        "as in training (scale, pad, standardise)")
    p.add_argument("--layer", required=True, help="layer index (negative from the output), name, or 'features'")
    p.add_argument("--network", choices=("forward", "feedback"), default="forward",
                   help="forward network F (default) or feedback network G")
    p.add_argument("--labels", metavar="FILE.npy", help="integer labels, one per image: what a classifier's "
                                                       "feedback network is fed")
    p.add_argument("--weights", choices=("tested", "last"), default="tested",
                   help="best-validation weights (default) or the last epoch's")
    p.add_argument("--out", required=True, metavar="FILE.npy", help="where to write the (N, d) float32 features")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _read_npy(path: Path, flag: str):
    import numpy as np
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:  # pickled objects, or not a .npy file at all
        raise _usage(f"{flag} {path} is not a plain .npy array ({str(e).splitlines()[0][:120]}); save it with "
                     f"numpy.save(path, array)") from None
    if not isinstance(array, np.ndarray):  # a .npz archive
        raise _usage(f"{flag} {path} is an .npz archive; save one array with numpy.save(path, array)")
    return array


def cmd_features(args: argparse.Namespace) -> int:
    """Features of raw images at one layer of a run, with the run's own preprocessing."""
    import io

    import numpy as np

    from . import checkpoint as ckpt
    from .api import load

    out = Path(args.out)
    if out.suffix != ".npy":
        raise _usage(f"--out {out} must end in .npy (the features are written with numpy.save)")
    if out.exists() and not args.overwrite:
        raise _usage(f"--out {out} already exists; choose another path or pass --overwrite")
    raw = _read_npy(Path(args.input), "--input")
    labels = _read_npy(Path(args.labels), "--labels") if args.labels else None
    run = load(args.run_dir, weights=args.weights)
    if args.network == "feedback" and run.model.task == "classify" and labels is None:
        raise _usage("a classifier's feedback network is fed one-hot labels, not images; pass --labels FILE.npy")
    feats = run.features(raw, layer=args.layer, network=args.network, labels=labels)
    buf = io.BytesIO()
    np.save(buf, feats)
    ckpt.atomic_write_bytes(out, buf.getvalue())
    print(json.dumps({"network": args.network, "layer": args.layer, "shape": list(feats.shape), "out": str(out)}))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models
    for name, desc in list_models().items():
        print(f"{name:16s} {desc}")
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    for name, desc in RULES.describe().items():
        rule = RULES.get(name)
        print(f"{name:6s} {desc} [models: {', '.join(rule.tasks)}; trains: {', '.join(rule.trains)}]")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .config import RECIPES_DIR, list_recipes
    for name in list_recipes():
        first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:18s} {first}")
    return 0


class _usage(UserError):
    pass


# Errors the user's files and folders can cause anywhere (unreadable, undecodable or unparsable
# input; a path that cannot be created or written): one line at the boundary, whatever raised them.
EXPECTED = (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError)
_OS_FIX = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EEXIST: "a file is in the way of a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file path",
    errno.ENOSPC: "the disk is full; free space or choose another path",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
}


def one_line(e: BaseException) -> str:
    """The message of an expected error, on one line, with the fix."""
    if isinstance(e, UserError):
        text = str(e)
    elif isinstance(e, OSError):
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        text = f"{where + ': ' if where else ''}{e.strerror or e}; {_OS_FIX.get(e.errno, 'check the file or folder it names')}"
    elif isinstance(e, UnicodeDecodeError):
        text = f"a file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
    else:  # JSON or YAML that does not parse
        text = f"{type(e).__name__}: {e}; fix the file it names"
    return " ".join(text.split())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ccl-repr", description="Counter-Current Learning toolkit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_compare(sub)
    _add_features(sub)
    sub.add_parser("models", help="list the model registry")
    sub.add_parser("rules", help="list the learning rules, the models each applies to and what it trains")
    sub.add_parser("recipes", help="list the bundled recipes")
    return parser


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "compare": cmd_compare, "features": cmd_features, "models": cmd_models,
            "rules": cmd_rules, "recipes": cmd_recipes}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UserError, *EXPECTED) as e:
        print(f"ccl-repr {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # train() has written its checkpoint and an "interrupted" summary
        why = str(e) or "interrupted; checkpoints already written are kept (continue with --resume RUN_DIR)"
        print(f"ccl-repr {args.command}: {why}", file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))  # 130 for Ctrl-C, 143 for SIGTERM


if __name__ == "__main__":
    raise SystemExit(main())
