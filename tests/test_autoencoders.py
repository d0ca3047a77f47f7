"""Autoencoders: shapes of both networks, bottleneck interface, published init,
size errors, gradient locality, overfitting a small batch with CCL and backprop, and the demo."""
import copy
import json

import pytest
import torch

from ccl_repr.cli import main
from ccl_repr.config import ModelConfig, make_config
from ccl_repr.data import pad_to
from ccl_repr.errors import ShapeError
from ccl_repr.builder import build_trainable
from ccl_repr.rules import make_rule
from ccl_repr.models import build_model, list_models

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread is fastest


AE = dict(act_forward="relu", act_feedback="relu", bias=True, norm="post", init="orthogonal")
# (model, per-sample input shape, encoder widths, original size padded by data.pad_to)
CASES = [
    ("ae_conv", (1, 8, 8), [4, 8, 16], None),
    ("ae_conv", (1, 32, 32), [4, 8, 8, 16], 28),
    ("ae_conv", (3, 32, 32), [4, 8, 8, 16], None),
    ("ae_mlp", (1, 8, 8), [32, 8], None),
    ("ae_mlp", (1, 28, 28), [64, 32, 16], None),
    ("ae_mlp", (3, 32, 32), [64, 16], None),
]


def ae(name: str, shape: tuple, widths: list[int], **kw):
    return build_model(ModelConfig(name=name, widths=widths, **{**AE, **kw}), input_shape=shape, num_classes=10)


def test_autoencoders_are_registered():
    assert {"ae_conv", "ae_mlp"} <= set(list_models())


@pytest.mark.parametrize("name,shape,widths,padded_from", CASES)
def test_shapes_in_both_networks(name, shape, widths, padded_from):
    model = ae(name, shape, widths)
    x = torch.rand(3, *shape)
    if padded_from:  # 28x28 images reach the model through data.pad_to
        x = pad_to(torch.rand(3, shape[0], padded_from, padded_from), shape[1])
    a = model.forward_intermediates(x)
    b = model.feedback_intermediates(model.feedback_input(x))
    assert model.task == "reconstruct" and len(a) == len(b) == len(model.layer_names) == len(model.layers) + 1
    for l, (al, bl) in enumerate(zip(a, b)):
        assert al.shape == bl.shape == (3, *model.shapes[l])
    assert a[-1].shape == x.shape and b[-1] is x and b[0].shape == x.shape
    # every boundary is a pair, the reconstruction (output) pair included
    assert model.pair_indices(include_output=True) == list(range(len(model.layers) + 1))
    # the bottleneck: forward features of F, and the middle of G through the same interface
    k = model.feature_index
    assert k == len(widths) and model.layer_names[k] != "output"
    assert model.shapes[k][0] == widths[-1] and model.num_features == min(model.feature_dims[1:])
    assert torch.allclose(model.forward_features(x), a[k].flatten(1))
    middle = model.intermediates(x, network="feedback")[k]
    assert middle.flatten(1).shape == (3, model.num_features)


def test_paper_widths_by_default():
    model = build_model(ModelConfig(name="ae_conv"), input_shape=(3, 32, 32), num_classes=10)
    assert [s[0] for s in model.shapes] == [3, 128, 256, 1024, 2048, 1024, 256, 128, 3]
    assert model.shapes[model.feature_index] == (2048, 2, 2)


def test_sizes_that_do_not_fit_name_sizes_that_do():
    with pytest.raises(ShapeError, match=r"divisible by 16.*data.pad_to=32.*at most 2 encoder widths"):
        ae("ae_conv", (1, 28, 28), [4, 8, 8, 16])
    with pytest.raises(ShapeError, match="image inputs"):
        ae("ae_mlp", (64,), [8])
    ae("ae_conv", (1, 28, 28), [4, 8])  # 28 = 4 * 7: two stride-2 layers fit


@pytest.mark.parametrize("init,norm", [("orthogonal", "post"), ("orthogonal_bn", "post"), ("orthogonal_bn", "none")])
def test_published_init_and_batch_norm_placement(init, norm):
    model = ae("ae_conv", (1, 16, 16), [4, 8, 16], norm=norm, init=init)
    n_enc, layers = model.feature_index, model.layers
    u_out, v_bottom = layers[-1].projections()[0], layers[0].projections()[1]
    assert u_out.weight.abs().max() == 0 and v_bottom.weight.abs().max() == 0  # outermost: zero
    # decoder forward and encoder feedback weights x0.001 (orthogonal_bn: unless a batch norm follows)
    scaled = [layer.fwd.proj for layer in layers[n_enc:-1]] + [layer.fbk.proj for layer in layers[1:n_enc]]
    keep = init == "orthogonal_bn" and norm != "none"
    for proj in scaled:
        assert proj.weight.abs().max() > 0.05 if keep else 0 < proj.weight.abs().max() < 0.01
    assert layers[0].fwd.proj.weight.abs().max() > 0.05  # the rest: orthogonal, unscaled
    assert all(float(layer.fwd.proj.bias.detach().abs().max()) == 0 for layer in layers)
    if norm == "none":
        return
    assert isinstance(layers[-1].fwd.post_norm, torch.nn.Identity)  # no norm on x̂ ...
    assert isinstance(layers[0].fbk.post_norm, torch.nn.Identity)  # ... nor on b_0
    assert isinstance(layers[n_enc - 1].fwd.post_norm, torch.nn.BatchNorm2d)


@pytest.mark.parametrize("init", ["orthogonal", "orthogonal_bn"])
def test_no_batch_norm_starts_below_its_eps(init):
    """The 0.001 scale behind a batch norm puts the pre-norm variance below the norm's eps: the
    norm stops normalising and its layer's gradient takes over the network's grad-norm clip.
    With orthogonal_bn (the ae_mnist recipe) every batch norm sees a variance well above eps."""
    cfg = make_config("ae_mnist", method="ccl", sets=[f"model.init={init}"])
    model = build_model(cfg.model, input_shape=(1, 28, 28), num_classes=10).train()
    seen = []

    def hook(module, inputs, _):
        seen.append(inputs[0].var(0).mean().item() / module.eps)

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.register_forward_hook(hook)
    x = torch.rand(64, 1, 28, 28)
    model.feedback_intermediates(model.feedback_input(x))
    model.forward_intermediates(x)
    assert len(seen) == 6
    assert min(seen) > 100 if init == "orthogonal_bn" else min(seen) < 0.1, seen  # orthogonal: two layers below eps


def test_ae_anti_collapse_penalises_agreement_on_a_collapsed_code():
    """Two codes that agree perfectly but have collapsed onto one direction: the plain pair
    loss is 0 (nothing stops the collapse); the anti-collapse term is not, and is ~0 for codes
    spread over the batch. Only inner pairs get it."""
    from ccl_repr.losses import ae_pair_loss
    torch.manual_seed(0)
    direction = torch.rand(1, 256)
    collapsed = torch.rand(32, 1) * direction
    spread = torch.randn(32, 256)
    assert ae_pair_loss(collapsed, collapsed, form="weighted", inner=True) == 0
    on_collapsed = ae_pair_loss(collapsed, collapsed, form="weighted", inner=True, anti_collapse=1.0)
    on_spread = ae_pair_loss(spread, spread, form="weighted", inner=True, anti_collapse=1.0)
    assert on_collapsed > 0.5 and on_spread < 0.05 and on_collapsed > 20 * on_spread
    assert ae_pair_loss(collapsed, collapsed, form="weighted", inner=False, anti_collapse=1.0) == 0
    a, b = collapsed.clone().requires_grad_(), spread.clone().requires_grad_()
    ae_pair_loss(a, b.detach(), form="mse", inner=True, anti_collapse=1.0).backward()
    assert a.grad.abs().sum() > 0


def _grads(model, method, x):
    model.zero_grad(set_to_none=True)
    sum(method.losses(model, x, None).values()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,shape,widths", [("ae_conv", (1, 16, 16), [4, 8, 16]), ("ae_mlp", (1, 8, 8), [16, 8])])
def test_ccl_gradient_locality(name, shape, widths):
    """The paper's method: U_l's CCL gradient depends on a_{l-1} and b_l only, not on forward weights above."""
    torch.manual_seed(0)
    cfg = make_config("ae_digits", method="ccl")
    model, x = ae(name, shape, widths), torch.rand(8, *shape)
    ccl = make_rule(cfg)
    ccl.prepare(model)
    before = _grads(model, ccl, x)
    for l in range(len(model.layers) - 1):
        changed = copy.deepcopy(model)
        with torch.no_grad():
            for layer in changed.layers[l + 1:]:
                for p in layer.forward_parameters():
                    p.add_(torch.randn_like(p))
        key = f"layers.{l}.fwd.proj.weight"
        assert torch.allclose(before[key], _grads(changed, ccl, x)[key], atol=1e-6), f"{key} saw upper layers"
    bp = make_rule(make_config("ae_digits", method="bp"))
    bp.prepare(model)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.layers[-1].fwd.proj.weight.add_(1.0)
    assert not torch.allclose(_grads(model, bp, x)["layers.0.fwd.proj.weight"],
                              _grads(changed, bp, x)["layers.0.fwd.proj.weight"])  # control: BP is global


@pytest.mark.parametrize("method", ["ccl", "bp"])
def test_each_method_overfits_a_small_batch(method, digits):
    """The recipe's own model and optimiser reconstruct 64 training digits far better than their
    mean image does (a rule that learns only the biases, i.e. the mean, or none at all fails; the
    untrained output is all zeros, so "half the starting MSE" would not tell these apart), and the
    code generalises: held-out digits are reconstructed better than by that mean image too."""
    batch, held_out = digits
    torch.manual_seed(0)
    cfg = make_config("ae_digits", method=method)
    model, rule, optim = build_trainable(cfg, input_shape=(1, 8, 8), num_classes=10, total_steps=150)

    def mse(x: torch.Tensor, reconstruction: torch.Tensor | None = None) -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(x) if reconstruction is None else reconstruction, x).item()

    for _ in range(150):
        optim.step(sum(rule.losses(model, batch, None).values()))
    mean_image = batch.mean(0, keepdim=True)
    fit, baseline = mse(batch), mse(batch, mean_image.expand_as(batch))  # CCL ~0.1x, BP ~0.05x baseline
    assert fit < 0.2 * baseline, f"{method}: batch MSE {fit:.4f} vs {baseline:.4f} for its mean image"
    held, held_baseline = mse(held_out), mse(held_out, mean_image.expand_as(held_out))  # CCL ~0.6x, BP ~0.4x
    assert held < 0.8 * held_baseline, f"{method}: held-out MSE {held:.4f} vs {held_baseline:.4f} for the mean image"


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """64 training digits to fit and 256 others to check the fit on."""
    from ccl_repr.config import DataConfig
    from ccl_repr.data import load_data
    x = load_data(DataConfig(name="digits", normalize=False)).train.x
    return x[:64], x[64:320]


def test_demo_end_to_end(tmp_path, capsys):
    """The demo trains CCL and backprop on the same architecture, probes a code no wider than the
    input next to PCA of its width and raw pixels (through evals), and maps the CCL code."""
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    demo = json.loads((out / "demo.json").read_text())
    rows = {r["representation"]: r for r in demo["rows"]}
    assert list(rows) == ["CCL code, F", "CCL code, G", "BP code, F", "PCA of pixels", "raw pixels"]
    pixels = rows["raw pixels"]["dim"]
    assert pixels == 64 and all(r["dim"] == rows["CCL code, F"]["dim"] <= pixels for r in demo["rows"])
    for name, r in rows.items():
        assert 0.1 < r["linear_probe"] <= 1 and 0.1 < r["knn"] <= 1, r  # above chance (10 classes)
        assert f"{r['linear_probe']:.1%}" in printed and name in printed  # the printed table
    for method in ("ccl", "bp"):
        summary = json.loads((out / method / "summary.json").read_text())
        assert summary["method"] == method and summary["test_mse"] == rows[f"{method.upper()} code, F"]["test_mse"] < 1
        assert {"reconstructions.png", "training_curves.png"} <= set(summary["figures"])
        for name in summary["figures"]:
            assert (out / method / name).stat().st_size > 1000
    png = out / "umap_ccl_code.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    umap = json.loads(png.with_suffix(".json").read_text())
    assert umap["num_points"] == umap["num_feedback_points"] == 360 and umap["feedback_kind"] == "samples"
    assert umap["class_names"] == [str(d) for d in range(10)]  # the legend's class names
