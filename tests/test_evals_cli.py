"""End to end: train a tiny digits run, then `ccl-repr eval` writes eval.json, report.md and PNGs."""
import json

import pytest

from ccl_repr.cli import main


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
    assert main(["eval", str(digits_run), "--out", str(out), "--layers", "linear2", "output"]) == 0
    result = json.loads((out / "eval.json").read_text())
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
