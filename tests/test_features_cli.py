"""`ccl-repr features`: raw images in, features out, preprocessed exactly as the run was trained."""
import json

import numpy as np
import pytest
import torch

from ccl_repr import checkpoint as ckpt
from ccl_repr.cli import main
from ccl_repr.data import _digits, load_data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A digits MLP trained on images padded 8x8 -> 10x10, so scale, padding and standardisation
    all matter."""
    out = tmp_path_factory.mktemp("feat") / "run"
    assert main(["train", "mlp_digits", "--epochs", "2", "--no-progress", "--out", str(out),
                 "--set", "data.pad_to=10", "--set", "train.num_threads=1"]) == 0
    return out


@pytest.fixture(scope="module")
def raw_test(run):
    """The run's test images as the dataset delivers them: floats in [0, 1], before padding."""
    _, _, x, y, _ = _digits()
    return x.numpy(), y.numpy()


def features(run, tmp_path, array, *args, name="in.npy"):
    np.save(tmp_path / name, array)
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.npy"
    code = main(["features", str(run), "--input", str(tmp_path / name), "--out", str(out), *args])
    return code, (np.load(out) if code == 0 else out)


def test_run_records_its_preprocessing(run):
    record = json.loads((run / ckpt.PREPROCESS).read_text())
    meta = ckpt.load_checkpoint(run / ckpt.MODEL)["model_meta"]
    assert meta["preprocess"] == record
    assert record["raw_shape"] == [1, 8, 8] and record["pad_to"] == 10
    cfg, _ = ckpt.load_run(run)
    bundle = load_data(cfg.data, seed=cfg.seed)
    assert np.allclose(record["mean"], bundle.mean.numpy()) and np.allclose(record["std"], bundle.std.numpy())


def test_output_argmax_of_raw_images_matches_the_runs_test_predictions(run, raw_test, tmp_path, capsys):
    x, y = raw_test
    code, logits = features(run, tmp_path, x, "--layer", "output")
    assert code == 0 and logits.shape == (len(x), 10) and logits.dtype == np.float32
    # The run's own predictions, through the training pipeline (load_data's padded, standardised test split).
    cfg, model = ckpt.load_run(run)
    bundle = load_data(cfg.data, seed=cfg.seed)
    with torch.no_grad():
        expected = model(bundle.test.x)
    assert np.array_equal(logits.argmax(1), expected.argmax(1).numpy())
    assert np.allclose(logits, expected.numpy(), atol=1e-5)
    summary = json.loads((run / ckpt.SUMMARY).read_text())
    assert (logits.argmax(1) == y).mean() == pytest.approx(summary["test_accuracy"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["shape"] == [len(x), 10]


def test_layouts_and_uint8_give_the_same_features(run, raw_test, tmp_path):
    x, _ = raw_test
    u8 = (x[:50] * 255).round().astype(np.uint8)
    _, from_u8 = features(run, tmp_path, u8, "--layer", "linear1", name="u8.npy")
    _, from_float = features(run, tmp_path, u8.astype(np.float32) / 255, "--layer", "linear1", name="f.npy")
    _, no_channel = features(run, tmp_path, u8[:, 0], "--layer", "1", name="hw.npy")
    assert from_u8.shape == (50, 128)
    assert np.allclose(from_u8, from_float, atol=1e-6) and np.array_equal(from_u8, no_channel)


def test_feedback_network_needs_labels_and_uses_them(run, raw_test, tmp_path, capsys):
    x, y = raw_test
    assert features(run, tmp_path, x, "--layer", "linear1", "--network", "feedback")[0] == 2
    assert "--labels" in capsys.readouterr().err
    np.save(tmp_path / "y.npy", y)
    code, b = features(run, tmp_path, x, "--layer", "linear1", "--network", "feedback", "--labels", str(tmp_path / "y.npy"))
    assert code == 0 and b.shape == (len(x), 128)
    # G is fed one-hot labels: images of one class share one feedback feature row.
    same = y == y[0]
    assert np.allclose(b[same], b[0], atol=1e-6) and not np.allclose(b[~same][0], b[0])


@pytest.mark.parametrize("array, layer, needle", [
    (np.zeros((4, 28, 28), np.float32), "output", "do not fit this model"),
    (np.zeros((4, 3, 8, 8), np.float32), "output", "do not fit this model"),
    (np.zeros((4, 8, 8), np.int64), "output", "dtype int64"),
    (np.full((4, 8, 8), 16.0, np.float32), "output", "must lie in [0, 1]"),
    (np.full((4, 8, 8), np.nan, np.float32), "output", "NaN"),
    (np.zeros((4, 8, 8), np.float32), "conv9", "unknown layer"),
    (np.array([{"a": 1}], dtype=object), "output", "not a plain .npy"),
])
def test_bad_input_is_one_line_exit_2(run, tmp_path, capsys, array, layer, needle):
    code, out = features(run, tmp_path, array, "--layer", layer)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not out.exists()


def test_missing_files_and_existing_out(run, tmp_path, capsys):
    assert main(["features", str(run), "--input", str(tmp_path / "nope.npy"), "--layer", "1",
                 "--out", str(tmp_path / "o.npy")]) == 2
    (tmp_path / "keep.npy").write_bytes(b"precious")
    np.save(tmp_path / "x.npy", np.zeros((2, 8, 8), np.float32))
    assert main(["features", str(run), "--input", str(tmp_path / "x.npy"), "--layer", "1",
                 "--out", str(tmp_path / "keep.npy")]) == 2
    assert (tmp_path / "keep.npy").read_bytes() == b"precious"
    assert main(["features", str(tmp_path / "no-run"), "--input", str(tmp_path / "x.npy"), "--layer", "1",
                 "--out", str(tmp_path / "o.npy")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "nope.npy" in lines[0] and "--overwrite" in lines[1] and "does not exist" in lines[2]
