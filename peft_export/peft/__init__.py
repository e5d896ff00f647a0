"""PEFT methods for SAM image encoders, block placement, and exact merge into plain SAM weights.

    from peft_export.peft import PeftConfig, apply_peft, merge_peft
    state = apply_peft(model, PeftConfig("lora", "late:4", {"rank": 32}), "lite_medsam")
    ...train...
    merge_peft(model)   # plain segment_anything module tree and key names again
"""

from peft_export.peft.base import NotMergeableError, PeftConfig, PeftMethod
from peft_export.peft.core import (
    METHODS,
    apply_peft,
    apply_peft_config,
    count_parameters,
    get_method,
    is_mergeable,
    merge_peft,
    peft_state,
)
from peft_export.peft.placement import resolve_placement

__all__ = [
    "METHODS",
    "NotMergeableError",
    "PeftConfig",
    "PeftMethod",
    "apply_peft",
    "apply_peft_config",
    "count_parameters",
    "get_method",
    "is_mergeable",
    "merge_peft",
    "peft_state",
    "resolve_placement",
]
