"""UMAP of a few hundred points, with feedback prototypes in the same embedding: PNG + JSON."""
import json

import numpy as np
from sklearn.manifold import trustworthiness
from sklearn.neighbors import NearestNeighbors

from evals.umap_plot import UMAPConfig, umap_plot


def test_umap_writes_png_and_parameters(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 4
    y = rng.integers(0, 5, 300)
    x = centres[y] + rng.normal(size=(300, 16))
    rec = umap_plot(x, y, tmp_path / "umap.png", feedback_feats=centres, feedback_labels=np.arange(5),
                    config=UMAPConfig(n_epochs=50, seed=3))
    png = (tmp_path / "umap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((tmp_path / "umap.json").read_text())
    assert saved["params"]["seed"] == 3 and saved["num_points"] == 300 and saved["num_feedback_points"] == 5
    assert saved == json.loads(json.dumps(rec))
    # The map keeps the structure (a random or shuffled one: 5-NN agreement ~0.2, trustworthiness
    # ~0.5; this one ~1.0 and ~0.94), in the input's row order, and puts each feedback prototype
    # among its own class's points (one joint fit).
    coords = np.load(tmp_path / "umap_coords.npz")
    emb, forward = coords["coords"], coords["source"] == "forward"
    assert np.array_equal(coords["labels"], np.concatenate([y, np.arange(5)])) and forward.sum() == 300
    neighbours = NearestNeighbors(n_neighbors=6).fit(emb[forward]).kneighbors(emb[forward], return_distance=False)
    agreement = (y[neighbours[:, 1:]] == y[:, None]).mean()
    assert agreement > 0.9, f"5-NN label agreement in the map {agreement:.2f}"
    trust = trustworthiness(x, emb[forward], n_neighbors=10, metric="cosine")
    assert trust > 0.8, f"trustworthiness {trust:.2f}"
    nearest = NearestNeighbors(n_neighbors=10).fit(emb[forward]).kneighbors(emb[~forward], return_distance=False)
    assert (y[nearest] == np.arange(5)[:, None]).mean(axis=1).min() >= 0.8, "a prototype sits away from its class"
