"""The autoencoders' local reconstruction term (loss.ae_layer_recon): V_l(U_l(sg(a_l))) vs sg(a_l)."""
import copy

import pytest
import torch

from ccl_repr.config import LossConfig, ModelConfig, make_config
from ccl_repr.errors import ConfigError
from ccl_repr.models import build_model
from ccl_repr.parallel import check_config
from ccl_repr.rules import CCL
from ccl_repr.rules.ccl import layer_reconstruction
from tests.test_speed_layerwise import AUTOENCODERS, assert_same, summed_and_layerwise_grads

pytestmark = pytest.mark.usefixtures("one_thread")

AE = dict(act_forward="relu", act_feedback="relu", bias=True, norm="post", init="orthogonal_bn")


def model_and_batch(name: str, **kw):
    shape, widths = AUTOENCODERS[name]
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, widths=widths, **{**AE, **kw}), input_shape=shape,
                        num_classes=10).train()
    return model, torch.rand(8, *shape)


@pytest.mark.parametrize("name", list(AUTOENCODERS))
@pytest.mark.parametrize("sides", ["forward", "feedback", "both"])
def test_each_reconstruction_term_trains_its_own_layer_only(name, sides):
    """Local: the term of layer l reaches U_l and V_l (both), and no other layer's parameters.
    (Default init: the published one starts F's output layer and G's bottom layer at zero.)"""
    model, x = model_and_batch(name, init="default")
    rule = CCL(LossConfig(ae_form="weighted", ae_layer_recon=1.0, ae_layer_recon_sides=sides))
    rule.prepare(model)
    terms = rule.losses(model, x, torch.zeros(8, dtype=torch.long))
    n = len(model.layers)
    for prefix in ("recon/", "recon_g/"):
        recon = {k: v for k, v in terms.items() if k.startswith(prefix)}
        assert len(recon) == (n if sides in ("both", {"recon/": "forward", "recon_g/": "feedback"}[prefix]) else 0)
        assert list(recon) == [f"{prefix}{model.layer_names[i + 1]}" for i in range(len(recon))]
        assert_local(model, recon)


def assert_local(model, recon):
    params = dict(model.named_parameters())
    for i, (key, term) in enumerate(recon.items()):
        grads = torch.autograd.grad(term, list(params.values()), allow_unused=True, retain_graph=True)
        reached = {n for n, g in zip(params, grads) if g is not None and g.abs().sum() > 0}
        assert reached, f"{key} trains nothing"
        assert all(n.startswith(f"layers.{i}.") for n in reached), f"{key} reached {sorted(reached)}"
        assert any(".fbk." in n for n in reached) and any(".fwd." in n for n in reached), key


def test_reconstruction_term_leaves_the_feedback_norms_running_statistics_alone():
    """G's batch norms describe G's own pass: F's values go through them for this term without
    moving their running estimates (or their batch count)."""
    model, x = model_and_batch("ae_mlp")
    layer, a0 = model.layers[1], model.layers[0](x)  # G's bottom layer has no batch norm
    a1 = layer(a0)
    before = copy.deepcopy(layer.fbk.state_dict())
    loss = layer_reconstruction(layer, a0, a1, form="mse", outer=False)
    loss.backward()
    after = layer.fbk.state_dict()
    buffers = [k for k in before if "running" in k or "num_batches" in k]
    assert buffers
    for k in buffers:
        assert torch.equal(before[k], after[k]), k
    layer.feedback(a1.detach())  # control: G's own pass moves them
    assert not torch.equal(before[buffers[0]], layer.fbk.state_dict()[buffers[0]])


@pytest.mark.parametrize("name", list(AUTOENCODERS))
@pytest.mark.parametrize("sides", ["forward", "feedback", "both"])
def test_layerwise_step_equals_summed_step_with_reconstruction_terms(name, sides):
    model, x = model_and_batch(name)
    cfg = LossConfig(ae_form="weighted", ae_layer_recon=0.5, ae_layer_recon_sides=sides)
    assert_same(*summed_and_layerwise_grads(model, cfg, x, torch.zeros(8, dtype=torch.long)))


def test_reconstruction_term_is_zero_for_an_exact_inverse_and_refused_by_the_layer_pipeline(monkeypatch):
    """A layer whose V_l inverts U_l exactly scores 0; the layer pipeline refuses the term with one
    line, the F/G split (which exchanges its gradients) takes it."""
    from ccl_repr.layers import DualLinear
    layer = DualLinear(in_shape=(4,), out_features=4, act_forward=None, act_feedback=None)
    with torch.no_grad():
        layer.fwd.proj.weight.copy_(torch.linalg.qr(torch.randn(4, 4))[0])
        layer.fbk.proj.weight.copy_(layer.fwd.proj.weight.T)
    x = torch.randn(16, 4)
    assert layer_reconstruction(layer, x, layer(x), form="mse", outer=False) < 1e-10
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_config(make_config("ae_mnist", method="ccl", sets=["train.parallel=networks", "loss.ae_layer_recon=1"]))
    cfg = make_config("ae_mnist", method="ccl", sets=["train.parallel=layers", "loss.ae_layer_recon=1"])
    with pytest.raises(ConfigError, match="loss.ae_layer_recon=0"):
        check_config(cfg)
