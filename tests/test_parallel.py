"""Delayed feedback (train.feedback_delay) and model-parallel CCL (train.parallel=layers): the delay
means what the docstring says, resumes exactly, and a 2-rank pipeline under torchrun (gloo) trains
to the same bits as one process with the same delay."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ccl_repr import checkpoint as ckpt
from ccl_repr.builder import build_trainable
from ccl_repr.cli import main
from ccl_repr.config import ModelConfig, make_config
from ccl_repr.errors import ConfigError
from ccl_repr.models import build_model
from ccl_repr.parallel import balanced_split, layer_flops, make_blocks, pipeline_period
from ccl_repr.rules import make_rule
from ccl_repr.train import train
from tests.conftest import REPO

SETS = ["train.batch_size=64", "train.num_threads=1", "train.progress=false", "data.train_subset=512",
        "data.test_subset=100", "train.feedback_delay=1"]


def _tiny(delay: int):
    cfg = make_config("mlp_digits", sets=[f"train.feedback_delay={delay}", "model.widths=[16,12]"])
    torch.manual_seed(0)
    return build_trainable(cfg, input_shape=(64,), num_classes=10, total_steps=10)


def test_delayed_feedback_reads_the_previous_steps_values():
    """Step 0 is the fresh step; at step 1 every b_j (j < L-1) is V_{j+1} of step 0's b_{j+1}
    under the updated weights, and b_{L-1} is fresh (the prototypes are fixed)."""
    x, y = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 10
    (m0, r0, o0), (m1, r1, o1) = _tiny(0), _tiny(1)
    for rule, model, opt in ((r0, m0, o0), (r1, m1, o1)):
        opt.zero_grad()
        rule.backward(model, x, y)
        opt.clip_and_step()
        rule.end_step()
    assert all(torch.equal(p, q) for p, q in zip(m0.parameters(), m1.parameters()))  # step 0: fresh
    step0 = dict(r1.prev)
    assert sorted(step0) == [1, 2] and sorted(r1.state_dict()) == ["b/linear1", "b/linear2"]
    with torch.no_grad():
        expect = {1: m1.layers[1].feedback(step0[2]), 2: m1.layers[2].feedback(torch.eye(10))}
        fresh = m1.feedback_intermediates(torch.eye(10))
    o1.zero_grad()
    r1.backward(m1, x, y)
    assert r1.prev is step0 or all(torch.equal(r1.prev[j], step0[j]) for j in step0)  # advances in end_step only
    for j, v in expect.items():
        torch.testing.assert_close(r1.pending[j], v, rtol=0, atol=0)
    assert not torch.allclose(r1.pending[1], fresh[1])  # the delay is real: b_1 is not G's fresh value


def test_delay_resumes_exactly_and_changes_training(tmp_path):
    cfg = make_config("mlp_digits", overrides={"train": {"epochs": 2}, "device": "cpu"}, sets=SETS)
    train(cfg, tmp_path / "ref", log=lambda m: None)

    def crash_in_epoch_2(*, epoch, **_):  # after epoch 1's checkpoint
        if epoch == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, tmp_path / "run", hooks=[crash_in_epoch_2], log=lambda m: None)
    assert sorted(ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["rule"]) == ["b/linear1", "b/linear2"]
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    for name in ("checkpoint.pt", "model.pt"):
        ref, got = ckpt.load_checkpoint(tmp_path / "ref" / name), ckpt.load_checkpoint(tmp_path / "run" / name)
        for part in ("model", "rule"):
            assert ref[part].keys() == got[part].keys()
            assert all(torch.equal(ref[part][k], got[part][k]) for k in ref[part]), f"{name} {part} differs"
    fresh = make_config("mlp_digits", overrides={"train": {"epochs": 1}, "device": "cpu"},
                        sets=[*SETS, "train.feedback_delay=0"])
    train(fresh, tmp_path / "fresh", log=lambda m: None)
    one = make_config("mlp_digits", overrides={"train": {"epochs": 1}, "device": "cpu"}, sets=SETS)
    train(one, tmp_path / "one", log=lambda m: None)
    a, b = (ckpt.load_checkpoint(tmp_path / r / "checkpoint.pt")["model"] for r in ("fresh", "one"))
    assert not torch.equal(a["layers.0.fbk.proj.weight"], b["layers.0.fbk.proj.weight"])


@pytest.mark.parametrize("sets, words", [
    (["--method", "bp", "--set", "train.feedback_delay=1"], "apply to CCL only"),
    (["--set", "train.feedback_delay=1", "--set", "loss.targets=samples"], "prototype targets"),
    (["--set", "train.feedback_delay=1", "--set", "train.layerwise=true"], "train.layerwise=false"),
    (["--set", "train.parallel=layers", "--set", "train.feedback_delay=1"], "torchrun"),
    (["--set", "train.micro_batches=2"], "train.parallel=layers"),
    (["--set", "train.parallel=networks"], "torchrun with 2 processes"),
])
def test_what_is_not_implemented_is_refused_in_one_line(tmp_path, capsys, sets, words):
    code = main(["train", "mlp_digits", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "r"), *sets])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "r").exists()


def test_autoencoders_refuse_the_delay():
    model = build_model(make_config("ae_digits").model, input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ConfigError, match="classifiers"):
        make_rule(make_config("ae_digits", sets=["train.feedback_delay=1"])).prepare(model)


def test_split_is_balanced_and_checked():
    model = build_model(ModelConfig(name="mlp_mnist"), input_shape=(784,), num_classes=10)
    # by counted FLOPs per pipeline step, not by parameters ([1]: 401k | 529k): rank 0's forward and
    # rank 1's whole step are in series, so the upper block is the lighter one
    assert balanced_split(model, 2, batch=256) == [2]
    flops = layer_flops(model, 256)
    assert flops[0] == (2 * 256 * 784 * 256, 2 * 10 * 256 * 784)  # F on the batch, G on the 10 prototypes
    periods = {s: pipeline_period(flops, [(0, s), (s, 6)]) for s in range(1, 6)}
    assert min(periods, key=periods.get) == 2
    assert periods[2] == max(sum(2 * (f + g) for f, g in flops[:2]),
                             sum(f for f, _ in flops[:2]) + sum(2 * (f + g) for f, g in flops[2:]))
    assert make_blocks(model, 3, [2, 4]) == [(0, 2), (2, 4), (4, 6)]
    for bad in ([4, 2], [0, 3], [6, 7], [3]):
        with pytest.raises(ConfigError, match="parallel_split"):
            make_blocks(model, 3, bad)
    with pytest.raises(ConfigError, match="nproc_per_node"):
        make_blocks(model, 7, [])


def test_two_rank_pipeline_equals_one_process_with_the_same_delay(tmp_path):
    """Rank 0 owns layer 0, rank 1 layers 1-2 (split [1]): activations go up, G's values one hop
    down per step, the network-wide clip norm is all-reduced. Every parameter, the delayed
    values and the metrics rows equal the single-process run's, bit for bit."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    cfg = make_config("mlp_digits", overrides={"train": {"epochs": 2}, "device": "cpu"}, sets=SETS)
    train(cfg, single, log=lambda m: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ccl_repr.cli", "train", "mlp_digits", "--epochs", "2", "--device", "cpu", "--out", str(multi),
           *[a for s in [*SETS, "train.parallel=layers"] for a in ("--set", s)]]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"test_accuracy"') == 1, done.stdout
    for name in ("checkpoint.pt", "model.pt"):
        a, b = ckpt.load_checkpoint(single / name), ckpt.load_checkpoint(multi / name)
        for part in ("model", "rule"):
            assert a[part].keys() == b[part].keys()
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), f"{name} {part} {k}"
    assert ckpt.load_checkpoint(multi / "checkpoint.pt")["optim"]["layer_parallel"]["blocks"] == [[0, 1], [1, 3]]
    drop = ("epoch_seconds", "samples_per_second")
    rows_a, rows_b = ckpt.read_jsonl(single / ckpt.METRICS), ckpt.read_jsonl(multi / ckpt.METRICS)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows_a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rows_b]
    # Micro-batches: 64 = 22 + 21 + 21 samples per step go up in 3 chunks; the chunks' size-weighted
    # mean losses are the batch's, so the update is the same up to float rounding (sums reordered).
    micro = tmp_path / "micro"
    cmd = [*cmd[:cmd.index("--out") + 1], str(micro), *cmd[cmd.index("--out") + 2:], "--set", "train.micro_batches=3"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    a, c = (ckpt.load_checkpoint(run / "checkpoint.pt")["model"] for run in (single, micro))
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{k} with 3 micro-batches")
    assert any(not torch.equal(c[k], a[k]) for k in a)  # the chunks did run: their sums round differently


# The F/G split computes the paper's step (no delay) for any CCL model: a conv autoencoder with
# batch norms, and a classifier whose G runs on per-sample targets and whose flooding mask needs F's
# logits on G's rank.
FG_CASES = {"ae_conv": ("ae_digits", ["model.name=ae_conv", "model.widths=[4,8]"]),
            "ae_conv_recon": ("ae_digits", ["model.name=ae_conv", "model.widths=[4,8]", "loss.ae_layer_recon=1",
                                            "loss.ae_layer_recon_sides=both"]),
            "samples_flooding": ("mlp_digits", ["loss.targets=samples", "loss.flooding=0.1"])}
FG_SETS = [s for s in SETS if not s.startswith("train.feedback_delay")]


@pytest.mark.parametrize("case", sorted(FG_CASES))
def test_fg_split_equals_one_process(tmp_path, case):
    """F on rank 0 and G on rank 1 (train.parallel=networks), each with the other's values as
    constants: the parameters, the checkpoint and the metrics rows equal single-process CCL's,
    bit for bit."""
    recipe, extra = FG_CASES[case]
    sets = [*FG_SETS, *extra]
    single, multi = tmp_path / "single", tmp_path / "multi"
    cfg = make_config(recipe, overrides={"train": {"epochs": 2}, "device": "cpu"}, sets=sets)
    train(cfg, single, log=lambda m: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ccl_repr.cli", "train", recipe, "--epochs", "2", "--device", "cpu", "--out", str(multi),
           *[a for s in [*sets, "train.parallel=networks"] for a in ("--set", s)]]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Warning" not in done.stderr, done.stderr[-3000:]
    for name in ("checkpoint.pt", "model.pt"):
        a, b = ckpt.load_checkpoint(single / name)["model"], ckpt.load_checkpoint(multi / name)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ranks = ckpt.load_checkpoint(multi / "checkpoint.pt")["optim"]["network_parallel"]["ranks"]
    assert not ranks[0]["feedback"]["opt"]["state"] and not ranks[1]["forward"]["opt"]["state"]  # each steps its own
    momentum = [getattr(cfg.optim, net).momentum > 0 for net in ("forward", "feedback")]
    assert [bool(r[net]["opt"]["state"]) for r, net in zip(ranks, ("forward", "feedback"))] == momentum
    drop = ("epoch_seconds", "samples_per_second")
    rows_a, rows_b = ckpt.read_jsonl(single / ckpt.METRICS), ckpt.read_jsonl(multi / ckpt.METRICS)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows_a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rows_b]


# (recipe, --set values, parallel mode): the layer pipeline with its delay; the F/G split without.
STOP_CASES = {"layers": ("mlp_digits", SETS), "networks": ("ae_digits", FG_SETS)}


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="finds the rank's process through /proc")
@pytest.mark.parametrize("mode", sorted(STOP_CASES))
def test_sigterm_to_one_rank_stops_the_pipeline_and_resumes_exactly(tmp_path, mode):
    """SIGTERM to rank 1 only: both ranks stop after the same step, rank 0's checkpoint holds
    every rank's block (or network), optimiser and delayed values, and `--resume` under torchrun
    ends where the uninterrupted single-process run (with the same delay) ends."""
    from tests.test_distributed import _rank_pid
    recipe, base = STOP_CASES[mode]
    epochs, single, multi = 20, tmp_path / "single", tmp_path / "multi"
    sets = [*base, "train.checkpoint_every=0"]
    train(make_config(recipe, overrides={"train": {"epochs": epochs}, "device": "cpu"}, sets=sets),
          single, log=lambda m: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ccl_repr.cli"]
    proc = subprocess.Popen([*launch, "train", recipe, "--epochs", str(epochs), "--device", "cpu",
                             "--out", str(multi), *[a for s in [*sets, f"train.parallel={mode}"] for a in ("--set", s)]],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ((multi / ckpt.METRICS).exists() and (multi / ckpt.METRICS).read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or hung before epoch 1"
            time.sleep(0.02)
        pid = _rank_pid(1, str(multi))
        assert pid is not None, "rank 1's process not found"
        os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)  # a hang (rank 0 waiting for rank 1's messages) fails here
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = ckpt.read_json(multi / ckpt.SUMMARY)
    assert proc.returncode != 0 and summary["status"] == "interrupted", (summary, err[-2000:])
    assert summary["checkpoint_epoch"] < epochs
    done = subprocess.run([*launch, "train", "--resume", str(multi)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = ckpt.load_checkpoint(single / ckpt.CHECKPOINT), ckpt.load_checkpoint(multi / ckpt.CHECKPOINT)
    for part in ("model", "rule"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert len(ckpt.read_jsonl(multi / ckpt.METRICS)) == epochs
