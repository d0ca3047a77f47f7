"""The layer-wise CCL step (train.layerwise) gives the summed step's gradients with memory flat
in depth; the fast-path switches (compile, autocast) keep the step's results."""
import copy

import pytest
import torch

from benchmarks.speed_common import Stepper, peak_step_memory
from ccl_repr.config import LossConfig, ModelConfig, make_config
from ccl_repr.errors import ConfigError
from ccl_repr.fastpath import apply as apply_fast_path
from ccl_repr.methods import CCL, make_method
from ccl_repr.models import build_model
from tests.test_layers_models import CLASSIFIERS, small_model

AUTOENCODERS = {"ae_mlp": ((1, 8, 8), [32, 16]), "ae_conv": ((3, 16, 16), [8, 16])}


def summed_and_layerwise_grads(model, cfg: LossConfig, x, y):
    out = []
    for layerwise in (False, True):
        m = copy.deepcopy(model)
        method = CCL(cfg, layerwise=layerwise)
        method.prepare(m)
        losses = method.backward(m, x, y)
        out.append(({n: p.grad for n, p in m.named_parameters() if p.grad is not None}, losses))
    return out


def assert_same(summed, layerwise):
    (g_sum, l_sum), (g_lw, l_lw) = summed, layerwise
    assert g_sum.keys() == g_lw.keys() and g_sum, "both steps must reach the same parameters"
    for k in g_sum:
        torch.testing.assert_close(g_lw[k], g_sum[k], rtol=1e-5, atol=1e-7, msg=f"gradient of {k}")
    assert l_sum.keys() == l_lw.keys()
    for k in l_sum:
        torch.testing.assert_close(l_lw[k], l_sum[k], msg=f"loss {k}")


LOSS_FORMS = {
    "prototype": LossConfig(form="prototype", scale=128.0),
    "normalized+flooding": LossConfig(form="normalized", scale=1.0, anti_collapse=0.5, flooding=0.2),
    "samples": LossConfig(form="prototype", targets="samples", scale=128.0),
}


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("form", list(LOSS_FORMS))
def test_layerwise_gradients_equal_summed_gradients(name, form):
    torch.manual_seed(0)
    model = small_model(name)
    x, y = torch.randn(12, *model.input_shape), torch.arange(12) % 10
    assert_same(*summed_and_layerwise_grads(model, LOSS_FORMS[form], x, y))


@pytest.mark.parametrize("name", list(AUTOENCODERS))
@pytest.mark.parametrize("ae_form", ["mse", "weighted"])
def test_layerwise_gradients_equal_summed_gradients_autoencoders(name, ae_form):
    shape, widths = AUTOENCODERS[name]
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, widths=widths, norm="none"), input_shape=shape, num_classes=10)
    x = torch.randn(6, *shape)
    assert_same(*summed_and_layerwise_grads(model, LossConfig(ae_form=ae_form), x, torch.zeros(6, dtype=torch.long)))


def test_layerwise_peak_memory_is_flat_in_depth_while_backprop_grows():
    """Allocated bytes, not time: the layer-wise step's peak grows <= 1.25x from 4 to 16 hidden
    layers; the summed CCL step and backprop grow with depth."""
    def peak(method: str, depth: int, layerwise: bool = False) -> int:
        s = Stepper("mlp_mnist", method, torch.device("cpu"), batch=128, widths=[64] * depth, layerwise=layerwise)
        s.step()
        return peak_step_memory(lambda: s.step(keep_grads=True), torch.device("cpu"))

    lw = peak("ccl", 16, True) / peak("ccl", 4, True)
    summed = peak("ccl", 16) / peak("ccl", 4)
    bp = peak("bp", 16) / peak("bp", 4)
    assert lw <= 1.25, f"layer-wise CCL peak grew {lw:.2f}x from depth 4 to 16"
    assert summed > 2.0 and bp > 2.0, (summed, bp)


def test_layerwise_is_refused_for_backprop_with_the_fix():
    cfg = make_config("mlp_digits", method="bp", sets=["train.layerwise=true"])
    with pytest.raises(ConfigError, match="ccl: section"):
        make_method(cfg)


def test_compile_and_bf16_autocast_paths_run_the_same_step():
    """train.compile (aot_eager: the compile machinery without a C++ toolchain) reproduces the
    eager losses and gradients; bf16 autocast on CPU stays close to float32."""
    torch.manual_seed(0)
    model = small_model("mlp_small")
    x, y = torch.randn(16, *model.input_shape), torch.arange(16) % 10
    results = {}
    for variant, sets in {"eager": [], "compiled": ["train.compile=true", "train.compile_backend=aot_eager"],
                          "bf16": ["train.amp=bf16"]}.items():
        cfg = make_config("mlp_digits", method="ccl", sets=sets)
        m = copy.deepcopy(model)
        method = make_method(cfg)
        method.prepare(m)
        on = apply_fast_path(m, method, cfg.train, torch.device("cpu"))
        assert on["compile"] == ("aot_eager/default" if variant == "compiled" else "off")
        assert on["amp"] == ("bf16" if variant == "bf16" else "off")
        losses = method.backward(m, x, y)
        results[variant] = (sum(losses.values()), m.layers[0].fwd.proj.weight.grad)
    torch.testing.assert_close(results["compiled"][0], results["eager"][0])
    torch.testing.assert_close(results["compiled"][1], results["eager"][1])
    torch.testing.assert_close(results["bf16"][0], results["eager"][0], rtol=0.05, atol=0.05)


def test_compile_with_layerwise_is_refused_with_the_fix():
    cfg = make_config("mlp_digits", method="ccl", sets=["train.compile=true", "train.layerwise=true"])
    model = small_model("mlp_small")
    with pytest.raises(ConfigError, match="train.layerwise=false"):
        apply_fast_path(model, make_method(cfg), cfg.train, torch.device("cpu"))
