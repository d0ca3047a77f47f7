"""The CPU-sized CNN recipes (cnn_mnist, cnn_cifar10_small) resolve, build at their data's shape,
and one CCL step of their settings lowers the losses it trains; the sweep script behind
docs/results_cnn.md runs end to end at toy size. Random tensors stand in for the datasets."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ccl_repr.config import make_config
from ccl_repr.methods import Optimizers, make_method
from ccl_repr.models import build_model
from tests.conftest import REPO

SHAPES = {"cnn_mnist": (1, 28, 28), "cnn_cifar10_small": (3, 32, 32)}


def _setup(recipe: str, method: str):
    cfg = make_config(recipe, method=method)
    c, h, w = SHAPES[recipe]
    if cfg.data.pad_to:
        h = w = cfg.data.pad_to
    model = build_model(cfg.model, input_shape=(c, h, w), num_classes=10)
    m = make_method(cfg)
    m.prepare(model)
    return cfg, model, m, (c, h, w)


@pytest.mark.parametrize("recipe", sorted(SHAPES))
@pytest.mark.parametrize("method", ["ccl", "bp"])
def test_recipe_builds_at_its_data_shape(recipe, method):
    cfg, model, _, shape = _setup(recipe, method)
    assert cfg.recipe == recipe and cfg.data.name in ("mnist", "cifar10")
    if recipe == "cnn_mnist":
        assert shape == (1, 32, 32)  # 28x28 padded: three halvings need a multiple of 8
    assert model(torch.zeros(2, *shape)).shape == (2, 10)
    assert len(model.layers) == len(cfg.model.widths) + 1


@pytest.mark.parametrize("recipe", sorted(SHAPES))
def test_one_ccl_step_lowers_the_losses_it_trains(recipe):
    """The recipe's own CCL optimiser settings (clip, momentum, centralisation, scale) take one
    step on a fixed tiny batch: the summed pair losses and the cross-entropy both go down."""
    torch.manual_seed(0)
    cfg, model, method, shape = _setup(recipe, "ccl")
    opt = Optimizers(model, cfg.optim, total_steps=10)
    x, y = torch.randn(16, *shape), torch.arange(16) % 10

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            losses = method.losses(model, x, y)
        return sum(v.item() for k, v in losses.items() if k.startswith("pair/")), losses["ce"].item()

    pairs0, ce0 = measure()
    opt.zero_grad()
    method.backward(model, x, y)
    opt.clip_and_step()
    pairs1, ce1 = measure()
    assert pairs1 < pairs0 and ce1 < ce0


def test_sweep_script_writes_curves(tmp_path):
    env = {**os.environ, "CCL_REPR_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "benchmarks/cnn.py", "--recipe", "mlp_digits", "--tag", "smoke", "--epochs", "2",
           "--out", str(tmp_path / "runs"), "--set", "train.batch_size=128"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    d = json.loads((tmp_path / "smoke.json").read_text())
    assert [(r["method"], r["seed"]) for r in d["rows"]] == [("ccl", 0), ("bp", 0)]
    for r in d["rows"]:
        assert len(r["curve"]["val/accuracy"]) == 2 and 0 < r["test_accuracy"] <= 1
        assert "--set train.batch_size=128" in r["command"]
    assert "| CCL |" in d["table"] and (tmp_path / "smoke.md").read_text() == d["table"]
    # --reuse collects the finished runs instead of training again
    again = subprocess.run(cmd + ["--reuse"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and "seed 0:" not in again.stderr
