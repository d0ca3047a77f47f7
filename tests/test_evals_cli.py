"""End to end: train a tiny digits run, then `ccl-repr eval` writes eval.json, report.md and PNGs."""
import json

import pytest

import numpy as np
import torch

from ccl_repr.cli import main
from evals.features import extract, open_run


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    """The default baseline cache lives under XDG_CACHE_HOME: keep it inside the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-home"))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits")
    assert main(["train", "mlp_digits", "--epochs", "2", "--out", str(run), "--no-progress", "--overwrite",
                 "--diagnostics-every", "10"]) == 0
    return run


def test_train_logs_diagnostics(digits_run):
    rows = [json.loads(line) for line in (digits_run / "diagnostics.jsonl").read_text().splitlines()]
    assert rows and rows[0]["step"] == 10
    assert {"align/linear1", "angle/linear1", "angle/output", "cka/linear1"} <= set(rows[0])


def test_eval_cli_end_to_end(digits_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(digits_run), "--out", str(out), "--layers", "linear2", "output",
                 "--umap-neighbors", "7", "--umap-min-dist", "0.25", "--no-progress"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["settings"]["umap"]["n_neighbors"] == 7 and result["umap"][0]["params"]["min_dist"] == 0.25
    assert result["settings"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # auto
    assert result["class_names"] == [str(i) for i in range(10)]
    coords = np.load(out / "umap_linear2_coords.npz")
    assert coords["coords"].shape == (360 + 10, 2) and coords["class_names"].tolist() == result["class_names"]
    assert {"linear", "knn", "baselines", "umap", "cka", "align"} <= set(result["timings"])
    for name in ("linear2", "output"):
        layer = result["layers"][name]
        assert 0.5 < layer["linear_probe_accuracy"] <= 1 and 0.5 < layer["knn_accuracy"] <= 1
        assert set(layer["baselines"]) == {"pixels", "pca", "random_init"}
    assert result["baselines"]["pixels"]["linear_probe_accuracy"] > 0.9
    # best epoch = last epoch here, so two panels: random init and the tested weights
    assert list(result["cka"]["checkpoints"]) == ["random init", "best validation epoch 2"]
    assert result["alignment"]["update_angle_degrees"]
    for name in ("cka.png", "umap_linear2.png", "umap_linear2.json", "cka.json", "report.md"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "![CKA](cka.png)" in report and "umap_linear2.png" in report
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"linear2", "output"}


def test_eval_cli_user_errors(digits_run, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert main(["eval", str(digits_run), "--layers", "conv7", "--out", str(tmp_path / "e")]) == 2
    assert main(["eval", str(digits_run), "--protocols", "linear,tsne"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "unknown layer" in err and "unknown protocol" in err


def test_eval_options_reach_protocols_and_export(digits_run, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", str(digits_run), "--out", str(out), "--layers", "linear1", "--protocols", "linear,knn",
                 "--knn-k", "1", "--knn-temperature", "0.5", "--probe-C", "0.3", "--export-features",
                 "--baselines", "pixels", "--no-progress"]) == 0
    result = json.loads((out / "eval.json").read_text())
    layer = result["layers"]["linear1"]
    assert layer["knn"]["protocol"]["k"] == 1 and layer["knn"]["protocol"]["temperature"] == 0.5
    assert layer["linear_probe"]["best_C"] == 0.3 and list(layer["linear_probe"]["val_accuracy_per_C"]) == ["0.3"]
    assert result["settings"]["knn"]["k"] == 1 and result["settings"]["linear"]["Cs"] == [0.3]
    run = open_run(digits_run)
    i = run.model.layer_names.index("linear1")
    for split in ("train", "val", "test"):
        s = getattr(run.data, split)
        saved = np.load(out / "features" / f"forward_linear1_{split}.npy")
        assert np.array_equal(saved, extract(run.model, s.x, layers=[i])[i].numpy())
        assert np.array_equal(np.load(out / "features" / f"labels_{split}.npy"), s.y.numpy())
    index = json.loads((out / "features" / "index.json").read_text())
    assert index["class_names"] == result["class_names"] and index["files"]["forward_linear1_test.npy"][0] == 360


def test_eval_baseline_cache_reused_across_evaluations(digits_run, tmp_path):
    args = ["eval", str(digits_run), "--layers", "output", "--protocols", "knn", "--no-progress",
            "--baseline-cache", str(tmp_path / "bc")]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("a", "b"))
    assert a["baseline_cache"]["misses"] == 3 and b["baseline_cache"] == {**a["baseline_cache"], "hits": 3, "misses": 0}
    assert b["baselines"] == a["baselines"] and b["layers"]["output"]["baselines"] == a["layers"]["output"]["baselines"]
    assert main([*args, "--out", str(tmp_path / "c"), "--knn-k", "3"]) == 0  # other settings: refitted
    assert json.loads((tmp_path / "c" / "eval.json").read_text())["baseline_cache"]["hits"] == 0


def test_eval_option_errors_are_one_line(digits_run, tmp_path, capsys):
    def exit_code(argv) -> int:
        try:
            return main(argv)
        except SystemExit as e:  # argparse's own errors (a value it cannot parse)
            return e.code

    for bad in (["--knn-k", "0"], ["--probe-C", "0.1,x"], ["--umap-neighbors", "1"], ["--knn-temperature", "-1"]):
        assert exit_code(["eval", str(digits_run), "--out", str(tmp_path / "e"), *bad]) == 2
    assert not (tmp_path / "e").exists()  # refused before anything was written
    err = capsys.readouterr().err
    assert "--knn-k" in err and "comma-separated numbers" in err and "--umap-neighbors" in err
    assert "Traceback" not in err


def test_export_features_without_scoring(digits_run, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", str(digits_run), "--out", str(out), "--layers", "output", "--protocols", "align",
                 "--export-features", "--no-progress"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["layers"] == {} and "baseline_cache" not in result and "alignment" in result
    assert np.load(out / "features" / "forward_output_test.npy").shape == (360, 10)
