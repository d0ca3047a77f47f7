"""The CPU-sized CNN recipes (cnn_mnist, cnn_cifar10_small) resolve, build at their data's shape,
and one CCL step of their settings lowers the losses it trains (the sweep behind
docs/results_cnn.md, benchmarks/sweep.py, is tested in test_benchmarks.py). Random tensors stand in
for the datasets."""
import pytest
import torch

from ccl_repr.config import make_config
from ccl_repr.builder import build_trainable
from ccl_repr.optim import Optimizers

SHAPES = {"cnn_mnist": (1, 28, 28), "cnn_cifar10_small": (3, 32, 32)}


def _setup(recipe: str, method: str):
    cfg = make_config(recipe, method=method)
    c, h, w = SHAPES[recipe]
    if cfg.data.pad_to:
        h = w = cfg.data.pad_to
    model, m, _ = build_trainable(cfg, input_shape=(c, h, w), num_classes=10, total_steps=1)
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
