"""Bad files and paths at the command line: one line, exit code 2, no traceback, nothing lost.

The CLI boundary catches the kinds (OSError, UnicodeDecodeError, JSON/YAML parse errors), so
these tests use real bad inputs of each kind rather than a list of known cases."""

import os
import subprocess
import sys
import urllib.request

import pytest
from PIL import Image

from ccl_repr.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--epochs", "1", "--no-progress", "--set", "train.num_threads=1"]


def _one_line_exit_2(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_recipe_that_is_not_utf8(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("# réglages\ntrain:\n  epochs: 1\n".encode("latin-1"))
    err = _one_line_exit_2(["train", str(recipe), "--out", str(tmp_path / "run"), *FAST], capsys)
    assert str(recipe) in err and "UTF-8" in err
    assert not (tmp_path / "run").exists()


def test_unreadable_image_in_an_image_folder(tmp_path, capsys):
    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("L", (8, 8), color=40 * i).save(folder / f"{i}.png")
    (tmp_path / "images" / "train" / "b" / "broken.png").write_bytes(b"not an image at all")
    err = _one_line_exit_2(["train", "mlp_digits", "--set", "data.name=imagefolder", "--data-root",
                            str(tmp_path / "images"), "--out", str(tmp_path / "run"), *FAST], capsys)
    assert "broken.png" in err


def test_out_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me\n")
    err = _one_line_exit_2(["train", "mlp_digits", "--out", str(blocker / "run"), *FAST], capsys)
    assert str(blocker) in err
    assert blocker.read_text() == "keep me\n"  # nothing already written is lost


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write into read-only folders")
def test_out_in_a_read_only_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        err = _one_line_exit_2(["train", "mlp_digits", "--out", str(locked / "run"), *FAST], capsys)
    finally:
        locked.chmod(0o755)
    assert str(locked) in err and not (locked / "run").exists()


def test_os_error_raised_anywhere_is_one_line(tmp_path, capsys):
    """The kind, not the case: an OSError from a path no command checks for (a report file
    under a regular file) reaches the boundary and ends as one line."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "mlp_digits", "--out", str(tmp_path / "run"), *FAST]) == 0
    capsys.readouterr()
    err = _one_line_exit_2(["compare", str(tmp_path / "run"), "--out", str(blocker / "table.md")], capsys)
    assert str(blocker) in err


def test_download_offline_keeps_the_cause_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    # A proxy on a closed local port: every download fails at once, online or not.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    urllib.request.install_opener(urllib.request.build_opener())  # read the proxy variables now
    try:
        root = tmp_path / "data"
        err = _one_line_exit_2(["train", "mlp_mnist", "--download", "--data-root", str(root / "new"),
                                "--out", str(tmp_path / "run"), *FAST], capsys)
        assert "Connection refused" in err  # the real cause, not only "Error downloading"
        assert not root.exists()  # the folders torchvision made for the download are gone
        root.mkdir()
        (root / "mine.txt").write_text("x")
        _one_line_exit_2(["train", "cnn_cifar10", "--download", "--data-root", str(root),
                          "--out", str(tmp_path / "run"), *FAST], capsys)
        assert sorted(p.name for p in root.iterdir()) == ["mine.txt"]  # what was there stays
    finally:
        urllib.request.install_opener(None)  # back to the default opener, built on next use


def test_entry_point_prints_no_traceback(tmp_path):
    """The installed console script path: python -m ccl_repr.cli, a real process."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(b"\xff\xfe\x00train: {}\n")
    proc = subprocess.run([sys.executable, "-m", "ccl_repr.cli", "train", str(recipe)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
