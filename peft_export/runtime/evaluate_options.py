"""``peft-export evaluate``'s options, apart from the evaluation code so that the command line stays light."""

from __future__ import annotations

from typing import Literal

from peft_export.options import Options, comma_list, option

PROMPT_TYPES = ("box", "point")
ALL_PROMPT_TYPES = (*PROMPT_TYPES, "auto")


class EvaluateOptions(Options):
    """What ``peft-export evaluate`` scores, and where a PyTorch model runs."""

    family = "evaluate"
    panel = "Evaluation"

    prompts: comma_list(Literal[ALL_PROMPT_TYPES], unique=True) = option(
        ["box", "point"], "Comma-separated prompt types: box (each object's bounding box), point (its most interior "
        "point), auto (segment everything, then match objects).", min_length=1)
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto", "Where a PyTorch model (a checkpoint or zoo name) runs: auto, cpu or cuda; exports use --backend.")
