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


def test_speed_sync_on_cpu_reports_not_measured(tmp_path):
    """On CPU the script checks nothing: it must say so, never "met"."""
    done = run_script(tmp_path, "benchmarks/speed_sync.py", "--steps", "2")
    d = json.loads((tmp_path / "speed_sync_cpu.json").read_text())
    assert d["results"] == {} and d["met"] is None and d["status"].startswith("not measured")
    assert "verdict: not measured" in done.stdout
    from speed_sync import verdict

    assert verdict({"a": "ok: no host synchronisation"}) == (True, "met")
    assert verdict({"a": "ok: no host synchronisation", "b": "SYNC: call to item"}) == (False, "not met")


def test_epoch_benchmark_on_mnist_files(tmp_path, mnist_root):
    run_script(tmp_path, "benchmarks/epoch_mnist.py", "--threads", "1", "--repeats", "1", "--run-epochs", "2",
               "--set", f"data.root={mnist_root}", "--set", "data.train_subset=1024", "--set", "data.test_subset=256")
    d = json.loads((tmp_path / "epoch_mnist_cpu.json").read_text())
    for m in ("ccl", "bp"):
        r = d["results"][m]
        assert r["steps"] == 4 and r["median"]["compute"] > 0 and r["median"]["data"] >= 0
    assert d["results"]["ccl_full_run"]["epochs"] == 2


@pytest.mark.parametrize("script", ["speed_steps.py", "memory_depth.py", "epoch_mnist.py", "speed_sync.py",
                                    "parallel_model.py", "parallel_ccl.py"])
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


def test_sweep_trains_collects_and_reuses_runs(tmp_path):
    """sweep.py through the real CLI: an unknown rule stops it with ccl-repr's one-line error and
    exit 2, keeping the runs already finished; --reuse collects them and trains only the rest."""
    base = [sys.executable, "benchmarks/sweep.py", "--recipe", "mlp_digits", "--tag", "smoke", "--epochs", "1",
            "--seeds", "0", "--out", str(tmp_path / "runs"), "--set", "train.batch_size=128"]
    env = {**os.environ, "CCL_REPR_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    bad = subprocess.run(base + ["--methods", "ccl", "no_such_rule"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=240, check=False)
    assert bad.returncode == 2 and "no_such_rule" in bad.stderr and "Traceback" not in bad.stderr
    assert (tmp_path / "runs" / "smoke-ccl-s0" / "summary.json").is_file() and not (tmp_path / "smoke.json").exists()

    done = run_script(tmp_path, *base[1:], "--methods", "ccl", "bp", "--reuse", "--jobs", "2")
    assert "bp seed 0:" in done.stderr and "ccl seed 0:" not in done.stderr
    d = json.loads((tmp_path / "smoke.json").read_text())
    assert [(r["method"], r["seed"], r["reused"]) for r in d["rows"]] == [("ccl", 0, True), ("bp", 0, False)]
    for r in d["rows"]:
        assert r["command"].startswith("ccl-repr train mlp_digits --method " + r["method"])
        assert "--set train.batch_size=128" in r["command"] and r["summary"]["status"] == "completed"
        assert r["curve"]["epoch"] == [1] and 0 < r["curve"]["val/accuracy"][0] <= 1
        assert r["curve"]["val/loss"][0] > 0 and r["curve"]["epoch_seconds"][0] > 0
    assert d["rows"][1]["wall_seconds"] > 0 and d["paper"] == {}
    md = (tmp_path / "smoke.md").read_text()
    assert md == d["table"] and "| CCL | " in md and "| BP s0 | " in md and "paper (Table 1)" not in md
    assert "no number for ccl, bp on recipe `mlp_digits`" in md and "`--set train.batch_size=128`" in md

    # --collect trains nothing: the completed runs are tabulated, a missing one is named
    collected = run_script(tmp_path, *base[1:], "--methods", "ccl", "fa", "--collect")
    assert "seed 0:" not in collected.stderr and not (tmp_path / "runs" / "smoke-fa-s0").exists()
    d = json.loads((tmp_path / "smoke.json").read_text())
    assert [r["method"] for r in d["rows"]] == ["ccl"] and d["not_run"] == ["fa seed 0"]
    assert "Not run yet (no completed run folder): fa seed 0." in d["table"]

    # --resume keeps a completed run (it continues interrupted ones only): nothing retrains
    summary = (tmp_path / "runs" / "smoke-ccl-s0" / "summary.json").read_text()
    resumed = run_script(tmp_path, *base[1:], "--methods", "ccl", "--resume")
    assert "seed 0:" not in resumed.stderr
    assert (tmp_path / "runs" / "smoke-ccl-s0" / "summary.json").read_text() == summary


def sweep_row(method: str, seed: int, acc: float, *, epochs: int = 3, dataset: str = "mnist") -> dict:
    curve = {"epoch": list(range(1, epochs + 1)), "val/accuracy": [acc] * epochs, "val/loss": [0.1] * epochs,
             "train/ce": [0.1] * epochs, "epoch_seconds": [2.0] * epochs}
    return {"method": method, "seed": seed, "test_accuracy": acc, "best_val_accuracy": acc, "best_epoch": epochs,
            "epochs": epochs, "dataset": dataset, "curve": curve, "command": f"ccl-repr train ... {method} {seed}"}


def test_sweep_table_puts_the_papers_numbers_beside_the_recipes_it_covers():
    from sweep import PAPER, notes, summary_table

    rows = [sweep_row(m, s, a) for m, accs in (("ccl", (0.98, 0.982)), ("fa", (0.97, 0.96)), ("new_rule", (0.9, 0.92)))
            for s, a in enumerate(accs)]
    methods = ["ccl", "fa", "new_rule"]
    table = summary_table(rows, methods, "mlp_mnist")
    assert "paper (Table 1)" in table[0] and "seed 0 | seed 1" in table[0]
    assert table[2].startswith("| CCL | 98.00 | 98.20 | **98.10 ± 0.14** | 98.13 ± 0.10 |")
    assert "| 96.96 ± 0.05 |" in table[3] and table[4].startswith("| NEW_RULE | 90.00 | 92.00 | **91.00 ± 1.41** | - |")
    assert "paper (Table 1)" not in summary_table(rows, methods, "mlp_digits")[0]
    said = " ".join(notes(rows, methods, "mlp_mnist", []))
    assert "train 3 epochs, not the paper's 100" in said and "JPEG" not in said
    full = [sweep_row("ccl", 0, 0.8, epochs=100, dataset="imagefolder")]
    said = " ".join(notes(full, ["ccl"], "cnn_cifar10", ["data.name=imagefolder"]))
    assert "not the paper's" not in said and "JPEG" in said and "`--set data.name=imagefolder`" in said
    assert PAPER[("cnn_cifar10", "bp")] == (87.12, 1.76) and PAPER[("mlp_cifar10", "ccl")] == (52.73, 0.59)


def test_sweep_notes_and_test_curves():
    """A rule without a paper number is named as such (not the recipe); the per-epoch test table
    appears only for runs that logged test/accuracy (train.test_each_epoch), with their numbers."""
    from sweep import curve_table, notes, test_curves

    rows = [sweep_row("fwdtp", 0, 0.97, epochs=100)]
    said = " ".join(notes(rows, ["fwdtp"], "mlp_mnist", []))
    assert "no number for fwdtp on recipe `mlp_mnist`" in said and "ccl" in said
    assert test_curves(rows) == []
    logged = sweep_row("ccl", 1, 0.9, epochs=2)
    logged["curve"]["test/accuracy"] = [0.5, 0.75]
    shown = test_curves([*rows, logged])
    assert "train.test_each_epoch" in shown[0] and shown[-2] == "| CCL s1 | 50.00 | 75.00 |"
    assert not any("FWDTP" in line for line in shown)
    assert curve_table([logged])[-1] == "| CCL s1 | 90.00 | 90.00 |"


def test_search_covers_the_papers_grid_and_ties_ccls_networks():
    from search import SPACES, grid, point_sets
    drtp = grid("drtp", [])
    assert len(drtp) == 4 * 2 * 4  # App. 6.1: lr x projection mean x projection std
    assert {p["rule.proj_std"] for p in drtp} == {"0.01", "0.03", "0.1", "0.3"}
    # --grid replaces an axis and adds new ones
    fa = grid("fa", ["optim.forward.lr=0.1,0.2", "model.act_forward=tanh"])
    assert len(fa) == 2 * len(SPACES["fa"]["optim.forward.clip"])
    assert all(p["model.act_forward"] == "tanh" for p in fa)
    # CCL's two networks share lr and clip (the paper's grid is one lr, one clip)
    sets = point_sets("ccl", {"optim.forward.lr": "0.5", "optim.forward.clip": "1.0"})
    assert set(sets) == {"optim.forward.lr=0.5", "optim.feedback.lr=0.5",
                         "optim.forward.clip=1.0", "optim.feedback.clip=1.0"}
    assert point_sets("fa", {"optim.forward.lr": "0.5"}) == ["optim.forward.lr=0.5"]
    # a momentum axis (--grid optim.forward.momentum=...) moves both networks too
    assert "optim.feedback.momentum=0.9" in point_sets("ccl", {"optim.forward.momentum": "0.9"})


def test_parallel_model_costs_and_periods():
    """The scaling model's per-layer CCL FLOPs add up to what FlopCounterMode counts for a real
    CCL step (within the pair losses' own small products), and its period obeys the dependencies
    it states: one rank = the whole step; two ranks = the larger of each rank's work and of
    (lower forward + upper step), plus messages."""
    from parallel_model import layer_costs, splits, step_time
    from speed_common import Stepper
    st = Stepper("mlp_mnist", "ccl", torch.device("cpu"), batch=64)
    layers = layer_costs(st.model, 64)
    real = st.flops()
    assert 0.9 * real < sum(c["ccl"] for c in layers) <= real
    assert all(c["g"] < c["f"] for c in layers)  # G runs on the 10 prototypes, F on 64 images
    p = {"R": 1e9, "o": 1e-4, "alpha": 1e-5, "beta": 1e9, "kappa": 1.0}
    n = len(layers)
    one = step_time(layers, [(0, n)], p, clip="layer")
    assert one == pytest.approx(sum(c["ccl"] / 1e9 + 1e-4 for c in layers))
    for blocks in splits(st.model, 2):
        (lo0, hi0), (lo1, hi1) = blocks
        t = [sum(layers[i]["ccl"] / 1e9 + 1e-4 for i in range(lo, hi)) for lo, hi in blocks]
        f0 = sum(layers[i]["f"] / 1e9 + 0.5e-4 for i in range(lo0, hi0))
        up, down = 1e-5 + layers[hi0 - 1]["up_bytes"] / 1e9, 1e-5 + layers[lo1 - 1]["down_bytes"] / 1e9
        assert step_time(layers, blocks, p, clip="layer") == pytest.approx(max(t[0] + up, t[1] + down,
                                                                               f0 + up + t[1] + down))
        assert step_time(layers, blocks, p, clip="network") >= step_time(layers, blocks, p, clip="layer") - 1e-12
        assert step_time(layers, blocks, p, clip="layer") < one


def test_autoencoder_benchmark_probes_codes_beside_pca_and_pixels_and_reuses_runs(tmp_path):
    """benchmarks/ae_mnist.py on any AE recipe (the bundled ae_digits here): both methods train,
    each code is probed beside PCA of the same width and the raw pixels, the CCL code is drawn by
    UMAP beside the JSON, and --reuse collects the finished runs instead of training them again."""
    args = ["benchmarks/ae_mnist.py", "--recipe", "ae_digits", "--tag", "ae_smoke", "--seeds", "0",
            "--variants", "ccl", "bp", "--epochs", "1", "--runs", str(tmp_path / "runs"),
            "--json", str(tmp_path / "ae_smoke.json"), "--doc", str(tmp_path / "results_ae.md"), "--probe"]
    run_script(tmp_path, *args, timeout=300)
    first = json.loads((tmp_path / "ae_smoke.json").read_text())
    assert [r["variant"] for r in first["rows"]] == ["ccl", "bp"] and not any(r["reused"] for r in first["rows"])
    dim = first["rows"][0]["probes"]["forward"]["dim"]
    assert set(first["rows"][0]["probes"]) == {"forward", "feedback"} and set(first["rows"][1]["probes"]) == {"forward"}
    refs = first["references"]
    assert refs["PCA of pixels"]["dim"] == dim and refs["raw pixels"]["dim"] == 64
    assert all(0.1 <= refs[k]["linear_probe"] <= 1 for k in ("PCA of pixels", "raw pixels"))
    assert (tmp_path / "ae_smoke_umap.png").stat().st_size > 0
    assert all((tmp_path / f"ae_smoke-{v}-reconstructions.png").stat().st_size > 0 for v in ("ccl", "bp"))
    doc = (tmp_path / "results_ae.md").read_text()
    assert "| PCA of pixels |" in doc and "`ae_digits`" in doc
    assert all((tmp_path / "runs" / f"ae_smoke-{v}-s0" / "code_probes.json").exists() for v in ("ccl", "bp"))
    run_script(tmp_path, *args, "--reuse")  # the runs and their probes are collected, not recomputed
    again = json.loads((tmp_path / "ae_smoke.json").read_text())
    assert all(r["reused"] for r in again["rows"])
    assert [(r["test_mse"], r["probes"]) for r in again["rows"]] == [(r["test_mse"], r["probes"]) for r in first["rows"]]
    assert {k: v for k, v in again["references"].items() if k != "umap"} == \
           {k: v for k, v in refs.items() if k != "umap"}
    from benchmarks.reuse import same_settings  # --reuse compares the run's resolved config, not its name
    run = tmp_path / "runs" / "ae_smoke-ccl-s0"

    def reusable(seed=0, sets=(), epochs=1):
        return same_settings(run, "ae_digits", method="ccl", seed=seed, sets=list(sets), epochs=epochs)

    assert reusable()
    assert not reusable(sets=["loss.ae_layer_recon=1"]) and not reusable(seed=1)
    assert not reusable(epochs=2)


def test_collect_curves_names_each_runs_overrides_and_keeps_its_curve(tmp_path):
    from ccl_repr.cli import main

    run, threads = tmp_path / "run", torch.get_num_threads()
    try:
        assert main(["train", "mlp_digits", "--epochs", "2", "--no-progress", "--out", str(run),
                     "--set", "optim.forward.lr=0.123", "--set", "train.num_threads=1"]) == 0
    finally:
        torch.set_num_threads(threads)  # train() applies train.num_threads to this process
    run_script(tmp_path, "benchmarks/collect_curves.py", str(run), "--out", str(tmp_path / "curves.json"))
    (r,) = json.loads((tmp_path / "curves.json").read_text())["runs"]
    assert r["status"] == "completed" and r["epochs_done"] == 2 and r["recipe"] == "mlp_digits"
    assert 0 < r["test_accuracy"] <= 1 and r["best_epoch"] in (1, 2)
    assert r["overrides"]["optim.forward.lr"] == 0.123 and "optim.feedback.lr" not in r["overrides"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert r["val"]["val/accuracy"] == [row["val/accuracy"] for row in rows]
