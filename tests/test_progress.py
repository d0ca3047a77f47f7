"""What a run shows and records about itself: progress bar and epoch lines, training curves,
peak memory, TensorBoard event files."""

import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from ccl_repr.checkpoint import read_jsonl
from ccl_repr.cli import main
from ccl_repr.config import make_config
from ccl_repr.plots import _curve_panels
from ccl_repr.progress import POSTFIX_EVERY, HostScalar, Progress
from ccl_repr.train import train

FAST = ["--set", "train.num_threads=1", "--set", "train.batch_size=64"]
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)  train loss [\d.e+-]+  val accuracy [\d.]+  val loss [\d.e+-]+  [\d.]+ s$")


class Terminal(io.StringIO):
    """A text stream that says it is a terminal, as sys.stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def test_epoch_lines_without_a_terminal_and_silence_with_no_progress(tmp_path, capsys):
    assert main(["train", "mlp_digits", "--epochs", "2", "--out", str(tmp_path / "a"), *FAST]) == 0
    err = capsys.readouterr().err
    lines = [m.groups() for m in map(EPOCH_LINE.search, err.splitlines()) if m]
    assert lines == [("1", "2"), ("2", "2")]
    assert "\r" not in err  # no bar when stderr is not a terminal
    assert main(["train", "mlp_digits", "--epochs", "2", "--out", str(tmp_path / "b"), "--no-progress", *FAST]) == 0
    assert not EPOCH_LINE.search(capsys.readouterr().err)


def test_bar_on_a_terminal_counts_steps_and_shows_the_running_loss(tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # Progress writes to the stderr of the moment
    cfg = make_config("mlp_digits", overrides={"train": {"epochs": 2, "batch_size": 16, "num_threads": 1}})
    summary = train(cfg, tmp_path / "run", log=lambda m: None)
    text = terminal.getvalue()
    steps = 2 * -(-summary["num_train"] // 16)
    assert f"/{steps} " in text and "step" in text  # one bar over every step of the run, with rate
    assert re.search(r"<\d\d:\d\d", text)  # the ETA
    assert re.search(r"loss=[\d.]+", text)  # running loss, refreshed every POSTFIX_EVERY steps
    assert "epoch 2/2" in text and "val_accuracy=" in text
    assert len([m for m in map(EPOCH_LINE.search, text.replace("\r", "\n").splitlines()) if m]) == 2


def test_running_loss_refreshes_every_postfix_every_steps():
    terminal = Terminal()
    progress = Progress(epochs=1, steps_per_epoch=3 * POSTFIX_EVERY, desc="t", stream=terminal)
    sums = {"pair/a": torch.tensor(0.0), "ce": torch.tensor(0.0)}
    for step in range(1, 2 * POSTFIX_EVERY + 1):
        sums = {"pair/a": sums["pair/a"] + 1.0, "ce": sums["ce"] + 2.0}
        progress.step(step, sums, step)
        if step == POSTFIX_EVERY - 1:
            assert "loss" not in progress.shown  # nothing read before the first refresh
    assert progress.shown["loss"] == "3"  # the epoch's mean of the summed losses: (1 + 2) per step
    assert progress.bar.n == 2 * POSTFIX_EVERY
    progress.close()


def test_host_scalar_reads_cpu_values():
    scalar = HostScalar(torch.device("cpu"))
    assert scalar.read() is None
    scalar.push(torch.tensor(1.5))
    assert scalar.read() == 1.5


def _rss_mib() -> float:
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc")
    kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
    return kib / 1024


def test_summary_records_peak_memory_and_training_curves_for_a_classifier(tmp_path):
    cfg = make_config("mlp_digits", overrides={"train": {"epochs": 2, "num_threads": 1, "progress": False}})
    summary = train(cfg, tmp_path / "run", log=lambda m: None)
    assert summary["peak_memory_source"] == "process_max_rss"
    assert summary["peak_memory_mib"] >= _rss_mib() * 0.99  # a process peak is at least the current RSS
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["peak_memory_mib"] == summary["peak_memory_mib"]
    assert "training_curves.png" in summary["figures"]
    from matplotlib.image import imread
    assert imread(tmp_path / "run" / "training_curves.png").shape[:2] == (400, 1300)  # three panels side by side
    panels = _curve_panels(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    assert panels["quality"] == ["val/accuracy"]
    assert {"train/ce", "train/pair/input", "val/loss"} <= set(panels["loss"])
    assert panels["learning rate"] == ["lr/forward", "lr/feedback"]


def test_tensorboard_events_hold_the_metrics(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", "mlp_digits", "--epochs", "2", "--out", str(run), "--no-progress", "--tensorboard", *FAST]) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("val/accuracy")]
    rows = read_jsonl(run / "metrics.jsonl")
    assert logged == [(r["epoch"], pytest.approx(r["val/accuracy"])) for r in rows]


def test_tensorboard_missing_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    # A real failed import: None in sys.modules makes `import tensorboard` raise ImportError.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    run = tmp_path / "run"
    assert main(["train", "mlp_digits", "--epochs", "1", "--out", str(run), "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install tensorboard" in err
    assert not run.exists()  # refused before the run folder, the data or the model


def test_tensorboard_after_a_crash_and_resume_holds_each_epoch_once(tmp_path):
    """Epochs logged after the last checkpoint are redone on resume; their first events are
    purged (metrics.jsonl drops the same rows), so each epoch appears once."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config("mlp_digits", overrides={"train": {"epochs": 4, "batch_size": 64, "num_threads": 1,
                                                         "progress": False, "checkpoint_every": 2,
                                                         "tensorboard": True}})
    run = tmp_path / "run"

    def crash_in_epoch_4(*, epoch, **_):  # a crash after epoch 3 was logged, checkpoint at epoch 2
        if epoch == 4:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, run, hooks=[crash_in_epoch_4], log=lambda m: None)
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    train(cfg, run, resume=True, log=lambda m: None)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("val/accuracy")]
    assert logged == [(r["epoch"], pytest.approx(r["val/accuracy"])) for r in read_jsonl(run / "metrics.jsonl")]
