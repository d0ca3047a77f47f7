"""Reliability end to end: bad inputs end as one line and exit 2 without touching run folders;
a run killed with SIGKILL and resumed ends bit-for-bit like the uninterrupted one; Ctrl-C writes
a checkpoint and an "interrupted" summary; corrupt or tampered checkpoints are refused with a
clear error; divergence stops the run, names the layer and step, and keeps the last good
checkpoint. Everything runs on CPU on scikit-learn's bundled digits."""
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from ccl_repr import checkpoint as ckpt
from ccl_repr.cli import main
from ccl_repr.data import check_labels
from ccl_repr.config import make_config
from ccl_repr.errors import CheckpointError, DataError
from ccl_repr.guard import Interrupted
from ccl_repr.train import train

REPO = Path(__file__).resolve().parent.parent
# 162 steps per epoch at batch 8: slow enough (~0.4 s an epoch) to kill a run between epochs.
RUN = ["train", "mlp_digits", "--epochs", "6", "--no-progress", "--set", "train.num_threads=1",
       "--set", "train.batch_size=8"]
# Measured, not computed: these differ between any two runs of the same config.
TIMING = {"epoch_seconds", "samples_per_second", "train_seconds", "versions", "peak_memory_mib"}


# --------------------------------------------------------------------------- helpers

def tree(root: Path) -> dict[str, str]:
    """Every path under root with the sha256 of its bytes ('dir' for folders)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path) -> dict:
    return {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k not in TIMING}


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def spawn(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ccl_repr.cli", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epochs(run: Path, n: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll metrics.jsonl until n epochs are logged and a checkpoint exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if (run / "checkpoint.pt").exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError(f"{run} did not reach epoch {n} in {timeout} s")


class Evil:
    """Unpickling this runs a shell command: what a tampered checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def flip_tensor_byte(path: Path) -> None:
    """Flip one byte inside the first tensor's storage (the zip member stays readable)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 3] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def threads():
    """One thread for the in-process runs: on a shared 2-core machine, two spinning BLAS threads
    make these tiny runs tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, threads) -> Path:
    """The uninterrupted run every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main([*RUN, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory, threads) -> Path:
    """A workspace of run folders in every state the bad inputs below point at."""
    ws = tmp_path_factory.mktemp("ws")
    done = ws / "done"
    assert main(["train", "mlp_digits", "--epochs", "2", "--no-progress", "--set", "train.num_threads=1",
                 "--out", str(done)]) == 0
    for name in ("resumable", "trunc", "rand", "evil", "flip", "edited", "invalid", "nockpt"):
        shutil.copytree(done, ws / name)
        (ws / name / "summary.json").unlink()  # as if killed before the end
    ck = "checkpoint.pt"
    data = (done / ck).read_bytes()
    (ws / "trunc" / ck).write_bytes(data[: len(data) // 2])
    (ws / "rand" / ck).write_bytes(os.urandom(4096))
    torch.save({"format": ckpt.FORMAT, "model": Evil(ws / "pwned")}, ws / "evil" / ck)
    flip_tensor_byte(ws / "flip" / ck)
    config = json.loads((ws / "edited" / "config.json").read_text())
    config["optim"]["forward"]["lr"] = 0.1
    (ws / "edited" / "config.json").write_text(json.dumps(config))
    config["optim"]["forward"]["lr"] = -1
    (ws / "invalid" / "config.json").write_text(json.dumps(config))
    (ws / "nockpt" / ck).unlink()
    (ws / "afile").write_text("not a folder")
    (ws / "notrun").mkdir()
    (ws / "notrun" / "notes.txt").write_text("precious")
    (ws / "bad.yaml").write_text("train: {epochs: 2, learning_rate: 0.1}\n")
    mixed = ws / "mixed"
    from PIL import Image
    for cls, size in (("a", 8), ("b", 12)):
        (mixed / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (size, size), (i * 40, 0, 0)).save(mixed / cls / f"{i}.png")
    return ws


# --------------------------------------------------------------------------- bad inputs

NO_CUDA = not torch.cuda.is_available()
BAD_INPUTS = [
    # (id, argv with {ws}/{new} placeholders, text the one-line message must contain)
    ("unknown-recipe", "train no_such_recipe --out {new}", "give a YAML path or one of: "),
    ("unknown-key", "train mlp_digits --set optim.forward.lrr=0.1 --out {new}", "did you mean optim.forward.lr?"),
    ("recipe-unknown-key", "train {ws}/bad.yaml --out {new}", "valid keys under train: epochs"),
    ("negative-lr", "train mlp_digits --set optim.forward.lr=-1 --out {new}", "must be >= 0.0"),
    ("zero-epochs", "train mlp_digits --epochs 0 --out {new}", "train.epochs: 0 is out of range; it must be >= 1"),
    ("epochs-not-int", "train mlp_digits --epochs three --out {new}", "invalid int value: 'three'"),
    ("wrong-type", "train mlp_digits --set train.batch_size=abc --out {new}", "write e.g. train.batch_size=256"),
    ("nan-lr", "train mlp_digits --set optim.feedback.lr=nan --out {new}", "expected a finite number"),
    ("val-fraction-range", "train mlp_digits --set data.val_fraction=1.5 --out {new}", "must be <= 0.9"),
    ("bad-choice", "train mlp_digits --set model.norm=batch --out {new}", "not one of none, pre, post"),
    ("zero-width", "train mlp_digits --set model.widths=[128,0] --out {new}", "must be >= 1"),
    ("seed-too-large", "train mlp_digits --seed 4294967296 --out {new}", "must be <= 4294967294"),
    ("set-without-value", "train mlp_digits --set optim.forward.lr --out {new}", "expected KEY=VALUE"),
    ("bad-method", "train mlp_digits --method sgd --out {new}", "invalid choice: 'sgd'"),
    ("unknown-flag", "train mlp_digits --lr 0.1 --out {new}", "unrecognized arguments: --lr"),
    ("no-command", "", "the following arguments are required: command"),
    ("no-recipe", "train --out {new}", "train needs a RECIPE"),
    ("unknown-model", "train mlp_digits --set model.name=resnet50 --out {new}", "choose one of"),
    ("unknown-dataset", "train mlp_digits --set data.name=imagenet --out {new}", "choose one of digits, mnist"),
    ("missing-dataset", "train mlp_digits --set data.name=mnist --data-root {ws}/nowhere --out {new}",
     "pass --data-root DIR"),
    ("missing-imagefolder", "train mlp_digits --set data.name=imagefolder --data-root {ws}/nowhere --out {new}",
     "set --data-root to that folder"),
    ("mixed-image-sizes", "train mlp_digits --set data.name=imagefolder --data-root {ws}/mixed --out {new}",
     "set data.image_size=N"),
    ("image-too-small-for-cnn", "train mlp_digits --set model.name=cnn --out {new}", "set data.pad_to=32"),
    ("pad-smaller-than-image", "train mlp_digits --set data.pad_to=4 --out {new}", "use 0 or >= 8"),
    ("too-few-samples", "train mlp_digits --set data.train_subset=1 --set data.val_fraction=0.9 --out {new}",
     "lower data.val_fraction"),
    ("out-exists", "train mlp_digits --out {ws}/done", "or --overwrite to replace it"),
    ("out-is-file", "train mlp_digits --out {ws}/afile", "is a file; choose a folder path"),
    ("overwrite-non-run-folder", "train mlp_digits --out {ws}/notrun --overwrite", "has no config.json"),
    ("resume-missing", "train --resume {ws}/nowhere", "no such run folder"),
    ("resume-with-flags", "train --resume {ws}/resumable --epochs 9 --set seed=3",
     "cannot take --epochs, --set; drop them"),
    ("resume-completed", "train --resume {ws}/done", "already completed"),
    ("resume-no-checkpoint", "train --resume {ws}/nockpt", "--overwrite"),
    ("resume-truncated", "train --resume {ws}/trunc", "truncated"),
    ("resume-random-bytes", "train --resume {ws}/rand", "not a checkpoint archive"),
    ("resume-tampered-pickle", "train --resume {ws}/evil", "refused without running it"),
    ("resume-flipped-byte", "train --resume {ws}/flip", "fails its CRC check"),
    ("resume-config-mismatch", "train --resume {ws}/edited", "optim.forward.lr: 0.5 in the checkpoint, 0.1 now"),
    ("resume-config-invalid", "train --resume {ws}/invalid", "restore the run's original config.json"),
] + ([("cuda-unavailable", "train mlp_digits --device cuda --out {new}", "use --device auto or cpu")]
     if NO_CUDA else [])


@pytest.mark.parametrize("case,argv,expected", BAD_INPUTS, ids=[c for c, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ws, case, argv, expected, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    before = tree(ws)
    code, out, err = run_main(argv.format(ws=ws, new=ws / "new").split(), capsys)
    lines = err.strip().splitlines()
    print(f"{case}: {err.strip()}", file=sys.__stdout__)  # the report quotes these
    assert code == 2 and out == ""
    assert len(lines) == 1 and "Traceback" not in err and "error:" in lines[0], err
    assert expected in lines[0]
    assert tree(ws) == before  # no run folder created, changed or removed; no pwned marker


def test_bad_inputs_through_the_installed_entry_point(ws, tmp_path):
    """The same contract from a real process (argparse error and a config error)."""
    cases = [(["train", "mlp_digits", "--epochs", "x"], "invalid int value"),
             (["train", "mlp_digits", "--set", "optim.forward.lr=-1", "--out", "new"], "must be >= 0")]
    procs = [(spawn(argv, tmp_path), expected) for argv, expected in cases]  # both at once: startup dominates
    for proc, expected in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- checkpoints

def test_checkpoint_holds_everything_to_resume(ws):
    state = ckpt.load_checkpoint(ws / "done" / "checkpoint.pt")
    assert set(ckpt.RESUME_KEYS) <= set(state)
    assert any(".fwd." in k for k in state["model"]) and any(".fbk." in k for k in state["model"])
    assert set(state["optim"]) == {"forward", "feedback"} and all("sched" in v for v in state["optim"].values())
    assert {"shuffle", "torch", "python", "numpy"} <= set(state["rng"])
    assert state["epoch"] == 2 and state["config"] == json.loads((ws / "done" / "config.json").read_text())
    assert state["metrics"] == [json.loads(l) for l in (ws / "done" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("damage", ["empty", "truncated-1", "truncated-half", "random", "tampered", "flipped",
                                    "foreign"])
def test_damaged_checkpoints_raise_checkpoint_error(ws, tmp_path, damage):
    src = ws / "done" / "model.pt"
    path = tmp_path / "model.pt"
    data = src.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage.startswith("truncated"):
        path.write_bytes(data[:-1] if damage == "truncated-1" else data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "tampered":
        torch.save({"format": ckpt.FORMAT, "model": Evil(tmp_path / "pwned")}, path)
    elif damage == "flipped":
        path.write_bytes(data)
        flip_tensor_byte(path)
    else:  # a valid torch file that ccl-repr did not write
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(path)
    assert "\n" not in str(e.value) and ("restore it" in str(e.value) or "retrain" in str(e.value))
    assert not (tmp_path / "pwned").exists()


def test_load_run_reports_damage_as_checkpoint_error(ws, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ws / "done", run)
    (run / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):  # load_run prefers model.safetensors ...
        ckpt.load_run(run)
    (run / "model.safetensors").unlink()
    (run / "model.pt").write_bytes((run / "model.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):  # ... and reads model.pt without it
        ckpt.load_run(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ckpt.load_run(run)


def test_atomic_write_survives_sigkill(tmp_path):
    """Kill a writer mid-stream: the file is always one complete version, never a mix."""
    target, size = tmp_path / "f.bin", 8 << 20
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from ccl_repr.checkpoint import atomic_write_bytes\n"
            f"i = 0\nwhile True:\n    atomic_write_bytes({str(target)!r}, bytes([i % 251]) * {size}); i += 1\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not target.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = target.read_bytes()
    assert len(data) == size and data == data[:1] * size


def test_label_ranges_are_checked():
    check_labels("toy", 3, train=torch.tensor([0, 1, 2]))
    with pytest.raises(DataError, match=r"range over \[0, 3\], outside 0..2"):
        check_labels("toy", 3, train=torch.tensor([0, 3]))
    with pytest.raises(DataError, match="1-D integer"):
        check_labels("toy", 3, test=torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def signalled(tmp_path_factory) -> tuple[dict[str, Path], dict[str, tuple[int, str, str]]]:
    """Two CLI processes started together into two folders (their start-up dominates the time):
    one killed with SIGKILL after its second epoch, one sent SIGINT shortly after its second."""
    root = tmp_path_factory.mktemp("signalled")
    runs = {name: root / name for name in ("killed", "interrupted")}
    procs = {name: spawn([*RUN, "--out", str(run)], root) for name, run in runs.items()}
    for name, sig, pause in (("killed", signal.SIGKILL, 0.0), ("interrupted", signal.SIGINT, 0.1)):
        wait_for_epochs(runs[name], 2, procs[name])
        time.sleep(pause)  # SIGINT most likely lands mid-epoch: exercises the mid-epoch checkpoint
        procs[name].send_signal(sig)
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[name] = (proc.returncode, out, err, rows(runs[name]))
    return runs, results


def test_sigkill_then_resume_matches_uninterrupted_run(reference, signalled, capsys):
    runs, results = signalled
    run = runs["killed"]
    assert results["killed"][0] == -signal.SIGKILL and not (run / "summary.json").exists()
    killed_at = len(rows(run))
    code, out, err = run_main(["train", "--resume", str(run)], capsys)  # the CLI, in this process
    assert code == 0, err
    assert f"resuming {run} from epoch" in err
    print(f"killed after {killed_at} logged epochs; resumed rows == reference rows: "
          f"{rows(run) == rows(reference)}; test_accuracy {summary(run)['test_accuracy']} vs "
          f"{summary(reference)['test_accuracy']}", file=sys.__stdout__)
    assert rows(run) == rows(reference)  # bit-for-bit: every loss, accuracy and lr of every epoch
    assert summary(run) == summary(reference)
    assert json.loads(out)["test_accuracy"] == summary(reference)["test_accuracy"]


def test_concurrent_runs_into_different_folders_do_not_interfere(reference, signalled):
    """The two runs above trained at the same time from the same seed: each logged exactly the
    reference's epochs (and each ends equal to it once resumed, below)."""
    _, results = signalled
    for _, _, _, logged in results.values():
        assert len(logged) >= 2 and logged == rows(reference)[: len(logged)]


def test_sigint_writes_checkpoint_and_interrupted_summary_then_resumes_exactly(reference, signalled, capsys):
    runs, results = signalled
    run, (code, _, err, _) = runs["interrupted"], results["interrupted"]
    assert code == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and f"--resume {run}" in lines[0]
    status = json.loads((run / "summary.json").read_text())
    assert status["status"] == "interrupted" and status["resume"] == f"ccl-repr train --resume {run}"
    state = ckpt.load_checkpoint(run / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (status["checkpoint_epoch"], status["checkpoint_step"])
    print(f"SIGINT: checkpoint at epoch {state['epoch']}, step {state['step']}, mid-epoch: "
          f"{state['partial'] is not None}", file=sys.__stdout__)
    assert run_main(["train", "--resume", str(run), "--no-progress"], capsys)[0] == 0
    assert rows(run) == rows(reference) and summary(run) == summary(reference)


def test_sigterm_mid_epoch_with_checkpoint_every_0_resumes_exactly(reference, tmp_path, threads):
    """A real signal sent from a step hook at a known step: the stop lands mid-epoch, and even a run
    that checkpoints only at the end writes a resumable checkpoint before stopping."""
    cfg = make_config("mlp_digits", overrides={"train": {"epochs": 6, "progress": False, "num_threads": 1,
                                                         "batch_size": 8, "checkpoint_every": 0}})
    run = tmp_path / "terminated"

    def terminate_at_step_200(*, step, **_):
        if step == 200:
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e:
        train(cfg, run, hooks=[terminate_at_step_200], log=lambda m: None)
    assert e.value.signum == signal.SIGTERM and "at step 200" in str(e.value)
    state = ckpt.load_checkpoint(run / "checkpoint.pt")
    assert (state["epoch"], state["step"], state["partial"]["batches"]) == (1, 200, 200 - 162)
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) == handler  # the previous handler is back
    train(cfg, run, resume=True, log=lambda m: None)
    assert rows(run) == rows(reference) and summary(run) == summary(reference)


# --------------------------------------------------------------------------- divergence

def test_huge_learning_rate_stops_cleanly_naming_layer_and_step(tmp_path, capsys, threads):
    run = tmp_path / "diverged"
    code, out, err = run_main(["train", "mlp_digits", "--epochs", "3", "--no-progress", "--out", str(run),
                               "--set", "train.num_threads=1", "--set", "optim.forward.lr=1e30",
                               "--set", "optim.forward.clip=0"], capsys)
    line = err.strip()
    print(f"divergence (lr=1e30): {line}", file=sys.__stdout__)
    assert code == 2 and out == "" and len(line.splitlines()) == 1
    assert "training diverged at step" in line and "forward network layer" in line and "lower optim.forward.lr" in line
    status = json.loads((run / "summary.json").read_text())
    assert status["status"] == "diverged" and status["checkpoint_epoch"] is None
    assert not (run / "checkpoint.pt").exists() and not (run / "model.pt").exists()


def test_divergence_keeps_last_good_checkpoint(tmp_path, capsys, threads):
    """A linear network whose learning rate warms up towards 100 trains for a few epochs, then blows up.
    The finite-explosion rules are off: they would stop it an epoch earlier (tests/test_guard.py)."""
    run = tmp_path / "late"
    code, _, err = run_main(["train", "mlp_digits", "--epochs", "8", "--no-progress", "--out", str(run),
                             "--set", "train.num_threads=1", "--set", "model.act_forward=identity", "--set", "optim.forward.lr=100",
                             "--set", "optim.warmup_steps=20000", "--set", "optim.forward.clip=0",
                             "--set", "train.diverge_factor=0", "--set", "train.diverge_growth=0"], capsys)
    print(f"divergence (warm-up): {err.strip()}", file=sys.__stdout__)
    assert code == 2 and "training diverged at step" in err and "last good checkpoint (epoch" in err
    status = json.loads((run / "summary.json").read_text())
    assert status["status"] == "diverged" and status["checkpoint_epoch"] >= 1
    state = ckpt.load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == status["checkpoint_epoch"] and state["step"] == status["checkpoint_step"]
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert state["metrics"] == [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
