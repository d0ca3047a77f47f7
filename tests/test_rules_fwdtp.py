"""Fixed-weight difference target propagation: the targets the docstring states, the difference
correction (no step at the output, no step anywhere; first order: g's Jacobian times the output
step), locality, seeded fixed feedback, refusal of conv models and autoencoders, and learning on
the digits. CPU, seconds."""
import pytest
import torch
import torch.nn.functional as F

from ccl_repr.cli import main
from ccl_repr.config import LossConfig, ModelConfig, RuleConfig, make_config
from ccl_repr.models import build_model
from ccl_repr.rules.fwdtp import FWDTP
from ccl_repr.train import train

C = 5
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_mlp(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="mlp_small", widths=[16, 12], act_forward="tanh"), input_shape=(20,),
                       num_classes=C).double()


def batch(n: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def params(model, network: str) -> list[torch.nn.Parameter]:
    return [p for _, ps in model.parameter_groups(network) for p in ps]


def prepared(model, *, step: float = 0.04, seed: int = 0) -> FWDTP:
    rule = FWDTP(LossConfig(), rule=RuleConfig(target_step=step), seed=seed)
    rule.prepare(model)
    return rule


def test_targets_are_the_difference_corrected_feedback_of_the_output_step():
    model, (x, y) = tiny_mlp(), batch()
    rule = prepared(model)
    a = [v.detach() for v in model.forward_intermediates(x)]
    B = {k.split("/")[1]: v for k, v in rule.state_dict().items()}
    assert set(B) == {"linear2", "output"}  # linear1's input is the data: nothing to send there
    assert B["output"].shape == model.layers[-1].fwd.proj.weight.shape
    t = rule.targets(a, y)
    e = a[-1].softmax(1) - F.one_hot(y, C).double()
    torch.testing.assert_close(t[3], a[3] - 0.04 * e)
    for l, name in ((2, "output"), (1, "linear2")):  # layer l: a_l -> a_{l+1}
        torch.testing.assert_close(t[l], a[l] + torch.tanh(t[l + 1] @ B[name]) - torch.tanh(a[l + 1] @ B[name]))
    assert sorted(t) == [1, 2, 3]


def test_no_output_step_no_update_and_first_order_is_g_jacobian():
    """beta = 0: every target equals its value (the difference correction), so no layer moves.
    Small beta: t_{L-1} - a_{L-1} = -beta J_g(a_L) e to first order, whatever U_L is."""
    model, (x, y) = tiny_mlp(), batch()
    rule = prepared(model, step=0.0)
    model.zero_grad(set_to_none=True)
    rule.backward(model, x, y)
    assert all(p.grad is None or not p.grad.any() for p in params(model, "forward"))
    beta = 1e-5
    rule = prepared(model, step=beta)
    a = [v.detach() for v in model.forward_intermediates(x)]
    e = a[-1].softmax(1) - F.one_hot(y, C).double()
    _, jvp = torch.autograd.functional.jvp(lambda h: rule.feedback("output", h), (a[3],), (-beta * e,))
    torch.testing.assert_close(rule.targets(a, y)[2] - a[2], jvp, rtol=1e-4, atol=1e-12)


def test_each_layer_regresses_its_own_target_locally():
    """Layer l's gradient is that of sum((a_l - t_l)^2)/N through layer l alone (its input detached)."""
    model, (x, y) = tiny_mlp(), batch()
    rule = prepared(model, step=0.5)
    model.zero_grad(set_to_none=True)
    losses = rule.backward(model, x, y)
    assert set(losses) == {"target/linear1", "target/linear2", "target/output", "ce"}
    a = [v.detach() for v in model.forward_intermediates(x)]
    t = rule.targets(a, y)
    for i in (0, 1, 2):  # layer i: a_i -> a_{i+1}
        w = model.layers[i].fwd.proj.weight
        out = model.layers[i](a[i])
        expect, = torch.autograd.grad((out - t[i + 1]).square().sum(1).mean(), w)
        torch.testing.assert_close(w.grad, expect)
    assert all(p.grad is None for p in params(model, "feedback"))  # G is unused


def test_feedback_is_seeded_fixed_and_left_out_of_the_global_rng():
    model = tiny_mlp()
    torch.manual_seed(3)
    before = torch.rand(1)
    torch.manual_seed(3)
    r0, r1, r2 = prepared(model, seed=0), prepared(model, seed=0), prepared(model, seed=1)
    assert torch.equal(torch.rand(1), before)
    assert all(torch.equal(r0.state_dict()[k], r1.state_dict()[k]) for k in r0.state_dict())
    assert not torch.equal(r0.state_dict()["B/output"], r2.state_dict()["B/output"])


@pytest.mark.parametrize("recipe, sets, problem", [("mlp_digits", ["model.name=cnn", "model.widths=[4,4]"],
                                                   "built for MLPs"), ("ae_digits", [], "trains classify")])
def test_refuses_conv_models_and_autoencoders_with_one_line(tmp_path, capsys, recipe, sets, problem):
    code = main(["train", recipe, "--method", "fwdtp", "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress",
                 *[a for s in ["data.train_subset=64", *sets] for a in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and problem in err[0], err


def test_learns_the_digits(tmp_path):
    cfg = make_config("mlp_digits", method="fwdtp", overrides={"train": {"epochs": 3, "progress": False}})
    summary = train(cfg, tmp_path / "run", log=lambda m: None)
    assert summary["test_accuracy"] > 0.85, summary["test_accuracy"]
