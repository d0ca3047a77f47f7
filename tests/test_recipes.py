"""Every bundled recipe resolves for both methods, and its model trains one step on inputs of
its dataset's shape (random tensors: the datasets themselves are not needed here).

Paper-width models (up to 86M parameters) are built on the meta device to check their shapes
and then stepped at 1/16 of their widths, which keeps this file fast on 2 CPU cores."""
import dataclasses

import pytest
import torch

from ccl_repr.config import list_recipes, make_config
from ccl_repr.data import TORCHVISION
from ccl_repr.builder import build_trainable
from ccl_repr.models import build_model

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashionmnist": (1, 28, 28), "cifar10": (3, 32, 32),
          "cifar100": (3, 32, 32), "stl10": (3, 96, 96)}
CLASSES = {"digits": 10, **{k: v[2] for k, v in TORCHVISION.items()}}
PAPER_RECIPES = ["mlp_mnist", "mlp_fashionmnist", "mlp_cifar10", "mlp_cifar100", "cnn_cifar10", "cnn_cifar100"]


def test_paper_recipes_are_bundled():
    assert set(PAPER_RECIPES) <= set(list_recipes())


@pytest.mark.parametrize("recipe", list_recipes())
@pytest.mark.parametrize("method", ["ccl", "bp"])
def test_recipe_resolves_and_steps(recipe, method):
    torch.manual_seed(0)
    cfg = make_config(recipe, method=method)
    assert cfg.method == method and cfg.recipe == recipe
    c, h, w = SHAPES[cfg.data.name]
    if cfg.data.pad_to:
        h = w = cfg.data.pad_to
    with torch.device("meta"):  # shapes of the full-width model, no memory, no init cost
        full = build_model(cfg.model, input_shape=(c, h, w), num_classes=CLASSES[cfg.data.name])
    if sum(p.numel() for p in full.parameters()) > 2_000_000:
        widths = [max(4, layer.out_shape[0] // 16) for layer in full.layers[:-1]]
        n_enc = full.feature_index
        cfg.model = dataclasses.replace(cfg.model, widths=widths[:n_enc] if full.task == "reconstruct" else widths)
    model, m, opt = build_trainable(cfg, input_shape=(c, h, w), num_classes=CLASSES[cfg.data.name], total_steps=10)
    x, y = torch.randn(4, c, h, w), torch.arange(4) % CLASSES[cfg.data.name]
    nets = {net: list(model.network_parameters(net)) for net in ("forward", "feedback")}
    grads = dict(zip(nets, _split(nets, torch.autograd.grad(
        sum(m.losses(model, x, y).values()), [p for ps in nets.values() for p in ps], allow_unused=True))))
    before = {net: [p.detach().clone() for p in ps] for net, ps in nets.items()}
    opt.step(sum(m.losses(model, x, y).values()))
    for net, ps in nets.items():
        moved = [(p.detach() - b, g) for p, b, g in zip(ps, before[net], grads[net]) if g is not None]
        if getattr(cfg.optim, net).lr == 0 or not moved:  # BP's feedback network: no lr, no gradient
            continue
        step, grad = (torch.cat([t.flatten() for t in ts]) for ts in zip(*moved))
        assert step.any(), f"{net} network did not move"
        # Downhill: the step opposes the gradient of the loss it took. Weight decay alone turns it
        # from -1 (down to about -0.2 for the BP autoencoders, whose first gradients are tiny).
        cosine = torch.nn.functional.cosine_similarity(step, grad, dim=0).item()
        assert cosine < 0, f"{net} network stepped uphill: cosine(step, gradient) = {cosine:.3f}"


def _split(nets: dict[str, list], flat: tuple) -> list[tuple]:
    """Undo the concatenation of the networks' parameter lists."""
    sizes = [len(ps) for ps in nets.values()]
    return [flat[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]


def test_method_sections_differ_where_the_paper_differs():
    ccl, bp = make_config("cnn_cifar10", method="ccl"), make_config("cnn_cifar10", method="bp")
    assert (ccl.train.batch_size, ccl.optim.forward.lr, ccl.loss.flooding) == (128, 1.0, 0.1)
    assert (bp.train.batch_size, bp.optim.forward.lr, bp.model.norm) == (256, 0.03, "pre")
