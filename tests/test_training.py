"""Training end to end: CCL and backprop overfit one batch, the schedules, and the CLI run folder."""
import json

import pytest
import torch

from ccl_repr.cli import main
from ccl_repr.config import LossConfig, ModelConfig, OptimConfig, NetOptimConfig
from ccl_repr.data import load_data
from ccl_repr.config import DataConfig
from ccl_repr.optim import Optimizers, lr_factor
from ccl_repr.rules import CCL, Backprop
from ccl_repr.models import build_model


@pytest.mark.parametrize("method_cls,loss", [(CCL, LossConfig()), (CCL, LossConfig(form="normalized", scale=1.0)),
                                             (CCL, LossConfig(targets="samples")), (Backprop, LossConfig())])
def test_overfit_one_batch(method_cls, loss):
    torch.manual_seed(0)
    data = load_data(DataConfig(name="digits"), seed=0)
    x, y = data.train.x[:64], data.train.y[:64]
    model = build_model(ModelConfig(name="mlp_small"), input_shape=(1, 8, 8), num_classes=10)
    method = method_cls(loss)
    method.prepare(model)
    opt = Optimizers(model, OptimConfig(forward=NetOptimConfig(lr=0.5), feedback=NetOptimConfig(lr=0.5)),
                     total_steps=300)
    for _ in range(300):
        opt.step(sum(method.losses(model, x, y).values()))
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.98, acc


def test_cnn_overfits_with_flooding_and_centralisation():
    torch.manual_seed(0)
    data = load_data(DataConfig(name="digits"), seed=0)
    x, y = data.train.x[:32], data.train.y[:32]
    model = build_model(ModelConfig(name="cnn", widths=[16, 32], bias=True), input_shape=(1, 8, 8), num_classes=10)
    method = CCL(LossConfig(form="normalized", scale=1.0, flooding=0.2))
    method.prepare(model)
    opt = Optimizers(model, OptimConfig(forward=NetOptimConfig(lr=0.5, momentum=0.8, clip=0.3),
                                        feedback=NetOptimConfig(lr=0.5, momentum=0.8, clip=0.3, clip_mode="layer"),
                                        centralize=True, warmup_steps=10), total_steps=150)
    for _ in range(150):
        opt.step(sum(method.losses(model, x, y).values()))
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean().item() >= 0.9


def test_lr_schedule_shape():
    f = [lr_factor(s, total=100, warmup=10, schedule="cosine", min_ratio=0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.01, abs=1e-3) and all(a >= b for a, b in zip(f[9:], f[10:]))
    assert lr_factor(50, total=100, warmup=0, schedule="constant", min_ratio=0.0) == 1.0


def test_optimizer_update_equals_the_sgd_formula():
    """Optimizers (fused SGD where available) applies, per network, clip by global norm then
    v <- mu v + (g + wd p), p <- p - lr v: checked against the formula over three steps."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp_small"), input_shape=(1, 8, 8), num_classes=10)
    cfg = OptimConfig(forward=NetOptimConfig(lr=0.3, momentum=0.9, weight_decay=1e-3, clip=0.5),
                      feedback=NetOptimConfig(lr=0.1, momentum=0.5, weight_decay=0.0, clip=0.0))
    opt = Optimizers(model, cfg, total_steps=10)
    method = CCL(LossConfig())
    method.prepare(model)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    params = {net: model.network_parameters(net) for net in ("forward", "feedback")}
    ref = {net: [p.detach().clone() for p in ps] for net, ps in params.items()}
    bufs = {net: [torch.zeros_like(p) for p in ps] for net, ps in params.items()}
    for _ in range(3):
        opt.zero_grad()
        method.backward(model, x, y)
        for net, ncfg in (("forward", cfg.forward), ("feedback", cfg.feedback)):
            grads = [p.grad.clone() for p in params[net]]
            if ncfg.clip > 0:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                grads = [g * min(1.0, ncfg.clip / (norm.item() + 1e-6)) for g in grads]
            for r, b, g in zip(ref[net], bufs[net], grads):
                b.mul_(ncfg.momentum).add_(g + ncfg.weight_decay * r)
                r.sub_(ncfg.lr * b)
        opt.clip_and_step()
        for net in params:  # the reference continues from the optimiser's params (same inputs)
            for r, p in zip(ref[net], params[net]):
                torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
                r.copy_(p.detach())


def test_fixed_feedback_network_with_zero_lr_still_learns():
    """The paper's analyses: asymmetric learning rates; lr_B = 0 keeps G at its random init."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp_small"), input_shape=(1, 8, 8), num_classes=10)
    before = [p.clone() for p in model.network_parameters("feedback")]
    data = load_data(DataConfig(name="digits"), seed=0)
    method = CCL(LossConfig())
    method.prepare(model)
    opt = Optimizers(model, OptimConfig(forward=NetOptimConfig(lr=0.5), feedback=NetOptimConfig(lr=0.0)),
                     total_steps=100)
    for _ in range(100):
        opt.step(sum(method.losses(model, data.train.x[:64], data.train.y[:64]).values()))
    assert all(torch.equal(a, b) for a, b in zip(before, model.network_parameters("feedback")))
    assert (model(data.train.x[:64]).argmax(1) == data.train.y[:64]).float().mean() > 0.8


@pytest.mark.parametrize("method", ["ccl", "bp"])
def test_cli_train_digits_writes_run_folder(tmp_path, capsys, method):
    out = tmp_path / "run"
    assert main(["train", "mlp_digits", "--method", method, "--epochs", "3", "--seed", "1", "--out", str(out),
                 "--no-progress", "--set", "optim.forward.lr=0.3"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "model", "dataset", "epochs", "seed", "test_accuracy", "best_val_accuracy",
                "best_epoch", "train_seconds", "samples_per_second"):
        assert key in summary
    assert summary["method"] == method and summary["seed"] == 1 and summary["epochs"] == 3
    assert 0.5 < summary["test_accuracy"] <= 1.0 and printed["test_accuracy"] == summary["test_accuracy"]
    config = json.loads((out / "config.json").read_text())
    assert config["optim"]["forward"]["lr"] == 0.3 and config["method"] == method
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]
    assert (out / "checkpoint.pt").exists() and (out / "model.pt").exists() and (out / "versions.json").exists()


def test_cli_train_mnist_subset_from_shared(tmp_path, mnist_root, capsys):
    out = tmp_path / "mnist"
    assert main(["train", "mlp_mnist", "--epochs", "2", "--data-root", str(mnist_root), "--out", str(out),
                 "--no-progress", "--set", "data.train_subset=3000", "--set", "data.test_subset=1000"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "mnist" and summary["num_test"] == 1000
    assert summary["test_accuracy"] > 0.3  # 2 short epochs: well above chance (0.1), not a target


def test_cli_refuses_to_overwrite_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["train", "mlp_digits", "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "precious"


def test_test_each_epoch_logs_the_test_curve_without_touching_selection(tmp_path, capsys):
    """The test rows are that epoch's weights on the test split (at the selected epoch they equal the
    summary's test accuracy), and logging them changes nothing else: same validation curve, same
    selected epoch."""
    args = ["train", "mlp_digits", "--epochs", "3", "--seed", "2", "--no-progress", "--set", "optim.forward.lr=0.3"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "curve"), "--set", "train.test_each_epoch=true"]) == 0
    plain, curve = ([json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                    for name in ("plain", "curve"))
    assert all("test/accuracy" not in r for r in plain) and all("test/accuracy" in r and "test/loss" in r for r in curve)
    assert [r["val/accuracy"] for r in plain] == [r["val/accuracy"] for r in curve]
    s_plain, s_curve = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("plain", "curve"))
    assert s_plain["best_epoch"] == s_curve["best_epoch"] and s_plain["test_accuracy"] == s_curve["test_accuracy"]
    assert curve[s_curve["best_epoch"] - 1]["test/accuracy"] == s_curve["test_accuracy"]
