"""The benchmark scripts run end to end at toy sizes and write well-formed JSON.

GPU time is scarce: `benchmarks/gpu.sh` has to work the first time it runs, so the
scripts it calls are run here on CPU with the same code paths (every model family, both CCL
step modes, the real train() loop on MNIST files), only smaller. Results go to a temporary
folder through CCL_REPR_BENCH_RESULTS, never into benchmarks/results.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import each other by bare name (speed_common)


def run_script(tmp_path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "CCL_REPR_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_speed_steps_every_model_family(tmp_path):
    run_script(tmp_path, "benchmarks/speed_steps.py", "--threads", "1", "--repeats", "3", "--warmup", "1",
               "--budget", "0.5", "--batch", "4", "--models", "mlp_small,cnn_strided,ae_mlp", "--tag", "_smoke")
    d = json.loads((tmp_path / "speed_steps_cpu_smoke.json").read_text())
    assert set(d["models"]) == {"mlp_small", "cnn_strided", "ae_mlp"}
    for r in d["models"].values():
        assert r["repeats"] >= 3 and r["ratio_ccl_over_bp_step_time"] > 0
        for m in ("ccl", "bp"):
            assert r[m]["flops_per_step"] > 0 and 0 < r[m]["mfu"] and len(r[m]["step_ms_all"]) == r["repeats"]
    assert d["targets"]["ccl_over_bp_step_time_mlp_max"] == d["models"]["mlp_small"]["ratio_ccl_over_bp_step_time"]


def test_speed_floor_script(tmp_path):
    run_script(tmp_path, "benchmarks/speed_floor.py", "--threads", "1", "--repeats", "2", "--warmup", "1",
               "--models", "mlp_small")
    r = json.loads((tmp_path / "speed_floor_cpu.json").read_text())["models"]["mlp_small"]
    assert set(r["step_ms_median"]) == {"library_ccl", "library_bp", "floor_ccl", "floor_bp"}
    assert r["ratio_floor"] > 0 and r["ratio_library"] > 0
    assert "speed_floor_cpu.json" in run_script(tmp_path, "benchmarks/speed_tables.py", "speed_floor_cpu.json").stdout


def test_memory_depth_and_the_tables(tmp_path):
    run_script(tmp_path, "benchmarks/memory_depth.py", "--threads", "1", "--batch", "128", "--width", "128",
               "--depths", "2,8", "--repeats", "1")
    d = json.loads((tmp_path / "memory_depth_cpu.json").read_text())
    assert set(d["results"]) == {"bp", "ccl_summed", "ccl_layerwise"}
    # Backprop keeps every layer's activations for the backward pass: its step peak grows with depth.
    assert d["results"]["bp"]["8"]["step_peak_bytes"] > d["results"]["bp"]["2"]["step_peak_bytes"]
    tables = run_script(tmp_path, "benchmarks/speed_tables.py").stdout
    assert "memory_depth_cpu.json" in tables and tables.count("\n| 2 |") == 1


def test_speed_sync_runs_on_cpu(tmp_path):
    run_script(tmp_path, "benchmarks/speed_sync.py", "--steps", "2")
    assert (tmp_path / "speed_sync_cpu.json").is_file()


def test_epoch_benchmark_on_mnist_files(tmp_path, mnist_root):
    run_script(tmp_path, "benchmarks/epoch_mnist.py", "--threads", "1", "--repeats", "1", "--run-epochs", "2",
               "--set", f"data.root={mnist_root}", "--set", "data.train_subset=1024", "--set", "data.test_subset=256")
    d = json.loads((tmp_path / "epoch_mnist_cpu.json").read_text())
    for m in ("ccl", "bp"):
        r = d["results"][m]
        assert r["steps"] == 4 and r["median"]["compute"] > 0 and r["median"]["data"] >= 0
    assert d["results"]["ccl_full_run"]["epochs"] == 2


@pytest.mark.parametrize("script", ["speed_steps.py", "memory_depth.py", "epoch_mnist.py", "speed_sync.py"])
def test_gpu_script_calls_only_existing_scripts_and_flags(script):
    """Every flag gpu.sh passes to a script is one that script accepts (argparse would exit 2
    on the GPU machine, wasting its time)."""
    gpu = (REPO / "benchmarks" / "gpu.sh").read_text()
    lines = [line for line in gpu.splitlines() if f"benchmarks/{script}" in line]
    assert lines, f"gpu.sh does not run {script}"
    helptext = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=REPO, capture_output=True,
                              text=True, timeout=60).stdout
    for line in lines:
        flags = [w for w in line.split(f"benchmarks/{script}", 1)[1].split("||")[0].split() if w.startswith("--")]
        for flag in flags:
            assert flag in helptext, f"gpu.sh passes {flag} to {script}, which does not accept it"


@pytest.mark.parametrize("name", ["mlp_small", "mlp_mnist"])
def test_kernel_floor_computes_the_library_step(name):
    """speed_floor's hand-written steps are the library's steps: same gradients as autograd for
    both networks, and the same parameters after one clip + SGD step."""
    from speed_common import Stepper
    from speed_floor import FloorStep, bp_grads, ccl_grads, weights

    for method in ("ccl", "bp"):
        lib, floor = (Stepper(name, method, torch.device("cpu"), batch=32, seed=1) for _ in range(2))
        lib.optim.zero_grad()
        lib.method.backward(lib.model, lib.x, lib.y)
        U, V = weights(lib.model)
        with torch.no_grad():
            gU, gV = (ccl_grads(U, V, lib.x, lib.y, scale=lib.method.cfg.scale) if method == "ccl"
                      else (bp_grads(U, lib.x, lib.y), None))
        for i, (w, g) in enumerate(zip(U, gU)):
            torch.testing.assert_close(g, w.grad, rtol=1e-4, atol=1e-6, msg=f"{method} U_{i + 1}")
        for i, (w, g) in enumerate(zip(V, gV or [])):
            torch.testing.assert_close(g, w.grad, rtol=1e-4, atol=1e-6, msg=f"{method} V_{i + 1}")
        lib.optim.clip_and_step()
        FloorStep(floor).step()
        for (k, a), b in zip(lib.model.state_dict().items(), floor.model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=f"{method} {k} after one step")


def test_kernel_floor_refuses_models_it_does_not_cover():
    from speed_common import make_model
    from speed_floor import weights

    with pytest.raises(ValueError, match="bias-free ELU MLPs only"):
        weights(make_model("cnn", torch.device("cpu")))


def test_imagefolder_load_first_and_cached(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        for label, cls in enumerate(("a", "b")):
            (tmp_path / "images" / split / cls).mkdir(parents=True)
            for i in range(10):
                Image.new("RGB", (8, 8), (40 * label, 10 * i, 0)).save(tmp_path / "images" / split / cls / f"{i}.png")
    run_script(tmp_path, "benchmarks/imagefolder_load.py", "--root", str(tmp_path / "images"), "--tag", "_smoke")
    d = json.loads((tmp_path / "imagefolder_load_smoke.json").read_text())
    assert d["input_shape"] == [3, 8, 8] and d["classes"] == ["a", "b"] and d["num_test"] == 20
    assert d["cache_bytes"] > 0 and d["first_load"]["wall_seconds"] > 0 and d["cached_load"]["cpu_seconds"] > 0
