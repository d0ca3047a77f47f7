"""Run folders and checkpoints: atomic writes, code-free loading, clear errors.

A run folder holds ``config.json`` (resolved config), ``metrics.jsonl`` (one line per epoch),
``summary.json`` (``status``: completed, interrupted or diverged), ``versions.json``,
``checkpoint.pt`` (everything needed to resume, including the metrics rows it covers) and
``model.pt`` (the weights that were tested: best validation epoch), the same weights as
``model.safetensors`` (metadata: the config and ``model_meta``, so the file alone rebuilds the
model) and ``preprocess.json`` (how raw images become model inputs). Every file is written to a
temporary name, flushed, fsynced and renamed, so a kill at any moment leaves the previous good
version intact. Loading first checks the zip archive's CRCs (torch does not, so a flipped byte
would otherwise load silently), then uses ``torch.load(weights_only=True)``: plain containers and
tensors only, never pickled code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import sys
import tempfile
import warnings
import zipfile
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, UserError

FORMAT = "ccl_repr.checkpoint/1"
CHECKPOINT, MODEL, CONFIG, METRICS, SUMMARY, VERSIONS = (
    "checkpoint.pt", "model.pt", "config.json", "metrics.jsonl", "summary.json", "versions.json")
DIAGNOSTICS = "diagnostics.jsonl"
# The tested weights for everyone (safetensors: no pickle, readable from other frameworks) and the
# preprocessing the model was trained with (see ccl_repr.preprocess), beside model.pt.
SAFETENSORS, PREPROCESS = "model.safetensors", "preprocess.json"
SAFETENSORS_FORMAT = "ccl_repr.safetensors/1"
RUN_FILES = (CHECKPOINT, MODEL, CONFIG, METRICS, SUMMARY, VERSIONS, DIAGNOSTICS, SAFETENSORS, PREPROCESS)
# Keys a resumable checkpoint must hold (see train.train); checked before anything is restored.
RESUME_KEYS = ("model", "model_meta", "optim", "epoch", "step", "train_seconds", "config", "best",
               "best_epoch", "best_model", "rng", "metrics", "device")
# Config entries that may change between the interrupted run and its resumption: they do not
# change what is computed, only how it is shown, how often it is saved, where data is cached or
# when the divergence guard stops it.
RESUME_MAY_CHANGE = ("train.progress", "train.tensorboard", "train.num_threads", "train.checkpoint_every",
                     "data.cache_dir", "train.diverge_factor", "train.diverge_growth")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the folder entry (not possible on some platforms)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def append_jsonl(path: Path, obj: Any) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Replace a JSON-lines file atomically (used on resume to drop rows the checkpoint lacks)."""
    atomic_write_bytes(path, "".join(json.dumps(r, default=str) + "\n" for r in rows).encode())


def read_jsonl(path: Path) -> list[dict]:
    """The complete rows of a JSON-lines file; a torn last line (killed mid-append) is dropped."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; is {Path(path).parent} a ccl-repr run folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the run folder is damaged, "
                              f"restore the file or start a new run") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None


def save_checkpoint(path: Path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _check_archive(path: Path) -> None:
    """Verify the zip container and every member's CRC: torch.load checks neither, so a
    truncated file fails deep inside torch and a flipped byte in a tensor loads silently."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError, OSError) as e:
        size = path.stat().st_size if path.exists() else 0
        what = "empty" if size == 0 else "truncated or not a checkpoint archive"
        raise CheckpointError(f"checkpoint {path} is {what} ({size} bytes; {e}); restore it from a copy "
                              f"or retrain") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: member {bad} fails its CRC check; "
                              f"restore it from a copy or retrain")


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; point to a run folder that finished "
                              f"at least one epoch")
    _check_archive(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing them
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # tampered content (code objects, os.system reduces), bad pickle, ...
        weights_only = "weights only" in str(e).lower() or "weights_only" in str(e)
        reason = ("it holds objects other than tensors and plain containers (possibly code), so it was "
                  "refused without running it" if weights_only else f"{type(e).__name__}")
        raise CheckpointError(f"checkpoint {path} is corrupt or was not written by ccl-repr: {reason}; "
                              f"restore it from a copy or retrain") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not in the {FORMAT} format; it was not written by "
                              f"ccl-repr (restore it from a copy or retrain)")
    return payload


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_resume_state(run_dir: Path, config: dict) -> dict:
    """Load ``run_dir``'s checkpoint for resuming with ``config`` (a resolved ``to_dict()``):
    check that it holds everything a resume restores and that the config still matches."""
    path = Path(run_dir) / CHECKPOINT
    summary = Path(run_dir) / SUMMARY
    if summary.exists() and read_json(summary).get("status") == "completed":
        raise CheckpointError(f"run {run_dir} already completed (see {summary}); nothing to resume, start a "
                              f"new run with --out")
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no {CHECKPOINT} (the run stopped before its first checkpoint); "
                              f"start it again with --out {run_dir} --overwrite")
    state = load_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it is a weights-only file "
                              f"or from an older version and cannot be resumed; start a new run with --out")
    from .config import config_from_dict
    try:  # fill keys added since the checkpoint was written with their defaults
        saved_config = config_from_dict(state["config"]).to_dict()
    except UserError as e:
        raise CheckpointError(f"the config stored in {path} does not fit this version of ccl-repr ({e}); "
                              f"resume it with the version that wrote it, or start a new run with --out") from None
    saved, now = flatten(saved_config), flatten(config)
    changed = [k for k in sorted(set(saved) | set(now))
               if k not in RESUME_MAY_CHANGE and saved.get(k, "<missing>") != now.get(k, "<missing>")]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k, '<missing>')!r} in the checkpoint, {now.get(k, '<missing>')!r} now"
                          for k in changed[:3])
        raise CheckpointError(f"{Path(run_dir) / CONFIG} no longer matches {path} ({diffs}); restore the "
                              f"original config.json, or start a new run with --out to use the new settings")
    return state


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("ccl_repr", "torch", "torchvision", "numpy", "scikit-learn", "einops", "umap-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    return out


def check_run_dir(out: Path, *, overwrite: bool = False) -> None:
    """Refuse a run folder that would destroy something, before any time is spent on data."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; choose a folder path")
    home = next((p for p in (out, *out.parents) if p.exists()), None)  # where the folder would be made
    if home is not None and not home.is_dir():
        raise CheckpointError(f"--out {out} cannot be created: {home} is a file, not a folder; choose another --out")
    if home is not None and not os.access(home, os.W_OK | os.X_OK):
        raise CheckpointError(f"--out {out} cannot be created: no write permission in {home}; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"run folder {out} already exists and is not empty; choose another --out, "
                                  f"pass --resume {out} to continue it, or --overwrite to replace it")
        if not (out / CONFIG).exists():
            # --overwrite deletes run files only; a folder that is not a run folder is never ours to reuse.
            raise CheckpointError(f"--overwrite only replaces ccl-repr run folders, and {out} has no {CONFIG}; "
                                  f"choose another --out")


def prepare_run_dir(out: Path, *, overwrite: bool = False) -> Path:
    """Create the run folder and claim it by creating config.json exclusively, so two runs that
    start into the same folder at once cannot both write it; refuse a non-empty one unless
    ``overwrite`` (which removes only run files)."""
    out = Path(out)
    check_run_dir(out, overwrite=overwrite)
    if overwrite and out.is_dir():
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with open(out / CONFIG, "x"):
            pass
    except FileExistsError:
        raise CheckpointError(f"run folder {out} was just claimed by another run; choose another --out") from None
    return out


def _data_section(blob: bytes) -> bytes:
    """The tensor bytes of a safetensors file (after the 8-byte length and the JSON header)."""
    return blob[8 + int.from_bytes(blob[:8], "little"):]


def save_safetensors(path: Path, state: dict[str, torch.Tensor], *, config: dict, meta: dict) -> None:
    """Write ``state`` as safetensors with the config and model_meta as JSON metadata, plus the
    SHA-256 of the tensor bytes: the format has no checksum of its own, and a flipped byte in a
    weight must be refused as it is for checkpoints."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    info = {"format": SAFETENSORS_FORMAT, "config": json.dumps(config), "model_meta": json.dumps(meta)}
    digest = hashlib.sha256(_data_section(save(tensors, metadata=info))).hexdigest()
    atomic_write_bytes(path, save(tensors, metadata={**info, "sha256": digest}))


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state_dict, config dict, model_meta) of a model.safetensors written by ccl-repr."""
    from safetensors.torch import load

    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None
    try:
        n = int.from_bytes(blob[:8], "little")
        info = json.loads(blob[8:8 + n]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        info = None
    if not info or info.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(f"{path} is not a model.safetensors written by ccl-repr (truncated, or no "
                              f"{SAFETENSORS_FORMAT} metadata); restore it from a copy or retrain")
    if hashlib.sha256(_data_section(blob)).hexdigest() != info.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: its tensor bytes do not match the recorded SHA-256; "
                              f"restore it from a copy or retrain")
    try:
        return load(blob), json.loads(info["config"]), json.loads(info["model_meta"])
    except Exception as e:  # a consistent digest over a malformed file: written by something else
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}); restore it from a copy or retrain") from None


def load_weights(source: Path, *, weights: str = "tested") -> tuple[dict, dict, dict, Path]:
    """(config dict, state_dict, model_meta, file read) from a run folder or a lone
    ``.safetensors`` file. ``weights``: 'tested' (model.safetensors, else model.pt: the best
    validation epoch) or 'last' (checkpoint.pt)."""
    source = Path(source)
    if source.suffix == ".safetensors" and source.is_file():
        state, config, meta = load_safetensors(source)
        return config, state, meta, source
    if not source.is_dir():
        raise CheckpointError(f"run folder {source} does not exist; pass the --out folder of a training run "
                              f"or a model.safetensors file")
    config = read_json(source / CONFIG)
    if weights == "tested" and (source / SAFETENSORS).exists():
        state, _, meta = load_safetensors(source / SAFETENSORS)
        return config, state, meta, source / SAFETENSORS
    path = source / (MODEL if weights == "tested" else CHECKPOINT)
    if weights == "tested" and not path.exists():
        path = source / CHECKPOINT
    payload = load_checkpoint(path)
    if not isinstance(payload.get("model"), dict) or not isinstance(payload.get("model_meta"), dict):
        raise CheckpointError(f"checkpoint {path} holds no model weights; restore it from a copy or retrain")
    return config, payload["model"], payload["model_meta"], path


def load_state(model: torch.nn.Module, state: dict, path: Path, name: str) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"weights in {path} do not fit model {name} "
                              f"({str(e).splitlines()[0][:200]}); the config and checkpoint disagree") from None


def load_run(run_dir: Path, *, weights: str = "tested", map_location: str | torch.device = "cpu"):
    """Rebuild (config, model) from a run folder or its ``model.safetensors``. ``weights``:
    'tested' (the best validation epoch) or 'last' (checkpoint.pt). Returns the model in eval
    mode on ``map_location``."""
    from .config import config_from_dict
    from .models import build_model, list_models

    config, state, meta, path = load_weights(Path(run_dir), weights=weights)
    cfg = config_from_dict(config)
    if cfg.model.name not in list_models():
        raise CheckpointError(f"{path} holds a model built in Python ({cfg.model.name!r}), not one of the registry; "
                              f"build it again and load the weights with ccl_repr.load({str(run_dir)!r}, model=...)")
    model = build_model(cfg.model, input_shape=tuple(meta["input_shape"]), num_classes=meta["num_classes"])
    load_state(model, state, path, cfg.model.name)
    return cfg, model.to(map_location).eval()


def read_preprocess(run_dir: Path, meta: dict | None = None) -> dict:
    """The preprocessing record of a run: ``meta["preprocess"]`` (checkpoints, safetensors) or the
    run folder's preprocess.json."""
    if meta is not None and isinstance(meta.get("preprocess"), dict):
        return meta["preprocess"]
    path = Path(run_dir) / PREPROCESS
    if not path.exists():
        raise CheckpointError(f"{run_dir} records no preprocessing (no {PREPROCESS}; trained by an older "
                              f"ccl-repr); retrain it to use raw images, or standardise inputs yourself")
    return read_json(path)
