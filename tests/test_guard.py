"""The divergence guard's finite-explosion rules (ccl_repr/guard.py): a loss far above an
uninformed model's (train.diverge_factor) or far above its own first-epoch mean
(train.diverge_growth) stops the run with status "diverged", the term named and the last good
checkpoint kept; healthy runs are not stopped. Everything runs on CPU on scikit-learn's digits."""
import json
import math
import sys

import pytest
import torch

from ccl_repr import checkpoint as ckpt
from ccl_repr.cli import main
from ccl_repr.config import make_config
from ccl_repr.errors import DivergenceError
from ccl_repr.guard import DivergenceGuard, first_epoch_means, loss_references
from ccl_repr.models import build_model

RUN = ["train", "mlp_digits", "--no-progress", "--set", "train.num_threads=1"]


@pytest.fixture(scope="module", autouse=True)
def threads():
    """train() applies train.num_threads=1 to this process: put torch's setting back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def classifier():
    cfg = make_config("mlp_digits")
    return build_model(cfg.model, input_shape=(1, 8, 8), num_classes=10)


def sums(**means_times_batches: float) -> dict[str, torch.Tensor]:
    return {k.replace("__", "/"): torch.tensor(v) for k, v in means_times_batches.items()}


# --------------------------------------------------------------------------- the rules

def test_references_are_a_uniform_guess_and_a_blank_image():
    assert loss_references("classify", 10, torch.zeros(4, 1, 8, 8)) == {"ce": pytest.approx(math.log(10))}
    x = torch.rand(500, 1, 8, 8) * 0.2 + 0.7  # bright images: a blank output is far worse than the mean image
    mean_image = ((x - x.mean(0)) ** 2).mean().item()  # the MSE of always predicting the mean image
    blank = (x ** 2).mean().item()  # ... of predicting zeros (the published zero-initialised decoder's output)
    plain = loss_references("reconstruct", None, x, ae_form="mse")
    weighted = loss_references("reconstruct", None, x, ae_form="weighted")  # the weighted AE pair loss is MSE x height
    assert blank > 10 * mean_image
    assert plain == {"mse": pytest.approx(blank), "pair/input": pytest.approx(blank), "pair/output": pytest.approx(blank)}
    assert weighted["mse"] == pytest.approx(blank) and weighted["pair/output"] == pytest.approx(8 * blank)


def test_absolute_rule_reads_the_window_since_the_last_check():
    guard = DivergenceGuard(classifier(), torch.device("cpu"), references={"ce": math.log(10)}, factor=10, growth=0)
    guard.check(step=200, epoch=1, loss_sums=sums(ce=200 * 2.0, pair__linear1=200 * 50.0), last_good="", batches=200)
    # Steps 201-400 average 30 > 10 log 10 = 23.0, while the epoch so far averages 16: the window trips.
    with pytest.raises(DivergenceError) as e:
        guard.check(step=400, epoch=1, loss_sums=sums(ce=200 * 2.0 + 200 * 30.0, pair__linear1=400 * 50.0),
                    last_good="no checkpoint", batches=400)
    msg = str(e.value)
    print(f"guard (window): {msg}", file=sys.__stdout__)
    assert "cross-entropy (ce) is 30" in msg and "above 23.03" in msg and "train.diverge_factor=10" in msg
    assert "lower optim.forward.lr" in msg and "optim.warmup_steps" in msg and "pair/linear1" not in msg
    # A new epoch starts a new window; the same values with the factor at 0 pass.
    off = DivergenceGuard(classifier(), torch.device("cpu"), references={"ce": math.log(10)}, factor=0, growth=0)
    off.check(step=400, epoch=1, loss_sums=sums(ce=400 * 30.0), last_good="", batches=400)


def test_growth_rule_compares_epoch_means_with_the_first_epoch_and_skips_non_positive_terms():
    guard = DivergenceGuard(classifier(), torch.device("cpu"), references={"ce": math.log(10)}, factor=10, growth=1e4)
    first = {"pair/linear1": 0.01, "pair/linear2": -0.5, "pair/linear3": 0.0, "ce": 0.5}
    guard.check(step=10, epoch=1, loss_sums={}, last_good="", means=first)
    assert guard.early == first
    # 1400x (healthy mlp_mnist's input pair grows that much), and non-positive references: no stop.
    guard.check(step=20, epoch=2, loss_sums={}, last_good="",
                means={"pair/linear1": 14.0, "pair/linear2": 1e9, "pair/linear3": 1e9, "ce": 0.4})
    with pytest.raises(DivergenceError) as e:
        guard.check(step=30, epoch=3, loss_sums={}, last_good="kept",
                    means={"pair/linear1": 1000.0, "pair/linear2": 1e9, "ce": 0.4})
    msg = str(e.value)
    print(f"guard (growth): {msg}", file=sys.__stdout__)
    assert "pair loss of layer linear1" in msg and "is 1000" in msg and "above 100 (train.diverge_growth=10000 x 0.01" in msg
    assert "optim.feedback.lr" in msg and msg.endswith("kept")
    # A resumed run takes its reference from the first metrics row.
    assert first_epoch_means([{"epoch": 1, "train/ce": 0.5, "val/loss": 0.3}, {"epoch": 2}]) == {"ce": 0.5}
    assert first_epoch_means([]) is None


# --------------------------------------------------------------------------- end to end

def test_finite_blow_up_in_the_first_epoch_stops_the_run(tmp_path, capsys):
    """lr 10 without clipping: the cross-entropy reaches ~1e31 in epoch 1 but stays finite."""
    run = tmp_path / "exploded"
    argv = RUN + ["--epochs", "3", "--out", str(run), "--set", "optim.forward.lr=10", "--set", "optim.forward.clip=0"]
    code, out, err = run_main(argv, capsys)
    line = err.strip()
    print(f"guard (first epoch): {line}", file=sys.__stdout__)
    assert code == 2 and out == "" and len(line.splitlines()) == 1 and "non-finite" not in line
    assert "diverged by step 21 (epoch 1)" in line and "cross-entropy (ce)" in line and "log C" in line
    status = json.loads((run / "summary.json").read_text())
    assert status["status"] == "diverged" and status["checkpoint_epoch"] is None and "ce" in status["error"]
    # The same run with the check off trains on at chance: the losses were finite.
    code, _, _ = run_main(argv + ["--overwrite", "--set", "train.diverge_factor=0"], capsys)
    done = json.loads((run / "summary.json").read_text())
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert code == 0 and done["status"] == "completed" and done["test_accuracy"] < 0.2
    assert math.isfinite(first["train/ce"]) and first["train/ce"] > 10 * math.log(10)


def test_finite_blow_up_later_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """A learning rate warming up towards 10: epoch 1 learns, the cross-entropy reaches 33 in epoch 3."""
    run = tmp_path / "late"
    code, _, err = run_main(RUN + ["--epochs", "8", "--out", str(run), "--set", "optim.forward.lr=10",
                                   "--set", "optim.warmup_steps=1000", "--set", "optim.forward.clip=0"], capsys)
    print(f"guard (later): {err.strip()}", file=sys.__stdout__)
    assert code == 2 and "(epoch 3)" in err and "cross-entropy (ce)" in err and "last good checkpoint (epoch 2" in err
    status = json.loads((run / "summary.json").read_text())
    assert status["status"] == "diverged" and status["checkpoint_epoch"] == 2
    state = ckpt.load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert state["metrics"] == [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_healthy_runs_are_not_stopped(tmp_path, capsys):
    """Batch 8: 162 steps an epoch, so the in-epoch reads (every 200 steps) run too."""
    for recipe, epochs in (("mlp_digits", 3), ("ae_digits", 2)):
        run = tmp_path / recipe
        code, _, err = run_main(["train", recipe, "--no-progress", "--epochs", str(epochs), "--out", str(run),
                                 "--set", "train.num_threads=1", "--set", "train.batch_size=8"], capsys)
        assert code == 0, err
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
