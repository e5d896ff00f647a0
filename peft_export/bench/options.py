"""The benchmarks' option families, composed from the training and PEFT families (:func:`peft_export.options.
inherit`): a training option means the same, with the same help, in ``finetune`` and in ``benchmark``. Torch-free.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, create_model

from peft_export.options import Options, comma_list, inherit, option
from peft_export.peft.options import OPTIONS, options_class
from peft_export.runtime.backends import BACKENDS as RUNTIME_BACKENDS
from peft_export.train.config import TrainConfig

DEFAULT_METHODS = ("lora", "fact", "ssf", "late_ft", "attention")
DEFAULT_PLACEMENTS = ("all", "late:50%", "late:1")
INFER_BACKENDS = ("torch", *RUNTIME_BACKENDS)
INFER_PRECISIONS = ("fp32", "fp16", "int8")
STUDY_METRICS = ("mean_iou", "box_iou", "point_iou", "box_msa", "point_msa", "ais_msa")
STUDY_COSTS = ("peak_memory", "train_memory", "step_time", "train_time")


def _methods(value: list[str]) -> list[str]:
    for m in value:
        options_class(m)  # one line naming the methods
    return value


Methods = Annotated[comma_list(str), AfterValidator(_methods)]
METHODS_HELP = f"Comma-separated PEFT methods: {', '.join(OPTIONS)}."
PLACEMENTS_HELP = "Comma-separated block placements: all, late:N, late:P%, 6-11, 0,3,9."


class _Bench(Options):
    family = "benchmark"
    panel = "Benchmark"


class _TrainBench(_Bench):
    methods: Methods = option(["lora"], METHODS_HELP, min_length=1)
    placements: comma_list(str) = option(["all", "late:50%", "late:25%", "late:1"], PLACEMENTS_HELP, min_length=1)
    steps: int = option(5, "Timed training steps per case (after warm-up).", ge=1)
    warmup: int = option(1, "Untimed warm-up steps per case.", ge=0)
    trunk_cache: bool = option(False, "Cache the frozen early blocks' output (finetune's default; off here so step "
                               "times are the method's own).")
    baseline: str | None = option(None, "Case the ratios refer to.", default_text="lora all")
    memory: bool = option(True, "Peak memory per case in a fresh process (CPU: peak RSS; CUDA: max allocated).")
    loss: bool = option(True, "Record the training loss of every step.", cli=False)
    extra: dict[str, Any] = option({}, "Further finetune options (e.g. instance_decoder=True).", cli=False)


# benchmark train: the training step of finetune, per method x placement (random weights where none are bundled)
TrainSettings = create_model(
    "TrainSettings", __base__=_TrainBench, __module__=__name__,
    **inherit(TrainConfig, "model", "data", "checkpoint", "rank", "seed", "precision"),
    **inherit(TrainConfig, "device", "batch_size", "objects_per_image", "sub_iterations", device="cpu",
              batch_size=1, objects_per_image=4, sub_iterations=1))


class _Study(_Bench):
    methods: Methods = option(list(DEFAULT_METHODS), METHODS_HELP, min_length=1)
    placements: comma_list(str) = option(list(DEFAULT_PLACEMENTS), PLACEMENTS_HELP, min_length=1)
    budget: str = option("30", "The same training budget per case: steps (30) or minutes (5min; turned into steps "
                         "per case from its measured step time).")
    trunk_cache: bool = option(False, "finetune's frozen-trunk cache (off: step times are the methods' own, as in the "
                               "study).")
    metric: Literal[STUDY_METRICS] = option("mean_iou", "Quality for the recommendation: mean_iou (box and point), "
                                            "box_iou, point_iou, box_msa, point_msa, ais_msa.")
    cost: Literal[STUDY_COSTS] = option("peak_memory", "Cost for the recommendation.")
    margin: float = option(0.02, "Quality margin: the cheapest case within this of the best wins.", ge=0, lt=1)
    memory_steps: int = option(2, "Steps (after 1 warm-up) of each case's memory run, as benchmark train.", ge=1)
    baseline: str | None = option(None, "Case the ratios refer to.", default_text="lora all")
    keep_checkpoints: bool = option(False, "Keep each case's best.pt/latest.pt (default: removed once the case is "
                                    "measured).")


# benchmark study: quality x cost per case, each trained with finetune's recipe (its presets fill what is unset)
StudySettings = create_model(
    "StudySettings", __base__=_Study, __module__=__name__,
    **inherit(TrainConfig, "model", "data", "val", "checkpoint", "recipe", "seed", "batch_size", "objects_per_image",
              "sub_iterations", "lr", "rank", "instance_decoder"),
    **inherit(TrainConfig, "device", "precision", device="cpu", precision="fp32"))


class InferSettings(_Bench):
    """benchmark infer: encoder and decoder latency per backend x precision."""

    backends: comma_list(Literal[INFER_BACKENDS]) = option(list(INFER_BACKENDS), "Comma-separated backends.",
                                                           min_length=1)
    precisions: comma_list(Literal[INFER_PRECISIONS]) = option(list(INFER_PRECISIONS), "Comma-separated precisions "
                                                               "to include.", min_length=1)
    runs: int = option(10, "Timed runs per case (after warm-up).", ge=1)
    warmup: int = option(2, "Untimed warm-up runs per case.", ge=0)
    prompts: int = option(16, "Prompts in the batched decoder measurement.", ge=1)
    baseline: str | None = option(None, "Case (name or part of it) the ratios refer to.",
                                  default_text="PyTorch vanilla")
    memory: bool = option(True, "Peak RSS per case in a fresh process.")
