"""Whether a finished run folder holds the run a benchmark command would train (``--reuse``).

Compared: the run's resolved config (``config.json``) against the config the command resolves
to, every setting but those that do not change what a run computes (where the data lives, how
the run reports, threads). So a run of an older recipe, or with other ``--set`` values, is never
collected under a newer one. A setting the run's config lacks (added to the toolkit after the
run) counts as its default, which keeps the behaviour the run had.
"""

from __future__ import annotations

import json
from pathlib import Path

from ccl_repr.config import Config, deep_merge, make_config

NOT_COMPARED = {"device", "data.root", "data.download", "data.cache_dir", "train.num_threads", "train.progress",
                "train.tensorboard", "train.checkpoint_every"}


def same_settings(run: Path, recipe: str, *, method: str, seed: int, sets: list[str],
                  epochs: int | None = None) -> bool:
    """True when ``run`` finished (summary.json) with the settings of ``ccl-repr train RECIPE
    --method METHOD --seed SEED [--epochs EPOCHS] --set S ...``."""
    if not ((run / "summary.json").exists() and (run / "config.json").exists()):
        return False
    over = {"seed": seed, **({"train": {"epochs": epochs}} if epochs else {})}
    want = make_config(recipe, method=method, overrides=over, sets=sets).to_dict()
    have = deep_merge(Config().to_dict(), json.loads((run / "config.json").read_text()))
    return set(differences(have, want)) <= NOT_COMPARED


def differences(done: dict, base: dict, prefix: str = "") -> dict:
    """The dotted keys whose value in ``done`` differs from ``base``."""
    out = {}
    for key, value in done.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out.update(differences(value, base[key], dotted + "."))
        elif base.get(key) != value:
            out[dotted] = value
    return out
