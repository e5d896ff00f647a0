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
automatic segmentation's mSA on the validation images); ``prompt_decoder`` adds SAM's prompt encoder and mask
decoder to it, trained with the interactive recipe on the frozen encoder's embeddings (APG's point prompts: by
default point prompts in three steps of four, in each object's inner core, where APG's seeds put them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import create_model

from peft_export.errors import UsageError, first_line
from peft_export.options import Options, comma_list, option
from peft_export.peft.options import PeftConfig, config_keys, peft_config_from, selection_fields

TRAIN, DATA, VAL, RUN, AIS = "Training", "Data", "Validation", "Run", "Automatic instance segmentation"

# the PEFT methods' options (peft/options.py): one field each, None = not given (the method's default)
PEFT_KEYS: dict[str, type] = config_keys()


class _TrainFields(Options):
    """One finetune run's options (the YAML keys of --config and RUN_DIR/config.yaml)."""

    family = "finetune"
    panel = TRAIN

    # what to train (+ the PEFT method, its blocks and options: selection_fields, panel PEFT)
    model: str = option("lite_medsam", "Zoo model (lite_medsam, vit_b, vit_l, vit_h, vit_t) or a checkpoint file.")
    checkpoint: str | None = option(None, "Base weights for --model (lite_medsam: bundled).", short="-c")
    instance_decoder: bool = option(
        False, "Also train micro-sam's instance decoder (foreground, centre and boundary distance maps for automatic "
        "segmentation without prompts), its loss added to the prompt losses; merge-and-export writes it as "
        "instance_decoder.onnx.", panel=AIS)
    instance_decoder_only: bool = option(
        False, "Train only the instance decoder on the frozen model (cheapest: with the trunk cache the encoder runs "
        "once per patch); e.g. on a finetuned run: --model RUN/best.pt. Validation metric: the automatic "
        "segmentation's mSA.", cli="--instance-decoder-only", panel=AIS)
    prompt_decoder: bool = option(
        False, "With --instance-decoder-only: also train SAM's prompt encoder and mask decoder with the interactive "
        "recipe (box and point prompts) on the frozen encoder's embeddings. Cheap (the trunk cache keeps the "
        "encoder out of the step); APG turns the instance decoder's seeds into point prompts. Points in the finetune "
        "itself (--point-fraction 0.75 --point-sampling central) train the prompt decoder while the adapters adapt "
        "the encoder, which measured better for APG at a similar cost.",
        cli="--prompt-decoder/--no-prompt-decoder", panel=AIS)
    # data
    data: str = option("sample:dsb2018", "DIR with images/ + labels/ (optional train/ val/ sub-folders), or "
                       "sample:dsb2018.", short="-d", panel=DATA)
    val: str | None = option(None, "Validation DIR.", panel=DATA, default_text="the val split of --data, if any")
    patch_size: int | None = option(None, "Training patch size in image pixels (0: whole images); resized to the "
                                    "model input.", ge=0, panel=DATA, default_text="the model input, at most 512")
    patch_sampling: Literal["tiles", "random"] = option("tiles", "tiles (a fixed grid) or random crops.", panel=DATA)
    augment: comma_list(Literal["flip", "rot90", "intensity"]) = option(
        [], "Comma-separated augmentations: flip, rot90, intensity.", panel=DATA)
    min_object_area: int = option(10, "Smallest object (pixels at model resolution) used for training.", ge=1,
                                  panel=DATA)
    # recipe
    recipe: Literal["auto", "study", "cpu"] = option(
        "auto", "Preset for the options that default to it: study (micro-sam's defaults), cpu (a few CPU-minutes), "
        "auto (study on CUDA, cpu otherwise).")
    epochs: int | None = option(None, "Number of epochs.", ge=1, default_text="recipe: cpu 6, study 100")
    iterations: int | None = option(None, "Number of optimisation steps instead of --epochs.", ge=1)
    samples_per_epoch: int | None = option(None, "Images per epoch.", ge=1, default_text="one pass over the "
                                           "training patches")
    batch_size: int | None = option(None, "Images per step; embeddings computed once per batch.", ge=1,
                                    default_text="recipe: cpu 1, study 2")
    lr: float | None = option(None, "AdamW learning rate.", gt=0, allow_inf_nan=False,
                              default_text="recipe: cpu 2e-4, study 1e-5")
    weight_decay: float = option(0.01, "AdamW weight decay.", ge=0, allow_inf_nan=False)
    objects_per_image: int | None = option(None, "Objects sampled per image.", ge=1,
                                           default_text="recipe: cpu 6, study 25")
    sub_iterations: int | None = option(None, "Iterative-correction rounds per step.", ge=1,
                                        default_text="recipe: cpu 2, study 8")
    point_fraction: float = option(
        0.5, "Share of the steps whose first prompt per object is a point (the others: its box), spread evenly. The "
        "study alternates (0.5); APG turns seeds into point prompts, so --prompt-decoder trains mostly points (1: "
        "points only, which let box answers drift in our runs).", ge=0, le=1, allow_inf_nan=False,
        default_text="0.5; 0.75 with --prompt-decoder")
    point_sampling: Literal["random", "central"] = option(
        "random", "Where a first point prompt lies: random (any pixel of the object, the study) or central (its "
        "inner core, at least half the largest distance from its border: where APG's seeds put their points).",
        default_text="random; central with --prompt-decoder")
    mask_prob: float = option(0.5, "Probability of feeding the previous logits as mask input.", ge=0, le=1)
    multimask: Literal["auto", "on", "off"] = option(
        "auto", "3 masks for the first point prompt (the study); auto: on when the model's multimask outputs were "
        "trained (not LiteMedSAM).")
    scheduler_factor: float = option(0.9, "ReduceLROnPlateau factor.", gt=0, le=1)
    scheduler_patience: int = option(10, "ReduceLROnPlateau patience in epochs.", ge=0)
    early_stopping: int = option(10, "Stop after N epochs without improvement (0: never).", ge=0)
    # validation
    val_every: int = option(1, "Validate every N epochs.", ge=1, panel=VAL)
    val_prompts: comma_list(Literal["box", "point"]) = option(["box", "point"], "Prompt types to validate: box, "
                                                              "point.", min_length=1, panel=VAL)
    val_metric: Literal["box", "point", "mean", "instance"] = option(
        "box", "Metric for best.pt, the scheduler and early stopping: box, point or mean (mean IoU), or instance "
        "(the instance decoder's automatic segmentation mSA).", panel=VAL,
        default_text="box; instance with --instance-decoder-only")
    val_before: bool = option(True, "Validate before training (epoch 0 in metrics.jsonl).", panel=VAL)
    # machinery
    trunk_cache: Literal["auto", "memory", "disk", "off"] = option(
        "auto", "Cache the frozen encoder trunk's output per repeating input.", panel=RUN)
    trunk_cache_mb: int = option(2048, "Size budget of the trunk cache in MiB.", ge=0, panel=RUN)
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto, cpu or cuda.", panel=RUN)
    precision: Literal["auto", "fp32", "fp16", "bf16"] = option(
        "auto", "auto (fp16 autocast + GradScaler on CUDA, fp32 on CPU), fp32, fp16, bf16.", panel=RUN)
    threads: int = option(0, "CPU threads of torch (0: torch's default, one per core). On a small CPU shared with "
                          "other jobs, 1 is often faster.", ge=0, panel=RUN)
    seed: int = option(0, "Seed of every random choice.", panel=RUN)

    def to_dict(self) -> dict[str, Any]:
        """By key: the model, the PEFT method, its blocks and options, then the rest (RUN_DIR/config.yaml)."""
        d = self.model_dump(mode="json")
        peft = ("peft", "blocks", *PEFT_KEYS)
        keys = [k for k in d if k not in peft]
        at = keys.index("checkpoint") + 1
        return {k: d[k] for k in (*keys[:at], *peft, *keys[at:])}

    def peft_config(self, warn: Callable[[str], None] | None = None) -> PeftConfig:
        """The run's PEFT method, placement and options (validated; options it does not have: ``warn``)."""
        return peft_config_from(self.peft, self.blocks, {k: getattr(self, k) for k in PEFT_KEYS}, warn)


TrainConfig = create_model("TrainConfig", __base__=_TrainFields, __module__=__name__,
                           **selection_fields("lora", "all"))
TrainConfig.__doc__ = _TrainFields.__doc__
TrainOptions = TrainConfig  # the training family's name among the option families


PRESETS: dict[str, dict[str, Any]] = {
    "study": dict(epochs=100, batch_size=2, lr=1e-5, objects_per_image=25, sub_iterations=8),
    # measured on the DSB2018 sample with LiteMedSAM + late LoRA (see README): a few CPU-minutes
    "cpu": dict(epochs=6, batch_size=1, lr=2e-4, objects_per_image=6, sub_iterations=2),
}

# keys that may change when a run is resumed (the schedule and the machinery); all others must match
RESUME_MUTABLE = ("epochs", "iterations", "early_stopping", "val_every", "device", "trunk_cache", "trunk_cache_mb",
                  "threads")

# command-line-only flags: never configuration keys
CLI_ONLY = ("out", "resume", "force", "config", "quiet", "json")
_ALIASES = {"method": "peft", "placement": "blocks", "checkpoint_path": "checkpoint", "val_data": "val"}


def field_names() -> tuple[str, ...]:
    return tuple(TrainConfig.model_fields)


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
        if k in CLI_ONLY:
            raise UsageError(f"config file {p}: {key!r} is a command-line-only option")
        if k not in TrainConfig.model_fields:
            raise UsageError(f"config file {p}: unknown option {key!r} (options: {', '.join(field_names())})")
        out[k] = value
    return out


def _given(src: dict[str, Any] | None) -> dict[str, Any]:
    out = {}
    for k, v in (src or {}).items():
        k = _norm_key(k)
        if k not in TrainConfig.model_fields:
            raise UsageError(f"unknown option {k!r}")
        if v is not None:
            out[k] = v
    return out


def resolve_config(file_values: dict[str, Any] | None = None, cli_values: dict[str, Any] | None = None, *,
                   cuda_available: bool = False) -> TrainConfig:
    """Preset < file < command line; validated. ``cli_values`` holds only options the user gave (not None)."""
    given: dict[str, Any] = {}
    for src in (file_values, cli_values):
        layer = _given(src)
        # --epochs and --iterations are one choice: a later source's choice replaces an earlier one's
        if "epochs" in layer or "iterations" in layer:
            given.pop("epochs", None)
            given.pop("iterations", None)
        given.update(layer)
    recipe = TrainConfig.parse(recipe=given.get("recipe")).recipe
    preset = PRESETS["study" if recipe == "study" or (recipe == "auto" and cuda_available) else "cpu"]
    values = {**preset, **given}
    if values.get("instance_decoder_only"):
        values.setdefault("instance_decoder", True)
        values.setdefault("val_metric", "instance")
    if values.get("prompt_decoder"):  # the decoder stage of APG: point prompts where its seeds put them
        values.setdefault("point_fraction", 0.75)
        values.setdefault("point_sampling", "central")
    if "iterations" in given and "epochs" not in given:
        values["epochs"] = None
    cfg = TrainConfig.parse(values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """What one field cannot say alone (each field's own range is checked by its declaration)."""
    cfg.peft_config()  # the method and its option values (placement is checked against the model)
    if cfg.epochs is not None and cfg.iterations is not None:
        raise UsageError("give --epochs or --iterations, not both")
    if cfg.epochs is None and cfg.iterations is None:
        raise UsageError("give --epochs N or --iterations N")
    if cfg.lr is None:
        raise UsageError("--lr must be given (no recipe preset set it)")
    if cfg.patch_size == 0 and cfg.patch_sampling == "random":
        raise UsageError("--patch-sampling random needs a --patch-size")
    if cfg.val_metric in ("box", "point") and cfg.val_metric not in cfg.val_prompts:
        raise UsageError(f"--val-metric {cfg.val_metric} needs {cfg.val_metric} in --val-prompts")
    if cfg.instance_decoder_only and not cfg.instance_decoder:
        raise UsageError("--instance-decoder-only trains the instance decoder: it cannot go with --no-instance-decoder")
    if cfg.prompt_decoder and not cfg.instance_decoder_only:
        raise UsageError("--prompt-decoder goes with --instance-decoder-only (without it the prompt decoder trains "
                         "anyway, beside the PEFT method)")
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
        if getattr(TrainConfig.parse({k: saved[k]}), k) != getattr(new, k):
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
    known = {k: v for k, v in saved.items() if k in TrainConfig.model_fields}
    base = TrainConfig.parse(known)
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
