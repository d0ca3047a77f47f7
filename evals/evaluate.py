"""Evaluate a run folder: every protocol on every requested layer, baselines beside each result.

Defaults (:class:`EvalConfig`): every layer above the input; protocols linear, knn, umap, cka,
align; the forward network (plus the feedback network, fed the images, for autoencoders: a
classifier's per-sample feedback features are a function of the label alone, so probing them
would only measure the label); the weights of the best validation epoch ("tested"); the run's
own data split (same seed, so the probe's C is chosen on the run's validation split); baselines
pixels, PCA of the layer's width and the same architecture at random init (seed 0); UMAP of the
feature layer (``model.feature_index``) with the feedback network in the same map; CKA on 2000
test samples for random init, the tested weights and the last epoch's weights; CCL update vs
backprop angles on the first 256 training samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ccl_repr import checkpoint as ckpt
from ccl_repr.fastpath import resolve_device
from ccl_repr.methods import CCL
from ccl_repr.models import DualNetwork

from . import EvalError
from .alignment import update_angles, weight_alignment
from .baselines import BASELINES, PCACache, pixels, random_init_model
from .cka import MAX_SAMPLES, run_cka
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
    cache_dir: str | None = None
    device: str = "cpu"
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


def score(feats: Sequence[Tensor], ys: Sequence[Tensor], protocols: Sequence[str], config: EvalConfig) -> dict:
    """Linear probe and kNN on (train, val, test) features; val may be empty."""
    (tr, va, te), (ytr, yva, yte) = feats, ys
    out: dict = {"dim": int(tr.shape[1])}
    if "linear" in protocols:
        val = dict(val_feats=va, val_y=yva) if len(yva) else {}
        r = probe(tr, ytr, te, yte, config=config.probe, **val)
        out.update(linear_probe_accuracy=r["test_accuracy"], linear_probe=r)
    if "knn" in protocols:
        r = knn(tr, ytr, te, yte, config=config.knn)
        out.update(knn_accuracy=r["top1"], knn_top5=r.get("top5"), knn=r)
    return out


def _short(rec: dict) -> dict:
    return {k: rec[k] for k in ("dim", "linear_probe_accuracy", "knn_accuracy", "knn_top5") if k in rec}


def evaluate_run(run_dir: Path | str, *, out_dir: Path | str | None = None, data_root: str | None = None,
                 config: EvalConfig = EvalConfig(), log=print) -> dict:
    """Run the protocols on a run folder; writes eval.json, report.md and PNGs into ``out_dir``
    (default RUN_DIR/eval) and returns the eval.json record."""
    from threadpoolctl import threadpool_limits

    t_start = time.perf_counter()
    run = open_run(run_dir, weights=config.weights, data_root=data_root, device=resolve_device(config.device))
    model, cfg = run.model, run.cfg
    out = Path(out_dir) if out_dir else Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"run_dir": str(run_dir), "model": model.name, "task": model.task, "dataset": run.data.name,
                    "method": cfg.method, "weights": config.weights, "layer_names": model.layer_names,
                    "feature_layer": model.layer_names[model.feature_index], "protocols": list(config.protocols),
                    "layers": {}, "baselines": {}}
    summary_path = Path(run_dir) / ckpt.SUMMARY
    if summary_path.exists():
        result["run_summary"] = {k: v for k, v in ckpt.read_json(summary_path).items() if k != "versions"}
    random_model = random_init_model(cfg, model)
    with threadpool_limits(limits=config.blas_threads):
        if any(p in config.protocols for p in ("linear", "knn")):
            _score_layers(run, random_model, config, result, log)
        if "umap" in config.protocols:
            result["umap"] = [_umap(run, spec, config, out, log) for spec in config.umap_layers]
        if "cka" in config.protocols:
            log("cka")
            tested, last = _epoch(run_dir, ckpt.MODEL), _epoch(run_dir, ckpt.CHECKPOINT)
            label = {"tested": f"best validation epoch {tested}", "last": f"last epoch {last}"}[config.weights]
            models = {"random init": random_model, label: model}
            if config.weights == "tested" and last is not None and last != tested:
                last_model = ckpt.load_run(Path(run_dir), weights="last")[1]
                models[f"last epoch {last}"] = last_model.to(resolve_device(config.device))
            result["cka"] = run_cka(models, run.data.test.x, run.data.test.y, out, max_samples=config.cka_samples)
        if "align" in config.protocols:
            log("alignment")
            result["alignment"] = _alignment(run, random_model)
    result["seconds"] = time.perf_counter() - t_start
    write_report(result, out)
    return result


def _epoch(run_dir: Path | str, name: str) -> int | None:
    """The epoch a checkpoint file of the run holds (None if absent)."""
    path = Path(run_dir) / name
    return ckpt.load_checkpoint(path).get("epoch") if path.exists() else None


def _score_layers(run, random_model: DualNetwork, config: EvalConfig, result: dict, log) -> None:
    """Probe + kNN per layer and network, each with its baselines (pixels, PCA, random init)."""
    model, data = run.model, run.data
    splits = (data.train, data.val, data.test)
    ys = [s.y.cpu() for s in splits]
    layers = resolve_layers(model, config.layers)
    networks = {"auto": ["forward"] + (["feedback"] if model.task == "reconstruct" else []),
                "both": ["forward", "feedback"]}.get(config.networks, [config.networks])
    if "feedback" in networks and model.task == "classify":
        raise EvalError("a classifier's per-sample feedback features depend on the label alone; probing "
                        "them measures nothing. Use --networks forward (UMAP and CKA still show G)")
    scoring = [p for p in config.protocols if p in ("linear", "knn")]

    def feats_of(m: DualNetwork, network: str) -> dict[int, list[Tensor]]:
        per_split = [extract(m, s.x, y=s.y, layers=layers, network=network, batch_size=config.batch_size,
                             cache_dir=config.cache_dir) for s in splits]
        return {i: [p[i] for p in per_split] for i in layers}

    base = result["baselines"]
    pca_cache = PCACache(*(s.x for s in splits))
    if "pixels" in config.baselines:
        log("baseline: pixels")
        base["pixels"] = score(pixels(*(s.x for s in splits)), ys, scoring, config)
    for network in networks:
        learned = feats_of(model, network)
        rand = feats_of(random_model, network) if "random_init" in config.baselines else {}
        key = "layers" if network == "forward" else "feedback_layers"
        result.setdefault(key, {})
        for i in layers:
            name = model.layer_names[i]
            log(f"{network} {name}: {', '.join(scoring)}")
            rec = {"index": i, "network": network, **score(learned[i], ys, scoring, config), "baselines": {}}
            if "pixels" in base:
                rec["baselines"]["pixels"] = _short(base["pixels"])
            if "pca" in config.baselines:
                pca_key = f"pca{min(rec['dim'], data.train.x[0].numel())}"
                if pca_key not in base:
                    feats, info = pca_cache(rec["dim"])
                    base[pca_key] = {**score(feats, ys, scoring, config), "pca": info}
                rec["baselines"]["pca"] = {**_short(base[pca_key]), "key": pca_key}
            if rand:
                base[f"random_init/{network}/{name}"] = r = score(rand[i], ys, scoring, config)
                rec["baselines"]["random_init"] = _short(r)
            result[key][name] = rec


def _umap(run, spec: LayerSpec, config: EvalConfig, out: Path, log) -> dict:
    """Test features of one layer with the feedback network's prototypes (or features) in one map."""
    model, data = run.model, run.data
    i = resolve_layer(model, spec)
    name = model.layer_names[i]
    log(f"umap {name}")
    x_test = data.test.x[: config.umap.max_points]
    f = extract(model, x_test, layers=[i])[i]
    if model.task == "classify":
        fb, fb_y, kind = prototypes(model, layers=[i])[i], torch.arange(model.num_classes), "prototypes"
    else:
        fb, fb_y, kind = extract(model, x_test, layers=[i], network="feedback")[i], data.test.y, "samples"
    rec = umap_plot(f, data.test.y, out / f"umap_{name}.png", feedback_feats=fb, feedback_labels=fb_y,
                    feedback_kind=kind, config=config.umap,
                    title=f"{model.name} {run.cfg.method}: layer {name}, test images + feedback {kind}")
    return {"layer": name, **rec}


def _alignment(run, random_model: DualNetwork) -> dict:
    """Weight alignment and CCL-vs-backprop angles, trained weights next to random init."""
    device = next(run.model.parameters()).device
    x, y = run.data.train.x[:ANGLE_BATCH].to(device), run.data.train.y[:ANGLE_BATCH].to(device)
    ccl = CCL(run.cfg.loss)
    return {"weight_alignment": weight_alignment(run.model),
            "weight_alignment_random_init": weight_alignment(random_model),
            "update_angle_degrees": update_angles(run.model, x, y, method=ccl),
            "update_angle_degrees_random_init": update_angles(random_model, x, y, method=ccl),
            "protocol": {"batch": f"first {len(y)} training samples", "loss": "the run's CCL loss config",
                         "conv_transpose": "channels swapped, kernel flipped (adjoint)"}}
