"""The notebook API (ccl_repr.fit / load / Run), model.safetensors, and the README's example."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from torch import nn
from torch.utils.data import TensorDataset

import ccl_repr
from ccl_repr import checkpoint as ckpt
from ccl_repr.data import _digits
from ccl_repr.errors import CheckpointError, UserError
from ccl_repr.layers import DualFlatten, DualLayer, DualLinear
from ccl_repr.models import DualNetwork
from evals.features import DualFeatures
from conftest import REPO

README_MARKER = "<!-- test: tests/test_api.py executes the next code block -->"
FAST = {"train": {"progress": False, "num_threads": 1}}


@pytest.fixture(scope="module")
def digits():
    xtr, ytr, xte, yte, _ = _digits()  # floats in [0, 1], (N, 1, 8, 8)
    return xtr, ytr, xte, yte


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory, digits):
    """A registry model trained through the API on uint8 images."""
    xtr, ytr, xte, yte = digits
    u8 = lambda x: (x * 255).round().to(torch.uint8)  # noqa: E731
    out = tmp_path_factory.mktemp("api") / "mlp"
    run = ccl_repr.fit("mlp_small", train=(u8(xtr), ytr), test=(u8(xte), yte), recipe="mlp_digits", epochs=3,
                       out=out, config=FAST)
    return run, out


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    text = (REPO / "README.md").read_text()
    block = re.search(re.escape(README_MARKER) + r"\n```python\n(.*?)```", text, re.S)
    assert block, f"README.md lost its marked example ({README_MARKER})"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    run = namespace["run"]
    assert run.summary["status"] == "completed" and run.summary["test_accuracy"] > 0.7
    out = tmp_path / "runs" / "my-digits"
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.pt", "model.safetensors", "preprocess.json"):
        assert (out / name).exists(), name
    assert "test accuracy" in capsys.readouterr().out
    again = namespace["again"]
    x = namespace["x"][1400:]
    assert np.array_equal(again.predict(x), run.predict(x))


def test_fit_writes_the_cli_run_folder_and_predicts_raw_images(mlp_run, digits):
    run, out = mlp_run
    _, _, xte, yte = digits
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "mlp_small" and summary["dataset"] == "tensors" and summary["num_test"] == len(yte)
    accuracy = (run.predict((xte * 255).round().to(torch.uint8)) == yte.numpy()).mean()
    assert accuracy == pytest.approx(summary["test_accuracy"])  # raw uint8 in, the run's own test score out
    assert accuracy > 0.7
    logits = run.features(xte, layer="output")
    assert np.array_equal(logits.argmax(1), run.predict(xte))


def test_load_prefers_safetensors_which_alone_rebuilds_the_model(mlp_run, digits, tmp_path):
    run, out = mlp_run
    _, _, xte, _ = digits
    with safe_open(str(out / ckpt.SAFETENSORS), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(run.model.state_dict())
    assert json.loads(meta["config"])["model"]["name"] == "mlp_small"
    assert json.loads(meta["model_meta"])["preprocess"] == json.loads((out / ckpt.PREPROCESS).read_text())
    lone = tmp_path / "elsewhere" / "model.safetensors"
    lone.parent.mkdir()
    shutil.copy(out / ckpt.SAFETENSORS, lone)
    alone = ccl_repr.load(lone)  # no config.json, no preprocess.json: the metadata suffices
    assert np.array_equal(alone.features(xte, layer="linear2"), run.features(xte, layer="linear2"))
    (tmp_path / "run").mkdir()
    for name in ("config.json", ckpt.SAFETENSORS):  # no model.pt, no checkpoint.pt
        shutil.copy(out / name, tmp_path / "run" / name)
    cfg, model = ckpt.load_run(tmp_path / "run")
    assert torch.equal(model.state_dict()["layers.0.fwd.proj.weight"], run.model.state_dict()["layers.0.fwd.proj.weight"])


@pytest.mark.parametrize("damage", ["flipped", "truncated", "foreign"])
def test_damaged_safetensors_is_refused(mlp_run, tmp_path, damage):
    _, out = mlp_run
    path = tmp_path / "model.safetensors"
    data = bytearray((out / ckpt.SAFETENSORS).read_bytes())
    if damage == "flipped":
        data[-5] ^= 0x40  # one bit of a weight
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        from safetensors.torch import save
        data = save({"w": torch.zeros(3)})
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        ccl_repr.load(path)
    assert "\n" not in str(e.value) and "restore it" in str(e.value)


class TanhPair(DualLayer):
    """A user's own dual layer: tanh(U x) forward, tanh(V y) feedback, no library Side."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(in_shape=(d_in,), out_shape=(d_out,))
        self.fwd = nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.Tanh())
        self.fbk = nn.Sequential(nn.Linear(d_out, d_in, bias=False), nn.Tanh())


def own_layers() -> list[DualLayer]:
    torch.manual_seed(0)
    return [DualFlatten(in_shape=(1, 8, 8)), TanhPair(64, 64),
            DualLinear(in_shape=(64,), out_features=10, act_forward=None)]


@pytest.mark.parametrize("method", ["ccl", "bp"])
def test_fit_own_layers_on_a_dataset_with_either_rule(digits, tmp_path, method):
    xtr, ytr, xte, yte = digits
    layers = own_layers()
    run = ccl_repr.fit(layers, train=TensorDataset(xtr, ytr), method=method, recipe="mlp_digits", epochs=4,
                       out=tmp_path / method, config=FAST)
    assert run.summary["method"] == method and run.summary["num_test"] == len(ytr) // 5
    assert run.summary["test_accuracy"] > 0.4  # chance is 0.1 (CCL reaches 0.56 in these 4 epochs)
    assert run.model.layers[1] is layers[1]  # the caller's layers were trained in place
    with pytest.raises(UserError, match="built in Python"):
        ccl_repr.load(tmp_path / method)
    again = ccl_repr.load(tmp_path / method, model=DualNetwork(layers=own_layers(), input_shape=(1, 8, 8),
                                                               task="classify", num_classes=10))
    assert np.array_equal(again.predict(xte), run.predict(xte))


def test_fit_rejects_bad_data(tmp_path):
    x = torch.rand(20, 8, 8)
    with pytest.raises(UserError, match="one per image"):
        ccl_repr.fit("mlp_small", train=(x, torch.zeros(19, dtype=torch.long)), out=tmp_path / "a")
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        ccl_repr.fit("mlp_small", train=(x * 255, torch.zeros(20, dtype=torch.long)), out=tmp_path / "b")
    with pytest.raises(UserError, match="takes"):
        ccl_repr.fit(own_layers(), train=(torch.rand(20, 9, 9), torch.zeros(20, dtype=torch.long)), out=tmp_path / "c")
    assert not any(tmp_path.iterdir())  # nothing written before the data was checked


def test_autoencoder_predict_reconstructs_on_pixel_scale(digits, tmp_path):
    xtr, ytr, xte, yte = digits
    run = ccl_repr.fit("ae_mlp", train=(xtr, ytr), test=(xte, yte), method="bp", epochs=2, out=tmp_path / "ae",
                       config={**FAST, "model": {"widths": [32, 8]}})
    recon = run.predict(xte)
    assert recon.shape == tuple(xte.shape) and recon.min() >= 0 and recon.max() <= 1
    # the run's test MSE is on [0, 1] pixels too (clamping can only bring the prediction closer)
    assert ((recon - xte.numpy()) ** 2).mean() <= run.summary["test_mse"] * (1 + 1e-4)


def test_sklearn_transformer_on_raw_images(mlp_run, digits):
    run, out = mlp_run
    xtr, ytr, xte, yte = digits
    flat = (xtr * 255).round().to(torch.uint8).flatten(1).numpy()  # raw uint8 rows, as a user has them
    pipe = Pipeline([("f", DualFeatures(run_dir=str(out), layer="linear2", raw=True)),
                     ("clf", LogisticRegression(max_iter=500))]).fit(flat, ytr.numpy())
    f = pipe.named_steps["f"]
    assert f.n_features_in_ == 64 and f.n_features_out_ == 128
    names = f.get_feature_names_out()
    assert len(names) == 128 and names[0] == "forward_linear2_0"
    assert np.allclose(f.transform(xte.numpy()), run.features(xte, layer="linear2"), atol=1e-6)
    assert pipe.score((xte * 255).round().to(torch.uint8).flatten(1).numpy(), yte.numpy()) > 0.7
