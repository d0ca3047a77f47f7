"""Data parallel through torchrun: 2 processes on CPU (gloo) train to the same parameters as one
process at the same global batch, and only rank 0 writes the run folder."""
import os
import subprocess
import sys

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
