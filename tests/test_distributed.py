"""Data parallel through torchrun: 2 processes on CPU (gloo) train to the same parameters as one
process at the same global batch, and only rank 0 writes the run folder."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ccl_repr import checkpoint as ckpt
from ccl_repr.config import make_config
from ccl_repr.distributed import DataParallel
from ccl_repr.train import train
from tests.conftest import REPO

# digits: 1293 training samples, so the last global batch of 64 has 13 (shards of 6 and 7: the
# all-reduce must weight each shard by its share of the global batch).
SETS = ["train.batch_size=64", "train.num_threads=1", "train.progress=false", "train.checkpoint_every=0"]


def test_shards_cover_the_global_batch_with_their_shares():
    x, y = torch.arange(13.0)[:, None], torch.arange(13)
    parts = [DataParallel(rank=r, world_size=3).shard(x, y) for r in range(3)]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert sum(p[2] for p in parts) == pytest.approx(1.0)
    xs, ys, share = DataParallel(rank=0, world_size=2).shard(x[:1], y[:1])  # fewer samples than ranks
    assert share == 0.0 and len(ys) == 1


def test_two_gloo_processes_equal_one_process(tmp_path, method="ccl"):
    """CCL: both networks' gradients go through the all-reduce (backprop's F-only case is a subset)."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    train(make_config("mlp_digits", method=method, overrides={"train": {"epochs": 2}, "device": "cpu"}, sets=SETS),
          single, log=lambda m: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ccl_repr.cli", "train", "mlp_digits", "--method", method, "--epochs", "2", "--device", "cpu",
           "--out", str(multi), *[a for s in SETS for a in ("--set", s)]]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # One voice: only rank 0 prints the summary line and the run folder.
    assert done.stdout.count('"test_accuracy"') == 1, done.stdout
    assert done.stderr.count("run folder:") == 1, done.stderr[-3000:]

    a = ckpt.load_checkpoint(single / ckpt.CHECKPOINT)["model"]
    b = ckpt.load_checkpoint(multi / ckpt.CHECKPOINT)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{k} after 2 epochs")
    # One writer: one metrics row per epoch, and the per-epoch losses are the global-batch means.
    rows_a, rows_b = ckpt.read_jsonl(single / ckpt.METRICS), ckpt.read_jsonl(multi / ckpt.METRICS)
    assert len(rows_b) == 2
    assert rows_b[-1]["val/accuracy"] == pytest.approx(rows_a[-1]["val/accuracy"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi", "single"]


def _rank_pid(rank: int, marker: str) -> int | None:
    """The pid of the torchrun worker with RANK=rank whose command line contains ``marker``."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if marker.encode() in cmdline and b"ccl_repr.cli" in cmdline and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_resumes_exactly(tmp_path):
    """SIGTERM to rank 1 only (one node preempted): every rank stops after the same step (else
    rank 0 would wait forever in the next all-reduce), rank 0 writes the checkpoint and an
    'interrupted' summary, and `--resume` under torchrun ends where an uninterrupted run ends."""
    epochs, single, multi = 60, tmp_path / "single", tmp_path / "multi"
    train(make_config("mlp_digits", overrides={"train": {"epochs": epochs}, "device": "cpu"}, sets=SETS),
          single, log=lambda m: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ccl_repr.cli"]
    cmd = [*launch, "train", "mlp_digits", "--epochs", str(epochs), "--device", "cpu", "--out", str(multi),
           *[a for s in SETS for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ((multi / ckpt.METRICS).exists() and (multi / ckpt.METRICS).read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "the torchrun run ended or hung before epoch 1"
            time.sleep(0.02)
        pid = _rank_pid(1, str(multi))
        assert pid is not None, "rank 1's process not found"
        os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)  # a hang (rank 0 stuck in the all-reduce) fails here
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    summary = ckpt.read_json(multi / ckpt.SUMMARY)
    assert summary["status"] == "interrupted", (summary, err[-2000:])
    assert summary["checkpoint_epoch"] < epochs

    done = subprocess.run([*launch, "train", "--resume", str(multi)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ckpt.read_json(multi / ckpt.SUMMARY)["status"] == "completed"
    a = ckpt.load_checkpoint(single / ckpt.CHECKPOINT)["model"]
    b = ckpt.load_checkpoint(multi / ckpt.CHECKPOINT)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{k} after {epochs} epochs")
    assert len(ckpt.read_jsonl(multi / ckpt.METRICS)) == epochs
