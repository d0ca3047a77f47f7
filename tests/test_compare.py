"""`ccl-repr compare`: one markdown table of run folders and mean ± std per group of seeds."""

import json
import shutil
import statistics

import pytest

from ccl_repr.cli import main

FAST = ["--no-progress", "--set", "train.num_threads=1", "--set", "train.batch_size=64"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds of one recipe, and a folder of a run that has not finished (config.json only)."""
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        assert main(["train", "mlp_digits", "--epochs", "1", "--seed", str(seed),
                     "--out", str(root / f"digits-s{seed}"), *FAST]) == 0
    (root / "digits-live").mkdir()
    shutil.copy(root / "digits-s0" / "config.json", root / "digits-live" / "config.json")
    return root


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_compare_lists_runs_and_aggregates_seeds(runs, capsys):
    out = runs / "report" / "compare.md"
    assert main(["compare", str(runs / "digits-*"), "--out", str(out)]) == 0  # a quoted glob
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    header = _table_rows(printed, "run")[0]
    rows = {r[0].rsplit("/", 1)[-1]: dict(zip(header, r)) for r in _table_rows(printed, str(runs))}
    assert set(rows) == {"digits-s0", "digits-s1", "digits-live"}
    assert rows["digits-live"]["status"] == "incomplete" and rows["digits-live"]["test acc"] == ""
    summaries = [json.loads((runs / f"digits-s{s}" / "summary.json").read_text()) for s in (0, 1)]
    for s, summary in enumerate(summaries):
        row = rows[f"digits-s{s}"]
        assert (row["status"], row["method"], row["dataset"], row["seed"]) == ("completed", "ccl", "digits", str(s))
        assert row["test acc"] == f"{100 * summary['test_accuracy']:.2f} %"
        assert row["peak MiB"] == f"{summary['peak_memory_mib']:.0f}"
    (group,) = _table_rows(printed, "mlp_digits")  # the incomplete run is not in the statistics
    group = dict(zip(_table_rows(printed, "recipe")[0], group))
    accs = [100 * s["test_accuracy"] for s in summaries]
    assert (group["runs"], group["seeds"]) == ("2", "0, 1")
    assert group["test acc (mean ± std)"] == f"{statistics.mean(accs):.2f} % ± {statistics.stdev(accs):.2f} %"


def test_compare_refuses_what_is_not_a_run(runs, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    for args in (["compare", str(tmp_path / "notes")], ["compare", str(tmp_path / "nothing-*")],
                 ["compare", str(runs / "digits-s0"), "--out", str(runs / "digits-s0" / "config.json" / "x.md")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, args
