"""Typed run configuration: one dataclass per component, YAML recipes, dotted overrides.

A recipe is a YAML mapping with the keys of :class:`Config`, plus optional per-method sections
(``ccl:``, ``bp:``, one per registered learning rule) whose contents are deep-merged over the base when that method is selected.
Resolution order: dataclass defaults < recipe < recipe's method section < CLI flags < ``--set``.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .registry import RULES  # the learning rules register there (ccl_repr.rules); read at validation time


def _recipes_dir() -> Path:
    """The bundled recipes: package data of an installed wheel (pyproject.toml maps the
    repository's recipes/ to ccl_repr/recipes at build time), else the checkout's recipes/
    (source tree and editable installs)."""
    packaged = Path(__file__).resolve().parent / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


RECIPES_DIR = _recipes_dir()


def _opt(default: Any, *, choices: tuple | None = None, lo: float | None = None,
         lo_open: bool = False, hi: float | None = None, doc: str = "") -> Any:
    """A dataclass field carrying its validation rules in metadata (for a list: of each item)."""
    meta = {"choices": choices, "lo": lo, "lo_open": lo_open, "hi": hi, "doc": doc, "default": default}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = _opt("digits", doc="digits | mnist | fashionmnist | cifar10 | cifar100 | stl10 | imagefolder")
    root: str = _opt("data", doc="folder holding the torchvision dataset folders (or the ImageFolder tree)")
    download: bool = _opt(False, doc="let torchvision download the dataset (needs internet)")
    val_fraction: float = _opt(0.1, lo=0.0, hi=0.9, doc="share of the training set held out for validation")
    normalize: bool = _opt(True, doc="standardise with per-channel mean/std of the training split")
    augment: bool = _opt(False, doc="random crop (pad 4) + horizontal flip, on device tensors")
    pad_to: int = _opt(0, lo=0, doc="zero-pad images to this square size (e.g. 28 -> 32); 0 = off")
    image_size: int = _opt(0, lo=0, doc="ImageFolder only: resize images to this square size (0 = keep; "
                                        "then all images must have one size)")
    cache_dir: str = _opt("auto", doc="ImageFolder only: where decoded images are cached; auto = "
                                      "$XDG_CACHE_HOME/ccl_repr or ~/.cache/ccl_repr; \"\" or off = no cache")
    train_subset: int = _opt(0, lo=0, doc="use N training samples, class-stratified, the same for every seed (0 = all)")
    test_subset: int = _opt(0, lo=0, doc="use N test samples, class-stratified, the same for every seed (0 = all)")


@dataclass
class ModelConfig:
    name: str = _opt("mlp_digits", doc="a name from the model registry (ccl-repr models)")
    widths: list[int] = _opt([], lo=1, doc="hidden widths/channels; [] = the registry default")
    act_forward: str = _opt("elu", choices=("elu", "relu", "tanh", "gelu", "leaky_relu", "identity"))
    act_feedback: str = _opt("elu", choices=("elu", "relu", "tanh", "gelu", "leaky_relu", "identity"))
    bias: bool = _opt(False)
    norm: str = _opt("none", choices=("none", "pre", "post"), doc="batch norm before/after each projection")
    norm_affine: bool = _opt(True, doc="learnable batch-norm scale and shift")
    init: str = _opt("default", choices=("default", "orthogonal", "orthogonal_bn"),
                     doc="orthogonal: + the published AE scaling (decoder forward / encoder feedback x0.001, "
                         "outermost 0); orthogonal_bn: the same, but projections a batch norm follows keep "
                         "their scale (x0.001 leaves them below the norm's eps)")


@dataclass
class LossConfig:
    form: str = _opt("prototype", choices=("prototype", "normalized"),
                     doc="prototype: mean((A B^T - Y)^2)/d*scale; normalized: Eq. 2 + anti-collapse")
    targets: str = _opt("prototypes", choices=("prototypes", "samples"),
                        doc="feed G the C x C identity (prototypes) or one one-hot per sample")
    scale: float = _opt(128.0, lo=0.0, doc="multiplier of the layer-pair term (published MLP: 0.5*256)")
    anti_collapse: float = _opt(0.5, lo=0.0, doc="weight of the (Â Â^T - I)^2 and (B̂ B̂^T - I)^2 terms")
    flooding: float = _opt(0.0, lo=0.0, hi=1.0,
                           doc="mask (at every pair) samples whose true-class prob is within this of 1; 0 = off "
                               "(published code: margin 0.1, i.e. mask above 0.9)")
    ae_form: str = _opt("mse", choices=("mse", "weighted"),
                        doc="AE pairs: plain MSE, or the published H-weighted MSE + spatially normalised MSE")
    ae_anti_collapse: float = _opt(0.0, lo=0.0, doc="AE inner pairs: weight of the anti-collapse term on each "
                                                    "side's batch-centred code; 0 = off")
    ae_layer_recon: float = _opt(0.0, lo=0.0, doc="AE: weight of each layer's local reconstruction term "
                                                  "V_l(U_l(sg(a_l))) vs sg(a_l), training U_l and V_l; 0 = off")
    ae_layer_recon_sides: str = _opt("forward", choices=("forward", "feedback", "both"),
                                     doc="forward: the term on F's values; feedback: its mirror U_l(V_l(sg(b_{l+1}))) "
                                         "vs sg(b_{l+1}) on G's values; both")


@dataclass
class RuleConfig:
    """The fixed random feedback of the rules that avoid weight transport (FA, DFA, DRTP, FW-DTP).

    Drawn once, when the rule is prepared, from N(proj_mean, proj_std^2) by a generator of its
    own seeded with the run's seed (the model's initialisation and the data order are not
    disturbed); saved in checkpoints and restored on resume."""
    proj_mean: float = _opt(0.0, doc="mean of the fixed random feedback matrices (the paper's DRTP search: 0, 0.05)")
    proj_std: float = _opt(0.0, lo=0.0, doc="their standard deviation; 0 = 1/sqrt(fan-in) of each matrix "
                                            "(the paper's DRTP search: 0.01, 0.03, 0.1, 0.3)")
    target_step: float = _opt(0.04, lo=0.0, doc="FW-DTP: the output target's step along -dCE/dlogits (its beta; "
                                                 "0.04 is the FW-DTP authors' MNIST example)")


@dataclass
class NetOptimConfig:
    lr: float = _opt(1.0, lo=0.0)
    momentum: float = _opt(0.0, lo=0.0, hi=1.0)
    weight_decay: float = _opt(0.0, lo=0.0)
    clip: float = _opt(1.0, lo=0.0, doc="grad-norm clip; 0 = off")
    clip_mode: str = _opt("network", choices=("network", "layer"),
                          doc="one norm over the whole network, or one per layer (keeps updates local)")


@dataclass
class OptimConfig:
    forward: NetOptimConfig = field(default_factory=NetOptimConfig)
    feedback: NetOptimConfig = field(default_factory=NetOptimConfig)
    warmup_steps: int = _opt(0, lo=0, doc="linear warm-up over this many steps (see warmup_mode)")
    warmup_mode: str = _opt("lr", choices=("lr", "loss"),
                            doc="lr: scale the learning rate after clipping; loss (published code): scale the "
                                "gradients by (step+1)/warmup_steps before centralisation and clipping")
    schedule: str = _opt("constant", choices=("constant", "cosine"))
    min_lr: float = _opt(0.0, lo=0.0, doc="cosine floor (eta_min)")
    centralize: bool = _opt(False, doc="gradient centralisation of weight gradients")


@dataclass
class TrainConfig:
    epochs: int = _opt(20, lo=1)
    batch_size: int = _opt(256, lo=1)
    eval_batch_size: int = _opt(2048, lo=1)
    num_threads: int = _opt(0, lo=0, doc="torch CPU threads; 0 = torch's default")
    progress: bool = _opt(True, doc="per-step bar on a terminal, else one line per epoch on stderr; false = silent")
    tensorboard: bool = _opt(False, doc="also write TensorBoard event files under RUN_DIR/tensorboard (pip install tensorboard)")
    checkpoint_every: int = _opt(1, lo=0, doc="write the resumable checkpoint every N epochs; 0 = only at the end")
    diverge_factor: float = _opt(10.0, lo=0.0,
                                 doc="stop the run (status diverged) when the cross-entropy exceeds this many times "
                                     "log C (a uniform guess), or an autoencoder's image MSE this many times that of a "
                                     "blank output (above the training mean image's); on the mean since the last read "
                                     "(every 200 steps and at epoch ends); 0 = off")
    diverge_growth: float = _opt(1e4, lo=0.0,
                                 doc="stop the run when a loss term's epoch mean exceeds this many times its "
                                     "first-epoch mean, at epoch ends (terms with a positive first-epoch mean; a healthy "
                                     "CCL pair loss grew 1400x: benchmarks/results/guard_margins.json); 0 = off")
    select: str = _opt("val_accuracy", choices=("val_accuracy", "val_loss"),
                   doc="classifiers: test the epoch of the best validation accuracy or of the lowest "
                       "validation cross-entropy (published code); autoencoders: lowest val MSE either way")
    batches_per_epoch: int = _opt(0, lo=0,
                                  doc="train only the first N batches of each epoch's shuffled order (the published "
                                      "conv-AE code trains 101); the schedule counts these steps; 0 = whole epochs")
    test_each_epoch: bool = _opt(False, doc="also evaluate the test split after every epoch (metrics rows test/*) "
                                            "for learning curves; never used to pick the tested epoch")
    layerwise: bool = _opt(False, doc="CCL only: backpropagate each pair loss as soon as it exists (memory flat in depth)")
    feedback_delay: int = _opt(0, lo=0, hi=1,
                               doc="CCL only: 1 = every feedback layer's input is the value computed one optimiser "
                                   "step earlier (what a layer pipeline sees; train.parallel=layers needs it); "
                                   "0 = G's fresh values (the paper)")
    parallel: str = _opt("none", choices=("none", "layers", "networks"),
                         doc="layers = model-parallel CCL under torchrun: each rank trains a contiguous block of "
                             "layers (F's and G's), activations up and feedback down one hop per step; networks = "
                             "the F/G split on 2 ranks: F trains on rank 0 while G trains on rank 1 (autoencoders)")
    parallel_split: list[int] = _opt([], lo=1,
                                     doc="train.parallel=layers: the first layer index of ranks 1..K-1, e.g. [3]; "
                                         "[] = the split with the smallest counted FLOPs per pipeline step (ccl_repr.parallel.balanced_split)")
    micro_batches: int = _opt(1, lo=1,
                              doc="train.parallel=layers: chunks per batch, sent up the pipeline one after the other "
                                  "so the ranks above start sooner; the chunks' losses are summed, weighted by size "
                                  "(the batch's gradient up to float rounding)")
    compile: bool = _opt(False, doc="torch.compile the loss computation (summed step only)")
    compile_backend: str = _opt("inductor", choices=("inductor", "aot_eager", "eager"))
    compile_mode: str = _opt("default", choices=("default", "reduce-overhead", "max-autotune"),
                             doc="inductor mode; reduce-overhead = CUDA graphs (GPU runs bound by launch overhead)")
    amp: str = _opt("auto", choices=("auto", "off", "bf16"), doc="bf16 autocast; auto = on for CUDA only")
    channels_last: str = _opt("auto", choices=("auto", "off", "on"), doc="channels-last conv layout; auto = CUDA + conv models")


@dataclass
class Config:
    method: str = _opt("ccl", choices=RULES, doc="a learning rule of the registry (ccl-repr rules)")
    seed: int = _opt(0, lo=0, hi=2**32 - 2, doc="numpy accepts seeds below 2**32; the augment stream uses seed+1")
    device: str = _opt("auto", choices=("auto", "cpu", "cuda"))
    recipe: str = _opt("", doc="the recipe this config came from (informational)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rule: RuleConfig = field(default_factory=RuleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- building

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, example: Any = None) -> Any:
    """Convert ``value`` to ``tp`` where that is unambiguous, else raise ConfigError."""
    origin = typing.get_origin(tp)
    hint = f"; write e.g. {key}={json_text(example)}" if example not in (None, "") else ""
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            except yaml.YAMLError:
                pass  # reported below as "expected a list"
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}; write e.g. {key}=[256,256]")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}{hint or f'; write e.g. {key}=true'}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}{hint}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}{hint}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}{hint}") from None
        if not math.isfinite(number):  # nan passes every range check, inf overflows the run
            raise ConfigError(f"{key}: expected a finite number, got {value!r}{hint}")
        return number
    if tp is str:
        if isinstance(value, bool):  # YAML reads a bare on/off (yes/no, true/false) as a boolean
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}{hint}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def json_text(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def _check_range(value: Any, meta: dict, key: str) -> None:
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_range(item, meta, f"{key}[{i}]")
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, meta['choices']))}; choose one of them")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        raise ConfigError(f"{key}: {value!r} is out of range; it must be {'>' if meta.get('lo_open') else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is out of range; it must be <= {hi}")


def build(cls: type, raw: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, validating every key and value."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}"
                          f"{f' (did you mean {prefix}{close[0]}?)' if close else ''}; valid keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        tp, key = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, key + ".")
        else:
            meta = fields[name].metadata
            kwargs[name] = _coerce(value, tp, key, meta.get("default"))
            _check_range(kwargs[name], meta, key)
    return cls(**kwargs)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_dotted(raw: dict, assignment: str) -> dict:
    """Apply one ``a.b.c=value`` override to a nested mapping (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set optim.forward.lr=0.5")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key part; write e.g. optim.forward.lr=0.5")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({str(e).splitlines()[0]}); "
                          f"quote it or fix the brackets, e.g. --set model.widths=[256,256]") from None
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {p} is a value, not a section")
    node[parts[-1]] = value
    return raw


def resolve_recipe_path(recipe: str) -> Path:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = RECIPES_DIR / f"{recipe}.yaml"
    if candidate.exists():
        return candidate
    names = ", ".join(list_recipes())
    raise ConfigError(f"recipe {recipe!r} not found; give a YAML path or one of: {names}")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(recipe: str) -> dict:
    path = resolve_recipe_path(recipe)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                          f"save it as a UTF-8 YAML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path} ({e.strerror}); check the path and its permissions") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping of config sections")
    raw.setdefault("recipe", path.stem)
    return raw


def make_config(recipe: str | dict | None = None, *, method: str | None = None,
                overrides: dict | None = None, sets: list[str] | tuple = ()) -> Config:
    """Resolve a recipe (name, path or mapping) + method + flag overrides + ``--set`` strings."""
    raw = load_recipe(recipe) if isinstance(recipe, str) else copy.deepcopy(recipe or {})
    sections = {m: raw.pop(m, None) or {} for m in RULES}
    over: dict = copy.deepcopy(overrides or {})
    for s in sets:
        set_dotted(over, s)
    chosen = method or over.get("method") or raw.get("method") or Config.method
    if chosen not in RULES:
        raise ConfigError(f"method: {chosen!r} is not one of {', '.join(RULES)}; see ccl-repr rules")
    merged = deep_merge(deep_merge(raw, sections[chosen]), over)
    merged["method"] = chosen
    return build(Config, merged)


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from its resolved ``to_dict()`` form (e.g. a run folder's config.json)."""
    return build(Config, d)
