"""Diagnostics read each learning rule's own update: update-vs-backprop angles, weight alignment,
the training hook and `ccl-repr eval` on runs of every registered classification rule."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ccl_repr import checkpoint as ckpt
from ccl_repr.cli import main
from ccl_repr.config import LossConfig, ModelConfig
from ccl_repr.models import build_model
from ccl_repr.registry import RULES
from ccl_repr.rules import CCL, Backprop, summed_backward
from evals.alignment import DiagnosticsHook, update_angles, weight_alignment
from evals.evaluate import run_rule
from evals.features import open_run


class FlipFirstLayer(Backprop):
    """A real rule whose update is not its losses' gradient: backprop with layer linear1's
    gradient negated inside backward(), and -U_l as its feedback weights."""
    name = "flip_first"

    def backward(self, model, x, y):
        losses = summed_backward(self, model, x, y)
        for p in dict(model.parameter_groups("forward"))["linear1"]:
            p.grad.neg_()
        return losses

    def feedback_weights(self, model):
        return {model.layer_names[i + 1]: -layer.projections()[0].weight.detach()
                for i, layer in enumerate(model.layers) if layer.has_params}


def small(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(name="mlp_small", **kw), input_shape=(1, 8, 8), num_classes=10)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 1, 8, 8, generator=g), torch.arange(32) % 10


def _direct_angles(model, x, y, losses_of) -> dict[str, float]:
    """Angles between autograd's gradient of ``losses_of(model)`` (detaches on) and backprop's,
    computed here from scratch on a copy of the model."""
    m = copy.deepcopy(model)
    groups = m.parameter_groups("forward")
    params = [p for _, ps in groups for p in ps]
    m.set_detach(True)
    g_rule = torch.autograd.grad(sum(losses_of(m).values()), params, allow_unused=True)
    m.set_detach(False)
    g_bp = torch.autograd.grad(F.cross_entropy(m(x), y), params)
    out, k = {}, 0
    for name, ps in groups:
        a = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                       for p, g in zip(ps, g_rule[k:k + len(ps)])])
        b = torch.cat([g.flatten().double() for g in g_bp[k:k + len(ps)]])
        out[name] = math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm()))))))
        k += len(ps)
    return out


def test_bp_angles_are_zero():
    model, (x, y) = small(), batch()
    angles = update_angles(model, x, y, rule=Backprop(LossConfig()))
    assert set(angles) == {"linear1", "linear2", "output"}
    assert all(a == pytest.approx(0.0, abs=1e-3) for a in angles.values())


def test_ccl_angles_match_direct_computation_and_restore_model():
    model, (x, y) = small(norm="post").train(), batch()
    ccl = CCL(LossConfig())
    ccl.prepare(model)
    expected = _direct_angles(model, x, y, lambda m: ccl.losses(m, x, y))
    marker = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), marker):
        p.grad = g.clone()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    angles = update_angles(model, x, y, rule=ccl)
    assert expected["linear1"] > 10  # CCL's hidden updates are not backprop's at init
    assert angles == pytest.approx(expected, abs=1e-3)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), marker))  # training's .grad kept
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers()) and model.training
    assert all(layer.detach for layer in model.layers if layer.has_params)


def test_angle_reads_the_rules_backward_not_its_losses():
    model, (x, y) = small(), batch()
    rule = FlipFirstLayer(LossConfig())
    rule.prepare(model)
    from_losses = _direct_angles(model, x, y, lambda m: rule.losses(m, x, y))
    assert from_losses["linear1"] == pytest.approx(0.0, abs=1e-2)  # its losses' gradient is backprop's
    angles = update_angles(model, x, y, rule=rule)
    assert angles["linear1"] == pytest.approx(180.0, abs=1e-3)
    assert angles["linear2"] == pytest.approx(0.0, abs=1e-3) and angles["output"] == pytest.approx(0.0, abs=1e-3)
    assert not any(layer.detach for layer in model.layers)  # prepare's flags (bp: off) restored


def test_rule_is_required_keyword():
    model, (x, y) = small(), batch()
    with pytest.raises(TypeError):
        update_angles(model, x, y)
    with pytest.raises(TypeError):
        update_angles(model, x, y, CCL(LossConfig()))
    with pytest.raises(TypeError):
        weight_alignment(model)


def test_weight_alignment_uses_the_rules_feedback_weights():
    model = small()
    assert weight_alignment(model, rule=Backprop(LossConfig())) is None  # BP: no feedback weight
    assert weight_alignment(model, rule=FlipFirstLayer(LossConfig())) == pytest.approx(
        {"linear1": -1.0, "linear2": -1.0, "output": -1.0})
    ccl = weight_alignment(model, rule=CCL(LossConfig()))
    layers = [(model.layer_names[i + 1], *layer.projections()) for i, layer in enumerate(model.layers)
              if layer.has_params]
    assert set(ccl) == {name for name, _, _ in layers}
    for name, u, v in layers:
        cos = F.cosine_similarity(u.weight.detach().flatten().double(), v.weight.detach().T.flatten().double(), dim=0)
        assert ccl[name] == pytest.approx(float(cos))


@pytest.mark.parametrize("name", ["dfa", "drtp"])
def test_direct_feedback_rules_have_no_weight_alignment(name):
    if name not in RULES:
        pytest.skip(f"rule {name} not registered")
    model = small()
    rule = RULES.get(name)(LossConfig())
    rule.prepare(model)
    assert weight_alignment(model, rule=rule) is None


def test_hook_passes_the_training_rule():
    model, (x, y) = small(), batch()
    rule = FlipFirstLayer(LossConfig())
    rule.prepare(model)
    record = DiagnosticsHook(every=1, cka=False)(step=1, epoch=1, model=model, x=x, y=y, method=rule)
    assert record["angle/linear1"] == pytest.approx(180.0, abs=1e-3) and record["align/output"] == pytest.approx(-1)
    record = DiagnosticsHook(every=1, cka=False)(step=1, epoch=1, model=model, x=x, y=y, method=Backprop(LossConfig()))
    assert not any(k.startswith("align/") for k in record) and record["angle/linear1"] == pytest.approx(0.0, abs=1e-3)


CLASSIFY_RULES = [n for n in RULES if "classify" in RULES.get(n).tasks]


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-home"))


@pytest.mark.parametrize("method", CLASSIFY_RULES)
def test_eval_cli_names_the_runs_rule(method, tmp_path):
    run, out = tmp_path / "run", tmp_path / "eval"
    assert main(["train", "mlp_digits", "--method", method, "--epochs", "1", "--out", str(run), "--no-progress",
                 "--overwrite", "--set", "train.num_threads=1"]) == 0
    assert main(["eval", str(run), "--out", str(out), "--protocols", "align", "--no-progress"]) == 0
    al = json.loads((out / "eval.json").read_text())["alignment"]
    assert al["rule"] == method and set(al["update_angle_degrees"]) == {"linear1", "linear2", "output"}
    assert al["update_angle_degrees"]["output"] == pytest.approx(0.0, abs=1e-3)
    if method == "bp":
        assert all(a == pytest.approx(0.0, abs=1e-3) for a in al["update_angle_degrees"].values())
    else:
        assert al["update_angle_degrees"]["linear1"] > 1  # a rule of its own, not backprop
    has_state = bool(ckpt.load_checkpoint(run / ckpt.MODEL)["rule"])
    assert al["rule_state"] == ("loaded from model.pt" if has_state else "none (the rule keeps no state)")
    if method == "ccl":
        assert set(al["weight_alignment"]) == {"linear1", "linear2", "output"}
    if method in ("bp", "dfa", "drtp"):
        assert al["weight_alignment"] is None and "not applicable" in al["protocol"]["feedback_weight"]
    assert f"angle({method} update, backprop)" in (out / "report.md").read_text()


def test_eval_loads_the_saved_rule_state(tmp_path):
    if "fa" not in RULES:
        pytest.skip("rule fa not registered")
    run = tmp_path / "run"
    assert main(["train", "mlp_digits", "--method", "fa", "--epochs", "1", "--out", str(run), "--no-progress",
                 "--overwrite", "--set", "train.num_threads=1"]) == 0
    payload = ckpt.load_checkpoint(run / ckpt.MODEL)
    payload["rule"] = {k: -v for k, v in payload["rule"].items()}  # not what the seed draws
    payload.pop("format", None)
    ckpt.save_checkpoint(run / ckpt.MODEL, payload)
    rule, source = run_rule(open_run(run), open_run(run).model)
    assert source == "loaded from model.pt"
    assert all(torch.equal(v, payload["rule"][k]) for k, v in rule.state_dict().items())
