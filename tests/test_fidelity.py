"""The published training settings the paper recipes restore (docs/fidelity.md), each with the
behaviour it stands for: the flooding margin, bias-free CNNs, the published BP CNN, the conv-AE
schedules, warm-up that scales the loss before the clip, and model selection by validation loss."""
import json
import os
import signal

import pytest
import torch

from ccl_repr.config import LossConfig, ModelConfig, NetOptimConfig, OptimConfig, make_config
from ccl_repr.guard import Interrupted
from ccl_repr.losses import flooding_mask
from ccl_repr.optim import Optimizers, lr_factor
from ccl_repr.rules import CCL
from ccl_repr.models import build_model
from ccl_repr.train import _better, selection_metric, train

CIFAR = (3, 32, 32)


@pytest.fixture(scope="module", autouse=True)
def threads():
    """train() applies train.num_threads=1 to this process: put torch's setting back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# The published configs, key by key (the authors' yaml/ folder): recipe, method -> {our key: value}.
PUBLISHED = {
    ("cnn_cifar10", "ccl"): {"model.name": "cnn", "model.bias": False, "loss.flooding": 0.1,
                             "optim.warmup_steps": 100, "optim.warmup_mode": "loss", "optim.forward.clip": 0.3,
                             "train.select": "val_loss", "data.augment": True},
    ("cnn_cifar10", "bp"): {"model.name": "cnn_strided", "model.bias": True, "model.norm": "pre",
                            "model.norm_affine": False, "optim.warmup_steps": 200, "optim.warmup_mode": "loss",
                            "train.select": "val_loss"},
    ("cnn_cifar100", "ccl"): {"model.name": "cnn", "model.bias": False, "loss.flooding": 0.0,
                              "optim.forward.clip": 0.0, "optim.warmup_mode": "loss", "train.select": "val_loss"},
    ("cnn_cifar100", "bp"): {"model.name": "cnn", "model.bias": False, "model.norm": "pre",
                             "model.norm_affine": False, "optim.warmup_mode": "loss", "train.select": "val_loss"},
    **{(ae, "ccl"): {"optim.schedule": "cosine", "optim.min_lr": 1e-3, "optim.centralize": True,
                     "optim.warmup_steps": 100, "optim.warmup_mode": "loss", "optim.forward.clip": 0.2,
                     "data.augment": True, "train.epochs": 50}
       for ae in ("ae_stl10", "ae_cifar10", "ae_fashionmnist")},
    **{(ae, "bp"): {"optim.schedule": "cosine", "optim.min_lr": 1e-3, "optim.centralize": True,
                    "optim.warmup_steps": 200, "optim.warmup_mode": "loss", "optim.forward.clip": 0.2,
                    "data.augment": True, "train.epochs": 50}
       for ae in ("ae_stl10", "ae_cifar10", "ae_fashionmnist")},
}


@pytest.mark.parametrize("recipe,method", sorted(PUBLISHED))
def test_paper_recipes_hold_the_published_values(recipe, method):
    cfg = make_config(recipe, method=method)
    assert {k: _get(cfg, k) for k in PUBLISHED[recipe, method]} == PUBLISHED[recipe, method]


@pytest.mark.parametrize("method", ["ccl", "bp"])
def test_cpu_sized_conv_ae_keeps_every_published_setting_but_widths_and_epochs(method):
    """ae_cifar10_small is ae_cifar10 (the published conv-AE settings) at CPU size: only the
    widths and the number of epochs (the cosine schedule compressed to them) differ, and its
    4x4x256 code is wider than the 3,072 pixels it encodes, as the paper's conv AEs' codes are."""
    import dataclasses

    small, paper = make_config("ae_cifar10_small", method=method), make_config("ae_cifar10", method=method)
    assert small.optim == paper.optim and small.loss == paper.loss and small.data == paper.data
    assert dataclasses.replace(small.model, widths=paper.model.widths) == paper.model
    assert dataclasses.replace(small.train, epochs=paper.train.epochs) == paper.train
    model = build_model(small.model, input_shape=CIFAR, num_classes=10)
    code = model.layers[model.feature_index - 1].out_shape
    assert code == (256, 4, 4) and torch.Size(code).numel() > 3 * 32 * 32


# --------------------------------------------------------------------------- flooding

def _logits_with_true_prob(p: float, classes: int = 10) -> torch.Tensor:
    """Logits whose softmax gives class 0 probability p and the rest (1 - p) / (C - 1) each."""
    probs = torch.full((classes,), (1 - p) / (classes - 1))
    probs[0] = p
    return probs.log()


def test_paper_flooding_keeps_085_and_masks_095():
    """Published code: a sample is masked when its true-class probability exceeds 0.9 (the
    config's filter_target 0.2 only switches flooding on). The alternative margin 0.2 masks 0.85."""
    logits = torch.stack([_logits_with_true_prob(0.85), _logits_with_true_prob(0.95)])
    y = torch.zeros(2, dtype=torch.long)
    margin = make_config("cnn_cifar10", method="ccl").loss.flooding
    assert flooding_mask(logits, y, margin).tolist() == [1.0, 0.0]
    assert flooding_mask(logits, y, 0.2).tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- CNN variants

@pytest.mark.parametrize("recipe", ["cnn_cifar10", "cnn_cifar100"])
def test_published_ccl_cnn_has_no_biases(recipe):
    cfg = make_config(recipe, method="ccl")
    with torch.device("meta"):
        model = build_model(cfg.model, input_shape=CIFAR, num_classes=10)
    names = [n for n, _ in model.named_parameters()]
    assert names and not [n for n in names if n.endswith("bias")]


def test_published_bp_cnn_is_strided_with_biases_and_input_batch_norm():
    cfg = make_config("cnn_cifar10", method="bp")
    with torch.device("meta"):
        model = build_model(cfg.model, input_shape=CIFAR, num_classes=10)
    convs, output = model.layers[:-1], model.layers[-1]
    assert len(convs) == 5 and all(layer.fwd.proj.stride == (2, 2) and layer.fwd.proj.bias is not None
                                   for layer in convs)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    # F: batch norm on each conv's input (the image included), without scale and shift; none on U_L
    assert all(isinstance(layer.fwd.pre_norm, torch.nn.BatchNorm2d) and not layer.fwd.pre_norm.affine
               for layer in convs)
    assert not isinstance(output.fwd.pre_norm, torch.nn.BatchNorm1d)
    # the pooling alternative stays one --set away
    pooled = make_config("cnn_cifar10", method="bp", sets=["model.name=cnn", "model.bias=false"])
    with torch.device("meta"):
        model = build_model(pooled.model, input_shape=CIFAR, num_classes=10)
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]


# --------------------------------------------------------------------------- warm-up

def _one_step_update(optim: OptimConfig) -> dict[str, list[torch.Tensor]]:
    """Parameter change of each network after the first optimiser step (same model, same batch)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp_small"), input_shape=(1, 8, 8), num_classes=10)
    method = CCL(LossConfig())
    method.prepare(model)
    x, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 10
    opt = Optimizers(model, optim, total_steps=100)
    before = {net: [p.detach().clone() for p in model.network_parameters(net)] for net in ("forward", "feedback")}
    opt.zero_grad()
    method.backward(model, x, y)
    norms = {net: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.network_parameters(net)]))
             for net in before}
    opt.clip_and_step()
    assert optim.forward.clip == 0 or all(n * 0.1 > optim.forward.clip for n in norms.values())  # the clip binds
    return {net: [p.detach() - b for p, b in zip(model.network_parameters(net), ps)] for net, ps in before.items()}


def _optim(*, clip: float, warmup: int, mode: str) -> OptimConfig:
    net = NetOptimConfig(lr=0.5, momentum=0.0, weight_decay=0.0, clip=clip)
    return OptimConfig(forward=net, feedback=net, warmup_steps=warmup, warmup_mode=mode, centralize=True)


def _assert_scaled(update, reference, factor):
    for net in reference:
        for u, r in zip(update[net], reference[net]):
            torch.testing.assert_close(u, r * factor, rtol=1e-3, atol=1e-7)  # p_new - p_old: float32 rounding


def test_loss_warmup_scales_gradients_before_the_clip():
    """Published warm-up multiplies the loss by (step+1)/warmup before centralisation and
    clipping: with a clip that binds the first step is as large as without warm-up; with no clip
    it is (0+1)/10 of it. Learning-rate warm-up scales the step after the clip either way."""
    tight = 1e-2
    full_clipped = _one_step_update(_optim(clip=tight, warmup=0, mode="loss"))
    _assert_scaled(_one_step_update(_optim(clip=tight, warmup=10, mode="loss")), full_clipped, 1.0)
    _assert_scaled(_one_step_update(_optim(clip=tight, warmup=10, mode="lr")), full_clipped, 0.1)
    full = _one_step_update(_optim(clip=0.0, warmup=0, mode="loss"))
    _assert_scaled(_one_step_update(_optim(clip=0.0, warmup=10, mode="loss")), full, 0.1)


def test_loss_warmup_leaves_the_learning_rate_to_the_cosine():
    """In loss mode the ramp is on the gradients, (step+1)/warmup, and the cosine starts at step 0
    (the published per-epoch cosine spans every epoch); in lr mode the ramp is on the lr."""
    model = build_model(ModelConfig(name="mlp_small"), input_shape=(1, 8, 8), num_classes=10)
    for mode in ("loss", "lr"):
        cfg = OptimConfig(warmup_steps=4, warmup_mode=mode, schedule="cosine", min_lr=0.01)
        opt = Optimizers(model, cfg, total_steps=20)
        lrs, scales = [], []
        for step in range(20):
            scales.append(opt.gradient_scale(step))
            lrs.append(opt.lrs()["forward"])
            opt.zero_grad()
            opt.clip_and_step()  # no gradients: only the schedule moves
        warm = 4 if mode == "lr" else 0
        assert lrs == pytest.approx([lr_factor(s, total=20, warmup=warm, schedule="cosine", min_ratio=0.01)
                                     for s in range(20)])
        assert scales == ([0.25, 0.5, 0.75] + [1.0] * 17 if mode == "loss" else [1.0] * 20)


# --------------------------------------------------------------------------- model selection

def test_selection_by_validation_loss_or_accuracy():
    earlier = {"accuracy": 0.90, "loss": 0.30, "mse": 0.0}
    later = {"accuracy": 0.92, "loss": 0.35, "mse": 0.0}  # more accurate, less calibrated
    assert _better(selection_metric("classify", "val_accuracy"), later, earlier)
    assert not _better(selection_metric("classify", "val_loss"), later, earlier)
    assert selection_metric("reconstruct", "val_accuracy") == selection_metric("reconstruct", "val_loss") == "val_mse"
    assert not _better("val_mse", {"mse": 0.02}, {"mse": 0.01})


def _rows(run):
    skip = {"epoch_seconds", "samples_per_second"}
    return [{k: v for k, v in json.loads(line).items() if k not in skip}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _summary(run):
    skip = {"train_seconds", "samples_per_second", "versions", "peak_memory_mib"}  # machine measurements
    return {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k not in skip}


@pytest.fixture(scope="module")
def loss_warmup_cfg():
    # 41 steps per epoch: the loss ramp (100 steps) spans the interruption at step 60 below.
    return make_config("mlp_digits", overrides={
        "train": {"epochs": 3, "batch_size": 32, "progress": False, "num_threads": 1, "checkpoint_every": 0,
                  "select": "val_loss"},
        "optim": {"warmup_steps": 100, "warmup_mode": "loss", "schedule": "cosine", "min_lr": 0.01,
                  "centralize": True, "forward": {"momentum": 0.5}, "feedback": {"momentum": 0.5}}})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, loss_warmup_cfg):
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("fidelity") / "ref"
    train(loss_warmup_cfg, run, log=lambda m: None)
    return run


def test_val_loss_selection_is_recorded_and_used(reference):
    summary, rows = json.loads((reference / "summary.json").read_text()), _rows(reference)
    assert summary["selected_by"] == "val_loss"
    assert summary["best_epoch"] == min(rows, key=lambda r: r["val/loss"])["epoch"]
    assert summary["best_val_loss"] == min(r["val/loss"] for r in rows)


def test_resume_mid_loss_warmup_is_exact(tmp_path, loss_warmup_cfg, reference):
    """The loss ramp's position comes back with the checkpoint: stopped at step 60 of a 100-step
    warm-up and resumed, the run ends exactly as the uninterrupted one."""
    run = tmp_path / "stopped"

    def terminate_at_step_60(*, step, **_):
        if step == 60:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        train(loss_warmup_cfg, run, hooks=[terminate_at_step_60], log=lambda m: None)
    train(loss_warmup_cfg, run, resume=True, log=lambda m: None)
    assert _rows(run) == _rows(reference) and _summary(run) == _summary(reference)


def _capped_cfg(batches_per_epoch: int):
    return make_config("mlp_digits", overrides={
        "train": {"epochs": 3, "batch_size": 32, "progress": False, "num_threads": 1, "checkpoint_every": 0,
                  "batches_per_epoch": batches_per_epoch},
        "optim": {"schedule": "cosine", "min_lr": 0.01}})


def test_batches_per_epoch_trains_each_epochs_first_batches_and_resumes_exactly(tmp_path):
    """The published conv-AE protocol (101 batches per epoch): each epoch trains the first N batches
    of that epoch's own shuffled order (the same order a whole-epoch run draws), the cosine spans
    those steps only, and a run stopped mid-epoch resumes to the same end."""
    seen: dict[str, list] = {"capped": [], "whole": []}  # each step's batch, in order

    def record(name):
        return lambda *, x, **_: seen[name].append(x[:, :4].clone())

    capped, whole = tmp_path / "capped", tmp_path / "whole"
    train(_capped_cfg(5), capped, hooks=[record("capped")], log=lambda m: None)
    train(_capped_cfg(0), whole, hooks=[record("whole")], log=lambda m: None)
    rows, whole_rows = _rows(capped), _rows(whole)
    assert [r["step"] for r in rows] == [5, 10, 15]
    per_epoch = whole_rows[0]["step"]  # whole epochs: 41 steps
    assert per_epoch > 5
    for epoch in range(2):  # epoch e's first 5 batches are the whole run's first 5 of epoch e
        for i in range(5):
            assert torch.equal(seen["capped"][epoch * 5 + i], seen["whole"][epoch * per_epoch + i])
    assert rows[-1]["lr/forward"] == pytest.approx(0.01)  # the cosine reached its floor at step 15

    stopped = tmp_path / "stopped"

    def terminate_at_step_7(*, step, **_):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        train(_capped_cfg(5), stopped, hooks=[terminate_at_step_7], log=lambda m: None)
    train(_capped_cfg(5), stopped, resume=True, log=lambda m: None)
    assert _rows(stopped) == rows and _summary(stopped) == _summary(capped)
