"""The paper's method: with CCL every gradient is local. The gradient reaching a layer's forward weights
depends only on that layer's input a_{l-1} and the feedback signal b_l; with backprop it does not."""
import copy

import pytest
import torch

from ccl_repr.config import LossConfig
from ccl_repr.losses import classification_pair_loss, match_matrix
from ccl_repr.rules import CCL, Backprop
from tests.test_layers_models import CLASSIFIERS, small_model


def grads(model, method, x, y):
    model.zero_grad(set_to_none=True)
    sum(method.losses(model, x, y).values()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def perturb_forward_above(model, l):
    """New random forward weights for layers l+1.. (their feedback weights untouched)."""
    with torch.no_grad():
        for layer in model.layers[l + 1:]:
            for p in layer.forward_parameters():
                p.add_(torch.randn_like(p))


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("form", ["prototype", "normalized"])
def test_forward_gradient_unchanged_by_upper_layers(name, form):
    torch.manual_seed(0)
    model = small_model(name)
    x, y = torch.randn(8, *model.input_shape), torch.arange(8) % 10
    ccl = CCL(LossConfig(form=form, scale=128.0 if form == "prototype" else 1.0))
    ccl.prepare(model)
    before = grads(model, ccl, x, y)
    for l in range(len(model.layers) - 1):
        changed = copy.deepcopy(model)
        perturb_forward_above(changed, l)
        after = grads(changed, ccl, x, y)
        key = f"layers.{l}.fwd.proj.weight"
        assert torch.allclose(before[key], after[key], atol=1e-6), f"{key} saw upper layers"


@pytest.mark.parametrize("name", ["mlp_small", "cnn"])
def test_backprop_gradient_does_change(name):
    """Control: the same perturbation does change the backprop gradient of the first layer."""
    torch.manual_seed(0)
    model = small_model(name)
    x, y = torch.randn(8, *model.input_shape), torch.arange(8) % 10
    bp = Backprop(LossConfig())
    bp.prepare(model)
    before = grads(model, bp, x, y)
    changed = copy.deepcopy(model)
    perturb_forward_above(changed, 0)
    after = grads(changed, bp, x, y)
    assert not torch.allclose(before["layers.0.fwd.proj.weight"], after["layers.0.fwd.proj.weight"])


def test_total_gradient_equals_isolated_pair_loss_gradient():
    """grad of U_l and V_{l+1} from the summed loss equals the grad of pair l's loss alone,
    computed from detached a_{l-1} and b_{l+1}."""
    torch.manual_seed(0)
    model = small_model("mlp_small")
    x, y = torch.randn(16, *model.input_shape), torch.arange(16) % 10
    cfg = LossConfig(form="prototype", scale=128.0)
    ccl = CCL(cfg)
    ccl.prepare(model)
    full = grads(model, ccl, x, y)
    a = [t.detach() for t in model.forward_intermediates(x)]
    b = [t.detach() for t in model.feedback_intermediates(torch.eye(10))]
    l = 1
    model.zero_grad(set_to_none=True)
    al = model.layers[l - 1](a[l - 1])
    bl = model.layers[l].feedback(b[l + 1])
    classification_pair_loss(al, bl, match_matrix(y, 10), form="prototype", scale=128.0,
                             anti_collapse=0.0).backward()
    assert torch.allclose(model.layers[l - 1].fwd.proj.weight.grad, full[f"layers.{l - 1}.fwd.proj.weight"], atol=1e-6)
    assert torch.allclose(model.layers[l].fbk.proj.weight.grad, full[f"layers.{l}.fbk.proj.weight"], atol=1e-6)


def test_input_pair_trains_only_bottom_feedback_layer():
    torch.manual_seed(0)
    model = small_model("mlp_small")
    x, y = torch.randn(8, *model.input_shape), torch.arange(8) % 10
    ccl = CCL(LossConfig())
    ccl.prepare(model)
    model.zero_grad(set_to_none=True)
    ccl.losses(model, x, y)["pair/input"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"layers.0.fbk.proj.weight"}
