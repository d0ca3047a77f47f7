"""The layer-wise CCL step (train.layerwise) gives the summed step's gradients with memory flat
in depth; the fast-path switches (compile, autocast) keep the step's results."""
import copy
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from benchmarks.speed_common import Stepper, peak_step_memory
from ccl_repr.config import LossConfig, ModelConfig, make_config
from ccl_repr.errors import ConfigError
from ccl_repr.fastpath import apply as apply_fast_path
from ccl_repr.optim import Optimizers
from ccl_repr.rules import CCL, make_rule
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
        make_rule(cfg)


def _fast_path_step(sets: list[str], model, x, y) -> tuple[dict, dict, dict, dict]:
    """One CCL step (mlp_digits's rule and optimiser) on a copy of ``model`` under the fast-path
    settings ``sets``: what apply switched on, the losses, every gradient, every parameter's update."""
    cfg = make_config("mlp_digits", method="ccl", sets=sets)
    m = copy.deepcopy(model)
    rule = make_rule(cfg)
    rule.prepare(m)
    on = apply_fast_path(m, rule, cfg.train, torch.device("cpu"))
    optim = Optimizers(m, cfg.optim, total_steps=10)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    optim.zero_grad()
    losses = {k: v.detach().float() for k, v in rule.backward(m, x, y).items()}
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    optim.clip_and_step()
    return on, losses, grads, {n: p.detach() - before[n] for n, p in m.named_parameters()}


def _fast_path_inputs():
    torch.manual_seed(0)
    model = small_model("mlp_small")
    return model, torch.randn(16, *model.input_shape), torch.arange(16) % 10


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_step_reproduces_the_eager_step(backend):
    """train.compile with the default backend (inductor: C++ kernels on CPU) and with aot_eager
    (the compile machinery without code generation) reproduces the eager losses, every gradient
    and every parameter update. Inductor's first run here compiles C++ (about a minute on 2 busy
    cores); its cache (torch's default, under the temp folder) makes later runs take seconds."""
    if backend == "inductor" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("inductor generates C++ for the CPU and needs a C++ compiler (g++/clang++); none is on PATH")
    model, x, y = _fast_path_inputs()
    _, losses, grads, updates = _fast_path_step([], model, x, y)
    torch._dynamo.reset()  # compile afresh, so the inductor counters below are this test's
    counters.clear()
    on, c_losses, c_grads, c_updates = _fast_path_step(
        ["train.compile=true", f"train.compile_backend={backend}"], model, x, y)
    assert on["compile"] == f"{backend}/default" and on["amp"] == "off"
    assert bool(counters["inductor"]) == (backend == "inductor"), dict(counters["inductor"])
    torch.testing.assert_close(c_losses, losses)
    assert c_grads.keys() == grads.keys() and len(grads) == len(updates)
    torch.testing.assert_close(c_grads, grads)
    torch.testing.assert_close(c_updates, updates)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm().clamp_min(1e-12))


def test_bf16_autocast_gradients_and_update_stay_close_to_float32():
    """bf16 autocast (8-bit mantissa, ~0.4% per rounding) on CPU: the losses, each parameter's
    gradient and its update stay within 3% (relative norm; measured <= 0.7%) of float32, and every
    parameter float32 trains is trained (none dropped, none with another scale)."""
    model, x, y = _fast_path_inputs()
    _, losses, grads, updates = _fast_path_step([], model, x, y)
    on, b_losses, b_grads, b_updates = _fast_path_step(["train.amp=bf16"], model, x, y)
    assert on["amp"] == "bf16" and on["compile"] == "off"
    torch.testing.assert_close(b_losses, losses, rtol=0.02, atol=0.02)
    assert b_grads.keys() == grads.keys(), f"bf16 trains {sorted(b_grads)}, float32 {sorted(grads)}"
    for name in grads:
        assert b_grads[name].dtype == torch.float32, f"{name}: gradient in {b_grads[name].dtype}"
        assert _relative_error(b_grads[name], grads[name]) < 0.03, f"gradient of {name}"
        assert _relative_error(b_updates[name], updates[name]) < 0.03, f"update of {name}"


def test_compile_with_layerwise_is_refused_with_the_fix():
    cfg = make_config("mlp_digits", method="ccl", sets=["train.compile=true", "train.layerwise=true"])
    model = small_model("mlp_small")
    with pytest.raises(ConfigError, match="train.layerwise=false"):
        apply_fast_path(model, make_rule(cfg), cfg.train, torch.device("cpu"))
