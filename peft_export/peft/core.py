"""Applying a PEFT configuration to a SAM model, counting what trains, and folding it back in."""

from __future__ import annotations

from dataclasses import dataclass

from segment_anything.modeling import Sam
from torch import nn

from peft_export.errors import UsageError
from peft_export.models.registry import model_family
from peft_export.peft.adaptformer import AdaptFormer
from peft_export.peft.base import PeftMethod, freeze, unfreeze
from peft_export.peft.fact import FacT
from peft_export.peft.lora import LoRA
from peft_export.peft.options import PeftConfig
from peft_export.peft.placement import resolve_placement
from peft_export.peft.selective import (
    AttentionTuning,
    BiasTuning,
    FrozenEncoder,
    FullFinetuning,
    LateFinetuning,
    LayerNormTuning,
)
from peft_export.peft.ssf import SSF

METHODS: dict[str, type[PeftMethod]] = {m.name: m for m in (
    LoRA, FacT, SSF, AdaptFormer, AttentionTuning, BiasTuning, LayerNormTuning, LateFinetuning,
    FrozenEncoder, FullFinetuning,
)}


def get_method(config: PeftConfig) -> PeftMethod:
    cls = METHODS.get(config.method)
    if cls is None:
        raise UsageError(f"unknown PEFT method {config.method!r}; choose one of: {', '.join(METHODS)}")
    return cls(**config.options)


def _family(model: Sam) -> str:
    return model_family(model)


@dataclass
class PeftState:
    config: PeftConfig
    method: PeftMethod
    family: str


def apply_peft(model: Sam, config: PeftConfig, model_name: str = "") -> PeftState:
    """Freeze the image encoder, apply ``config`` to its chosen blocks; prompt encoder and mask decoder train.

    Fills ``config.blocks`` (resolved placement) and ``config.options`` (with defaults) in place.
    """
    if getattr(model, "_peft_state", None) is not None:
        raise UsageError("this model already has a PEFT method applied")
    method = get_method(config)
    family = _family(model)
    n_blocks = len(model.image_encoder.blocks)
    if not method.uses_placement:
        blocks = []
    elif config.blocks is not None:  # a stored configuration: exactly the blocks it was trained with
        blocks = resolve_placement(list(config.blocks), n_blocks, model_name)
    else:
        blocks = resolve_placement(config.placement, n_blocks, model_name)
    freeze(model.image_encoder)
    unfreeze(model.prompt_encoder.parameters())
    unfreeze(model.mask_decoder.parameters())
    method.apply_global(model, family)
    method.apply(model, blocks, family)
    model.train(model.training)  # new modules (dropout) follow the model's mode
    config.blocks = blocks
    config.options = dict(method.options)
    state = PeftState(config, method, family)
    model._peft_state = state
    return state


def apply_peft_config(model: Sam, peft: dict | PeftConfig, model_name: str = "") -> PeftState:
    """Apply a stored PEFT configuration (from a checkpoint) so that its state dict loads strictly."""
    src = peft if isinstance(peft, PeftConfig) else PeftConfig.from_dict(peft)
    config = PeftConfig(src.method, src.placement, dict(src.options), src.blocks)
    return apply_peft(model, config, model_name)


def peft_state(model: Sam) -> PeftState | None:
    return getattr(model, "_peft_state", None)


def is_mergeable(model: Sam) -> bool:
    state = peft_state(model)
    return state is None or state.method.mergeable


def merge_peft(model: Sam) -> Sam:
    """Fold the applied method into plain weights in place (computed in fp32, stored in the model's dtype).

    Raises for AdaptFormer, and for an adapter holding NaN or infinite values (then nothing is changed).
    A merged model has no PEFT state: merging it again changes nothing.
    """
    state = peft_state(model)
    if state is None:
        return model
    state.method.merge(model, state.family)
    model._peft_state = None
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per part (encoder figures are what the study reports)."""
    def n(mod, trainable=True):
        return sum(p.numel() for p in mod.parameters() if p.requires_grad or not trainable)

    out = {"image_encoder": n(model.image_encoder), "prompt_encoder": n(model.prompt_encoder),
           "mask_decoder": n(model.mask_decoder)}
    out["total"] = sum(out.values())
    out["all_parameters"] = n(model, trainable=False)
    return out
