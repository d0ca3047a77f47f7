"""Feedback alignment: the hidden layers' gradients are those of the error sent down through the
fixed random B_l (checked against a layer-by-layer computation), the output layer's are BP's,
B is seeded on its own stream and restored on resume, and the rule refuses autoencoders."""
import pytest
import torch
import torch.nn.functional as F

from ccl_repr import checkpoint as ckpt
from ccl_repr.cli import main
from ccl_repr.config import LossConfig, ModelConfig, RuleConfig, make_config
from ccl_repr.errors import ConfigError
from ccl_repr.layers import DualConv
from ccl_repr.models import build_model
from ccl_repr.rules import FeedbackAlignment, make_rule
from ccl_repr.train import train


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread is fastest


def tiny(name: str, widths: list[int], input_shape: tuple[int, ...], **kw):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, widths=widths, **kw), input_shape=input_shape, num_classes=10)
    return model.double()


def weights(model) -> dict[str, torch.Tensor]:
    """U_l of every parametrised layer, by layer name."""
    return {model.layer_names[i + 1]: layer.fwd.proj.weight for i, layer in enumerate(model.layers) if layer.has_params}


def local_grad(fn, inp: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d fn / d inp applied to grad_out, for a parameter-free stage (activation, pool, reshape, norm)."""
    inp = inp.detach().requires_grad_()
    out = fn(inp)
    return torch.autograd.grad(out, inp, grad_out.reshape(out.shape))[0]


def manual_fa(model, B: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """U_l's FA gradients, top-down by hand: e = dCE/dlogits; at each layer, delta_l = the error at
    its output through the stages after U_l (true local derivatives), dU_l = delta_l^T (input),
    and the error below = delta_l B_l (linear) or the transposed convolution with B_l (conv)."""
    names, saved, a = list(weights(model)), [], x
    with torch.no_grad():
        for layer in model.layers:
            side, flat = layer.fwd, a.flatten(1) if not isinstance(layer, DualConv) else a
            before = lambda t, s=side: s.pre_norm(s.before(t))
            inp = before(flat)
            z = side.proj(inp)
            saved.append((layer, a, flat, inp, z))
            a = side.after(side.act(side.post_norm(z)))
    g = (a.softmax(1) - F.one_hot(y, 10).double()) / len(y)  # dCE/dlogits, mean over the batch
    grads = {}
    for (layer, a_in, flat, inp, z), name in zip(reversed(saved), reversed(names)):
        side, b = layer.fwd, B[name]
        delta = local_grad(lambda t, s=side: s.after(s.act(s.post_norm(t))), z, g)
        if isinstance(layer, DualConv):
            p = side.proj
            grads[name] = torch.nn.grad.conv2d_weight(inp, p.weight.shape, delta, stride=p.stride, padding=p.padding)
            down = torch.nn.grad.conv2d_input(inp.shape, b, delta, stride=p.stride, padding=p.padding)
        else:
            grads[name] = delta.T @ inp
            down = delta @ b
        g = local_grad(lambda t, s=side: s.pre_norm(s.before(t)), flat, down).reshape(a_in.shape)
    return grads


def fa_bp_manual(model, x, y, seed: int = 0):
    rule = FeedbackAlignment(LossConfig(), seed=seed)
    rule.prepare(model)
    W = weights(model)
    rule.backward(model, x, y)
    fa = {k: w.grad.clone() for k, w in W.items()}
    from_losses = dict(zip(W, torch.autograd.grad(sum(rule.losses(model, x, y).values()), list(W.values()))))
    # The same model backpropagated outside the rule: the true gradient (the hooks are gone).
    bp = dict(zip(W, torch.autograd.grad(F.cross_entropy(model(x), y), list(W.values()))))
    return rule, fa, from_losses, bp, manual_fa(model, rule.B, x, y)


def check_fa_gradients(model, x, y):
    rule, fa, from_losses, bp, manual = fa_bp_manual(model, x, y)
    assert set(fa) == set(manual) == set(rule.B)
    for name in fa:
        assert rule.B[name].shape == fa[name].shape
        torch.testing.assert_close(fa[name], manual[name], rtol=0, atol=1e-10)
        torch.testing.assert_close(from_losses[name], fa[name], rtol=0, atol=1e-12)  # losses() carries FA's update
    torch.testing.assert_close(fa["output"], bp["output"], rtol=0, atol=1e-12)  # its own error: BP's
    for name in fa:
        if name != "output":
            assert (fa[name] - bp[name]).abs().max() > 1e-3, f"{name}: FA's gradient equals BP's"
    assert all(p.grad is None for p in model.network_parameters("feedback"))  # G takes no part


@pytest.mark.parametrize("norm", ["none", "pre", "post"])
def test_mlp_hidden_gradients_follow_the_random_feedback(norm):
    model = tiny("mlp_small", [16, 12], (64,), norm=norm)
    x, y = torch.randn(6, 64, dtype=torch.float64), torch.arange(6) % 10
    check_fa_gradients(model, x, y)


def test_cnn_hidden_gradients_follow_the_transposed_convolution_with_b():
    model = tiny("cnn", [4, 4], (1, 8, 8))
    assert [l.out_shape for l in model.layers] == [(4, 4, 4), (4, 2, 2), (10,)]
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.arange(5)
    check_fa_gradients(model, x, y)
    strided = tiny("cnn_strided", [3, 5], (2, 8, 8))  # stride 2 in U_l: conv2d_input must use it
    check_fa_gradients(strided, torch.randn(4, 2, 8, 8, dtype=torch.float64), torch.arange(4))


def b_of(seed: int, rule: RuleConfig | None = None, model_seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(model_seed)
    model = build_model(ModelConfig(name="mlp_small", widths=[256, 12]), input_shape=(64,), num_classes=10)
    fa = FeedbackAlignment(LossConfig(), rule=rule, seed=seed)
    state = torch.get_rng_state()
    fa.prepare(model)
    assert torch.equal(torch.get_rng_state(), state), "prepare() moved the global RNG"
    assert {k: v.shape for k, v in fa.state_dict().items()} == {f"B/{k}": w.shape for k, w in weights(model).items()}
    return fa.B


def test_b_is_seeded_on_its_own_stream_and_scaled_by_fan_in():
    b0 = b_of(0)
    assert all(torch.equal(b0[k], v) for k, v in b_of(0, model_seed=5).items())  # the run seed alone
    assert all(not torch.equal(b0[k], v) for k, v in b_of(1).items())
    assert b0["linear1"].std().item() == pytest.approx(64 ** -0.5, rel=0.05)  # 1/sqrt(fan-in), 16384 draws
    shifted = b_of(0, RuleConfig(proj_mean=0.05, proj_std=0.3))["linear1"]
    assert (shifted.mean().item(), shifted.std().item()) == (pytest.approx(0.05, abs=0.01), pytest.approx(0.3, rel=0.05))
    # Not the weight init's stream: B is no draw of a generator seeded with the run seed itself.
    same = torch.randn(b0["linear1"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert not torch.allclose(b0["linear1"] * 8, same.to(b0["linear1"].dtype))


def test_load_state_dict_restores_b_in_place():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp_small", widths=[16, 12]), input_shape=(64,), num_classes=10)
    src, dst = FeedbackAlignment(LossConfig(), seed=0), FeedbackAlignment(LossConfig(), seed=1)
    src.prepare(model)
    dst.prepare(model)
    live = dst.B["linear1"]
    dst.load_state_dict(src.state_dict())
    assert dst.B["linear1"] is live and all(torch.equal(dst.B[k], v) for k, v in src.B.items())


def fa_digits(epochs: int):
    return make_config("mlp_digits", method="fa", overrides={
        "data": {"train_subset": 256, "test_subset": 100},
        "train": {"epochs": epochs, "batch_size": 32, "progress": False, "num_threads": 1}})


def test_resume_is_exact_and_g_never_moves(tmp_path):
    cfg = fa_digits(2)
    assert make_rule(cfg).trains == ("forward",)
    g0 = {}

    def record_g(*, step, model, **_):  # after the first optimiser step
        if step == 1:
            g0.update({k: v.clone() for k, v in model.state_dict().items() if ".fbk." in k})

    train(cfg, tmp_path / "ref", hooks=[record_g], log=lambda m: None)
    run = tmp_path / "resumed"

    def crash_in_epoch_2(*, epoch, **_):  # after epoch 1's checkpoint
        if epoch == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, run, hooks=[crash_in_epoch_2], log=lambda m: None)
    assert ckpt.load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    train(cfg, run, resume=True, log=lambda m: None)
    for name in ("checkpoint.pt", "model.pt"):
        ref, got = ckpt.load_checkpoint(tmp_path / "ref" / name), ckpt.load_checkpoint(run / name)
        assert set(ref["rule"]) == {"B/linear1", "B/linear2", "B/output"}
        for part in ("model", "rule"):
            assert ref[part].keys() == got[part].keys()
            assert all(torch.equal(ref[part][k], got[part][k]) for k in ref[part]), f"{name} {part} differs"
    last = ckpt.load_checkpoint(run / "checkpoint.pt")["model"]
    assert g0 and all(torch.equal(last[k], v) for k, v in g0.items())  # G: not stepped by the optimiser


def test_fa_refuses_autoencoders_and_layerwise(tmp_path, capsys):
    code = main(["train", "ae_digits", "--method", "fa", "--epochs", "1", "--no-progress",
                 "--set", "train.num_threads=1", "--out", str(tmp_path / "ae")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "method fa" in err and "reconstruct" in err
    with pytest.raises(ConfigError, match="train.layerwise"):
        make_rule(make_config("mlp_digits", method="fa", sets=["train.layerwise=true"]))
