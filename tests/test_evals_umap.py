"""UMAP of a few hundred points, with feedback prototypes in the same embedding: PNG + JSON."""
import json

import numpy as np

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
