"""Runs side by side: ``ccl-repr compare RUN_DIR... [--out FILE.md]``.

One markdown table with a row per run folder (from its ``summary.json``), then one row per
(recipe, method, dataset, epochs) group of completed runs with the mean ± sample standard
deviation over its seeds. A run folder without ``summary.json`` (still training, or killed
before it could write one) is listed with status ``incomplete`` from its ``config.json`` and,
like interrupted and diverged runs, left out of the group statistics. A path that is not a run
folder at all is an error.
"""

from __future__ import annotations

import glob
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

from . import checkpoint as ckpt
from .errors import CheckpointError

GROUP_BY = ("recipe", "method", "dataset", "epochs")
# (column header, summary key, cell format); one list for the run table and the group table.
METRICS: list[tuple[str, str, Callable[[float], str]]] = [
    ("test acc", "test_accuracy", lambda v: f"{100 * v:.2f} %"),
    ("test MSE", "test_mse", lambda v: f"{v:.4f}"),
    ("best epoch", "best_epoch", lambda v: f"{v:.3g}"),
    ("train s", "train_seconds", lambda v: f"{v:.1f}"),
    ("samples/s", "samples_per_second", lambda v: f"{v:.0f}"),
    ("peak MiB", "peak_memory_mib", lambda v: f"{v:.0f}"),
]


def expand(patterns: Sequence[str]) -> list[Path]:
    """Run folders named by paths or glob patterns (quoted globs too), in order, without repeats."""
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise CheckpointError(f"{pattern} matches no run folder; check the pattern")
        found += [Path(m) for m in matches if Path(m) not in found]
    return found


def read_run(path: Path) -> dict[str, Any]:
    """The row of one run folder: its summary, or its config with status ``incomplete``."""
    if not path.is_dir():
        why = "is not a folder" if path.exists() else "does not exist"
        raise CheckpointError(f"{path} {why}; pass run folders written by `ccl-repr train`")
    if (path / ckpt.SUMMARY).exists():
        return {"run": str(path), "status": "completed", **ckpt.read_json(path / ckpt.SUMMARY)}
    if not (path / ckpt.CONFIG).exists():
        raise CheckpointError(f"{path} is not a ccl-repr run folder (no {ckpt.CONFIG} or {ckpt.SUMMARY}); "
                              f"pass folders written by `ccl-repr train`")
    cfg = ckpt.read_json(path / ckpt.CONFIG)
    data, train = cfg.get("data") or {}, cfg.get("train") or {}
    return {"run": str(path), "status": "incomplete", "recipe": cfg.get("recipe"), "method": cfg.get("method"),
            "dataset": data.get("name"), "seed": cfg.get("seed"), "epochs": train.get("epochs")}


def _number(row: dict, key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _used(rows: list[dict]) -> list[tuple[str, str, Callable[[float], str]]]:
    """The metric columns some run has (no empty test-MSE column in a table of classifiers)."""
    return [m for m in METRICS if any(_number(r, m[1]) is not None for r in rows)]


def runs_table(rows: list[dict]) -> str:
    metrics = _used(rows)
    header = ["run", "status", "recipe", "method", "dataset", "seed", "epochs", *[m[0] for m in metrics]]
    body = [[r["run"], str(r.get("status", "")), *[str(r.get(k, "")) if r.get(k) is not None else ""
                                                   for k in ("recipe", "method", "dataset", "seed", "epochs")],
             *[fmt(v) if (v := _number(r, key)) is not None else "" for _, key, fmt in metrics]] for r in rows]
    return _markdown(header, body)


def _mean_std(values: list[float], fmt: Callable[[float], str]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def groups_table(rows: list[dict]) -> str:
    done = [r for r in rows if r.get("status") == "completed"]
    metrics = _used(done)
    groups: dict[tuple, list[dict]] = {}
    for r in done:
        groups.setdefault(tuple(r.get(k) for k in GROUP_BY), []).append(r)
    header = [*GROUP_BY, "runs", "seeds", *[f"{m[0]} (mean ± std)" for m in metrics]]
    body = [[*("" if v is None else str(v) for v in key), str(len(members)),
             ", ".join(str(m.get("seed")) for m in members),
             *[_mean_std([v for m in members if (v := _number(m, k)) is not None], fmt) for _, k, fmt in metrics]]
            for key, members in groups.items()]
    return _markdown(header, body)


def compare(patterns: Sequence[str]) -> str:
    """The markdown report of the run folders named by ``patterns``."""
    rows = [read_run(p) for p in expand(patterns)]
    text = f"## Runs\n\n{runs_table(rows)}\n"
    if any(r.get("status") == "completed" for r in rows):
        text += (f"\n## Groups ({', '.join(GROUP_BY)}): mean ± sample std over seeds, completed runs only\n\n"
                 f"{groups_table(rows)}\n")
    return text
