"""Run folders and checkpoints: atomic writes, code-free loading, clear errors.

A run folder holds ``config.json`` (resolved config), ``metrics.jsonl`` (one line per epoch),
``summary.json``, ``versions.json``, ``checkpoint.pt`` (everything needed to resume) and
``model.pt`` (the weights that were tested: best validation epoch). Every file is written
to a temporary name, flushed, fsynced and renamed, so a kill at any moment leaves the previous
good version intact. Loading uses ``torch.load(weights_only=True)``: plain containers and
tensors only, never pickled code.
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

FORMAT = "ccl_repr.checkpoint/1"
CHECKPOINT, MODEL, CONFIG, METRICS, SUMMARY, VERSIONS = (
    "checkpoint.pt", "model.pt", "config.json", "metrics.jsonl", "summary.json", "versions.json")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def append_jsonl(path: Path, obj: Any) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; is {Path(path).parent} a ccl-repr run folder?") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the run folder is damaged") from None


def save_checkpoint(path: Path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; point to a run folder that finished "
                              f"at least one epoch")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, tampered content with code objects, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a ccl-repr checkpoint ({first[:200]}); "
                              f"restore it or retrain") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not in the {FORMAT} format; it was not written by ccl-repr")
    return payload


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("ccl_repr", "torch", "torchvision", "numpy", "scikit-learn", "einops", "umap-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    return out


def prepare_run_dir(out: Path, *, overwrite: bool = False) -> Path:
    """Create the run folder; refuse to reuse a non-empty one unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"run folder {out} already exists and is not empty; choose another --out, "
                                  f"pass --resume {out} to continue it, or --overwrite to replace it")
        for name in (CHECKPOINT, MODEL, CONFIG, METRICS, SUMMARY, VERSIONS):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_run(run_dir: Path, *, weights: str = "tested", map_location: str | torch.device = "cpu"):
    """Rebuild (config, model) from a run folder. ``weights``: 'tested' (model.pt, the best
    validation epoch) or 'last' (checkpoint.pt). Returns the model in eval mode."""
    from .config import config_from_dict
    from .models import build_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist; pass the --out folder of a training run")
    cfg = config_from_dict(read_json(run_dir / CONFIG))
    path = run_dir / (MODEL if weights == "tested" else CHECKPOINT)
    if weights == "tested" and not path.exists():
        path = run_dir / CHECKPOINT
    payload = load_checkpoint(path, map_location=map_location)
    meta = payload["model_meta"]
    model = build_model(cfg.model, input_shape=tuple(meta["input_shape"]), num_classes=meta["num_classes"])
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"weights in {path} do not fit model {cfg.model.name} "
                              f"({str(e).splitlines()[0][:200]}); the config and checkpoint disagree") from None
    return cfg, model.eval()
