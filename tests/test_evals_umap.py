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


def test_exact_knn_graph_matches_a_brute_force_search():
    """The neighbour graph handed to umap-learn (the exact one, in place of pynndescent's search)
    equals scikit-learn's brute-force neighbours, the point itself first at distance 0, for both
    metrics, across chunk boundaries, with duplicated rows."""
    from evals.umap_plot import exact_knn
    rng = np.random.default_rng(1)
    x = rng.normal(size=(257, 12)).astype(np.float32)
    x[200] = x[100]  # a duplicate: the point itself must still come first
    for metric in ("cosine", "euclidean"):
        idx, dist = exact_knn(x, 7, metric, chunk_size=50)
        ref_d, ref_i = NearestNeighbors(n_neighbors=7, metric=metric, algorithm="brute").fit(x).kneighbors(x)
        assert idx.shape == dist.shape == (257, 7) and dist.dtype == np.float32
        assert np.array_equal(idx[:, 0], np.arange(257)) and np.all(dist[:, 0] == 0)
        np.testing.assert_allclose(dist, ref_d, atol=1e-4)
        # rows 100 and 200 are one point: at equal distance their order may differ from the reference
        same = lambda i: np.where(i == 200, 100, i)  # noqa: E731
        ties = np.isin(np.arange(257), [100, 200])
        assert np.array_equal(same(idx[~ties, 1:]), same(ref_i[~ties, 1:])), metric


def test_umap_above_pynndescent_threshold_warns_nothing(tmp_path):
    """Above 4096 points umap-learn would build its approximate graph; the exact graph goes in
    instead, with no warning and no change to the caller's warning filters."""
    import warnings

    from evals.umap_plot import embed
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4200, 8)).astype(np.float32)
    import umap  # noqa: F401  (its own import-time notices are not ours)
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb = embed(x, config=UMAPConfig(n_epochs=5))
    assert emb.shape == (4200, 2) and np.isfinite(emb).all()
    assert not [w for w in caught if "precomputed_knn" in str(w.message)], [str(w.message) for w in caught]
    assert warnings.filters == before
