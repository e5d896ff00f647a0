"""Training configuration: one flat set of options, read from presets, a YAML/TOML file and the command line.

Precedence (later wins): the recipe preset (``study`` or ``cpu``) < the config file < command-line options.
The fully resolved configuration is written to ``RUN_DIR/config.yaml`` so a run can be repeated with
``peft-export finetune --config RUN_DIR/config.yaml --out OTHER_DIR``.

Presets
- ``study``: the study's recipe (micro-sam's defaults): AdamW lr 1e-5, batch 2, up to 25 objects per image,
  8 iterative sub-iterations, 100 epochs, ReduceLROnPlateau(0.9, 10), early stopping after 10 epochs.
- ``cpu``: the same recipe scaled to a few CPU-minutes on small data: fewer objects per image and
  sub-iterations, a higher learning rate, a handful of epochs. Chosen with measurements (README, issue 4).
- ``auto`` (default): ``study`` on CUDA, ``cpu`` otherwise.

Instance decoder (micro-sam's AIS): ``instance_decoder`` trains it jointly, its loss added to the prompt losses;
``instance_decoder_only`` trains only it on the frozen model (then ``val_metric`` defaults to ``instance``, the
automatic segmentation's mSA on the validation images).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from peft_export.errors import UsageError, first_line
from peft_export.peft.options import PeftConfig, config_keys, peft_config_from

RECIPES = ("auto", "study", "cpu")
PATCH_SAMPLING = ("tiles", "random")
AUGMENTATIONS = ("flip", "rot90", "intensity")
TRUNK_CACHE = ("auto", "memory", "disk", "off")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
MULTIMASK = ("auto", "on", "off")
VAL_METRICS = ("box", "point", "mean", "instance")
VAL_PROMPTS = ("box", "point")

# the PEFT methods' options (peft/options.py): one field each, None = not given (the method's default)
PEFT_KEYS: dict[str, type] = config_keys()


@dataclass
class _TrainFields:
    # what to train (+ the PEFT options, after `blocks`)
    model: str = "lite_medsam"
    checkpoint: str | None = None
    peft: str = "lora"
    blocks: str = "all"
    instance_decoder: bool = False  # train micro-sam's instance decoder jointly (its loss added)
    instance_decoder_only: bool = False  # train only the instance decoder; SAM stays frozen
    # data
    data: str = "sample:dsb2018"
    val: str | None = None
    patch_size: int | None = None  # None: min(model input size, 512); 0: whole images
    patch_sampling: str = "tiles"
    augment: list[str] = field(default_factory=list)
    min_object_area: int = 10
    # recipe
    recipe: str = "auto"
    epochs: int | None = None
    iterations: int | None = None
    samples_per_epoch: int | None = None  # None: one pass over the training patches
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.01
    objects_per_image: int | None = None
    sub_iterations: int | None = None
    mask_prob: float = 0.5
    multimask: str = "auto"
    scheduler_factor: float = 0.9
    scheduler_patience: int = 10
    early_stopping: int = 10
    # validation
    val_every: int = 1
    val_prompts: list[str] = field(default_factory=lambda: ["box", "point"])
    val_metric: str = "box"
    val_before: bool = True
    # machinery
    trunk_cache: str = "auto"
    trunk_cache_mb: int = 2048
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0  # torch's CPU threads; 0: torch's default
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        keys = [k for k in d if k not in PEFT_KEYS]
        at = keys.index("blocks") + 1
        return {k: d[k] for k in (*keys[:at], *PEFT_KEYS, *keys[at:])}

    def peft_config(self, warn: Callable[[str], None] | None = None) -> PeftConfig:
        """The run's PEFT method, placement and options (validated; options it does not have: ``warn``)."""
        return peft_config_from(self.peft, self.blocks, {k: getattr(self, k) for k in PEFT_KEYS}, warn)


TrainConfig = make_dataclass("TrainConfig", [(k, t | None, field(default=None)) for k, t in PEFT_KEYS.items()],
                             bases=(_TrainFields,))
TrainConfig.__doc__ = "One finetune run's options (the YAML keys of --config and RUN_DIR/config.yaml)."
TrainConfig.__module__ = __name__


PRESETS: dict[str, dict[str, Any]] = {
    "study": dict(epochs=100, batch_size=2, lr=1e-5, objects_per_image=25, sub_iterations=8),
    # measured on the DSB2018 sample with LiteMedSAM + late LoRA (see README): a few CPU-minutes
    "cpu": dict(epochs=6, batch_size=1, lr=2e-4, objects_per_image=6, sub_iterations=2),
}

# keys that may change when a run is resumed (the schedule and the machinery); all others must match
RESUME_MUTABLE = ("epochs", "iterations", "early_stopping", "val_every", "device", "trunk_cache", "trunk_cache_mb",
                  "threads")

_FIELDS = {f.name: f for f in fields(TrainConfig)}
_TYPES = get_type_hints(TrainConfig)
_ALIASES = {"method": "peft", "placement": "blocks", "checkpoint_path": "checkpoint", "val_data": "val"}


def field_names() -> tuple[str, ...]:
    return tuple(_FIELDS)


def _norm_key(key: str) -> str:
    k = str(key).strip().replace("-", "_")
    return _ALIASES.get(k, k)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Flat options from a YAML (.yaml/.yml) or TOML (.toml) file; one clear line for every problem."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise UsageError("TOML config files need Python >= 3.11 (or pip install tomli); "
                                     "use YAML instead") from None
            raw = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raise UsageError(f"config file {p}: unknown format {suffix!r}; use .yaml, .yml or .toml")
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot read config file {p}: {first_line(exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"config file {p} must hold a mapping of option names to values")
    out = {}
    for key, value in raw.items():
        k = _norm_key(key)
        if k in ("out", "resume", "force", "config", "quiet", "json"):
            raise UsageError(f"config file {p}: {key!r} is a command-line-only option")
        if k not in _FIELDS:
            raise UsageError(f"config file {p}: unknown option {key!r} (options: {', '.join(_FIELDS)})")
        out[k] = value
    return out


def _as_list(value: Any, allowed: tuple[str, ...], what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip() and v.strip() != "none"]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        raise UsageError(f"{what} must be a comma-separated list, got {value!r}")
    bad = [v for v in items if v not in allowed]
    if bad:
        raise UsageError(f"unknown {what} {bad[0]!r}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def _coerce(name: str, value: Any) -> Any:
    """Type-check one value (config files carry any YAML type)."""
    if value is None:
        return None
    kind = _TYPES[name]
    if get_origin(kind) in (Union, types.UnionType):  # X | None
        kind = next(a for a in get_args(kind) if a is not type(None))
    try:
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if get_origin(kind) is list:
            return value
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise UsageError(f"option {name.replace('_', '-')}: invalid value {value!r}") from None


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"unknown {name.replace('_', '-')} {value!r}; choose from {', '.join(allowed)}")


def resolve_config(file_values: dict[str, Any] | None = None, cli_values: dict[str, Any] | None = None, *,
                   cuda_available: bool = False) -> TrainConfig:
    """Preset < file < command line; validated. ``cli_values`` holds only options the user gave (not None)."""
    given: dict[str, Any] = {}
    for src in (file_values or {}, cli_values or {}):
        layer = {}
        for k, v in src.items():
            k = _norm_key(k)
            if k not in _FIELDS:
                raise UsageError(f"unknown option {k!r}")
            if v is not None:
                layer[k] = _coerce(k, v)
        # --epochs and --iterations are one choice: a later source's choice replaces an earlier one's
        if "epochs" in layer or "iterations" in layer:
            given.pop("epochs", None)
            given.pop("iterations", None)
        given.update(layer)
    recipe = given.get("recipe", "auto")
    _choice("recipe", recipe, RECIPES)
    preset = PRESETS["study" if recipe == "study" or (recipe == "auto" and cuda_available) else "cpu"]
    values = {**preset, **given}
    if values.get("instance_decoder_only"):
        values.setdefault("instance_decoder", True)
        values.setdefault("val_metric", "instance")
    if "iterations" in given and "epochs" not in given:
        values["epochs"] = None
    cfg = TrainConfig(**values)
    cfg.augment = _as_list(cfg.augment, AUGMENTATIONS, "augmentation")
    cfg.val_prompts = _as_list(cfg.val_prompts, VAL_PROMPTS, "validation prompt type")
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    cfg.peft_config()  # the method and its option values (placement is checked against the model)
    _choice("patch_sampling", cfg.patch_sampling, PATCH_SAMPLING)
    _choice("trunk_cache", cfg.trunk_cache, TRUNK_CACHE)
    _choice("precision", cfg.precision, PRECISIONS)
    _choice("device", cfg.device, DEVICES)
    _choice("multimask", cfg.multimask, MULTIMASK)
    _choice("val_metric", cfg.val_metric, VAL_METRICS)
    if cfg.epochs is not None and cfg.iterations is not None:
        raise UsageError("give --epochs or --iterations, not both")
    if cfg.epochs is None and cfg.iterations is None:
        raise UsageError("give --epochs N or --iterations N")
    positive = {"epochs": cfg.epochs, "iterations": cfg.iterations, "batch_size": cfg.batch_size,
                "objects_per_image": cfg.objects_per_image, "sub_iterations": cfg.sub_iterations,
                "val_every": cfg.val_every, "samples_per_epoch": cfg.samples_per_epoch,
                "min_object_area": cfg.min_object_area}
    for name, v in positive.items():
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if cfg.lr is None or cfg.lr <= 0:
        raise UsageError(f"--lr must be positive, got {cfg.lr}")
    if cfg.weight_decay < 0:
        raise UsageError("--weight-decay must be >= 0")
    if not 0 <= cfg.mask_prob <= 1:
        raise UsageError(f"--mask-prob must be in [0, 1], got {cfg.mask_prob}")
    if not 0 < cfg.scheduler_factor <= 1:
        raise UsageError("--scheduler-factor must be in (0, 1]")
    if cfg.scheduler_patience < 0 or cfg.early_stopping < 0:
        raise UsageError("patience values must be >= 0 (0 turns early stopping off)")
    if cfg.patch_size is not None and cfg.patch_size < 0:
        raise UsageError("--patch-size must be >= 0 (0: whole images)")
    if cfg.patch_size == 0 and cfg.patch_sampling == "random":
        raise UsageError("--patch-sampling random needs a --patch-size")
    if cfg.trunk_cache_mb < 0:
        raise UsageError("--trunk-cache-mb must be >= 0")
    if cfg.threads < 0:
        raise UsageError(f"--threads must be >= 0 (0: torch's default), got {cfg.threads}")
    if not cfg.val_prompts:
        raise UsageError("--val-prompts is empty; choose from box, point")
    if cfg.val_metric in ("box", "point") and cfg.val_metric not in cfg.val_prompts:
        raise UsageError(f"--val-metric {cfg.val_metric} needs {cfg.val_metric} in --val-prompts")
    if cfg.instance_decoder_only and not cfg.instance_decoder:
        raise UsageError("--instance-decoder-only trains the instance decoder: it cannot go with --no-instance-decoder")
    if cfg.val_metric == "instance" and not cfg.instance_decoder:
        raise UsageError("--val-metric instance needs an instance decoder (--instance-decoder)")


def to_yaml(cfg: TrainConfig | dict) -> str:
    import yaml

    d = cfg.to_dict() if isinstance(cfg, TrainConfig) else dict(cfg)
    return yaml.safe_dump(d, sort_keys=False)


def diff_for_resume(saved: dict[str, Any], new: TrainConfig, given: set[str]) -> list[str]:
    """Options the user gave on resume that disagree with the saved run (and may not change)."""
    bad = []
    for k in sorted(given):
        if k in RESUME_MUTABLE or k not in saved:
            continue
        if _coerce(k, saved[k]) != getattr(new, k):
            bad.append(f"{k.replace('_', '-')} (run: {saved[k]!r}, given: {getattr(new, k)!r})")
    return bad


def config_for_resume(saved: dict[str, Any], file_values: dict[str, Any] | None = None,
                      cli_values: dict[str, Any] | None = None) -> TrainConfig:
    """The saved run's configuration with the schedule/machinery options the user changed; other options that
    disagree with the run are refused (a resumed run continues the same training)."""
    given: dict[str, Any] = {}
    for src in (file_values or {}, cli_values or {}):
        for k, v in src.items():
            if v is not None:
                given[_norm_key(k)] = v
    known = {k: v for k, v in saved.items() if k in _FIELDS}
    base = TrainConfig(**known)
    probe = resolve_config({**known, "epochs": None, "iterations": None,
                            **{k: v for k, v in given.items()}, **_schedule(known, given)})
    bad = diff_for_resume(known, probe, set(given))
    if bad:
        raise UsageError("--resume continues the run with its own settings; these differ: " + "; ".join(bad)
                         + " (start a new run with another --out to change them)")
    for k in RESUME_MUTABLE:
        setattr(base, k, getattr(probe, k))
    validate(base)
    return base


def _schedule(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    if "epochs" in given or "iterations" in given:
        return {"epochs": given.get("epochs"), "iterations": given.get("iterations")}
    return {"epochs": saved.get("epochs"), "iterations": saved.get("iterations")}
