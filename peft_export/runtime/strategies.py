"""Automatic segmentation ("segment everything") as a strategy chosen once, from what the model has.

    strategy, why = choose_strategy(backend.info, AutoOptions(method="auto"))
    labels = strategy.segment(image, progress)      # ``image``: a Segmenter with an image set

Strategies (each a small module; adding one is a module + one line in :data:`STRATEGIES`):

- ``instance``: the instance decoder's maps + seeded watershed (micro-sam's AIS), :mod:`.instances`;
- ``apg``: the instance decoder's seeds as point prompts for the prompt decoder (micro-sam's APG), :mod:`.apg`;
- ``grid``: a grid of point prompts, filtered, :mod:`.auto` (SAM's automatic mask generator, simplified).

``auto`` picks the instance decoder's watershed (AIS) when the model has one, else the grid, and says why (as
micro-sam's ``get_predictor_and_segmenter`` chooses its segmenter once). A strategy sees the image only through
:class:`EmbeddedImage` (never the Segmenter class), so strategies and the Segmenter do not import each other.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Literal, Protocol

import numpy as np
from pydantic import Field

from peft_export.errors import UsageError
from peft_export.options import Options, option
from peft_export.runtime.apg import APGOptions
from peft_export.runtime.auto import GridOptions
from peft_export.runtime.backend import Backend, BackendInfo, no_instance_decoder
from peft_export.runtime.embedding import ImagePlan
from peft_export.runtime.instances import InstanceOptions

# name -> "module:Class"; ``auto`` prefers them in this order among those the model can run
STRATEGIES: dict[str, str] = {
    "instance": "peft_export.runtime.instances:InstanceStrategy",
    "apg": "peft_export.runtime.apg:APGStrategy",
    "grid": "peft_export.runtime.auto:GridStrategy",
}
NEEDS_INSTANCE_DECODER = ("instance", "apg")
# With an instance decoder auto takes AIS (first in STRATEGIES), not APG: on the held-out DSB2018 tile, with exports
# of CPU finetunes (benchmarks/ais_vs_grid.py), AIS had the higher mSA (APG's masks are the prompt decoder's answer
# to one point, which a few CPU-minutes of training leave too small) and ran 5-10x faster (one watershed instead of
# one prompt-decoder call per seed). micro-sam's published figures favour APG for its fully trained models.
AUTO_WITH_DECODER = ("the model has an instance decoder; AIS measured better and faster than APG on CPU-finetuned "
                     "exports (--method apg: its seeds as point prompts)")
GRID_FALLBACK = ("this model has no instance decoder: automatic segmentation falls back to a grid of point prompts "
                 "(about 50x slower on a CPU, and weak for models not trained with points); `peft-export finetune "
                 "--instance-decoder` makes a decoder; --method grid says you want the grid")


class AutoOptions(Options):
    """Automatic segmentation: which strategy, and each strategy's settings."""

    family = "automatic segmentation"
    panel = "Automatic segmentation"

    method: Literal["auto", "instance", "apg", "grid"] = option(
        "auto", "instance: the export's instance decoder + seeded watershed (micro-sam's AIS; from finetune "
        "--instance-decoder); apg: the instance decoder's seeds as point prompts for the prompt decoder (micro-sam's "
        "APG); grid: a grid of point prompts, filtered; auto: instance when the model has an instance decoder, else "
        "grid.")
    link_3d: bool = option(False, "Stacks: link the objects of consecutive planes into 3D objects by their overlap "
                           "(micro-sam's merge_instance_segmentation_3d); without it labels are per plane.",
                           cli="--3d")
    grid: GridOptions = Field(default_factory=GridOptions)
    instance: InstanceOptions = Field(default_factory=InstanceOptions)
    apg: APGOptions = Field(default_factory=APGOptions)


class EmbeddedImage(Protocol):
    """What a strategy uses of a Segmenter whose image is set (embedded, or embedded tile by tile on demand)."""

    backend: Backend
    plan: ImagePlan
    batch_size: int  # tiles per encoder call

    @property
    def info(self) -> BackendInfo: ...

    def tile_embeddings(self, idx) -> np.ndarray: ...

    def release(self, idx) -> None: ...

    def map_tiles(self, fn, *, channels: int | None = None, blend: str = "core", progress=None) -> np.ndarray: ...


class Strategy(Protocol):
    name: str
    description: str  # one line: what runs

    def steps(self, image: EmbeddedImage) -> int: ...  # how many progress(1) calls segment makes

    def segment(self, image: EmbeddedImage, progress: Callable[[int], None] | None = None) -> np.ndarray: ...

    def advice(self) -> str | None: ...  # after segmenting: one line on what to train when results look poor


def _strategy_class(name: str):
    module, _, cls = STRATEGIES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def choose_strategy(info: BackendInfo, options: AutoOptions | None = None) -> tuple[Strategy, str]:
    """The strategy for ``options.method`` on a model described by ``info``, and one line saying why."""
    opts = options or AutoOptions()
    method = opts.method
    if method == "auto":
        method = next(n for n in STRATEGIES if info.instance_decoder or n not in NEEDS_INSTANCE_DECODER)
        why = (AUTO_WITH_DECODER if method in NEEDS_INSTANCE_DECODER else
               "the model has no instance decoder (finetune --instance-decoder trains one: faster and better)")
    else:
        why = f"--method {method}"
    if method in NEEDS_INSTANCE_DECODER and not info.instance_decoder:
        raise no_instance_decoder(info)
    if method in ("grid", "apg") and not info.prompt_decoder:
        raise UsageError(f"--method {method} needs a prompt decoder; {info.source} is an instance-segmentation "
                         "package without one: use --method instance (or auto), or the export folder")
    declared = info.details.get("instance_postprocessing")
    if method == "instance" and declared:  # a package's declared post-processing; the flags given override it
        opts = opts.replace(instance=InstanceOptions.from_dict({**declared, **opts.instance.given()}))
    if method == "apg" and (unused := opts.apg.unused()):
        why += f"; {', '.join(unused)} unused with --apg-merge {opts.apg.merge}"
    strategy = _strategy_class(method)(opts)
    return strategy, f"automatic segmentation: {strategy.description} ({why})"
