"""Shapes of both networks for every registry model, layer kinds, and the uniform interface."""
import pytest
import torch

from ccl_repr.config import ModelConfig
from ccl_repr.errors import ShapeError
from ccl_repr.layers import DualConv, DualFlatten, DualLinear, set_detach
from ccl_repr.models import DualNetwork, build_model, list_models

# (input shape, widths override) small enough for a CPU test, per registry model
SMALL = {
    "mlp_small": ((1, 8, 8), []),
    "mlp_mnist": ((1, 28, 28), []),
    "mlp_cifar": ((3, 32, 32), [64, 64, 64]),
    "cnn": ((3, 32, 32), [8, 8, 16, 16, 32]),
    "cnn_strided": ((1, 32, 32), [8, 8, 16, 16, 32]),
}
CLASSIFIERS = [n for n in list_models() if n in SMALL]


def small_model(name: str, **kw) -> DualNetwork:
    shape, widths = SMALL[name]
    return build_model(ModelConfig(name=name, widths=widths, **kw), input_shape=shape, num_classes=10)


def test_every_classifier_in_registry_has_a_small_test_config():
    from ccl_repr.registry import MODELS
    missing = [n for n in MODELS if n not in SMALL and not n.startswith("ae_")]
    assert not missing, f"add a small test config for {missing}"


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_shapes_both_networks(name):
    model = small_model(name)
    x = torch.randn(5, *model.input_shape)
    a = model.forward_intermediates(x)
    b = model.feedback_intermediates(model.feedback_input(x, torch.arange(5)))
    assert len(a) == len(b) == len(model.layers) + 1 == len(model.layer_names)
    assert a[-1].shape == (5, 10)
    assert b[-1].shape == (10, 10)  # C x C prototypes
    for l, (al, bl) in enumerate(zip(a, b)):
        assert al.shape[1:] == bl.shape[1:] == model.shapes[l]
        assert bl.shape[0] == 10
    assert model.forward_features(x).shape == (5, model.num_features)
    assert torch.allclose(model(x), a[-1])
    # per-sample one-hot targets give per-sample feedback activations
    bs = model.feedback_intermediates(model.feedback_input(x, torch.arange(5) % 10, targets="samples"))
    assert bs[0].shape == (5, *model.input_shape)


def test_conv_kinds_mirror_shapes():
    for kind, out_hw in (("strided", 4), ("pool", 4), ("up", 16), ("same", 8)):
        layer = DualConv(in_shape=(3, 8, 8), out_channels=5, kind=kind)
        y = layer(torch.randn(2, 3, 8, 8))
        assert y.shape == (2, 5, out_hw, out_hw) == (2, *layer.out_shape)
        assert layer.feedback(y).shape == (2, 3, 8, 8)


def test_flatten_layer_is_parameter_free_and_keeps_gradient_path():
    flat = DualFlatten(in_shape=(2, 3, 3))
    lin = DualLinear(in_shape=(18,), out_features=4)
    net = DualNetwork(layers=[DualConv(in_shape=(1, 6, 6), out_channels=2, kind="strided"), flat, lin],
                      input_shape=(1, 6, 6), task="classify", num_classes=4)
    assert net.pair_indices(include_output=False) == [0, 1]  # the flatten boundary repeats pair 1
    b = net.feedback_intermediates(torch.eye(4))
    b[1].sum().backward()  # reaches the linear layer's V through the flatten
    assert lin.fbk.proj.weight.grad is not None


def test_batchnorm_and_activation_placement():
    model = small_model("mlp_small", norm="post")
    first, last = model.layers[0], model.layers[-1]
    assert isinstance(last.fwd.act, torch.nn.Identity) and isinstance(last.fwd.post_norm, torch.nn.Identity)
    assert isinstance(first.fbk.act, torch.nn.Identity) and isinstance(first.fbk.post_norm, torch.nn.Identity)
    assert isinstance(first.fwd.post_norm, torch.nn.BatchNorm1d)
    # batch-norm parameters belong to a network's optimiser group (published code dropped them)
    fwd_ids = {id(p) for p in model.network_parameters("forward")}
    assert id(first.fwd.post_norm.weight) in fwd_ids


def test_orthogonal_init():
    layer = DualLinear(in_shape=(16,), out_features=8, init="orthogonal")
    w = layer.fwd.proj.weight
    assert torch.allclose(w @ w.T, torch.eye(8), atol=1e-5)


def test_shape_errors_name_the_fix():
    with pytest.raises(ShapeError, match="pad_to=32"):
        build_model(ModelConfig(name="cnn"), input_shape=(1, 28, 28), num_classes=10)
    model = small_model("mlp_small")
    with pytest.raises(ShapeError, match=r"expects inputs of shape \(1, 8, 8\)"):
        model(torch.randn(2, 1, 28, 28))


def test_detach_switch():
    model = small_model("mlp_small")
    set_detach(model, False)
    assert all(not l.detach for l in model.layers)
    model.set_detach(True)
    assert all(l.detach for l in model.layers)
