"""Evaluate a run folder: every protocol on every requested layer, baselines beside each result.

Defaults (:class:`EvalConfig`): every layer above the input; protocols linear, knn, umap, cka,
align; the forward network (plus the feedback network, fed the images, for autoencoders: a
classifier's per-sample feedback features are a function of the label alone, so probing them
would only measure the label); the weights of the best validation epoch ("tested"); the run's
own data split (same seed, so the probe's C is chosen on the run's validation split); baselines
pixels, PCA of the layer's width and the same architecture at random init (seed 0); UMAP of the
feature layer (``model.feature_index``) with the feedback network in the same map; CKA on 2000
test samples for random init, the tested weights and the last epoch's weights; the run's own
learning rule's update vs backprop angles (and its weight alignment, where it has feedback weights)
on the first 256 training samples; device "auto" (CUDA when present). Each
protocol's own defaults (probe C grid, kNN k and T, UMAP n_neighbors and min_dist) are stated at
the top of its module; ``EvalConfig.probe/knn/umap`` override them and eval.json records the
values used (``settings``), the time per protocol (``timings``) and, with a baseline cache
directory, how many baselines it supplied (``baseline_cache``).
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ccl_repr import checkpoint as ckpt
from ccl_repr.fastpath import resolve_device
from ccl_repr.rules import LearningRule, make_rule
from ccl_repr.models import DualNetwork

from . import EvalError
from .alignment import update_angles, weight_alignment
from .baselines import BASELINES, BaselineCache, PCACache, pixels, random_init_model
from .cka import MAX_SAMPLES, run_cka
from .export import export_features
from .features import LayerSpec, extract, open_run, prototypes, resolve_layer, resolve_layers
from .knn import KNNConfig, knn
from .linear_probe import ProbeConfig, probe
from .report import write_report
from .umap_plot import UMAPConfig, umap_plot

PROTOCOLS = ("linear", "knn", "umap", "cka", "align")
ANGLE_BATCH = 256


@dataclass
class EvalConfig:
    layers: Sequence[LayerSpec] | None = None
    protocols: Sequence[str] = PROTOCOLS
    networks: str = "auto"  # auto | forward | feedback | both
    baselines: Sequence[str] = BASELINES
    weights: str = "tested"
    umap_layers: Sequence[LayerSpec] = ("features",)
    cka_samples: int = MAX_SAMPLES
    batch_size: int = 1024
    cache_dir: str | None = None  # extracted features (evals.features), keyed by weights + inputs
    baseline_cache: str | None = None  # scored baselines (evals.baselines.BaselineCache); None: refit
    export_features: bool = False  # write each evaluated layer's features + labels as .npy (features/)
    progress: bool = True  # tqdm bar over the protocols and layers; shown on a terminal only
    umap_background: bool = True  # embed UMAPs in a background thread while the probes run
    device: str = "auto"
    blas_threads: int | None = 1  # numpy/scikit-learn BLAS threads (see linear_probe); None: untouched
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    umap: UMAPConfig = field(default_factory=UMAPConfig)

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise EvalError(f"unknown protocol {bad[0]!r}; choose from {','.join(PROTOCOLS)}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise EvalError(f"unknown baseline {bad[0]!r}; choose from {','.join(BASELINES)}")
        if self.networks not in ("auto", "forward", "feedback", "both"):
            raise EvalError(f"networks must be auto, forward, feedback or both, got {self.networks!r}")


def score(feats: Sequence[Tensor], ys: Sequence[Tensor], protocols: Sequence[str], config: EvalConfig,
          timings: dict | None = None) -> dict:
    """Linear probe and kNN on (train, val, test) features; val may be empty. ``timings``
    (optional) accumulates each protocol's seconds."""
    (tr, va, te), (ytr, yva, yte) = feats, ys
    out: dict = {"dim": int(tr.shape[1])}
    if "linear" in protocols:
        val = dict(val_feats=va, val_y=yva) if len(yva) else {}
        r = probe(tr, ytr, te, yte, config=config.probe, **val)
        out.update(linear_probe_accuracy=r["test_accuracy"], linear_probe=r)
    if "knn" in protocols:  # on the evaluation's device: the (test x bank) similarities are its bulk
        device = resolve_device(config.device)
        r = knn(tr.to(device), ytr, te.to(device), yte, config=config.knn)
        out.update(knn_accuracy=r["top1"], knn_top5=r.get("top5"), knn=r)
    if timings is not None:
        for key, proto in (("linear_probe", "linear"), ("knn", "knn")):
            if key in out:
                timings[proto] = timings.get(proto, 0.0) + out[key]["seconds"]
    return out


def settings(config: EvalConfig) -> dict:
    """The protocol settings an evaluation used (defaults merged with the overrides)."""
    return {"linear": dataclasses.asdict(config.probe), "knn": dataclasses.asdict(config.knn),
            "umap": dataclasses.asdict(config.umap), "cka_samples": config.cka_samples,
            "baselines": list(config.baselines), "weights": config.weights, "networks": config.networks,
            "device": config.device, "blas_threads": config.blas_threads}


def _short(rec: dict) -> dict:
    return {k: rec[k] for k in ("dim", "linear_probe_accuracy", "knn_accuracy", "knn_top5") if k in rec}


def evaluate_run(run_dir: Path | str, *, out_dir: Path | str | None = None, data_root: str | None = None,
                 config: EvalConfig = EvalConfig(), log=print) -> dict:
    """Run the protocols on a run folder; writes eval.json, report.md and PNGs into ``out_dir``
    (default RUN_DIR/eval) and returns the eval.json record."""
    from threadpoolctl import threadpool_limits

    t_start = time.perf_counter()
    device = resolve_device(config.device)
    run = open_run(run_dir, weights=config.weights, data_root=data_root, device=device)
    model, cfg = run.model, run.cfg
    out = Path(out_dir) if out_dir else Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"run_dir": str(run_dir), "model": model.name, "task": model.task, "dataset": run.data.name,
                    "method": cfg.method, "weights": config.weights, "layer_names": model.layer_names,
                    "feature_layer": model.layer_names[model.feature_index], "protocols": list(config.protocols),
                    "class_names": class_names(run), "settings": {**settings(config), "device": str(device)},
                    "layers": {}, "baselines": {}, "timings": {"load": time.perf_counter() - t_start}}
    summary_path = Path(run_dir) / ckpt.SUMMARY
    if summary_path.exists():
        result["run_summary"] = {k: v for k, v in ckpt.read_json(summary_path).items() if k != "versions"}
    random_model = random_init_model(cfg, model)
    with threadpool_limits(limits=config.blas_threads), _progress(run, config) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="umap") as background:
        # UMAP (one core: umap-learn's numba code, compiled on its first call in a process) runs
        # beside the probes (their BLAS, kNN and lbfgs work releases the GIL), collected after them.
        umaps = [_umap(run, spec, config, out, log, bar, background if config.umap_background else None)
                 for spec in config.umap_layers] if "umap" in config.protocols else []
        if any(p in config.protocols for p in ("linear", "knn")) or config.export_features:
            _score_layers(run, random_model, config, result, out, log, bar)
        if umaps:
            with _timed(result, "umap_wait"):
                result["umap"] = [u.result() if isinstance(u, Future) else u for u in umaps]
            result["timings"]["umap"] = sum(u["seconds"] for u in result["umap"])
        if "cka" in config.protocols:
            with _timed(result, "cka"):
                result["cka"] = _cka(run, model, random_model, config, out, log, bar)
        if "align" in config.protocols:
            with _timed(result, "align"):
                log("alignment")
                bar.set_postfix_str("alignment")
                result["alignment"] = _alignment(run, random_model, config.weights)
                bar.update()
    result["seconds"] = time.perf_counter() - t_start
    write_report(result, out)
    return result


def class_names(run) -> list[str]:
    """Class names in label order: the data bundle's, else the run's summary.json, else the label
    numbers (runs written before names were recorded)."""
    names = list(getattr(run.data, "classes", None) or [])
    if not names and (Path(run.run_dir) / ckpt.SUMMARY).exists():
        names = list(ckpt.read_json(Path(run.run_dir) / ckpt.SUMMARY).get("classes") or [])
    n = run.data.num_classes
    return [str(c) for c in names] if len(names) == n else [str(i) for i in range(n)]


@contextmanager
def _timed(result: dict, key: str):
    """Add the wall seconds of the block to ``result["timings"][key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        result["timings"][key] = result["timings"].get(key, 0.0) + time.perf_counter() - t0


def _networks(model: DualNetwork, config: EvalConfig) -> list[str]:
    networks = {"auto": ["forward"] + (["feedback"] if model.task == "reconstruct" else []),
                "both": ["forward", "feedback"]}.get(config.networks, [config.networks])
    if "feedback" in networks and model.task == "classify":
        raise EvalError("a classifier's per-sample feedback features depend on the label alone; probing "
                        "them measures nothing. Use --networks forward (UMAP and CKA still show G)")
    return networks


@contextmanager
def _progress(run, config: EvalConfig):
    """One tqdm bar over the evaluation's units (each layer's scoring, the pixel baseline, each
    UMAP, CKA, alignment); ``disable=None`` hides it when stderr is not a terminal."""
    from tqdm.auto import tqdm

    scoring = any(p in config.protocols for p in ("linear", "knn"))
    per_layer = scoring or config.export_features
    n_layers = len(resolve_layers(run.model, config.layers)) * len(_networks(run.model, config)) if per_layer else 0
    total = (n_layers + (scoring and "pixels" in config.baselines)
             + ("umap" in config.protocols) * len(config.umap_layers) + ("cka" in config.protocols)
             + ("align" in config.protocols))
    bar = tqdm(total=total, desc="eval", unit="step", dynamic_ncols=True, disable=None if config.progress else True)
    try:
        yield bar
    finally:
        bar.close()


def _epoch(run_dir: Path | str, name: str) -> int | None:
    """The epoch a checkpoint file of the run holds (None if absent)."""
    path = Path(run_dir) / name
    return ckpt.load_checkpoint(path).get("epoch") if path.exists() else None


def _score_layers(run, random_model: DualNetwork, config: EvalConfig, result: dict, out: Path, log, bar) -> None:
    """Probe + kNN per layer and network, each with its baselines (pixels, PCA, random init);
    with ``export_features`` the layers' features are also written under ``out/features``."""
    model, data = run.model, run.data
    splits = (data.train, data.val, data.test)
    ys = [s.y.cpu() for s in splits]
    layers = resolve_layers(model, config.layers)
    scoring = [p for p in config.protocols if p in ("linear", "knn")]
    cache = BaselineCache(config.baseline_cache if scoring else None, [t for s in splits for t in (s.x, s.y)],
                          {"protocols": scoring, "linear": dataclasses.asdict(config.probe),
                           "knn": dataclasses.asdict(config.knn), "batch_size": config.batch_size})
    base = result["baselines"]
    if scoring and "pixels" in config.baselines:
        log("baseline: pixels")
        bar.set_postfix_str("baseline pixels")
        with _timed(result, "baselines"):
            base["pixels"] = cache.lookup("pixels", (), lambda: score(pixels(*(s.x for s in splits)), ys, scoring, config))
        bar.update()
    for network in _networks(model, config):
        with _timed(result, "features"):
            learned = _layer_feats(model, network, layers, splits, config)
        if config.export_features:
            with _timed(result, "export"):
                result.setdefault("exported_features", {}).update(
                    export_features(out / "features", learned, model.layer_names, network, ys, result["class_names"]))
        if not scoring:
            bar.update(len(layers))
            continue
        key = "layers" if network == "forward" else "feedback_layers"
        result.setdefault(key, {})
        rand = _Lazy(lambda: _layer_feats(random_model, network, layers, splits, config))
        for i in layers:
            name = model.layer_names[i]
            log(f"{network} {name}: {', '.join(scoring)}")
            bar.set_postfix_str(f"{network} {name}")
            rec = {"index": i, "network": network, **score(learned[i], ys, scoring, config, result["timings"])}
            with _timed(result, "baselines"):
                rec["baselines"] = _layer_baselines(run, random_model, network, i, rec["dim"], rand, cache,
                                                    scoring, config, base, ys)
            result[key][name] = rec
            bar.update()
    if scoring:
        result["baseline_cache"] = cache.info()


class _Lazy:
    """A value computed on first use (random-init features: not needed when the cache has them)."""

    def __init__(self, make) -> None:
        self.make, self.value = make, None

    def __call__(self):
        if self.value is None:
            self.value = self.make()
        return self.value


def _layer_feats(m: DualNetwork, network: str, layers: list[int], splits, config: EvalConfig) -> dict[int, list[Tensor]]:
    """{layer: [train, val, test] features} of one network."""
    per_split = [extract(m, s.x, y=s.y, layers=layers, network=network, batch_size=config.batch_size,
                         cache_dir=config.cache_dir) for s in splits]
    return {i: [p[i] for p in per_split] for i in layers}


def _layer_baselines(run, random_model: DualNetwork, network: str, i: int, dim: int, rand: _Lazy,
                     cache: BaselineCache, scoring: list[str], config: EvalConfig, base: dict, ys) -> dict:
    """The baselines beside layer ``i``: pixels (scored once), PCA of its width (once per width),
    the random-init network at the same layer; each looked up in the baseline cache first."""
    data, name = run.data, run.model.layer_names[i]
    out: dict = {}
    if "pixels" in base:
        out["pixels"] = _short(base["pixels"])
    if "pca" in config.baselines:
        pca_key = f"pca{min(dim, data.train.x[0].numel(), len(data.train.x))}"
        if pca_key not in base:
            pca_cache = PCACache(data.train.x, data.val.x, data.test.x)

            def fit_pca() -> dict:
                feats, info = pca_cache(dim)
                return {**score(feats, ys, scoring, config), "pca": info}
            base[pca_key] = cache.lookup(pca_key, (), fit_pca)
        out["pca"] = {**_short(base[pca_key]), "key": pca_key}
    if "random_init" in config.baselines:
        r = cache.lookup(f"random_init-{network}-{name}", (random_model, network, i),
                         lambda: score(rand()[i], ys, scoring, config))
        base[f"random_init/{network}/{name}"] = r
        out["random_init"] = _short(r)
    return out


def _umap(run, spec: LayerSpec, config: EvalConfig, out: Path, log, bar, background=None) -> dict | Future:
    """Test features of one layer with the feedback network's prototypes (or features) in one map;
    features are extracted here, the embedding and plot run in ``background`` if given."""
    model, data = run.model, run.data
    i = resolve_layer(model, spec)
    name = model.layer_names[i]
    log(f"umap {name}")
    bar.set_postfix_str(f"umap {name}")
    x_test = data.test.x[: config.umap.max_points]
    f = extract(model, x_test, layers=[i])[i]
    if model.task == "classify":
        fb, fb_y, kind = prototypes(model, layers=[i])[i], torch.arange(model.num_classes), "prototypes"
    else:
        fb, fb_y, kind = extract(model, x_test, layers=[i], network="feedback")[i], data.test.y, "samples"

    def embed_and_plot() -> dict:
        rec = umap_plot(f, data.test.y, out / f"umap_{name}.png", feedback_feats=fb, feedback_labels=fb_y,
                        feedback_kind=kind, config=config.umap, class_names=class_names(run),
                        title=f"{model.name} {run.cfg.method}: layer {name}, test images + feedback {kind}")
        bar.update()
        return {"layer": name, **rec}
    return background.submit(embed_and_plot) if background is not None else embed_and_plot()


def _cka(run, model: DualNetwork, random_model: DualNetwork, config: EvalConfig, out: Path, log, bar) -> dict:
    """CKA matrices of random init, the evaluated weights and (if different) the last epoch's."""
    log("cka")
    bar.set_postfix_str("cka")
    run_dir = run.run_dir
    tested, last = _epoch(run_dir, ckpt.MODEL), _epoch(run_dir, ckpt.CHECKPOINT)
    label = {"tested": f"best validation epoch {tested}", "last": f"last epoch {last}"}[config.weights]
    models = {"random init": random_model, label: model}
    if config.weights == "tested" and last is not None and last != tested:
        last_model = ckpt.load_run(Path(run_dir), weights="last")[1]
        models[f"last epoch {last}"] = last_model.to(next(model.parameters()).device)
    rec = run_cka(models, run.data.test.x, run.data.test.y, out, max_samples=config.cka_samples)
    bar.update()
    return rec


def _saved_rule_state(run_dir: Path, weights: str) -> tuple[dict | None, str | None]:
    """(the learning rule's state saved beside the evaluated weights, the file it came from):
    model.pt for 'tested' (checkpoint.pt when a run has none), checkpoint.pt for 'last';
    (None, None) for a lone .safetensors file or a checkpoint saved without a "rule" entry."""
    if not Path(run_dir).is_dir():
        return None, None
    path = Path(run_dir) / (ckpt.MODEL if weights == "tested" else ckpt.CHECKPOINT)
    if weights == "tested" and not path.exists():
        path = Path(run_dir) / ckpt.CHECKPOINT
    if not path.exists():
        return None, None
    state = ckpt.load_checkpoint(path).get("rule")
    return (state, path.name) if isinstance(state, dict) else (None, None)


def run_rule(run, model: DualNetwork, weights: str = "tested") -> tuple[LearningRule, str]:
    """The run's learning rule (``make_rule(run.cfg)``) prepared on ``model``, with the state saved
    beside the evaluated weights (e.g. fixed random feedback matrices); without a saved state, the
    one ``prepare`` draws from the run's seed. Returns (rule, where its state came from)."""
    rule = make_rule(run.cfg)
    rule.prepare(model)
    if not rule.state_dict():  # nothing to restore: leave the run's files unread
        return rule, "none (the rule keeps no state)"
    state, source = _saved_rule_state(run.run_dir, weights)
    if state is None:
        return rule, "drawn from the run's seed (no saved rule state)"
    try:
        rule.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:  # a tensor of another shape: not this model's rule
        raise EvalError(f"the {rule.name} rule state in {source} does not fit the model "
                        f"({str(e).splitlines()[0][:160]}); the run folder's files disagree") from None
    return rule, f"loaded from {source}"


def _alignment(run, random_model: DualNetwork, weights: str = "tested") -> dict:
    """Weight alignment and the run's own rule's update vs backprop angles, trained weights next
    to random init (with its own instance of the rule, holding the same saved state)."""
    device = next(run.model.parameters()).device
    x, y = run.data.train.x[:ANGLE_BATCH].to(device), run.data.train.y[:ANGLE_BATCH].to(device)
    rule, source = run_rule(run, run.model, weights)
    random_rule, _ = run_rule(run, random_model, weights)
    align = weight_alignment(run.model, rule=rule)
    return {"rule": rule.name, "rule_state": source,
            "weight_alignment": align,
            "weight_alignment_random_init": weight_alignment(random_model, rule=random_rule),
            "update_angle_degrees": update_angles(run.model, x, y, rule=rule),
            "update_angle_degrees_random_init": update_angles(random_model, x, y, rule=random_rule),
            "protocol": {"batch": f"first {len(y)} training samples",
                         "update": f"the {rule.name} rule's own backward() gradient on F's parameters "
                                   f"vs the backprop gradient (run's loss config)",
                         "feedback_weight": (f"cos(U_l, W_l), W_l = the {rule.name} rule's feedback_weights() "
                                             f"in U_l's layout (CCL: V_l^T; conv: channels swapped, kernel "
                                             f"flipped, the adjoint)") if align is not None else
                                            (f"not applicable: the {rule.name} rule has no per-layer feedback "
                                             f"weight in U_l's layout")}}
