"""Automatic segmentation as a strategy chosen once per export: ``apg``, ``instance`` (AIS) or ``grid``. Torch-free.

- ``apg``: the instance decoder's seeds become point prompts for the prompt decoder (:mod:`peft_export.runtime.apg`).
- ``instance``: the instance decoder's maps + a seeded watershed (micro-sam's AIS, :mod:`.instances`).
- ``grid``: a grid of point prompts, filtered (:mod:`.auto`); the only choice without an instance decoder.

``--method auto`` (:func:`choose`) picks AIS when the export has an instance decoder (see ``AUTO_WITH_DECODER``:
measured better and faster on CPU-trained exports), else the grid, and says which and why; where the result will be
poor (no instance decoder; low predicted IoUs seen while segmenting, :func:`quality_advice`) one line says what to
train.

Each strategy takes the Segmenter's public surface (its plan, tile embeddings, ``backend.decode`` and the instance
maps) and returns an int32 label image; :class:`AutoOptions` holds the options these strategies add to
``predict`` / ``evaluate`` (the CLI flags are generated from it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peft_export.errors import UsageError

METHODS = ("auto", "apg", "instance", "grid")
# With an instance decoder, auto picks AIS: on the held-out DSB2018 tile, with exports of the README's CPU
# finetunes, AIS had the higher mSA (APG's masks come from the prompt decoder's answer to one point, which a
# few CPU-minutes of training leave too small) and ran 5-10x faster (one watershed instead of one prompt-decoder
# run per seed); benchmarks/ais_vs_grid.py measures both. --method apg is micro-sam's APG.
AUTO_WITH_DECODER = "instance"
LOW_IOU = 0.6  # median predicted IoU of the decoded prompts below this: the prompt heads answer poorly
TRAIN_LINE = ("peft-export finetune --model {model} --data YOUR_DATA --instance-decoder --out run && peft-export "
              "merge-and-export run/best.pt -o export")


class AutoOptions(BaseModel):
    """Options of automatic segmentation that ``predict --auto`` / ``evaluate --auto`` add (None: the method's
    default, micro-sam's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    foreground_threshold: float | None = Field(None, ge=0, le=1, description=(
        "apg / instance: foreground probability above which a pixel belongs to an object [default: 0.5]."))
    center_distance_threshold: float | None = Field(None, ge=0, le=1, description=(
        "apg / instance: seeds where the centre distance is below this [default: 0.5]."))
    boundary_distance_threshold: float | None = Field(None, ge=0, le=1, description=(
        "apg / instance: seeds where the boundary distance is below this [default: 0.5]."))
    min_size: int | None = Field(None, ge=0, description=(
        "apg / instance: smallest object in pixels [default: apg 25, instance 0]."))
    nms_threshold: float | None = Field(None, ge=0, le=1, description=(
        "apg: a mask overlapping a better-scored one by more than this IoU is dropped [default: 0.9]."))
    refine_with_boxes: bool | None = Field(None, description=(
        "apg: decode each mask again from its bounding box (micro-sam's refine_with_box_prompts) [default: off]."),
        json_schema_extra={"cli": "--apg-box-refine"})
    mask_threshold: float | None = Field(None, allow_inf_nan=False, description=(
        "apg: logits above this are the mask (micro-sam's mask_threshold; lower gives larger masks) [default: 0]."))
    prompt_batch: int | None = Field(None, ge=1, description=(
        "apg / grid: point prompts per prompt-decoder call [default: apg 32, grid 64]."))
    three_d: bool = Field(False, description=(
        "Stacks: link the objects of consecutive planes into 3D objects by their overlap (micro-sam's "
        "merge_instance_segmentation_3d); without it labels are per plane."), json_schema_extra={"cli": "--3d"})

    @classmethod
    def build(cls, **values) -> AutoOptions:
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            from peft_export.runtime.apg import one_line

            raise UsageError(one_line(exc, cls)) from None

    def apg(self):
        from peft_export.runtime.apg import APGConfig

        return APGConfig.build(**self._shared(), nms_threshold=self.nms_threshold, batch_size=self.prompt_batch,
                               refine_with_boxes=self.refine_with_boxes, mask_threshold=self.mask_threshold)

    def instance(self, defaults: dict | None = None):
        """AIS settings: the given options over ``defaults`` (e.g. what a package declares) over micro-sam's."""
        from peft_export.runtime.instances import InstanceConfig

        given = {k: v for k, v in self._shared().items() if v is not None}
        return InstanceConfig.from_dict({**(defaults or {}), **given}).validate()

    def _shared(self) -> dict:
        return dict(foreground_threshold=self.foreground_threshold, min_size=self.min_size,
                    center_distance_threshold=self.center_distance_threshold,
                    boundary_distance_threshold=self.boundary_distance_threshold)


def check_grid(cfg):
    """The grid's :class:`~peft_export.runtime.auto.AutoConfig`, its thresholds checked (one line each)."""
    for name in ("pred_iou_thresh", "stability_thresh"):
        v = getattr(cfg, name)
        if not 0 <= v <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
    if cfg.points_per_side < 1 or cfg.batch_size < 1 or cfg.min_area < 0:
        raise UsageError("--points-per-side and the prompt batch must be >= 1, --min-area >= 0")
    return cfg


@dataclass(frozen=True)
class Choice:
    method: str  # apg | instance | grid
    reason: str  # why this method, one line
    advice: str | None = None  # what to train when the result will be poor, one line


def _model(backend) -> str:
    manifest = getattr(backend, "manifest", None)  # the contract's BackendInfo.model once ported
    return getattr(manifest, "model", None) or getattr(backend, "model_name", None) or "MODEL"


def train_advice(backend) -> str:
    return "to segment well without prompts, train an instance decoder: " + TRAIN_LINE.format(model=_model(backend))


def choose(backend, method: str = "auto") -> Choice:
    """The strategy for ``backend``, chosen once; ``apg`` / ``instance`` without an instance decoder: one line."""
    from peft_export.runtime.instances import has_instance_decoder, require_instance_decoder

    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    has = has_instance_decoder(backend)
    if not getattr(backend, "prompt_decoder", True):  # an instance package: maps only (BackendInfo once ported)
        if method in ("apg", "grid"):
            raise UsageError(f"--method {method} needs a prompt decoder, and {getattr(backend, 'out_dir', 'this')} "
                             "is an instance-segmentation package without one: use --method instance (or auto), "
                             "or the export folder")
        return Choice("instance", "an instance-segmentation package: its instance decoder + the seeded watershed "
                      "it declares (AIS)")
    if method in ("apg", "instance"):
        if not has:
            require_instance_decoder(backend, method)
        how = "the instance decoder's seeds as point prompts (APG)" if method == "apg" else \
            "the instance decoder + seeded watershed (AIS)"
        return Choice(method, f"{how}, as asked (--method {method})")
    if method == "grid":
        return Choice("grid", "a grid of point prompts, as asked (--method grid)",
                      None if has else train_advice(backend))
    if has:
        return Choice(AUTO_WITH_DECODER, "the export has an instance decoder: its maps + seeded watershed (AIS; "
                      "--method apg for its seeds as point prompts, APG)")
    return Choice("grid", "the export has no instance decoder: a grid of point prompts (slow, and weak unless the "
                  "model was trained with point prompts)", train_advice(backend))


@dataclass
class Configs:
    """Each strategy's configuration (None: its defaults)."""

    grid: object = None  # auto.AutoConfig
    instance: object = None  # instances.InstanceConfig
    apg: object = None  # apg.APGConfig
    three_d: bool = False

    @classmethod
    def from_options(cls, options: AutoOptions | None, grid=None, instance_defaults: dict | None = None) -> Configs:
        options = options or AutoOptions()
        if grid is not None and options.prompt_batch is not None:
            from dataclasses import replace

            grid = replace(grid, batch_size=options.prompt_batch)
        return cls(None if grid is None else check_grid(grid), options.instance(instance_defaults), options.apg(),
                   options.three_d)


@dataclass
class Stats:
    """What a run saw that says how good it will be: the decoded prompts' predicted IoUs."""

    ious: list = field(default_factory=list)

    def median_iou(self) -> float | None:
        return float(np.median(self.ious)) if self.ious else None


def run(segmenter, method: str, configs: Configs | None = None, *, runner=None, progress=None,
        stats: Stats | None = None) -> np.ndarray:
    """One image (the segmenter's current one) with the chosen strategy -> int32 labels at its original size."""
    configs = configs or Configs()
    if method == "apg":
        from peft_export.runtime.apg import segment_apg

        return segment_apg(segmenter, configs.apg, runner=runner, progress=progress, stats=stats)
    if method == "instance":
        from peft_export.runtime.instances import segment_instances

        return segment_instances(segmenter, configs.instance, runner=runner, progress=progress)
    if method == "grid":
        from peft_export.runtime.auto import segment_everything

        return segment_everything(segmenter, configs.grid, progress=progress, stats=stats)
    raise UsageError(f"unknown automatic segmentation method {method!r}")


def steps(segmenter, method: str, configs: Configs | None = None) -> int:
    """How many ``progress`` units :func:`run` reports on the current image."""
    if method == "apg":
        from peft_export.runtime.apg import steps as apg_steps

        return apg_steps(segmenter)
    if method == "instance":
        return len(segmenter._require_plan().grid)
    from peft_export.runtime.auto import auto_steps

    return auto_steps(segmenter, (configs or Configs()).grid)


def quality_advice(choice: Choice, stats: Stats | None, backend, objects: int | None = None) -> str | None:
    """One line when the result will be poor: no instance decoder, or low predicted IoUs of the decoded prompts."""
    if choice.advice:
        return choice.advice
    med = None if stats is None else stats.median_iou()
    if med is not None and med < LOW_IOU:
        return (f"the prompt decoder's predicted IoUs are low (median {med:.2f} over {len(stats.ious)} prompts): "
                "finetune with point prompts (the README's main job), e.g. " + TRAIN_LINE.format(model=_model(backend)))
    return None
