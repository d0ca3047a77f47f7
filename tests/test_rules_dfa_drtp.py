"""Direct feedback alignment and direct random target projection: the exact signal each layer
receives, independence of DRTP's hidden updates from the output error, conv models, seeded
feedback matrices, exact resume, refusal on autoencoders, and G left untouched. CPU, seconds."""
import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from ccl_repr import checkpoint as ckpt
from ccl_repr.cli import main
from ccl_repr.config import LossConfig, ModelConfig, OptimConfig, RuleConfig, make_config
from ccl_repr.guard import Interrupted
from ccl_repr.models import build_model
from ccl_repr.optim import Optimizers
from ccl_repr.rules import make_rule
from ccl_repr.rules.dfa import DFA
from ccl_repr.rules.drtp import DRTP
from ccl_repr.train import train

C = 5


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread is fastest


def tiny_mlp(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="mlp_small", widths=[16, 12]), input_shape=(20,), num_classes=C).double()


def batch(n: int = 7, shape=(20,), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def prepared(cls, model, seed: int = 0):
    rule = cls(LossConfig(), rule=RuleConfig(), seed=seed)
    rule.prepare(model)
    return rule


def grads_with_activations(rule, model, x, y):
    """Run the rule's backward; return each layer output's gradient and each forward weight's gradient."""
    model.zero_grad(set_to_none=True)
    acts = {}

    def keep(i):
        def hook(_, __, out):
            out.retain_grad()
            acts[i + 1] = out
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(model.layers)]
    rule.backward(model, x, y)
    for h in handles:
        h.remove()
    weights = {name: layer.fwd.proj.weight.grad.clone() for name, layer in zip(model.layer_names[1:], model.layers)
               if hasattr(layer, "fwd")}
    return acts, weights


def output_error(model, x, y):
    with torch.no_grad():
        logits = model(x)
    return (logits.softmax(1) - F.one_hot(y, C).double()) / len(y)


# --------------------------------------------------------------------------- the signals

def test_dfa_hidden_layers_receive_e_times_B_and_the_weight_update_is_the_papers():
    model = tiny_mlp()
    rule = prepared(DFA, model)
    x, y = batch()
    acts, grads = grads_with_activations(rule, model, x, y)
    e = output_error(model, x, y)
    assert set(rule.B) == {"linear1", "linear2"}
    for l, name in ((1, "linear1"), (2, "linear2")):
        assert rule.B[name].shape == (C, model.feature_dims[l])
        torch.testing.assert_close(acts[l].grad, e @ rule.B[name], rtol=0, atol=1e-15)
    # Manual DFA update (Nøkland 2016): dW_l = ((e B_l) ⊙ f'(z_l))^T a_{l-1}, ELU'(z) = 1 if z > 0 else exp(z).
    a_prev = x
    for l, layer in enumerate(model.layers[:-1], start=1):
        w = layer.fwd.proj.weight
        z = a_prev @ w.T
        delta = (e @ rule.B[model.layer_names[l]]) * torch.where(z > 0, torch.ones_like(z), z.exp())
        torch.testing.assert_close(grads[model.layer_names[l]], delta.T @ a_prev, rtol=1e-12, atol=1e-15)
        a_prev = F.elu(z).detach()
    torch.testing.assert_close(grads["output"], e.T @ a_prev, rtol=1e-12, atol=1e-15)  # U_L: its own error


def test_drtp_hidden_gradients_ignore_the_output_error_while_dfas_follow_it():
    x, y = batch()
    hidden = ("linear1", "linear2")
    runs = {}
    for cls in (DFA, DRTP):
        model = tiny_mlp()
        rule = prepared(cls, model)
        acts, before = grads_with_activations(rule, model, x, y)
        if cls is DRTP:
            for l, name in ((1, "linear1"), (2, "linear2")):
                torch.testing.assert_close(acts[l].grad, -F.one_hot(y, C).double() @ rule.B[name] / len(y),
                                           rtol=0, atol=1e-15)
            # The output layer learns from its own error: the CE gradient, as backprop gives it.
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            torch.testing.assert_close(before["output"], model.layers[-1].fwd.proj.weight.grad, rtol=1e-12, atol=0)
        with torch.no_grad():  # a different output layer: different logits, different error
            model.layers[-1].fwd.proj.weight.mul_(-3.0).add_(0.5)
        _, after = grads_with_activations(rule, model, x, y)
        assert not torch.equal(before["output"], after["output"])
        runs[cls] = [torch.equal(before[k], after[k]) for k in hidden]
    assert runs[DRTP] == [True, True] and runs[DFA] == [False, False]


@pytest.mark.parametrize("cls", [DFA, DRTP])
def test_conv_classifier_gets_a_signal_per_conv_layer(cls):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn", widths=[4, 4]), input_shape=(3, 8, 8), num_classes=C).double()
    rule = prepared(cls, model)
    x, y = batch(6, (3, 8, 8))
    acts, grads = grads_with_activations(rule, model, x, y)
    assert {k: tuple(v.shape) for k, v in rule.B.items()} == {"conv1": (C, 4 * 4 * 4), "conv2": (C, 4 * 2 * 2)}
    s = output_error(model, x, y) if cls is DFA else -F.one_hot(y, C).double() / len(y)
    for l, name in ((1, "conv1"), (2, "conv2")):
        assert acts[l].dim() == 4
        torch.testing.assert_close(acts[l].grad.flatten(1), s @ rule.B[name], rtol=0, atol=1e-15)
    assert set(grads) == {"conv1", "conv2", "output"}
    assert all(g.abs().sum() > 0 and torch.isfinite(g).all() for g in grads.values())


def test_feedback_matrices_are_seeded_and_leave_the_global_rng_alone():
    model = tiny_mlp()
    state = torch.get_rng_state()
    a, b, other = prepared(DFA, model, seed=3), prepared(DRTP, model, seed=3), prepared(DFA, model, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a.B[k], b.B[k]) and not torch.equal(a.B[k], other.B[k]) for k in a.B)
    assert all(v.dtype == torch.float64 for v in a.B.values())
    std = RuleConfig(proj_mean=0.05, proj_std=0.01)
    wide = DFA(LossConfig(), rule=std, seed=3)
    wide.prepare(build_model(ModelConfig(name="mlp_small", widths=[400]), input_shape=(20,), num_classes=C))
    assert abs(wide.B["linear1"].mean().item() - 0.05) < 0.002 and abs(wide.B["linear1"].std().item() - 0.01) < 0.001
    assert abs(a.B["linear1"].std().item() - C ** -0.5) < 0.1  # std 0: 1/sqrt(fan-in of the projection)
    assert set(a.state_dict()) == {"B/linear1", "B/linear2"}


def test_only_the_forward_network_is_stepped():
    model = tiny_mlp().float()
    rule = prepared(DFA, model)
    optim = Optimizers(model, OptimConfig(), total_steps=1, networks=rule.trains)
    fwd = [p.detach().clone() for p in model.network_parameters("forward")]
    fbk = [p.detach().clone() for p in model.network_parameters("feedback")]
    x, y = batch()
    optim.zero_grad()
    rule.backward(model, x.float(), y)
    optim.clip_and_step()
    assert all(p.grad is None for p in model.network_parameters("feedback"))
    assert all(torch.equal(p, q) for p, q in zip(model.network_parameters("feedback"), fbk))
    assert all(not torch.equal(p, q) for p, q in zip(model.network_parameters("forward"), fwd))


# --------------------------------------------------------------------------- end to end

def _rows(run):
    skip = {"epoch_seconds", "samples_per_second"}
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in skip} for line in lines]


def _summary(run):
    skip = {"train_seconds", "samples_per_second", "versions", "peak_memory_mib", "epoch_seconds"}
    return {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k not in skip}


# The fixed matrices each rule keeps on mlp_digits: DFA/DRTP's per hidden layer, FW-DTP's per layer
# that carries a target down (linear1's input is the data).
SAVED = {"dfa": {"B/linear1", "B/linear2"}, "drtp": {"B/linear1", "B/linear2"}, "fwdtp": {"B/linear2", "B/output"}}


@pytest.mark.parametrize("method", sorted(SAVED))
def test_resume_mid_epoch_is_exact(tmp_path, method):
    """Stopped by SIGTERM mid-epoch 2 and resumed: the run ends exactly as the uninterrupted one,
    and both checkpoints hold the rule's feedback matrices."""
    cfg = make_config("mlp_digits", method=method, overrides={
        "train": {"epochs": 2, "batch_size": 64, "progress": False, "num_threads": 1, "checkpoint_every": 0}})
    train(cfg, tmp_path / "ref", log=lambda m: None)
    run = tmp_path / "stopped"

    def terminate_at_step_30(*, step, **_):
        if step == 30:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        train(cfg, run, hooks=[terminate_at_step_30], log=lambda m: None)
    assert ckpt.load_checkpoint(run / "checkpoint.pt")["partial"] is not None  # it did stop mid-epoch
    train(cfg, run, resume=True, log=lambda m: None)
    assert _rows(run) == _rows(tmp_path / "ref") and _summary(run) == _summary(tmp_path / "ref")
    saved = ckpt.load_checkpoint(run / "model.pt")["rule"]
    rule = make_rule(cfg)
    rule.prepare(build_model(cfg.model, input_shape=(64,), num_classes=10))
    assert set(saved) == SAVED[method]
    assert all(torch.equal(saved[k], v) for k, v in rule.state_dict().items())


def test_autoencoder_recipe_is_refused_in_one_line(tmp_path, capsys):
    code = main(["train", "ae_digits", "--method", "dfa", "--epochs", "1", "--no-progress",
                 "--out", str(tmp_path / "ae")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "method dfa trains classify models, not a reconstruct model" in err
