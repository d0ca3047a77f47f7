"""evals protocols on synthetic data and small models: probe, kNN, CKA, features, alignment."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from ccl_repr.config import LossConfig, ModelConfig
from ccl_repr.rules import CCL
from ccl_repr.models import build_model
from evals import EvalError
from evals.alignment import DiagnosticsHook, update_angles, weight_alignment
from evals.cka import linear_cka
from evals.features import DualFeatures, extract, prototypes, resolve_layer
from evals.knn import knn_accuracy, knn_scores
from evals.linear_probe import TorchProbeConfig, probe, probe_torch


def separable(n: int = 600, d: int = 20, c: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d)) * 6
    y = rng.integers(0, c, n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_probes_reach_100_percent_on_separable_data():
    x, y = separable()
    r = probe(x[:400], y[:400], x[400:], y[400:])
    assert r["test_accuracy"] >= 0.99 and r["protocol"]["name"] == "sklearn_logistic_regression"
    assert r["best_C"] in r["protocol"]["Cs"]
    r = probe_torch(x[:400], y[:400], x[400:], y[400:], config=TorchProbeConfig(epochs=10))
    assert r["test_accuracy"] >= 0.99 and r["protocol"]["weight_decay"] == 0.0


def test_chunked_knn_equals_brute_force():
    x, y = separable(n=300, c=5, seed=1)
    x += np.random.default_rng(2).normal(size=x.shape).astype(np.float32) * 8  # make neighbours disagree
    tr, te, ytr, yte = x[:200], x[200:], y[:200], y[200:]
    k, t = 20, 0.07
    sim = F.normalize(torch.from_numpy(te), dim=1) @ F.normalize(torch.from_numpy(tr), dim=1).T
    brute = torch.zeros(len(te), 5)
    for i in range(len(te)):
        s, j = sim[i].sort(descending=True)
        for sv, jv in zip(s[:k], j[:k]):
            brute[i, ytr[jv]] += torch.exp(sv / t)
    chunked = knn_scores(tr, ytr, te, k=k, temperature=t, chunk_size=7, num_classes=5)
    assert torch.allclose(chunked, brute, rtol=1e-4)
    r = knn_accuracy(tr, ytr, te, yte, chunk_size=7)
    assert r["top1"] == pytest.approx((brute.argmax(1).numpy() == yte).mean())
    assert r["top5"] == 1.0 and r["protocol"]["k"] == 20


def test_cka_identity_orthogonal_and_scale_invariance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 30))
    y = x @ rng.normal(size=(30, 20)) + rng.normal(size=(100, 20))
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ q) == pytest.approx(1.0)
    assert linear_cka(x @ q * 7.5, y) == pytest.approx(linear_cka(x, y))
    assert 0 < linear_cka(x, y) < 1
    wide = rng.normal(size=(20, 50))  # Gram form (width > samples) agrees with feature form
    assert linear_cka(wide, wide @ np.linalg.qr(rng.normal(size=(50, 50)))[0] * 3) == pytest.approx(1.0)


def small(name: str = "mlp_small", **kw):
    torch.manual_seed(0)
    shape = (1, 8, 8) if name != "cnn_strided" else (1, 32, 32)
    widths = [8, 8, 16, 16, 32] if name == "cnn_strided" else []
    return build_model(ModelConfig(name=name, widths=widths, **kw), input_shape=shape, num_classes=10)


def test_extract_matches_interface_restores_mode_and_caches(tmp_path):
    model = small(norm="post").train()
    x, y = torch.randn(50, 1, 8, 8), torch.arange(50) % 10
    feats = extract(model, x, layers=["linear1", -1, "features"], batch_size=16)
    model.eval()
    with torch.no_grad():
        a = model.forward_intermediates(x)
    model.train()
    assert sorted(feats) == [1, 2, 3] and torch.allclose(feats[1], a[1], atol=1e-5) and model.training
    fb = extract(model, x, y=y, layers=[1], network="feedback")[1]
    assert fb.shape == (50, 128) and torch.allclose(fb[:10], prototypes(model, layers=[1])[1], atol=1e-5)
    with pytest.raises(EvalError, match="labels"):
        extract(model, x, layers=[1], network="feedback")
    with pytest.raises(EvalError, match="unknown layer"):
        resolve_layer(model, "conv9")
    first = extract(model, x, layers=[2], cache_dir=tmp_path)[2]
    assert len(list(tmp_path.iterdir())) == 1
    assert torch.equal(extract(model, x, layers=[2], cache_dir=tmp_path)[2], first)


def test_autoencoder_feedback_features_and_sklearn_pipeline():
    torch.manual_seed(0)
    ae = build_model(ModelConfig(name="ae_mlp", widths=[32, 8]), input_shape=(1, 8, 8), num_classes=10)
    x = torch.randn(40, 1, 8, 8)
    k = ae.feature_index
    fb = extract(ae, x, layers=[k], network="feedback")[k]
    assert fb.shape == (40, ae.feature_dims[k])
    xs, ys = separable(n=200, d=64, c=3)
    pipe = Pipeline([("features", DualFeatures(model=small(), layer="linear2")),
                     ("clf", LogisticRegression(max_iter=500))]).fit(xs[:150], ys[:150])
    assert pipe.score(xs[150:], ys[150:]) > 0.9
    assert pipe.named_steps["features"].n_features_out_ == 128


def test_weight_alignment_linear_and_conv_adjoint():
    for name in ("mlp_small", "cnn_strided"):
        model = small(name)
        with torch.no_grad():
            for layer in model.layers:
                if layer.has_params:
                    u, v = layer.projections()
                    w = u.weight
                    v.weight.copy_(w.T if w.dim() == 2 else w.transpose(0, 1).flip(-2, -1))
        assert all(c == pytest.approx(1.0) for c in weight_alignment(model, rule=CCL(LossConfig())).values())
    assert all(abs(c) < 0.5 for c in weight_alignment(small("cnn_strided"), rule=CCL(LossConfig())).values())


def test_update_angles_and_training_hook_leave_model_unchanged():
    model = small(norm="post").train()
    x, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 10
    ccl = CCL(LossConfig())
    ccl.prepare(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    angles = update_angles(model, x, y, rule=ccl)
    assert set(angles) == {"linear1", "linear2", "output"} and angles["output"] == pytest.approx(0.0, abs=1e-3)
    assert all(0 <= a <= 180 for a in angles.values())
    assert all(layer.detach for layer in model.layers) and model.training
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    hook = DiagnosticsHook(every=3)
    assert hook(step=2, epoch=1, model=model, x=x, y=y, method=ccl) is None
    record = hook(step=3, epoch=1, model=model, x=x, y=y, method=ccl)
    assert {"align/linear1", "angle/linear1", "cka/linear1", "cka/output"} <= set(record)
    assert all(0 <= record[f"cka/{n}"] <= 1 + 1e-9 for n in ("linear1", "linear2", "output"))
