"""Protocol settings users steer, the baseline cache, UMAP coordinates and plotting without global state."""
import csv
import json

import matplotlib
import numpy as np
import pytest
import torch

from evals import EvalError
from evals.baselines import BaselineCache
from evals.cka import plot_cka
from evals.evaluate import EvalConfig, score
from evals.knn import KNNConfig, knn
from evals.linear_probe import ProbeConfig, probe
from evals.umap_plot import UMAPConfig, umap_plot


def test_knn_k_and_temperature_reach_the_vote():
    # the query's nearest neighbour is class 0; its next two are class 1 (almost as close)
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.3], [0.9, -0.3], [-1.0, 0.0]])
    bank_y = torch.tensor([0, 1, 1, 2])
    query, query_y = torch.tensor([[1.0, 0.02]]), torch.tensor([0])
    assert knn(bank, bank_y, query, query_y, config=KNNConfig(k=1))["top1"] == 1.0
    r = knn(bank, bank_y, query, query_y, config=KNNConfig(k=3, temperature=10.0))  # near-equal votes: 2 beat 1
    assert r["top1"] == 0.0 and r["protocol"]["k"] == 3 and r["protocol"]["temperature"] == 10.0
    assert knn(bank, bank_y, query, query_y, config=KNNConfig(k=3, temperature=0.001))["top1"] == 1.0
    with pytest.raises(EvalError, match="--knn-k"):
        KNNConfig(k=0)
    with pytest.raises(EvalError, match="--knn-temperature"):
        KNNConfig(temperature=0.0)


def separable(n=400, d=12, c=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d)) * 3
    y = rng.integers(0, c, n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_probe_one_C_is_used_as_given_and_grid_is_searched():
    x, y = separable()
    r = probe(x[:300], y[:300], x[300:], y[300:], config=ProbeConfig(Cs=(0.37,)))
    assert r["best_C"] == 0.37 and list(r["val_accuracy_per_C"]) == ["0.37"] and len(r["n_iter"]) == 1
    assert r["protocol"]["Cs"] == [0.37]
    grid = probe(x[:300], y[:300], x[300:], y[300:], config=ProbeConfig(Cs=(1e-4, 1.0), search_rows=100))
    assert set(grid["val_accuracy_per_C"]) == {"0.0001", "1.0"} and len(grid["n_iter"]) == 3  # 2 searches + refit
    assert len(grid["per_class_accuracy"]) == 3 and grid["test_accuracy"] > 0.9
    with pytest.raises(EvalError, match="--probe-C"):
        ProbeConfig(Cs=(0.1, -1.0))


def test_warm_started_refit_matches_a_cold_fit():
    """The refit starts from the search solution: same objective, so the same optimum."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = separable(n=1500, d=30, c=5, seed=1)
    x += np.random.default_rng(3).normal(size=x.shape).astype(np.float32) * 3  # overlapping classes
    cfg = ProbeConfig(Cs=(0.01, 0.1), search_rows=300, tol=1e-8, max_iter=2000)
    r = probe(x[:1000], y[:1000], x[1000:], y[1000:], val_feats=x[1000:1200], val_y=y[1000:1200], config=cfg)
    scaler = StandardScaler().fit(x[:1000])
    cold = LogisticRegression(C=r["best_C"], tol=1e-8, max_iter=2000).fit(scaler.transform(x[:1000]), y[:1000])
    assert r["test_accuracy"] == pytest.approx(cold.score(scaler.transform(x[1000:]), y[1000:]), abs=1e-9)


def test_baseline_cache_hit_is_identical_and_data_change_invalidates(tmp_path):
    x, y = separable(n=300)
    xs = [torch.from_numpy(x[:200]), torch.from_numpy(x[200:240]), torch.from_numpy(x[240:])]
    ys = [torch.from_numpy(y[:200]), torch.from_numpy(y[200:240]), torch.from_numpy(y[240:])]
    config = EvalConfig()
    calls = []

    def compute():
        calls.append(1)
        return score(xs, ys, ("linear", "knn"), config)

    def lookup(splits, settings=None):
        cache = BaselineCache(tmp_path, [t for pair in zip(splits, ys) for t in pair], settings or {"k": 20})
        return cache.lookup("pixels", (), compute), cache

    first, c1 = lookup(xs)
    second, c2 = lookup(xs)
    assert (c1.misses, c2.hits, len(calls)) == (1, 1, 1) and second == first
    assert second["linear_probe_accuracy"] == compute()["linear_probe_accuracy"]  # a refit agrees with the hit
    changed = [xs[0].clone(), xs[1], xs[2]]
    changed[0][5, 3] += 1.0  # one value of one training image: different data, new key
    _, c3 = lookup(changed)
    _, c4 = lookup(xs, {"k": 1})  # different protocol settings: new key
    assert c3.misses == 1 and c4.misses == 1 and len(list(tmp_path.glob("*.json"))) == 3


def test_umap_coords_files_and_no_global_backend_change(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    y = rng.integers(0, 3, 60)
    x = centres[y] + rng.normal(size=(60, 8))
    names = ["cat", "dog", "ship"]
    with matplotlib.rc_context({"backend": "svg"}):  # a backend switch inside would show here
        rec = umap_plot(x, y, tmp_path / "u.png", feedback_feats=centres, feedback_labels=np.arange(3),
                        class_names=names, config=UMAPConfig(n_epochs=20, n_neighbors=5, min_dist=0.3))
        plot_cka({"a": {"matrix": [[1.0, 0.2], [0.2, 1.0]], "forward_layers": ["x", "h"],
                        "feedback_layers": ["x", "h"]}}, tmp_path / "cka.png")
        assert matplotlib.get_backend() == "svg"
    assert rec["params"]["n_neighbors"] == 5 and rec["params"]["min_dist"] == 0.3
    z = np.load(tmp_path / "u_coords.npz")
    assert z["coords"].shape == (63, 2) and np.isfinite(z["coords"]).all()
    assert z["labels"].tolist() == y.tolist() + [0, 1, 2]
    assert z["classes"].tolist() == [names[c] for c in y] + names and z["class_names"].tolist() == names
    assert z["source"].tolist() == ["forward"] * 60 + ["feedback_prototypes"] * 3
    rows = list(csv.DictReader((tmp_path / "u_coords.csv").open()))
    assert len(rows) == 63 and rows[-1]["class"] == "ship" and float(rows[0]["x"]) == pytest.approx(z["coords"][0, 0], rel=1e-5)
    assert json.loads((tmp_path / "u.json").read_text())["coords_csv"] == "u_coords.csv"
    with pytest.raises(EvalError, match="--umap-neighbors"):
        UMAPConfig(n_neighbors=1)
