"""PEFT methods for SAM image encoders, block placement, and exact merge into plain SAM weights.

    from peft_export.peft import PeftConfig, apply_peft, merge_peft
    state = apply_peft(model, PeftConfig("lora", "late:4", {"rank": 32}), "lite_medsam")
    ...train...
    merge_peft(model)   # plain segment_anything module tree and key names again

Importing this package does not import torch: the names below load their modules on first use, so the
torch-free option declarations (:mod:`peft_export.peft.options`) serve the CLI without PyTorch.
"""

from __future__ import annotations

from peft_export.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "METHODS": "core", "apply_peft": "core", "apply_peft_config": "core", "count_parameters": "core",
    "get_method": "core", "is_mergeable": "core", "merge_peft": "core", "peft_state": "core",
    "NotMergeableError": "base", "PeftMethod": "base",
    "PeftConfig": "options", "OPTIONS": "options",
    "resolve_placement": "placement",
})
